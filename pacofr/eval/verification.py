"""Face verification as insightface evaluates recognition models (docs/evaluation.md).

    pacofr eval-verification --encoder runs/vitb/encoder.safetensors --bin lfw.bin --bin cfp_fp.bin \\
        [--pairs pairs.txt --images lfw/] [--ijb IJBC/] [--output verification.json]

Sets: insightface `.bin` files (a pickle of (encoded images, issame bools), pairs as images 2i and
2i + 1), the original LFW protocol (`pairs.txt` and an image folder) and IJB-B/C 1:1 (ijb.py).
An image's embedding is the sum of the embeddings of it and of its horizontal flip,
L2-normalized; a pair's distance is the squared L2 distance of its two embeddings.

`verification_metrics` is insightface's protocol: 10 folds of consecutive pairs (no shuffling,
the first n % 10 folds one pair larger); each fold's threshold is the first of 0, 0.01, ...,
3.99 with the best accuracy on the other 9 folds (a pair is matched when its distance is below
the threshold); accuracy is the mean and std (ddof 0) of the 10 test folds'. VAL@FAR=1e-3: on
the other 9 folds, the FAR of each threshold 0, 0.001, ..., 3.999 is interpolated linearly
(between the largest threshold still at or under 1e-3 and the next) to the threshold of FAR
1e-3 (0 when no threshold reaches it); VAL and FAR of the test fold at it, averaged.
"""

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.decode import decode_rgb, draft, open_image, read_bytes
from ..data.items import MAX_PIXELS
from ..data.transforms import FaceTransform, normalize
from .common import progress

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


