"""IJB-B / IJB-C 1:1 verification (template pairs), as insightface's IJB evaluation runs it.

The folder holds `meta/<set>_face_tid_mid.txt` (per face: image name, template id, media id),
`meta/<set>_template_pair_label.txt` (per pair: template 1, template 2, 1 matched / 0 not),
`meta/<set>_name_5pts_score.txt` (per face, in the same order: image name, 5 landmarks x y,
detector score) and `loose_crop/<image name>`. Each face is warped by the least-squares
similarity of its 5 landmarks to the ArcFace 112 x 112 template (scaled to the encoder's size),
embedded with its flip (verification.embed_batch), optionally weighted by its detector score;
a template is the sum over its media of the mean of each media's faces, L2-normalized; a
pair's score is the cosine of its two templates; TAR at each FAR comes from the ROC
(verification.tar_at_far). A face that cannot be read, or whose landmarks are not finite or all
at one point ("landmarks_invalid"), is counted and left out of its template.
"""

from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..data.align import align as warp
from ..data.decode import read_bytes
from ..data.items import MAX_PIXELS
from .common import progress
from .verification import decode, embed_batch, tar_at_far

def align(im: Image.Image, points: np.ndarray, size: int) -> np.ndarray:
    """The face of `im` with landmarks `points` [5, 2] (IJB's: pixel centres at integers) warped
    onto the ArcFace template scaled to size x size (pacofr.data.align): uint8 [size, size, 3],
    black outside `im`."""
    if not np.isfinite(points).all() or np.ptp(points, axis=0).max() < 1e-3:  # (no similarity fits)
        raise ValueError("the landmarks are not finite, or all at one point")
    out, _ = warp(im, points + 0.5, size)  # (+ 0.5: pixel centres at i + 0.5, as pacofr's landmarks)
    return np.array(out, dtype=np.uint8)


def _meta(root: Path, suffix: str) -> Path:
    found = sorted((root / "meta").glob(f"*_{suffix}"))
    if len(found) != 1:
        raise ValueError(f"'{root / 'meta'}' must hold one *_{suffix} (IJB-B: ijbb_{suffix}, IJB-C: ijbc_{suffix}); "
                         f"found {len(found)}")
    return found[0]


def _rows(path: Path, columns: int, convert):
    """convert(fields) of each non-empty line of `path`, which must have `columns` fields (a bad
    line: an error naming it)."""
    try:
        with open(path, encoding="utf-8") as f:
            for k, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    if len(fields) != columns:
                        raise ValueError
                    row = convert(fields)
                except ValueError:
                    raise ValueError(f"'{path}' line {k}: expected {columns} fields, got '{line.strip()}'") from None
                yield row
    except UnicodeDecodeError:
        raise ValueError(f"'{path}' is not UTF-8 text") from None


