"""`make eval-demo`: the `make demo` encoder against a random-init encoder of the same config,
through the probes' own commands, on the real faces that ship offline.

    python -m pacofr.eval_demo [--encoder runs/demo/encoder.safetensors] [--output runs/eval-demo]

Faces: scikit-image's lfw_subset() (100 LFW faces and 100 non-faces, 25 x 25 gray) and the
astronaut's face (pacofr.data.sources), each resized to UPSCALE px (bicubic) so that dlib's
predictor has pixels to work with; the faces of alignment and pose get a PAD px black border,
so that the points dlib puts just outside the tight crops stay in the image. Labels, all of them
pseudo-labels on a tiny set except face vs non-face:

- alignment: the 68 points of dlib's iBUG 300-W shape predictor (face-recognition-models, the
  `demo-labels` extra), fitted with the whole crop as the face box (the images are face crops);
- pose: yaw, pitch and roll from a perspective-n-point fit of six of those points to a generic
  3D face (GENERIC_FACE_3D), written as AFLW2000-style .mat files for `pacofr eval-pose`;
- attributes: face vs non-face, lfw_subset's own label.

Split: even indices train, odd ones test. The landmarks are cached under OUTPUT/labels/, keyed
by the image's and the predictor file's hashes. Parsing and verification are left out: no
parsing maps nor identities come with these images.
"""

import argparse
import contextlib
import csv
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

UPSCALE = 150  # px: the 25 px LFW crops are too small for dlib's predictor
PAD = 15  # px of black around each face crop: its jaw points fall a few pixels outside the tight crops
PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
MISSING = ("the eval demo's pseudo-labels need dlib's shape predictor: "
           "pip install -e \".[demo-labels]\" (face-recognition-models, dlib-bin)")

# A generic 3D face (arbitrary units; x right, y up, z towards the viewer, nose tip at the
# origin): the six-point model of LearnOpenCV's head-pose tutorial (S. Mallick, 2016), with the
# iBUG 68-point indices it stands for: nose tip, chin, outer eye corners, mouth corners.
GENERIC_FACE_3D = np.array([[0.0, 0.0, 0.0], [0.0, -330.0, -65.0], [-225.0, 170.0, -135.0],
                            [225.0, 170.0, -135.0], [-150.0, -150.0, -125.0], [150.0, -150.0, -125.0]])
GENERIC_FACE_POINTS = (30, 8, 36, 45, 48, 54)
TO_CAMERA = np.array([1.0, -1.0, -1.0])  # the model into the camera's axes (y down, z away): frontal is R = I


# --- faces ---------------------------------------------------------------------------------

def _rgb(a: np.ndarray) -> np.ndarray:
    im = Image.fromarray(a if a.dtype == np.uint8 else np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8))
    return np.asarray(im.convert("RGB").resize((UPSCALE, UPSCALE), Image.BICUBIC))


def demo_images() -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray, int]]]:
    """(faces: [(name, RGB uint8 [S, S, 3])], the 100 LFW faces and the astronaut's, each crop
    UPSCALE px with PAD px of black around it (S = UPSCALE + 2 PAD); face vs non-face: [(name,
    UPSCALE px image, 1 or 0)], lfw_subset's 200 images, unpadded)."""
    from skimage import data

    from .data.sources import ASTRONAUT_FACE_BOX, N_LFW_FACES

    lfw = data.lfw_subset()
    labelled = [(f"lfw_{i:03d}", _rgb(a), int(i < N_LFW_FACES)) for i, a in enumerate(lfw)]
    astro = np.asarray(Image.fromarray(data.astronaut()).crop(ASTRONAUT_FACE_BOX))
    faces = [(n, _padded(im)) for n, im, face in labelled if face] + [("astronaut", _padded(_rgb(astro)))]
    return faces, labelled


def _padded(image: np.ndarray) -> np.ndarray:
    return np.pad(image, ((PAD, PAD), (PAD, PAD), (0, 0)))


