"""Face alignment probe: how well the frozen encoder's features locate facial landmarks.

    pacofr eval-alignment --config tiny --encoder runs/demo/encoder.safetensors \\
        --train faces/train --train-landmarks faces/train.csv \\
        --test faces/test --test-landmarks faces/test.csv [--output probe.json]

Images are centre-cropped to a square and resized to the model's input size (no augmentation);
landmarks (any number of points per face, the same in every file; CSV `path,x1,y1,...` or JSON
`{path: [[x, y], ...]}` as for pretraining) follow the crop. The encoder's patch tokens,
average-pooled to a `grid` x `grid` map, are the features. A ridge regression from features to
coordinates is fitted on the train set, its penalty chosen on a held-out tenth of it, and the
test set is scored by the normalized mean error (NME): the mean point-to-point distance over
the points, divided by a per-face scale, averaged over faces:

- "inter_ocular": the distance between the outer eye corners (68 points: 36 and 45, iBUG; 98
  points: 60 and 72, WFLW) or between the eye centres (5 points: 0 and 1, inter-pupil);
- "diag": the diagonal of the bounding box of the face's ground-truth landmarks (datasets that
  define NME_diag by an annotated face box, such as AFLW-19, give somewhat other values).

The mean shape of the train set (the coordinates' mean) is scored too, as the floor a probe
must beat. This is a linear probe of frozen features, not the fine-tuned alignment models the
paper's NME figures come from: it compares encoders, it does not reproduce those figures.
The ridge is solved in its dual form: memory is N^2 float64 for N train faces, plus N x
grid^2 x width float32 features.
"""

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import image_files
from ..data.decode import decode_rgb, open_image, read_bytes
from ..data.landmarks import check_landmarks, load_landmarks_file
from ..data.transforms import FaceTransform
from ..model import ViTEncoder

EYE_CORNERS = {5: (0, 1), 68: (36, 45), 98: (60, 72)}  # points whose distance is the inter-ocular scale
LAMBDAS = tuple(10.0 ** e for e in range(-6, 3))  # ridge penalties, relative to the mean kernel diagonal


# -- the metric ------------------------------------------------------------------------------------
def face_scale(points: torch.Tensor, norm: str) -> torch.Tensor:
    """[N, K, 2] ground-truth points -> [N] per-face NME scale (see the module docstring)."""
    if norm == "inter_ocular":
        k = points.shape[1]
        if k not in EYE_CORNERS:
            raise ValueError(f"norm 'inter_ocular' knows the eye points of 5, 68 and 98-point layouts, not {k} "
                             "points: use norm 'diag'")
        i, j = EYE_CORNERS[k]
        return (points[:, i] - points[:, j]).norm(dim=-1)
    if norm == "diag":
        return (points.amax(1) - points.amin(1)).norm(dim=-1)
    raise ValueError(f"norm must be 'inter_ocular' or 'diag', got '{norm}'")


def nme(pred: torch.Tensor, target: torch.Tensor, norm: str = "inter_ocular") -> torch.Tensor:
    """[N, K, 2] predictions and ground truth -> [N] per-face NME (fractions: x100 for %)."""
    return (pred - target).norm(dim=-1).mean(-1) / face_scale(target, norm)


# -- the regression --------------------------------------------------------------------------------
@dataclass
class Ridge:
    """Kernel ridge regression with a linear kernel (the dual form of ridge on the features)."""

    train_x: torch.Tensor  # [N, F] centred train features
    x_mean: torch.Tensor
    alpha: torch.Tensor  # [N, T]
    y_mean: torch.Tensor
    penalty: float

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        kernel = (x.double() - self.x_mean) @ self.train_x.T
        return kernel @ self.alpha + self.y_mean


def _solve(kernel: torch.Tensor, y: torch.Tensor, penalties) -> list[torch.Tensor]:
    """alpha = (K + p I)^-1 y for each penalty p, from one eigendecomposition of K."""
    e, v = torch.linalg.eigh(kernel)
    vy = v.T @ y
    return [v @ (vy / (e.clamp_min(0) + p)[:, None]) for p in penalties]


def _fit(x: torch.Tensor, y: torch.Tensor, penalty: float | None, penalties) -> tuple[Ridge, list]:
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    kernel = xc @ xc.T
    scale = float(kernel.diagonal().mean()) or 1.0
    chosen = [penalty] if penalty is not None else [p * scale for p in penalties]
    alphas = _solve(kernel, y - y_mean, chosen)
    return [Ridge(xc, x_mean, a, y_mean, p) for a, p in zip(alphas, chosen)], chosen


def fit_ridge(x: torch.Tensor, y: torch.Tensor, norm: str, holdout: float = 0.1, seed: int = 0) -> tuple[Ridge, dict]:
    """Features [N, F] and targets [N, K, 2] -> the ridge refitted on all of them with the
    penalty (from LAMBDAS, scaled by the kernel's mean diagonal) whose fit on the rest had the
    lowest NME on a held-out `holdout` fraction; and the validation NME of each penalty."""
    x, y2 = x.double(), y.double().flatten(1)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"the probe needs at least 2 training faces, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(holdout * n)))
    val, fit = order[:n_val], order[n_val:]
    models, penalties = _fit(x[fit], y2[fit], None, LAMBDAS)
    scores = [float(nme(m.predict(x[val]).view(-1, *y.shape[1:]), y[val].double(), norm).mean()) for m in models]
    best = min(range(len(scores)), key=lambda i: (scores[i], -penalties[i]))  # ties: the stronger penalty
    (model,), _ = _fit(x, y2, penalties[best], LAMBDAS)
    return model, {"penalties": penalties, "val_nme": scores, "penalty": penalties[best]}


