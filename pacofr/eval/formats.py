"""The benchmarks' own annotation files, read into faces (`Face`: an image, its landmarks, its
face box, its subsets), and the dataset that crops each face from its box (`BoxedFaces`).

- WFLW: `list_98pt_rect_attr_{train,test}.txt`, one face a line: 196 coordinates (x y of the
  98 points), the box (x_min y_min x_max y_max), 6 flags (pose, expression, illumination,
  make-up, occlusion, blur) and the image name, relative to the image folder.
- 300W: a `.pts` file beside each image (`version: 1`, `n_points: 68`, `{`, 68 lines `x y`,
  `}`), looked up under the landmarks folder at the image's relative path; an image under a
  folder named `ibug` is in the challenging subset, any other in the common one.
- COFW: the release's `COFW_{train,test}_color.mat`: the images (`IsTr` / `IsT`, a cell of
  arrays) and `phisTr` / `phisT` (one row a face: 29 x, 29 y, 29 occlusion flags, 1 occluded).
- AFLW-19: `AFLWinfo_release.mat` (the 19-point AFLW release of Zhu et al., CVPR 2016):
  `nameList` (image names under the image folder), `data` (x1..x19, y1..y19), `bbox` (left,
  right, top, bottom), `mask_new` (1: visible) and `ra` (a 1-based permutation: its first 20000
  faces train, the rest test); the frontal subset is the test faces with every point visible.

Faces are cropped to the square of side MARGIN x the longer side of the dataset's box (WFLW,
AFLW-19) or of the landmarks' box (300W, COFW), around its centre (the 1.25 of HRNet's face
alignment pipelines), clipped to the image.
"""

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..data.items import MAX_PIXELS
from ..data.landmarks import norm_key
from ..data.sources import source_root
from ..data.transforms import FaceTransform
from .common import FaceImages

MARGIN = 1.25
WFLW_SUBSETS = ("pose", "expression", "illumination", "make-up", "occlusion", "blur")
AFLW_TRAIN = 20000  # the first faces of `ra` are the train split


@dataclass
class Face:
    """One annotated face: `key` names its image (relative to the image folder), `points` [K, 2]
    in its pixels, `box` (x0, y0, x1, y1) or None (the landmarks' box), `subsets` it belongs to,
    `occluded` [K] flags or None, `problem` a skip reason of its annotation."""

    key: str
    points: np.ndarray | None = None
    box: tuple | None = None
    subsets: tuple = ()
    occluded: np.ndarray | None = None
    problem: str | None = None
    extra: dict = field(default_factory=dict)


def square_box(x0: float, y0: float, x1: float, y1: float, margin: float) -> tuple:
    """(x0, y0, w, h) of the square of side margin x the longer side of the box, same centre."""
    side = margin * max(x1 - x0, y1 - y0)
    return ((x0 + x1 - side) / 2, (y0 + y1 - side) / 2, side, side)


def points_box(points: np.ndarray) -> tuple:
    return (*points.min(0).tolist(), *points.max(0).tolist())


# -- readers -----------------------------------------------------------------------------------------
def read_wflw(path: str, what: str) -> list[Face]:
    """The faces of a WFLW list; a line that is not 196 + 4 + 6 numbers and a name is a face
    with problem "labels_invalid" (keyed by its name, or FILE:LINE)."""
    faces = []
    for n, line in enumerate(_text_lines(path, what), 1):
        cols = line.split()
        if not cols:
            continue
        key = norm_key(cols[-1]) if len(cols) > 1 else f"{path}:{n}"
        try:
            values = np.array([float(c) for c in cols[:-1]])
        except ValueError:
            values = None
        if len(cols) != 207 or values is None or not np.isfinite(values).all():
            faces.append(Face(key, problem="labels_invalid"))
            continue
        flags = values[200:206] != 0
        faces.append(Face(key, values[:196].reshape(98, 2), tuple(values[196:200]),
                          tuple(s for s, f in zip(WFLW_SUBSETS, flags) if f)))
    return faces


