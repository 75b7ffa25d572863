"""What the probes share: the encoder of a pretraining run, batching of skippable items and
the list of what was skipped, the test set's minimum size, autocast, and ridge regression from
streamed statistics with its penalty chosen on held-out rows."""

import math
import os
import sys
from collections import Counter

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..data.datasets import image_files
from ..data.decode import decode_rgb, draft, open_image, read_bytes
from ..data.items import MAX_PIXELS
from ..data.sources import source_root
from ..data.transforms import FaceTransform
from ..model import ViTEncoder, load_encoder_weights

MIN_TEST = 20  # fewer usable test images give a score too noisy to compare (--min-test)


class FaceImages(Dataset):
    """The images of a folder or .txt list (`source`), for a probe: `crop` reads one, centre-
    cropped to a square and resized to `img_size` (no augmentation), decoded within the pixel
    budget `max_pixels` (as in training: a larger JPEG at reduced scale, others skipped).
    `keys` are the paths relative to the folder (or as listed), the names its label files
    use; `orphans` the (path, "no_image") rows of label entries that name no image of it."""

    def __init__(self, source: str, img_size: int, what: str, max_pixels: int = MAX_PIXELS):
        self.paths, self.keys = image_files(source, what)
        self.transform = FaceTransform(img_size, augment=False)
        self.what, self.source, self.max_pixels = what, source, int(max_pixels)
        self.orphans: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.paths)

    def label_orphans(self, labelled) -> None:
        """`orphans`: the entries of a label file (its keys) that name no image of the source."""
        root, known = source_root(self.source), set(self.keys)
        self.orphans = [(os.path.join(root, k), "no_image") for k in sorted(set(labelled) - known)]

    def crop(self, index: int, points: torch.Tensor | None = None, box=None):
        """((image [3, S, S] normalized, `points` in output pixels, the crop's params, the
        original (width, height)), None), or (None, skip reason) for an unreadable image.
        `box` (x0, y0, w, h in original pixels): the region to crop, clipped to the image;
        None: the centred square."""
        raw, _ = read_bytes(self.paths[index])
        im, reason = open_image(raw, 1)
        return (None, reason) if im is None else self.crop_image(im, points, box)

    def crop_image(self, im, points: torch.Tensor | None = None, box=None):
        """`crop` of an opened, not yet decoded PIL image."""
        size = im.size
        params = self.transform.params(*size, 0) if box is None else clipped_box(box, *size)
        scale, reason = draft(im, self.transform.draft_size(params, *size), self.max_pixels)
        rgb, reason = (None, reason) if scale is None else decode_rgb(im)
        if rgb is None:
            return None, reason
        x, lm = self.transform.apply(rgb, params, torch.zeros(0, 2) if points is None else points, scale)
        return (x, lm, params, size), None


def clipped_box(box, width: int, height: int) -> dict:
    """Crop params (no flip, no jitter) of `box` (x0, y0, w, h) clipped to the image (a box
    that leaves it is squeezed, not padded: the resize cannot read outside the image)."""
    x0, y0, w, h = (float(v) for v in box)
    x1, y1 = min(x0 + w, float(width)), min(y0 + h, float(height))
    x0, y0 = min(max(x0, 0.0), width - 1.0), min(max(y0, 0.0), height - 1.0)
    return {"box": (x0, y0, max(x1 - x0, 1.0), max(y1 - y0, 1.0)), "flip": False, "jitter": None}


class Skipped:
    """One split's skipped items: their count by reason (`counts`, the result's skipped_<split>)
    and (path, reason) `rows`, starting with the label entries that name no image."""

    def __init__(self, dataset: FaceImages):
        self.rows = list(dataset.orphans)
        self.counts = dict(Counter(reason for _, reason in self.rows))

    def add(self, path: str, reason: str) -> None:
        self.rows.append((path, reason))
        self.counts[reason] = self.counts.get(reason, 0) + 1


def skipped_files(**splits: Skipped) -> list[tuple[str, str, str]]:
    """(path, reason, split) of every split's skipped items (the CLI's .skipped.csv)."""
    return [(path, reason, name) for name, skipped in splits.items() for path, reason in skipped.rows]


def check_test_size(n: int, min_test: int, test: FaceImages) -> None:
    """A score over fewer than `min_test` test images is refused, not reported."""
    if n < min_test:
        raise ValueError(f"{test.what} '{test.source}': {n} usable test image(s), fewer than --min-test {min_test}: "
                         "a score over so few says little; add test images or lower --min-test")