# -- data and features -------------------------------------------------------------------------------
class AlignmentImages(Dataset):
    """(image [3, S, S] normalized, landmarks [K, 2] in output pixels) or None for a file that
    is skipped: unreadable, not an image, without usable landmarks (counted by `reason`)."""

    def __init__(self, source: str, landmarks: str, img_size: int, what: str = "--train"):
        self.paths, keys = image_files(source, what)
        table = load_landmarks_file(landmarks, keep_all=True)
        counts = {len(v) for v in table.values() if v is not None}
        if not counts:
            raise ValueError(f"{what}-landmarks '{landmarks}' holds no usable entries")
        if len(counts) > 1:
            raise ValueError(f"{what}-landmarks '{landmarks}' mixes point counts {sorted(counts)}: every face "
                             "needs the same layout")
        self.num_points = counts.pop()
        self.points = [table.get(k) for k in keys]
        if all(p is None for p in self.points):
            raise ValueError(f"{what}-landmarks '{landmarks}': none of its paths names a file of '{source}' "
                             f"(e.g. '{keys[0]}'); paths are relative to the folder or list")
        self.transform = FaceTransform(img_size, augment=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        points = self.points[index]
        if points is None:
            return None, "no_landmarks"
        raw, _ = read_bytes(self.paths[index])
        im, reason = open_image(raw, 1)
        if im is None:
            return None, reason
        if not check_landmarks(points, *im.size):
            return None, "landmarks_invalid"
        rgb, reason = decode_rgb(im)
        if rgb is None:
            return None, reason
        params = self.transform.params(*rgb.size, 0)
        image, lm = self.transform.apply(rgb, params, torch.from_numpy(points.astype(np.float32)))
        return (image, lm), None


def _collate(items):
    kept = [it for it, _ in items if it is not None]
    reasons = [r for it, r in items if it is None]
    if not kept:
        return None, None, reasons
    return torch.stack([i for i, _ in kept]), torch.stack([p for _, p in kept]), reasons


@torch.no_grad()
def features(encoder: ViTEncoder, images: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, 3, S, S] -> [B, grid * grid * width]: the patch tokens (class token dropped),
    average-pooled to grid x grid (adaptive: the patch grid need not divide)."""
    tokens = encoder(images)[:, 1:].float()
    gh, gw = encoder.grid
    maps = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)
    return torch.nn.functional.adaptive_avg_pool2d(maps, grid).flatten(1)


def extract(encoder, dataset: AlignmentImages, grid: int, batch_size: int, workers: int, device):
    """-> (features [N, F] float32 on CPU, landmarks [N, K, 2], {skip reason: count})."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    feats, points, skipped = [], [], {}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for images, lm, reasons in loader:
        for r in reasons:
            skipped[r] = skipped.get(r, 0) + 1
        if images is None:
            continue
        with amp:
            feats.append(features(encoder, images.to(device), grid).float().cpu())
        points.append(lm)
    if not feats:
        raise ValueError("no usable face (every file was skipped: " + json.dumps(skipped) + ")")
    return torch.cat(feats), torch.cat(points), skipped


def load_encoder(cfg, path: str, device) -> ViTEncoder:
    """The encoder of config `cfg` with the weights of an encoder.safetensors (strict)."""
    m = cfg.model
    encoder = ViTEncoder(m.img_size, m.patch_size, m.in_chans, m.encoder.embed_dim, m.encoder.depth,
                         m.encoder.num_heads, m.encoder.mlp_ratio, m.attn_impl)
    encoder.load_state_dict(load_file(path), strict=True)
    return encoder.to(device).eval()


def evaluate(encoder: ViTEncoder, train: AlignmentImages, test: AlignmentImages, norm: str = "inter_ocular",
             grid: int = 7, batch_size: int = 64, workers: int = 2, seed: int = 0) -> dict:
    """Fits the probe on `train`, scores it and the mean shape on `test` (NME in %)."""
    if train.num_points != test.num_points:
        raise ValueError(f"train faces have {train.num_points} points, test faces {test.num_points}")
    face_scale(torch.zeros(1, train.num_points, 2), norm)  # (a layout the norm does not know fails here)
    device = next(encoder.parameters()).device
    grid = min(grid, *encoder.grid)
    x_train, y_train, skipped_train = extract(encoder, train, grid, batch_size, workers, device)
    x_test, y_test, skipped_test = extract(encoder, test, grid, batch_size, workers, device)
    model, search = fit_ridge(x_train, y_train, norm, seed=seed)
    pred = model.predict(x_test).view_as(y_test).float()
    per_face = nme(pred, y_test, norm)
    mean_shape = nme(y_train.mean(0, keepdim=True).expand_as(y_test), y_test, norm)
    finite = torch.isfinite(per_face)
    return {
        "nme": 100 * float(per_face[finite].mean()), "mean_shape_nme": 100 * float(mean_shape[finite].mean()),
        "failure_rate_10": 100 * float((per_face[finite] > 0.1).float().mean()),  # % of faces with NME > 10%
        "norm": norm, "points": train.num_points, "train_faces": len(y_train), "test_faces": len(y_test),
        "degenerate_faces": int((~finite).sum()), "features": x_train.shape[1], "grid": grid,
        "penalty": search["penalty"], "val_nme": [100 * v if math.isfinite(v) else v for v in search["val_nme"]],
        "skipped_train": skipped_train, "skipped_test": skipped_test,
    }


__all__ = ["nme", "face_scale", "fit_ridge", "Ridge", "AlignmentImages", "features", "extract", "load_encoder",
           "evaluate", "EYE_CORNERS"]