def read_pts(path: str) -> np.ndarray | None:
    """The points of a .pts file ([K, 2]), or None when it does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        head = dict(ln.split(":", 1) for ln in lines[: lines.index("{")])
        body = lines[lines.index("{") + 1 : lines.index("}")]
        points = np.array([[float(v) for v in ln.split()] for ln in body])
    except (ValueError, UnicodeDecodeError):
        return None
    k = int(head.get("n_points", -1)) if head.get("n_points", "").strip().isdigit() else -1
    ok = points.ndim == 2 and points.shape == (k, 2) and np.isfinite(points).all()
    return points if ok else None


def read_300w(keys: list[str], folder: str, what: str) -> list[Face]:
    """A face for each image key: its .pts under `folder` (missing: "no_landmarks"; not a
    valid .pts: "labels_invalid"), its subset by its path."""
    if not os.path.isdir(folder):
        raise ValueError(f"{what}-landmarks '{folder}': give the folder holding the .pts files (300W keeps "
                         "them beside the images: the image folder itself)")
    faces = []
    for key in keys:
        pts = os.path.join(folder, os.path.splitext(key)[0] + ".pts")
        subset = "challenging" if key.split("/")[0].lower() == "ibug" else "common"
        if not os.path.exists(pts):
            faces.append(Face(key, subsets=(subset,), problem="no_landmarks"))
            continue
        points = read_pts(pts)
        points = points if points is not None and points.shape == (68, 2) else None
        faces.append(Face(key, points, subsets=(subset,), problem=None if points is not None else "labels_invalid"))
    return faces


def load_mat(path: str, names: tuple, what: str) -> dict:
    """scipy's read of a MATLAB file, with `names` (any of each tuple) checked."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path)
    except NotImplementedError:  # (scipy's answer to a v7.3 file, which is HDF5)
        raise ValueError(f"{what} '{path}' is a MATLAB v7.3 (HDF5) file, which scipy does not read: re-save it "
                         "as v7 (MATLAB or Octave: load it, then save -v7 with the same variables)") from None
    except (MatReadError, ValueError, TypeError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{what} '{path}' is not a MATLAB file scipy can read ({err})") from None
    for options in names:
        if not any(n in mat for n in options):
            raise ValueError(f"{what} '{path}' has no variable {' or '.join(options)}")
    return mat


def read_cofw(path: str, what: str) -> tuple[list[Face], list[np.ndarray]]:
    """The faces and images of a COFW .mat (train: IsTr, phisTr; test: IsT, phisT)."""
    mat = load_mat(path, (("IsTr", "IsT"), ("phisTr", "phisT")), what)
    images = mat["IsTr"] if "IsTr" in mat else mat["IsT"]
    phis = np.asarray(mat["phisTr"] if "phisTr" in mat else mat["phisT"], dtype=np.float64)
    images = [np.asarray(im[0] if im.dtype == object else im) for im in images.reshape(-1)]
    if phis.ndim != 2 or phis.shape[1] != 87 or len(phis) != len(images):
        raise ValueError(f"{what} '{path}': phis must be one row of 87 values (29 x, 29 y, 29 occlusion flags) "
                         f"per image, got {phis.shape} for {len(images)} images")
    faces = []
    for i, row in enumerate(phis):
        points = np.stack([row[:29], row[29:58]], 1)
        ok = np.isfinite(row).all()
        faces.append(Face(f"{i}", points if ok else None, occluded=row[58:] != 0,
                          problem=None if ok else "labels_invalid"))
    return faces, images


def read_aflw19(path: str, split: str, what: str) -> list[Face]:
    """The faces of one split ("train" or "test") of AFLWinfo_release.mat."""
    mat = load_mat(path, (("nameList",), ("data",), ("bbox",), ("mask_new",), ("ra",)), what)
    names = [norm_key(str(np.asarray(n).reshape(-1)[0])) for n in mat["nameList"].reshape(-1)]
    data, bbox = np.asarray(mat["data"], np.float64), np.asarray(mat["bbox"], np.float64)
    mask, ra = np.asarray(mat["mask_new"]), np.asarray(mat["ra"]).reshape(-1).astype(np.int64) - 1
    if data.shape != (len(names), 38) or bbox.shape != (len(names), 4) or mask.shape != (len(names), 19):
        raise ValueError(f"{what} '{path}': data, bbox and mask_new must be {len(names)} x 38, x 4 and x 19 "
                         f"(got {data.shape}, {bbox.shape}, {mask.shape})")
    if sorted(ra.tolist()) != list(range(len(names))):
        raise ValueError(f"{what} '{path}': ra must be a permutation of 1..{len(names)}")
    faces = []
    for i in ra[:AFLW_TRAIN] if split == "train" else ra[AFLW_TRAIN:]:
        left, right, top, bottom = bbox[i]
        points = np.stack([data[i, :19], data[i, 19:]], 1)
        ok = np.isfinite(points).all() and np.isfinite(bbox[i]).all() and right > left and bottom > top
        faces.append(Face(names[i], points, (left, top, right, bottom), ("frontal",) if (mask[i] != 0).all() else (),
                          problem=None if ok else "labels_invalid"))
    return faces


def _text_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "no such file", path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{what} '{path}' is not UTF-8 text") from None


# -- the dataset ---------------------------------------------------------------------------------------
class BoxedFaces(FaceImages):
    """The faces of a benchmark, one item each (an image may hold several): (image [3, S, S]
    normalized, float64 [5]: the face's index and its crop box x0, y0, w, h in the image's
    pixels), or None with the skip reason (the face's `problem`, or the image's). Faces whose
    image is not in `source` are counted ("no_image"). `arrays`: the images themselves (COFW),
    `source` then names the file they come from."""

    def __init__(self, source: str, faces: list[Face], img_size: int, what: str, max_pixels: int = MAX_PIXELS,
                 margin: float = MARGIN, arrays: list[np.ndarray] | None = None):
        if arrays is None:
            super().__init__(source, img_size, what, max_pixels)
            where = dict(zip(self.keys, self.paths))
            root = source_root(source)
            self.orphans = [(os.path.join(root, f.key), "no_image") for f in faces if f.key not in where]
            faces = [f for f in faces if f.key in where]
            self.paths = [where[f.key] for f in faces]
        else:
            self.transform = FaceTransform(img_size, augment=False)
            self.what, self.source, self.max_pixels, self.orphans = what, source, int(max_pixels), []
            self.paths = [f"{source}#{f.key}" for f in faces]
        if not faces:
            raise ValueError(f"{what} '{source}': none of the annotated faces has its image here "
                             "(image names are relative to this folder)")
        self.faces, self.arrays, self.margin = faces, arrays, margin

    def __len__(self) -> int:
        return len(self.faces)

    def crop_box(self, face: Face) -> tuple:
        return square_box(*(face.box if face.box is not None else points_box(face.points)), self.margin)

    def __getitem__(self, index: int):
        return self.item(index, self.faces[index])

    def item(self, index: int, face: Face):
        """The item of `face`, the `index`-th."""
        if face.problem is not None:
            return None, face.problem
        box = self.crop_box(face)
        if self.arrays is None:
            read, reason = self.crop(index, box=box)
        else:
            read, reason = self.crop_image(_pil(self.arrays[int(face.key)]), box=box)
        if read is None:
            return None, reason
        return (read[0], torch.tensor([index, *read[2]["box"]], dtype=torch.float64)), None

    def crop_points(self, index: int, item) -> torch.Tensor | None:
        """The `index`-th face's landmarks [K, 2] in the crop's pixels of its item (occlusion.py)."""
        points = self.faces[index].points
        return None if points is None else self.to_crop(torch.from_numpy(points)[None], item[1][None, 1:])[0]

    def to_crop(self, points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """[N, K, 2] image pixels -> crop pixels, for crop boxes [N, 4] (x0, y0, w, h)."""
        s = self.transform.size
        return (points - boxes[:, None, :2]) * (s / boxes[:, None, 2:])

    def to_image(self, points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_crop`."""
        s = self.transform.size
        return points * (boxes[:, None, 2:] / s) + boxes[:, None, :2]


def _pil(array: np.ndarray) -> Image.Image:
    """A COFW image array (grey H x W or H x W x 3, uint8) as an RGB PIL image."""
    a = np.ascontiguousarray(array.astype(np.uint8))
    return Image.fromarray(a).convert("RGB")


__all__ = ["Face", "BoxedFaces", "MARGIN", "WFLW_SUBSETS", "square_box", "points_box", "read_wflw", "read_pts",
           "read_300w", "read_cofw", "read_aflw19", "load_mat"]