# -- the metric ------------------------------------------------------------------------------------
def fold_bounds(n: int, folds: int) -> list[tuple[int, int]]:
    """(start, end) of `folds` consecutive folds of n pairs, the first n % folds one larger."""
    if folds < 2 or n < folds:
        raise ValueError(f"{n} pair(s) cannot make {folds} folds (at least 2 folds, a pair in each)")
    sizes = [n // folds + (k < n % folds) for k in range(folds)]
    ends = np.cumsum(sizes)
    return [(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def _below(dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of `dist` lie strictly below each threshold."""
    return np.searchsorted(np.sort(dist), thresholds, side="left")


def _rate(count, total):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(count, dtype=np.float64) / total


def _interpolated_threshold(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """The threshold where the (non-decreasing) FAR curve reaches `target`, linear between the
    largest threshold at or under it and the next; 0 when the curve never reaches it."""
    if not (np.isfinite(far).all() and far.max() >= target):  # (not finite: no mismatched pair to count)
        return 0.0
    j = int(np.searchsorted(far, target, side="right")) - 1
    if j + 1 == len(far) or far[j] == target:
        return float(thresholds[j])
    return float(thresholds[j] + (target - far[j]) * (thresholds[j + 1] - thresholds[j]) / (far[j + 1] - far[j]))


def verification_metrics(embeddings, issame, folds: int = 10) -> dict:
    """Embeddings [2P, D] (flip-summed, normalized; pair i is rows 2i and 2i + 1) and issame [P]
    -> accuracy, accuracy_std, val, val_std, far (fractions), as the module docstring says."""
    e = torch.as_tensor(embeddings).detach().cpu().double().numpy()
    same = torch.as_tensor(issame).cpu().numpy().astype(bool).ravel()
    if e.ndim != 2 or e.shape[0] != 2 * len(same):
        raise ValueError(f"embeddings {tuple(e.shape)} do not hold the 2 x {len(same)} images of the pairs")
    dist = ((e[0::2] - e[1::2]) ** 2).sum(1)
    if not np.isfinite(dist).all():
        raise ValueError("the embeddings are not all finite")
    bounds = fold_bounds(len(same), folds)

    def counts(thresholds):  # per fold: matched pairs below each threshold, mismatched ones below it
        return (np.stack([_below(dist[a:b][same[a:b]], thresholds) for a, b in bounds]),
                np.stack([_below(dist[a:b][~same[a:b]], thresholds) for a, b in bounds]))

    n_pos = np.array([same[a:b].sum() for a, b in bounds])
    n_neg = np.array([(b - a) for a, b in bounds]) - n_pos
    tp, fp = counts(ACC_THRESHOLDS)
    fp_v = counts(VAL_THRESHOLDS)[1]
    acc, val, far = [], [], []
    for k, (a, b) in enumerate(bounds):
        rest = np.arange(folds) != k
        correct = tp[rest].sum(0) + (n_neg[rest].sum() - fp[rest].sum(0))
        best = ACC_THRESHOLDS[int(np.argmax(correct))]  # (the first of equally good ones)
        d, s = dist[a:b], same[a:b]
        acc.append(((d < best) == s).mean())
        threshold = _interpolated_threshold(_rate(fp_v[rest].sum(0), n_neg[rest].sum()), VAL_THRESHOLDS, FAR_TARGET)
        val.append(_rate(((d < threshold) & s).sum(), s.sum()))
        far.append(_rate(((d < threshold) & ~s).sum(), (~s).sum()))
    return {"accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)), "val": float(np.mean(val)),
            "val_std": float(np.std(val)), "far": float(np.mean(far))}


def roc(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the ROC of `scores` (higher: more likely matched) against bool `labels`: a
    point per distinct score from the highest down, after the origin; a point whose step in and
    step out are the same is left out (as the usual ROC of insightface's IJB evaluation is)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    if len(tps) > 2:
        keep = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        tps, fps = tps[keep], fps[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    return _rate(fps, fps[-1]), _rate(tps, tps[-1])


def tar_at_far(scores, labels, fars=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)) -> dict:
    """{far: TAR} read off the ROC: the TPR of the ROC point whose FPR is closest to each far (the
    first in ROC order on a tie; a far far below 1 / negatives reads the origin, 0)."""
    fpr, tpr = roc(scores, labels)
    return {far: float(tpr[int(np.argmin(np.abs(fpr - far)))]) for far in fars}


# -- embedding -------------------------------------------------------------------------------------
def _normalized(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> resized to size x size, normalized as the training images are."""
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    return normalize(images.permute(0, 2, 3, 1))


@torch.no_grad()
def embed_batch(embed_fn, images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> [B, D]: embed_fn of each image plus of its flip, L2-normalized."""
    x = _normalized(images, size)
    e = embed_fn(x).float() + embed_fn(x.flip(-1)).float()
    if not bool(torch.isfinite(e).all()):
        raise ValueError("the encoder gave non-finite embeddings")
    return F.normalize(e, dim=1).cpu()


def embed(embed_fn, images_uint8: torch.Tensor, size: int, batch_size: int = 64) -> torch.Tensor:
    """uint8 RGB images [N, 3, H, W] -> [N, D] flip-summed, L2-normalized embeddings; `embed_fn`
    takes normalized float images [B, 3, size, size] to [B, D]."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    starts = range(0, images_uint8.shape[0], batch_size)
    return torch.cat([embed_batch(embed_fn, images_uint8[i : i + batch_size], size)
                      for i in progress(starts, desc="embedding", unit="batch")])


# -- reading ---------------------------------------------------------------------------------------
def decode(raw: bytes | None, max_pixels: int) -> tuple[object, str | None]:
    """Encoded bytes -> (RGB PIL image, None) or (None, skip reason), within the pixel budget."""
    im, reason = open_image(raw, 1)
    if im is None:
        return None, reason
    scale, reason = draft(im, None, max_pixels)
    return (None, reason) if scale is None else decode_rgb(im)


class _NoGlobals(pickle.Unpickler):
    """An unpickler of plain data only: a global (a class, a function) is refused, so a file
    cannot make it construct objects or call anything."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names the global {module}.{name}")


def _bin_contents(path: str) -> tuple[list, list]:
    with open(path, "rb") as f:
        try:  # (bytes: a Python 2 str, the images of the released files, loads as bytes)
            obj = _NoGlobals(f, encoding="bytes").load()
        except Exception as err:  # whatever a malformed or hostile pickle raises
            raise ValueError(f"'{path}' is not an insightface .bin (a pickle of images and issame bools): "
                             f"{type(err).__name__}: {err}") from None
    ok = isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(p, (list, tuple)) for p in obj)
    if ok:
        bins, same = obj
        ok = (all(isinstance(b, (bytes, bytearray)) for b in bins) and all(isinstance(s, bool) for s in same)
              and len(bins) == 2 * len(same) > 0)
    if not ok:
        raise ValueError(f"'{path}' is not an insightface .bin: it must hold (list of 2P encoded images, list of "
                         f"P issame bools), P >= 1")
    return bins, same


def load_bin(path, max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """An insightface .bin -> (uint8 RGB images [2P, 3, H, W], issame bool [P]). Every image
    must decode (within `max_pixels`) and share one size: the pairs are fixed."""
    path = str(path)
    bins, same = _bin_contents(path)
    images, shape = [], None
    for i, raw in enumerate(progress(bins, desc=f"decoding {Path(path).name}", unit="image")):
        im, reason = decode(bytes(raw), max_pixels)
        if im is None:
            raise ValueError(f"'{path}': image {i} cannot be used ({reason}): the pairs need every image")
        a = np.asarray(im, dtype=np.uint8)
        if shape is None:
            shape = a.shape
        elif a.shape != shape:
            raise ValueError(f"'{path}': image {i} is {a.shape[1]}x{a.shape[0]}, image 0 {shape[1]}x{shape[0]}: "
                             "a .bin holds images of one size")
        images.append(torch.from_numpy(a.copy()))
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(same, dtype=torch.bool)


def evaluate_bin(embed_fn, path, size: int, batch_size: int = 64, max_pixels: int = MAX_PIXELS) -> dict:
    """load_bin, embed, verification_metrics: {set, pairs, accuracy, accuracy_std, val, val_std, far}."""
    images, same = load_bin(path, max_pixels)
    metrics = verification_metrics(embed(embed_fn, images, size, batch_size), same)
    return {"set": Path(path).stem, "path": str(path), "pairs": len(same), **metrics}


def read_lfw_pairs(pairs: str, images: str) -> tuple[list[tuple[str, str]], list[bool], int]:
    """LFW's pairs.txt (first line `sets pairs`, then per set `pairs` lines `name n1 n2`
    (matched) and `pairs` lines `name1 n1 name2 n2` (mismatched)) -> the (path, path) of each pair
    under `images` (name/name_%04d.jpg), issame, and the number of sets (the folds)."""
    try:
        lines = [line.split() for line in Path(pairs).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"'{pairs}' is not UTF-8 text") from None
    try:
        sets, per_set = (int(v) for v in lines[0])
    except (IndexError, ValueError):
        raise ValueError(f"'{pairs}': the first line must be '<sets> <pairs per set>' (LFW's: '10 300')") from None
    image = lambda name, n: str(Path(images) / name / f"{name}_{int(n):04d}.jpg")  # noqa: E731
    out, same = [], []
    for k, f in enumerate(lines[1:], start=2):
        try:
            out.append((image(f[0], f[1]), image(f[0], f[2])) if len(f) == 3 else
                       (image(f[0], f[1]), image(f[2], f[3])) if len(f) == 4 else None)
        except ValueError:
            out.append(None)
        if out[-1] is None:
            raise ValueError(f"'{pairs}' line {k}: expected 'name n1 n2' or 'name1 n1 name2 n2', got '{' '.join(f)}'")
        same.append(len(f) == 3)
    if len(out) != 2 * sets * per_set or sets < 2:
        raise ValueError(f"'{pairs}': {len(out)} pairs, but its first line announces {sets} sets of 2 x {per_set}")
    return out, same, sets


def load_face(path: str, size: int, max_pixels: int) -> np.ndarray:
    """An image file, centre-cropped to a square and resized to size (as the probes read
    images): uint8 [size, size, 3]. One that cannot be used is an error naming it."""
    raw, _ = read_bytes(path)
    if raw is None and not Path(path).is_file():
        raise FileNotFoundError(2, "no such file", path)
    im, reason = decode(raw, max_pixels)
    if im is None:
        raise ValueError(f"'{path}' cannot be used ({reason}): the pairs need every image")
    transform = FaceTransform(size, augment=False)
    return transform.pixels(im, transform.params(*im.size, 0))


def evaluate_pairs(embed_fn, pairs: str, images: str, size: int, batch_size: int = 64,
                   max_pixels: int = MAX_PIXELS) -> dict:
    """The original LFW protocol: its sets are the folds."""
    listed, same, sets = read_lfw_pairs(pairs, images)
    paths = sorted({p for pair in listed for p in pair})
    row = {p: i for i, p in enumerate(paths)}
    faces = torch.from_numpy(np.stack([load_face(p, size, max_pixels)
                                       for p in progress(paths, desc="decoding", unit="image")]))
    unique = embed(embed_fn, faces.permute(0, 3, 1, 2), size, batch_size)
    embeddings = unique[[row[p] for pair in listed for p in pair]]
    metrics = verification_metrics(embeddings, torch.tensor(same), folds=sets)
    return {"set": Path(pairs).stem, "path": str(pairs), "pairs": len(same), **metrics}


__all__ = ["embed", "evaluate_bin", "evaluate_pairs", "load_bin", "read_lfw_pairs", "roc", "tar_at_far",
           "verification_metrics"]
