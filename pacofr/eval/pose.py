"""Head pose probe: how well the frozen encoder's features give yaw, pitch and roll.

    pacofr eval-pose --encoder runs/demo/encoder.safetensors \\
        --train 300W_LP --test AFLW2000 [--output pose.json]

The protocol of 300W-LP -> AFLW2000-3D (Hopenet, FSA-Net, 6DRepNet): every image has a `.mat`
beside it (same name) holding `Pose_Para` (1 x 7: pitch, yaw, roll in radians, then scale
and translation) and the landmarks that give the face box: `pt3d_68` (3 x 68, x and y rows in
the image's pixels: AFLW2000-3D) or else `pt2d` (2 x K; negative coordinates mark missing
points: 300W-LP's 68, AFLW2000's 21). The face is cropped from the landmarks' box enlarged as
Hopenet's test loader does (k = 0.2: 2k of its width on each side, 2k of its height above,
0.6k below), then squared around its centre on its longer side, clipped to the image.
Test faces with any angle outside [-99, 99] degrees are dropped and counted
("pose_out_of_range"; AFLW2000-3D keeps 1969 of its 2000 faces), train faces are kept.

BIWI (Fanelli et al., IJCV 2013), as its release ships it (`BiwiFaces`): subject folders `NN/`
of `frame_XXXXX_rgb.png` frames, each with `frame_XXXXX_pose.txt` (the head's 3 x 3 rotation,
three lines, a blank line, then its centre in mm, in the depth camera's frame) and one
`rgb.cal` a folder (the RGB camera's 3 x 3 intrinsics, a blank line, a distortion line, a
blank line, the 3 x 3 rotation and, after a blank line, the translation that take the depth
camera's frame to the RGB camera's; then the image size). The angles are those of the public
300W-LP -> BIWI protocol's labels (FSA-Net's preprocessing, 6DRepNet's too): pitch, -yaw and
-roll are the x-y-z Euler angles of the file's rotation transposed (R^T = Rz Ry Rx). BIWI
gives no face box: the crop is the square of HEAD_MM millimetres at the head centre's depth
around its projection into the RGB frame (rgb.cal's R c + t through its intrinsics; the
distortion line is not used).

Features: the patch tokens pooled to `grid` x `grid` (alignment.features); one ridge
regression (streamed statistics, penalty chosen on a held-out tenth of the train images) to
the three angles in degrees. Score: the mean absolute error of yaw, pitch and roll in degrees
and their mean, beside the train set's mean pose as the floor.
"""

import os

import numpy as np
import torch

from ..data.items import MAX_PIXELS
from ..data.sources import image_files, source_root
from .alignment import PREVIEW, features
from .common import (MIN_TEST, Skipped, Stats, autocast, batches, check_test_size, fit_on_held_out, held_out,
                     skipped_files)
from .formats import BoxedFaces, Face, points_box

ANGLES = ("yaw", "pitch", "roll")
LIMIT = 99.0  # degrees: test faces beyond it are dropped
HOPENET_K = 0.2
HEAD_MM = 250.0  # BIWI's crop side at the head's depth: a head with a margin, near the AFLW2000-3D crop's
BIWI_FRAME = "_rgb.png"