def load_encoder(cfg, path: str, device: torch.device | None = None) -> ViTEncoder:
    """The encoder of config `cfg` with the weights of `path` (strict): an encoder.safetensors,
    a checkpoint's model.safetensors, a checkpoint or a run directory (`load_encoder_weights`),
    on `device` (default: CUDA when there is one, else the CPU)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = ViTEncoder.from_config(cfg.model)
    encoder.load_state_dict(load_encoder_weights(path, encoder), strict=True)
    return encoder.to(device).eval()


def collate_pairs(items):
    """[((a, b) or None, skip reason or None)] -> (stacked a or None, stacked b or None, each
    item's skip reason or None)."""
    kept = [it for it, _ in items if it is not None]
    reasons = [None if it is not None else r for it, r in items]
    if not kept:
        return None, None, reasons
    return torch.stack([a for a, _ in kept]), torch.stack([b for _, b in kept]), reasons


def progress(iterable, **kwargs):
    """tqdm over `iterable` when stderr is a terminal (a batch job's log gets no redraws)."""
    return tqdm(iterable, disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


def batches(dataset, batch_size: int, workers: int, skipped: Skipped, indices: list[int] | None = None):
    """The (a, b) batches of the usable items of `dataset` (or of its `indices`), adding each
    skipped item (its path and reason) to `skipped`; a progress bar on a terminal."""
    part = dataset if indices is None else Subset(dataset, indices)
    order, at = (range(len(dataset)) if indices is None else indices), 0
    loader = DataLoader(part, batch_size=batch_size, num_workers=workers, collate_fn=collate_pairs)
    for a, b, reasons in progress(loader, desc=f"{getattr(dataset, 'what', '')} features".strip(), unit="batch",
                                  total=math.ceil(len(part) / batch_size), leave=False):
        for k, r in enumerate(reasons):
            if r is not None:
                skipped.add(dataset.paths[order[at + k]], r)
        at += len(reasons)
        if a is not None:
            yield a, b


def held_out(usable: list[int], size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(held-out indices: `fraction` of `usable`, at least one; the other indices of range(size))."""
    draw = torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed))
    held = {usable[int(i)] for i in draw[: max(1, round(fraction * len(usable)))]}
    return sorted(held), [i for i in range(size) if i not in held]


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as in training), none on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# Ridge penalties, relative to each probe's scale of its features (per row: the mean feature
# variance; alignment's dual form: the kernel's mean diagonal).
LAMBDAS = tuple(10.0 ** e for e in range(-6, 3))


class Stats:
    """Sufficient statistics of a ridge regression from rows x [F] to y [T] (float64)."""

    def __init__(self, f: int, t: int, device):
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.n, self.sx, self.sy, self.sxx, self.sxy, self.syy = 0, z(f), z(t), z(f, f), z(f, t), 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.sxy += x.T @ y
        self.syy += float((y * y).sum())

    def __add__(self, other: "Stats") -> "Stats":
        out = Stats(0, 0, self.sx.device)
        out.n, out.sx, out.sy = self.n + other.n, self.sx + other.sx, self.sy + other.sy
        out.sxx, out.sxy, out.syy = self.sxx + other.sxx, self.sxy + other.sxy, self.syy + other.syy
        return out

    def solve(self, penalties) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(W [F, T], b [T]) minimizing sum ||y - x W - b||^2 + p ||W||^2 for each penalty p."""
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.sxx - self.n * torch.outer(mx, mx)
        cxy = self.sxy - self.n * torch.outer(mx, my)
        e, v = torch.linalg.eigh(cxx)
        vxy = v.T @ cxy
        out = []
        for p in penalties:
            w = v @ (vxy / (e.clamp_min(0) + p)[:, None])
            out.append((w, my - mx @ w))
        return out

    def squared_error(self, w: torch.Tensor, b: torch.Tensor) -> float:
        """sum ||y - x W - b||^2 over the rows added, from the statistics alone."""
        return float(self.syy - 2 * (w * self.sxy).sum() - 2 * b @ self.sy + (w * (self.sxx @ w)).sum()
                     + 2 * b @ (w.T @ self.sx) + self.n * b @ b)


def fit_on_held_out(fit: Stats, val: Stats) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """The ridge (W, b) refitted on fit + val rows with the penalty (LAMBDAS times the mean
    feature variance, per row) whose fit on `fit` had the lowest squared error on `val` (ties:
    the stronger penalty); and the search (penalty, penalties, val_mse)."""
    if not all(bool(torch.isfinite(t).all()) for t in (fit.sxx, fit.sxy, val.sxx, val.sxy)):
        raise ValueError("the encoder gave non-finite features")
    width = fit.sx.shape[0]
    scale = float(fit.sxx.diagonal().sum() / fit.n - (fit.sx / fit.n).pow(2).sum()) / width or 1.0
    penalties = [lam * scale for lam in LAMBDAS]  # per row: the refit on more rows keeps the same strength
    errors = [val.squared_error(w, b) / val.n for w, b in fit.solve([p * fit.n for p in penalties])]
    best = min(range(len(errors)), key=lambda i: (errors[i], -penalties[i]))
    everything = fit + val
    return everything.solve([penalties[best] * everything.n])[0], {
        "penalty": penalties[best], "penalties": penalties, "val_mse": errors}