def split(index: int) -> str:
    return "train" if index % 2 == 0 else "test"


# --- pseudo-labels -------------------------------------------------------------------------

def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def image_hash(image: np.ndarray) -> str:
    return hashlib.sha256(repr((image.shape, str(image.dtype))).encode() + image.tobytes()).hexdigest()


def cached_landmarks(images: list[np.ndarray], predict, model_file: str | Path, cache: str | Path) -> list[np.ndarray]:
    """`predict(image)` -> [K, 2] for each image, read from `cache`/<model hash>/<image hash>.npy
    when there, else computed and stored: a new predictor file or a changed image is recomputed."""
    folder = Path(cache) / file_hash(model_file)[:16]
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for image in images:
        path = folder / f"{image_hash(image)[:32]}.npy"
        if path.is_file():
            out.append(np.load(path))
            continue
        points = np.asarray(predict(image), dtype=np.float64)
        tmp = path.with_name(f".{path.name}")  # (atomic: an interrupted run leaves no half entry)
        with open(tmp, "wb") as f:
            np.save(f, points)
        tmp.replace(path)
        out.append(points)
    return out


def predictor_file(name: str = PREDICTOR_68) -> Path:
    """The shape predictor file inside face-recognition-models, found without importing it (its
    __init__ needs pkg_resources, gone from recent setuptools). ImportError when absent."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or importlib.util.find_spec("dlib") is None:
        raise ImportError(MISSING)
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise ImportError(f"{path}: not found; {MISSING}")
    return path


def dlib_predictor(model_file: Path, margin: int = PAD):
    """image -> [68, 2] points (x, y pixels), the face box the image less `margin` px on each
    side (the face crop inside its padding)."""
    import dlib

    shape = dlib.shape_predictor(str(model_file))

    def predict(image: np.ndarray) -> np.ndarray:
        box = dlib.rectangle(margin, margin, image.shape[1] - 1 - margin, image.shape[0] - 1 - margin)
        parts = shape(np.ascontiguousarray(image), box).parts()
        return np.array([(p.x, p.y) for p in parts], dtype=np.float64)

    return predict


# --- head pose -----------------------------------------------------------------------------

def project(rotvec: np.ndarray, t: np.ndarray, points3d: np.ndarray, focal: float, centre) -> np.ndarray:
    """Pinhole projection of [N, 3] camera-axis points rotated by `rotvec` and moved by `t`."""
    from scipy.spatial.transform import Rotation

    cam = points3d @ Rotation.from_rotvec(rotvec).as_matrix().T + t
    return focal * cam[:, :2] / cam[:, 2:3] + np.asarray(centre, dtype=np.float64)


def fit_pose(points2d: np.ndarray, size: tuple[int, int],
             model: np.ndarray = GENERIC_FACE_3D) -> tuple[np.ndarray, np.ndarray]:
    """[N, 2] image points of the `model`'s [N, 3] points -> ((yaw, pitch, roll) degrees, the
    translation): least squares over a rotation vector and a translation, with a pinhole camera
    of focal length the image width, centred (no distortion). R = Rx(pitch) Ry(yaw) Rz(roll) in
    the camera's axes (x right, y down, z away from the camera); the frontal face is 0."""
    from scipy.optimize import least_squares
    from scipy.spatial.transform import Rotation

    width, height = size
    focal, centre = float(width), (width / 2.0, height / 2.0)
    model = model * TO_CAMERA
    spread = np.linalg.norm(points2d - points2d.mean(0), axis=1).mean()
    z = focal * np.linalg.norm(model - model.mean(0), axis=1).mean() / max(spread, 1e-6)
    xy = (points2d.mean(0) - centre) * z / focal
    start = np.concatenate([np.zeros(3), xy, [z]])
    fit = least_squares(lambda p: (project(p[:3], p[3:], model, focal, centre) - points2d).ravel(), start)
    pitch, yaw, roll = Rotation.from_rotvec(fit.x[:3]).as_euler("XYZ", degrees=True)
    return np.array([yaw, pitch, roll]), fit.x[3:]