def read_pose(path: str) -> Face:
    """The face of one pose .mat (its key left empty): angles in degrees (yaw, pitch, roll) in
    `extra["pose"]` and the landmarks' box, or a problem: "labels_invalid" (unreadable, no
    Pose_Para, not finite), "no_face_box" (no usable pt3d_68 / pt2d points)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path)
        pitch, yaw, roll = np.asarray(mat["Pose_Para"], dtype=np.float64).reshape(-1)[:3]
    except (MatReadError, ValueError, TypeError, KeyError, NotImplementedError, OSError):
        return Face("", problem="labels_invalid")
    pose = np.degrees([yaw, pitch, roll])
    if not np.isfinite(pose).all():
        return Face("", problem="labels_invalid")
    points = None
    for name in ("pt3d_68", "pt2d"):
        if name in mat and np.asarray(mat[name]).ndim == 2 and np.asarray(mat[name]).shape[0] >= 2:
            p = np.asarray(mat[name], dtype=np.float64)[:2].T
            p = p[np.isfinite(p).all(1) & (p >= 0).all(1)]
            if len(p) >= 2:
                points = p
                break
    if points is None:
        return Face("", problem="no_face_box")
    x0, y0, x1, y1 = points_box(points)
    if not (x1 > x0 and y1 > y0):
        return Face("", problem="no_face_box")
    w, h = x1 - x0, y1 - y0
    k = HOPENET_K
    return Face("", points, (x0 - 2 * k * w, y0 - 2 * k * h, x1 + 2 * k * w, y1 + 0.6 * k * h), extra={"pose": pose})


class PoseFaces(BoxedFaces):
    """The faces of a folder of images with a pose .mat each (under `labels`, default the
    image folder, at the image's relative path): (image, [yaw, pitch, roll] degrees) items.
    `drop_beyond`: faces with an angle outside +-this many degrees are skipped (the test set's
    rule), None keeps them. An image without its .mat is counted ("no_pose")."""

    kind = "images with a pose .mat each (300W-LP, AFLW2000-3D)"
    protocol = "300W-LP -> AFLW2000-3D head pose (Hopenet's)"
    conventions = {"angles": "Pose_Para[:3] = pitch, yaw, roll in radians, reported in degrees",
                   "face_box": "pt3d_68 (x, y rows), else pt2d without negative points",
                   "crop": f"the landmarks' box enlarged as Hopenet's test loader (k = {HOPENET_K}), squared on its "
                           "longer side, clipped to the image"}

    def __init__(self, source: str, labels: str | None, img_size: int, what: str = "--train",
                 max_pixels: int = MAX_PIXELS, drop_beyond: float | None = None):
        keys = image_files(source, what)[1]
        folder = labels or source_root(source)
        if not os.path.isdir(folder):
            raise ValueError(f"{what}-labels '{folder}': give the folder of the pose .mat files (beside the images "
                             "in 300W-LP and AFLW2000-3D: the image folder itself)")
        faces = []  # (the .mat files are read by the items, in the loader's workers)
        for key in keys:
            mat = os.path.join(folder, os.path.splitext(key)[0] + ".mat")
            faces.append(Face(key, extra={"mat": mat}) if os.path.exists(mat) else Face(key, problem="no_pose"))
        if all(f.problem == "no_pose" for f in faces):
            raise ValueError(f"{what} '{source}': no image has its pose .mat beside it under '{folder}' "
                             f"(e.g. '{os.path.splitext(keys[0])[0]}.mat')")
        super().__init__(source, faces, img_size, what, max_pixels, margin=1.0)
        self.drop_beyond = drop_beyond

    def read_face(self, face: Face) -> Face:
        """The face's labels read (in the loader's workers)."""
        return read_pose(face.extra["mat"])

    def __getitem__(self, index: int):
        face = self.faces[index]
        if face.problem is None:
            face = self.read_face(face)
            beyond = self.drop_beyond is not None and np.abs(face.extra.get("pose", 0)).max() > self.drop_beyond
            face.problem = "pose_out_of_range" if face.problem is None and beyond else face.problem
        item, reason = self.item(index, face)
        if item is None:
            return None, reason
        return (item[0], torch.cat([item[1], torch.tensor(face.extra["pose"], dtype=torch.float64)])), None


# -- BIWI ---------------------------------------------------------------------------------------------
def _rows(path: str) -> list[list[float]] | None:
    """The numbers of a text file, one list a non-blank line, or None when it does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [[float(v) for v in line.split()] for line in f if line.strip()]
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    return rows if all(np.isfinite(r).all() for r in rows) else None