class IJBFaces(Dataset):
    """The faces of an IJB folder, aligned: (uint8 [3, size, size], index) or (None, reason)."""

    def __init__(self, root: str, size: int, max_pixels: int = MAX_PIXELS):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(20, "not a folder (an IJB-B or IJB-C folder: meta/, loose_crop/)", str(root))
        faces = _meta(self.root, "face_tid_mid.txt")
        self.name = faces.name[: -len("_face_tid_mid.txt")].upper()
        tid_mid = list(_rows(faces, 3, lambda f: (f[0], int(f[1]), int(f[2]))))
        points = _meta(self.root, "name_5pts_score.txt")
        lmk = list(_rows(points, 12, lambda f: (f[0], [float(v) for v in f[1:11]], float(f[11]))))
        if [r[0] for r in tid_mid] != [r[0] for r in lmk]:
            raise ValueError(f"'{faces}' and '{points}' must list the same images in the same order")
        self.files = [r[0] for r in tid_mid]
        self.templates = torch.tensor([r[1] for r in tid_mid])
        self.medias = torch.tensor([r[2] for r in tid_mid])
        self.points = np.array([r[1] for r in lmk], dtype=np.float64).reshape(-1, 5, 2)
        self.scores = torch.tensor([r[2] for r in lmk], dtype=torch.float32)
        pairs = _meta(self.root, "template_pair_label.txt")
        flat = chain.from_iterable(_rows(pairs, 3, lambda f: (int(f[0]), int(f[1]), int(f[2]))))
        self.pairs = torch.from_numpy(np.fromiter(flat, dtype=np.int64)).view(-1, 3)  # (IJB-C: 15.7M pairs)
        if not bool(((self.pairs[:, 2] == 0) | (self.pairs[:, 2] == 1)).all()):
            raise ValueError(f"'{pairs}': a pair's label (third field) must be 1 (matched) or 0 (not)")
        known = set(self.templates.tolist())
        missing = set(self.pairs[:, :2].unique().tolist()) - known
        if missing:
            raise ValueError(f"'{pairs}' names template(s) no face of '{faces}' belongs to: {sorted(missing)[:5]}")
        self.size, self.max_pixels = int(size), int(max_pixels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        if not np.isfinite(self.points[i]).all():
            return None, "landmarks_invalid"
        im, reason = decode(read_bytes(self.root / "loose_crop" / self.files[i])[0], self.max_pixels)
        if im is None:
            return None, reason
        try:
            return torch.from_numpy(align(im, self.points[i], self.size)).permute(2, 0, 1), i
        except ValueError:
            return None, "landmarks_invalid"


def _collate(items):
    kept = [(x, i) for x, i in items if x is not None]
    skipped = [r for x, r in items if x is None]
    if not kept:
        return None, None, skipped
    return torch.stack([x for x, _ in kept]), torch.tensor([i for _, i in kept]), skipped


def template_features(faces: IJBFaces, embed_fn, batch_size: int = 64, workers: int = 2,
                      detector_score: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(template ids [T], their L2-normalized features [T, D], skipped faces by reason): each
    media's mean face embedding (weighted by detector score if asked), summed per template."""
    media_keys = torch.stack([faces.templates, faces.medias], 1)
    medias, media_of = media_keys.unique(dim=0, return_inverse=True)
    sums, counts, skipped = None, torch.zeros(len(medias)), {}
    loader = DataLoader(faces, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    for images, index, reasons in progress(loader, desc=f"embedding {faces.name}", unit="batch"):
        for r in reasons:
            skipped[r] = skipped.get(r, 0) + 1
        if images is None:
            continue
        e = embed_batch(embed_fn, images, faces.size)
        if detector_score:
            e = e * faces.scores[index, None]
        if sums is None:
            sums = torch.zeros(len(medias), e.shape[1])
        sums.index_add_(0, media_of[index], e)
        counts.index_add_(0, media_of[index], torch.ones(len(index)))
    if sums is None:
        raise ValueError(f"'{faces.root}': no face could be used (skipped: {skipped})")
    means = sums / counts.clamp_min(1)[:, None]
    templates, template_of = medias[:, 0].unique(return_inverse=True)
    pooled = torch.zeros(len(templates), means.shape[1]).index_add_(0, template_of, means)
    return templates, F.normalize(pooled, dim=1), skipped


def pair_scores(templates: torch.Tensor, features: torch.Tensor, pairs: torch.Tensor, chunk: int = 1 << 20):
    """The cosine of each pair's two templates (rows of `features` by template id)."""
    rows = torch.searchsorted(templates, pairs[:, :2].contiguous())
    out = torch.empty(len(pairs))
    for i in range(0, len(pairs), chunk):
        r = rows[i : i + chunk]
        out[i : i + chunk] = (features[r[:, 0]] * features[r[:, 1]]).sum(1)
    return out


def evaluate_ijb(embed_fn, root: str, size: int, batch_size: int = 64, workers: int = 2,
                 detector_score: bool = False, max_pixels: int = MAX_PIXELS) -> dict:
    """IJB-B/C 1:1: {set, path, pairs, templates, faces, tar_at_far: {far: TAR}, skipped}."""
    faces = IJBFaces(root, size, max_pixels)
    templates, features, skipped = template_features(faces, embed_fn, batch_size, workers, detector_score)
    scores = pair_scores(templates, features, faces.pairs)
    labels = faces.pairs[:, 2] == 1
    return {"set": faces.name, "path": str(root), "pairs": len(labels), "matched_pairs": int(labels.sum()),
            "templates": len(templates), "faces": len(faces), "detector_score": detector_score,
            "tar_at_far": {f"{far:g}": tar for far, tar in tar_at_far(scores.numpy(), labels.numpy()).items()},
            "skipped": skipped}


__all__ = ["IJBFaces", "align", "evaluate_ijb", "pair_scores", "template_features"]