def write_pose_mat(path: Path, angles: np.ndarray, translation: np.ndarray, points: np.ndarray) -> None:
    """An AFLW2000-3D style .mat: Pose_Para (1 x 7: pitch, yaw, roll in radians, then a scale
    (unused: 0) and the translation) and pt2d (2 x 68, the points that give the face box)."""
    from scipy.io import savemat

    yaw, pitch, roll = np.radians(angles)
    savemat(path, {"Pose_Para": np.array([[pitch, yaw, roll, 0.0, *translation]]), "pt2d": points.T.astype(np.float64)})


# --- probe inputs and runs -----------------------------------------------------------------

def write_inputs(out: Path, faces, labelled, landmarks) -> None:
    """The probes' input files under `out`: faces/{train,test}/NAME.png with NAME.mat beside
    them and faces/{train,test}.csv (68 points), and face/{train,test}/ with face/{train,test}.csv."""
    rows = {"train": [], "test": []}
    for i, ((name, image), points) in enumerate(zip(faces, landmarks)):
        folder = out / "faces" / split(i)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{name}.png")
        angles, t = fit_pose(points[list(GENERIC_FACE_POINTS)], (image.shape[1], image.shape[0]))
        write_pose_mat(folder / f"{name}.mat", angles, t, points)
        rows[split(i)].append([f"{name}.png", *np.round(points.ravel(), 2)])
    for s, r in rows.items():
        header = ["path"] + [f"{c}{k}" for k in range(len(landmarks[0])) for c in "xy"]
        _write_csv(out / "faces" / f"{s}.csv", header, r)
    rows = {"train": [], "test": []}
    for i, (name, image, face) in enumerate(labelled):
        folder = out / "face" / split(i)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{name}.png")
        rows[split(i)].append([f"{name}.png", int(face)])
    for s, r in rows.items():
        _write_csv(out / "face" / f"{s}.csv", ["path", "face"], r)


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# (probe, command, the inputs folder, the labels option's value for a split or None: beside the images)
PROBES = (("alignment", "eval-alignment", "faces", "--{s}-landmarks", lambda d, s: d / "faces" / f"{s}.csv"),
          ("pose", "eval-pose", "faces", "--{s}-labels", None),
          ("attributes", "eval-attributes", "face", "--{s}-labels", lambda d, s: d / "face" / f"{s}.csv"))


def run_probes(inputs: Path, encoder: str | Path, out: Path, min_test: int | None = None) -> dict:
    """Each probe's command run on `encoder` -> {probe: its JSON}; its printout to out/PROBE.log.
    A failed command raises, naming its log."""
    from .cli import main

    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for probe, command, folder, option, labels in PROBES:
        argv = [command, "--encoder", str(encoder), "--workers", "0", "--output", str(out / f"{probe}.json")]
        for s in ("train", "test"):
            argv += [f"--{s}", str(inputs / folder / s)]
            if labels is not None:
                argv += [option.format(s=s), str(labels(inputs, s))]
        if min_test is not None:
            argv += ["--min-test", str(min_test)]
        log = out / f"{probe}.log"
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            rc = main(argv)
        if rc != 0:
            last = (log.read_text().strip().splitlines() or [""])[-1]
            raise RuntimeError(f"pacofr {command} failed (exit {rc}, {log}): {last}")
        results[probe] = json.loads((out / f"{probe}.json").read_text())
    return results