def read_biwi_pose(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(rotation [3, 3], head centre [3] in mm) of a BIWI `_pose.txt`, or None."""
    rows = _rows(path)
    if rows is None or [len(r) for r in rows] != [3, 3, 3, 3]:
        return None
    return np.array(rows[:3]), np.array(rows[3])


def read_calibration(path: str) -> dict | None:
    """{"K": [3, 3], "R": [3, 3], "t": [3]} of a BIWI `rgb.cal`, or None when it is not
    intrinsics, a distortion line, a rotation and a translation (then anything: the size)."""
    rows = _rows(path)
    if rows is None or len(rows) < 8 or [len(r) for r in rows[:3] + rows[4:8]] != [3] * 7:
        return None
    k = np.array(rows[:3])
    return {"K": k, "R": np.array(rows[4:7]), "t": np.array(rows[7])} if k[0, 0] > 0 and k[1, 1] > 0 else None


def _folder_calibration(folder: str) -> dict | str:
    """The `rgb.cal` of a subject folder, or the reason its frames are skipped."""
    path = os.path.join(folder, "rgb.cal")
    if not os.path.isfile(path):
        return "no_calibration"
    return read_calibration(path) or "calibration_invalid"


def biwi_angles(rotation: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) in degrees of a BIWI rotation (module doc: R^T = Rz(-roll) Ry(-yaw) Rx(pitch))."""
    r = np.asarray(rotation, dtype=np.float64).T
    pitch = np.arctan2(r[2, 1], r[2, 2])
    yaw = -np.arctan2(-r[2, 0], np.hypot(r[2, 1], r[2, 2]))
    roll = -np.arctan2(r[1, 0], r[0, 0])
    return np.degrees([yaw, pitch, roll])


def biwi_box(centre: np.ndarray, cal: dict) -> tuple | None:
    """The crop (x0, y0, x1, y1) in the RGB frame's pixels: the square of HEAD_MM at the head
    centre's depth around its projection; None when the centre is not in front of the camera."""
    x, y, z = cal["R"] @ np.asarray(centre, dtype=np.float64) + cal["t"]
    if not z > 0:
        return None
    (fx, _, cx), (_, fy, cy) = cal["K"][:2]
    u, v, half = fx * x / z + cx, fy * y / z + cy, HEAD_MM * fx / z / 2
    return (u - half, v - half, u + half, v + half)


def is_biwi(source: str) -> bool:
    """Whether `source` is a BIWI folder: an `rgb.cal` in it or in one of its folders."""
    if not os.path.isdir(source):
        return False
    return os.path.isfile(os.path.join(source, "rgb.cal")) or any(
        e.is_dir() and os.path.isfile(os.path.join(e.path, "rgb.cal")) for e in os.scandir(source))


class BiwiFaces(PoseFaces):
    """The frames of BIWI (module doc) under `source` (the release's folder of subject folders,
    or one of them): (image, [yaw, pitch, roll] degrees) items. Skipped and counted: a frame
    without its `_pose.txt` ("no_pose"), in a folder without `rgb.cal` ("no_calibration") or
    whose rgb.cal does not parse ("calibration_invalid"), a pose file that does not parse
    ("labels_invalid"), a centre behind the camera ("no_face_box")."""

    kind = "BIWI frames with their _pose.txt and rgb.cal"
    protocol = "300W-LP -> BIWI head pose (the public protocol's labels; the crop from the annotated head centre)"
    conventions = {"angles": "pitch, -yaw, -roll = the x-y-z Euler angles of the transposed _pose.txt rotation "
                             "(R^T = Rz Ry Rx), in degrees, as FSA-Net's BIWI labels",
                   "face_box": "the head centre taken to the RGB camera by rgb.cal's rotation and translation "
                               "(R c + t) and projected by its intrinsics (its distortion line not used)",
                   "crop": f"the square of {HEAD_MM:g} mm at the centre's depth (HEAD_MM x fx / z pixels) around its "
                           "projection, clipped to the image (published BIWI figures crop with a face detector)"}

    def __init__(self, source: str, img_size: int, what: str = "--test", max_pixels: int = MAX_PIXELS,
                 drop_beyond: float | None = None):
        keys = [k for k in image_files(source, what)[1] if k.endswith(BIWI_FRAME)]
        if not keys:
            raise ValueError(f"{what} '{source}': no BIWI frame here (NN/frame_XXXXX{BIWI_FRAME})")
        root, calibrations, faces = source_root(source), {}, []
        for key in keys:
            folder = os.path.join(root, os.path.dirname(key))
            if folder not in calibrations:
                calibrations[folder] = _folder_calibration(folder)
            cal, pose = calibrations[folder], os.path.join(root, key[: -len(BIWI_FRAME)] + "_pose.txt")
            if isinstance(cal, str):
                faces.append(Face(key, problem=cal))
            elif not os.path.isfile(pose):
                faces.append(Face(key, problem="no_pose"))
            else:
                faces.append(Face(key, extra={"pose_file": pose, "cal": cal}))
        BoxedFaces.__init__(self, source, faces, img_size, what, max_pixels, margin=1.0)
        self.drop_beyond = drop_beyond

    def read_face(self, face: Face) -> Face:
        read = read_biwi_pose(face.extra["pose_file"])
        if read is None:
            return Face(face.key, problem="labels_invalid")
        box = biwi_box(read[1], face.extra["cal"])
        if box is None:
            return Face(face.key, problem="no_face_box")
        return Face(face.key, box=box, extra={"pose": biwi_angles(read[0])})


def _features(encoder, images: torch.Tensor, grid: int, device) -> torch.Tensor:
    """alignment.features under autocast, in float32 (the ridge's sums run outside it, in float64)."""
    with autocast(device):
        return features(encoder, images.to(device), grid).float()


def mae(pred: torch.Tensor, truth: torch.Tensor) -> dict:
    """Mean absolute error (degrees) of each angle and their mean."""
    per = (pred - truth).abs().mean(0)
    return {**{a: float(v) for a, v in zip(ANGLES, per)}, "mean": float(per.mean())}


def evaluate(encoder, train: PoseFaces, test: PoseFaces, grid: int = 2, batch_size: int = 64, workers: int = 2,
             holdout: float = 0.1, seed: int = 0, min_test: int = MIN_TEST, occlusion=None) -> dict:
    """Fits the probe on `train` (one pass), scores it and the train mean pose on `test`;
    `occlusion` (occlusion.Occlusion): the mean MAE at each of its levels too."""
    device = next(encoder.parameters()).device
    grid = min(grid, *encoder.grid)
    width = grid * grid * encoder.embed_dim
    usable = [i for i, f in enumerate(train.faces) if f.problem is None]
    held, rest = held_out(usable, len(train), holdout, seed)
    fit, val = Stats(width, 3, device), Stats(width, 3, device)
    skipped_train, skipped_test = Skipped(train), Skipped(test)
    for part, stats in ((held, val), (rest, fit)):
        for images, meta in batches(train, batch_size, workers, skipped_train, part):
            stats.add(_features(encoder, images, grid, device), meta[:, 5:].to(device))
    if not fit.n or not val.n:
        raise ValueError(f"the probe needs usable train images in both its fit and held-out parts "
                         f"(skipped: {skipped_train.counts})")
    (w, b), search = fit_on_held_out(fit, val)
    mean_pose = (fit.sy + val.sy) / (fit.n + val.n)

    def predict(dataset, skipped: Skipped):
        """(predictions, truths [N, 3], face indices) of `dataset`'s usable faces."""
        preds, truths, index = [], [], []
        for images, meta in batches(dataset, batch_size, workers, skipped):
            preds.append((_features(encoder, images, grid, device).double() @ w + b).cpu())
            truths.append(meta[:, 5:])
            index.append(meta[:, 0].long())
        if not truths:
            raise ValueError(f"{test.what} '{test.source}': no usable test face (skipped: {skipped.counts})")
        return torch.cat(preds), torch.cat(truths), torch.cat(index)

    pred, truth, index = predict(test, skipped_test)
    n = len(truth)
    check_test_size(n, min_test, test)
    robustness = {}
    if occlusion is not None:
        mean_mae = lambda dataset: mae(*predict(dataset, Skipped(test))[:2])["mean"]  # noqa: E731
        robustness["robustness"] = occlusion.sweep(test, mean_mae, "mae_mean", lower_is_better=True)
    return {"protocol": test.protocol, "angles": list(ANGLES),
            "conventions": {"train": train.kind, "test": test.kind, **test.conventions,
                            "test_drop": f"test faces with an angle outside [-{LIMIT:g}, {LIMIT:g}] degrees"},
            "mae": mae(pred, truth), "mean_pose_mae": mae(mean_pose.cpu().expand_as(truth), truth),
            "train_images": fit.n + val.n, "test_images": n, "features": width, "grid": grid, **search,
            "skipped_train": skipped_train.counts, "skipped_test": skipped_test.counts,
            "skipped_files": skipped_files(train=skipped_train, test=skipped_test),
            "preview": [(int(i), p, t) for i, p, t in zip(index, pred, truth)][:PREVIEW], **robustness}


__all__ = ["PoseFaces", "BiwiFaces", "read_pose", "read_biwi_pose", "read_calibration", "biwi_angles", "biwi_box",
           "is_biwi", "mae", "evaluate", "ANGLES", "LIMIT", "HEAD_MM"]