def random_encoder(pretrained: str | Path, out: Path, seed: int = 0) -> Path:
    """An encoder of the pretrained one's config with its initial (random) weights, seeded."""
    from .model import ViTEncoder, save_encoder, weights_config

    cfg = weights_config(pretrained)
    torch.manual_seed(seed)
    encoder = ViTEncoder.from_config(cfg.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_encoder(encoder.state_dict(), out, cfg.model)


# --- the table -----------------------------------------------------------------------------

# (probe, metric, value in its JSON, the floor's, n train, n test; lower_is_better)
METRICS = (("alignment", "NME inter-ocular %, 68 pts", ("nme",), ("mean_shape_nme",), "train_faces", "test_faces",
            True),
           ("pose", "MAE mean of yaw/pitch/roll, deg", ("mae", "mean"), ("mean_pose_mae", "mean"),
            "train_images", "test_images", True),
           ("pose", "MAE yaw, deg", ("mae", "yaw"), ("mean_pose_mae", "yaw"), "train_images", "test_images", True),
           ("attributes", "accuracy face vs non-face %", ("mean_accuracy",), ("majority_mean_accuracy",),
            "train_images", "test_images", False))
LABELS = {"alignment": "pseudo (dlib 68 points)", "pose": "pseudo (PnP of dlib points)",
          "attributes": "real (lfw_subset face / non-face)"}


def _get(d: dict, keys: tuple):
    for k in keys:
        d = d[k]
    return d


def table_rows(pretrained: dict, random: dict) -> list[dict]:
    """The rows of the two encoders' probe results ({probe: JSON}), for the probes both have."""
    rows = []
    for probe, metric, value, floor, n_train, n_test, lower in METRICS:
        if probe not in pretrained or probe not in random:
            continue
        p, r = pretrained[probe], random[probe]
        rows.append({"probe": probe, "metric": metric, "labels": LABELS[probe], "pretrained": _get(p, value),
                     "random_init": _get(r, value), "floor": _get(p, floor), "lower_is_better": lower,
                     "n_train": p[n_train], "n_test": p[n_test]})
    return rows


def format_table(rows: list[dict]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [("probe", "metric", "pretrained", "random-init", "floor", "n (train/test)", "labels")]
    lines += [(r["probe"], r["metric"], fmt(r["pretrained"]), fmt(r["random_init"]), fmt(r["floor"]),
               f"{r['n_train']}/{r['n_test']}", r["labels"]) for r in rows]
    widths = [max(len(line[k]) for line in lines) for k in range(len(lines[0]))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:]])


# --- the demo ------------------------------------------------------------------------------

def run_demo(encoder: str | Path, output: str | Path) -> dict:
    output = Path(output)
    if not Path(encoder).is_file():
        raise FileNotFoundError(f"--encoder '{encoder}': no such file (run `make demo` first)")
    model_file = predictor_file()
    faces, labelled = demo_images()
    landmarks = cached_landmarks([im for _, im in faces], dlib_predictor(model_file), model_file, output / "labels")
    inputs = output / "inputs"
    write_inputs(inputs, faces, labelled, landmarks)
    rand = random_encoder(encoder, output / "random-init.safetensors")
    pretrained = run_probes(inputs, encoder, output / "probes" / "pretrained")
    random = run_probes(inputs, rand, output / "probes" / "random-init")
    rows = table_rows(pretrained, random)
    result = {"note": "pseudo-labels on a tiny set: landmarks from dlib's 68-point predictor, pose from a PnP fit "
                      "of them to a generic 3D face; only face vs non-face is a real label",
              "encoder": str(encoder), "random_init": str(rand), "predictor": model_file.name,
              "upscale_px": UPSCALE, "rows": rows}
    (output / "results.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pacofr.eval_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default="runs/demo/encoder.safetensors", help="the pretrained encoder (make demo's)")
    p.add_argument("--output", default="runs/eval-demo", help="folder of the inputs, labels and results.json")
    args = p.parse_args(argv)
    try:
        result = run_demo(args.encoder, args.output)
    except (ImportError, FileNotFoundError, RuntimeError) as e:
        print(f"eval-demo: error: {e}", file=sys.stderr)
        return 2
    print("eval demo: pseudo-labels on a tiny set (only face vs non-face is a real label); "
          "floor: mean shape / mean pose / majority class")
    print(format_table(result["rows"]))
    print(f"written: {Path(args.output) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
