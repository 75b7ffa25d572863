"""Face alignment probe: how well the frozen encoder's features locate facial landmarks.

    pacofr eval-alignment --config tiny --encoder runs/demo/encoder.safetensors \\
        --train faces/train --train-landmarks faces/train.csv \\
        --test faces/test --test-landmarks faces/test.csv [--output probe.json]

Images are centre-cropped to a square and resized to the model's input size (no augmentation;
there is no face-box input here: the benchmarks' own files, cropped from their boxes, are
benchmarks.py's);
landmarks (any number of points per face, the same in every file; CSV `path,x1,y1,...` or JSON
`{path: [[x, y], ...]}` as for pretraining) follow the crop. The encoder's patch tokens,
average-pooled to a `grid` x `grid` map, are the features. A ridge regression from features to
coordinates is fitted on the train set, its penalty chosen on a held-out tenth of it, and the
test set is scored by the normalized mean error (NME): the mean point-to-point distance over
the points, divided by a per-face scale, averaged over faces:

- "inter_ocular": the distance between the outer eye corners (68 points: 36 and 45, iBUG; 98
  points: 60 and 72, WFLW; 29 points: 8 and 9, COFW as HRNet scores it) or between the eye
  centres (5 points: 0 and 1, inter-pupil);
- "diag": the diagonal of the bounding box of the face's ground-truth landmarks. Papers that
  report AFLW-19's NME_diag divide by the annotated face box, or by sqrt(w * h) of a box: the
  diagonal is at least sqrt(2) times sqrt(w * h) of the same box, and the 19 points' box is
  smaller than the face box, so those figures are not comparable with this one.

The mean shape of the train set (the coordinates' mean) is scored too, as the floor a probe
must beat. This is a linear probe of frozen features, not the fine-tuned alignment models the
paper's NME figures come from: it compares encoders, it does not reproduce those figures.
The ridge is solved in its dual form from the Gram matrix of the train features (computed in
float64 a block at a time): memory is a few N^2 float64 matrices for N train faces beside the
N x grid^2 x width float32 features, time 2 N^2 F float64 operations on the CPU.

Faces are skipped (and counted) when unreadable or over the pixel budget, without landmarks,
with a landmark that is not finite ("landmarks_invalid") or outside the image
("landmarks_outside"), or with a zero NME scale; points inside the image but outside the centre
crop are kept as targets. Landmark rows naming no image of the folder are counted ("no_image").
"""

import json
from dataclasses import dataclass

import numpy as np
import torch

from ..data.items import MAX_PIXELS
from ..data.landmarks import check_landmarks, load_landmarks_file
from ..model import ViTEncoder
from .common import LAMBDAS, MIN_TEST, FaceImages, Skipped, autocast, batches, check_test_size, skipped_files

# Points whose distance is the inter-ocular scale: iBUG 68 and WFLW 98 outer eye corners, COFW's
# 29-point pair of HRNet's evaluation, the 5-point eye centres.
EYE_CORNERS = {5: (0, 1), 29: (8, 9), 68: (36, 45), 98: (60, 72)}
PREVIEW = 8  # test faces drawn with their predictions (the CLI's FILE.preview.png)
# The eyes' points whose means are the pupils (inter-pupil scale): iBUG's eye contours, COFW's and
# WFLW's pupils (COFW's 17 and 18 counted from 1, the scale of its published NME).
EYE_PUPILS = {5: ((0,), (1,)), 29: ((16,), (17,)), 68: (tuple(range(36, 42)), tuple(range(42, 48))),
              98: ((96,), (97,))}


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


def benchmark_scale(points: torch.Tensor, norm: str, boxes: torch.Tensor | None = None) -> torch.Tensor:
    """[N] scale of `norm`: face_scale's, "inter_pupil" (between the eyes' mean points,
    EYE_PUPILS), "box" (sqrt(w * h) of the annotated boxes [N, 4] x0, y0, x1, y1) or "box_diag"
    (their diagonal)."""
    if norm == "inter_pupil":
        left, right = EYE_PUPILS[points.shape[1]]
        return (points[:, list(left)].mean(1) - points[:, list(right)].mean(1)).norm(dim=-1)
    if norm in ("box", "box_diag"):
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        return (w * h).clamp_min(0).sqrt() if norm == "box" else (w * w + h * h).sqrt()
    return face_scale(points, norm)


def failure_rate(errors: torch.Tensor, threshold: float) -> float:
    """% of faces whose NME is above `threshold` (a non-finite one fails)."""
    return 100 * float(((errors > threshold) | ~torch.isfinite(errors)).double().mean())


def auc(errors: torch.Tensor, threshold: float) -> float:
    """% area under the cumulative error distribution (the fraction of faces with NME <= e, for
    e from 0 to `threshold`), divided by `threshold`: the exact integral of that step function,
    mean(max(threshold - NME, 0)) / threshold (a non-finite NME adds nothing)."""
    e = torch.where(torch.isfinite(errors), errors.double(), torch.full_like(errors.double(), float("inf")))
    return 100 * float((threshold - e).clamp_min(0).mean() / threshold)


def nme(pred: torch.Tensor, target: torch.Tensor, norm: str = "inter_ocular") -> torch.Tensor:
    """[N, K, 2] predictions and ground truth -> [N] per-face NME (fractions: x100 for %)."""
    return (pred - target).norm(dim=-1).mean(-1) / face_scale(target, norm)


# -- the regression --------------------------------------------------------------------------------
def gram(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """a [M, F] @ b [N, F].T in float64, a block at a time (the float32 features are never
    copied whole to float64)."""
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], chunk):
        ai = a[i : i + chunk].double()
        for j in range(0, b.shape[0], chunk):
            out[i : i + chunk, j : j + chunk] = ai @ b[j : j + chunk].double().T
    return out


def _centred(g: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(x_r - m)(x_c - m)' for r in rows, c in cols, m the mean of the features of `cols`,
    from the Gram matrix g = X X' alone."""
    g_rc, g_cc = g[rows][:, cols], g[cols][:, cols]
    return g_rc - g_rc.mean(1, keepdim=True) - g_cc.mean(0) + g_cc.mean()


@dataclass
class Ridge:
    """Ridge regression on the features in its dual form (a linear kernel): predictions are
    centred kernel rows against the train faces times `alpha`, plus the targets' mean."""

    train_x: torch.Tensor  # [N, F] the train features (not copied)
    train_gram_mean: torch.Tensor  # [N] column means of the train Gram matrix (for the centring)
    alpha: torch.Tensor  # [N, T]
    y_mean: torch.Tensor  # [T]
    penalty: float

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        g = gram(x, self.train_x)
        kernel = g - g.mean(1, keepdim=True) - self.train_gram_mean + self.train_gram_mean.mean()
        return kernel @ self.alpha + self.y_mean


def _alphas(g: torch.Tensor, fit: torch.Tensor, y: torch.Tensor, penalties) -> list[torch.Tensor]:
    """alpha = (K + p I)^-1 (y - mean y) over the faces `fit` for each penalty p (absolute),
    from one eigendecomposition of their centred kernel K."""
    e, v = torch.linalg.eigh(_centred(g, fit, fit))
    vy = v.T @ (y[fit] - y[fit].mean(0))
    return [v @ (vy / (e.clamp_min(0) + p)[:, None]) for p in penalties]


def fit_ridge(x: torch.Tensor, y: torch.Tensor, norm: str, holdout: float = 0.1, seed: int = 0) -> tuple[Ridge, dict]:
    """Features [N, F] and targets [N, K, 2] -> the ridge fitted on all of them with the
    penalty (LAMBDAS times the kernel's mean diagonal) whose fit on the others had the lowest
    NME on a held-out `holdout` fraction (ties: the stronger penalty), scaled by the faces'
    count to keep its strength per face; and the search: the held-out faces, each penalty and
    its validation NME."""
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"the probe needs at least 2 training faces, got {n}")
    y2 = y.double().flatten(1).to(x.device)
    g = gram(x, x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    n_val = min(n - 1, max(1, round(holdout * n)))
    val, fit = order[:n_val], order[n_val:]
    scale = float(_centred(g, fit, fit).diagonal().mean()) or 1.0
    penalties = [p * scale for p in LAMBDAS]
    cross = _centred(g, val, fit)
    scores = []
    for alpha in _alphas(g, fit, y2, penalties):
        pred = (cross @ alpha + y2[fit].mean(0)).view(-1, *y.shape[1:])
        scores.append(float(nme(pred.cpu(), y[val.cpu()].double(), norm).mean()))
    best = min(range(len(scores)), key=lambda i: (scores[i], -penalties[i]))
    everyone = torch.arange(n, device=x.device)
    refit = penalties[best] * n / len(fit)  # the same strength per face on all of them
    (alpha,) = _alphas(g, everyone, y2, [refit])
    model = Ridge(x, g.mean(0), alpha, y2.mean(0), refit)
    return model, {"holdout": val.tolist(), "penalties": penalties, "val_nme": scores, "penalty": penalties[best]}


def scores(pred: torch.Tensor, target: torch.Tensor, norm: str) -> dict:
    """NME (%) over the faces and the failure rate at 10% (a non-finite prediction fails)."""
    per_face = nme(pred, target, norm)
    bad = ~torch.isfinite(per_face)
    return {"nme": 100 * float(per_face.mean()),
            "failure_rate_10": 100 * float(((per_face > 0.1) | bad).double().mean()),
            "failed_predictions": int(bad.sum())}


# -- data and features -------------------------------------------------------------------------------
class AlignmentImages(FaceImages):
    """(image [3, S, S] normalized, landmarks [K, 2] in output pixels) or None for a face that
    is skipped, with its reason: unreadable, not an image, no landmarks, some not finite
    ("landmarks_invalid") or outside the image ("landmarks_outside"), or a zero NME scale under
    `norm` ("degenerate_scale"). Points may lie outside the centre crop: they are regression
    targets as any other."""

    def __init__(self, source: str, landmarks: str, img_size: int, norm: str = "inter_ocular", what: str = "--train",
                 max_pixels: int = MAX_PIXELS):
        super().__init__(source, img_size, what, max_pixels)
        keys = self.keys
        table = load_landmarks_file(landmarks, keep_all=True, what=f"{what}-landmarks")
        counts = {len(v) for v in table.values() if v is not None}
        if not counts:
            raise ValueError(f"{what}-landmarks '{landmarks}' holds no usable entries")
        if len(counts) > 1:
            raise ValueError(f"{what}-landmarks '{landmarks}' mixes point counts {sorted(counts)}: every face "
                             "needs the same layout")
        self.num_points = counts.pop()
        self.points = [table.get(k) for k in keys]
        self.label_orphans(table)
        if all(p is None for p in self.points):
            raise ValueError(f"{what}-landmarks '{landmarks}': none of its paths names a file of '{source}' "
                             f"(e.g. '{keys[0]}'); paths are relative to the folder or list")
        face_scale(torch.zeros(1, self.num_points, 2), norm)  # (a layout the norm does not know fails here)
        self.norm = norm

    def __getitem__(self, index: int):
        points = self.points[index]
        if points is None:
            return None, "no_landmarks"
        if not np.isfinite(points).all():
            return None, "landmarks_invalid"
        if not float(face_scale(torch.from_numpy(points)[None].double(), self.norm)) > 0:
            return None, "degenerate_scale"
        read, reason = self.crop(index, torch.from_numpy(points.astype(np.float32)))
        if read is None:
            return None, reason
        return (read[:2], None) if check_landmarks(points, *read[3]) else (None, "landmarks_outside")

    def crop_points(self, index: int, item) -> torch.Tensor:
        """The landmarks [K, 2] in the crop's pixels of the `index`-th face's item (occlusion.py)."""
        return item[1]


@torch.no_grad()
def features(encoder: ViTEncoder, images: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, 3, S, S] -> [B, grid * grid * width]: the patch tokens (class token dropped),
    average-pooled to grid x grid (adaptive: the patch grid need not divide)."""
    tokens = encoder.forward_features(images)[:, 1:].float()
    gh, gw = encoder.grid
    maps = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)
    return torch.nn.functional.adaptive_avg_pool2d(maps, grid).flatten(1)


def extract(encoder, dataset: AlignmentImages, grid: int, batch_size: int, workers: int, device):
    """-> (features [N, F] float32 on CPU, landmarks [N, K, 2], Skipped). No usable face raises,
    naming the dataset (`dataset.what` and its source), and so do features that are not finite."""
    feats, points, skipped = [], [], Skipped(dataset)
    for images, lm in batches(dataset, batch_size, workers, skipped):
        with autocast(device):
            feats.append(features(encoder, images.to(device), grid).float().cpu())
        points.append(lm)
    if not feats:
        raise ValueError(f"{dataset.what} '{dataset.source}': no usable face (every file was skipped: "
                         + json.dumps(skipped.counts) + ")")
    x = torch.cat(feats)
    if not torch.isfinite(x).all():
        raise ValueError(f"the encoder gave non-finite features for {dataset.what} '{dataset.source}'")
    return x, torch.cat(points), skipped


def _preview(encoder, model: Ridge, test: AlignmentImages, grid: int, device) -> list:
    """(index, prediction, truth) in the crop's pixels of the first PREVIEW usable test faces."""
    shown = []
    for i in range(len(test)):
        item, _ = test[i]
        if item is not None:
            shown.append((i, item))
        if len(shown) == PREVIEW:
            break
    with autocast(device):
        seen = features(encoder, torch.stack([item[0] for _, item in shown]).to(device), grid).float().cpu()
    pred = model.predict(seen).view(len(shown), -1, 2).float()
    return [(i, p, item[1]) for (i, item), p in zip(shown, pred)]


def evaluate(encoder: ViTEncoder, train: AlignmentImages, test: AlignmentImages, norm: str = "inter_ocular",
             grid: int = 7, batch_size: int = 64, workers: int = 2, seed: int = 0, min_test: int = MIN_TEST,
             occlusion=None) -> dict:
    """Fits the probe on `train`, scores it and the mean shape on `test` (NME in %); fewer
    than `min_test` usable test faces are refused. `occlusion` (occlusion.Occlusion): the NME
    of the occluded test set at each of its levels too (`robustness`)."""
    if train.num_points != test.num_points:
        raise ValueError(f"train faces have {train.num_points} points, test faces {test.num_points}")
    if train.norm != norm or test.norm != norm:
        raise ValueError(f"the datasets skip faces by the norm '{train.norm}' / '{test.norm}', not '{norm}'")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    device = next(encoder.parameters()).device
    grid = min(grid, *encoder.grid)
    x_train, y_train, skipped_train = extract(encoder, train, grid, batch_size, workers, device)
    x_test, y_test, skipped_test = extract(encoder, test, grid, batch_size, workers, device)
    check_test_size(len(y_test), min_test, test)
    model, search = fit_ridge(x_train, y_train, norm, seed=seed)
    pred = model.predict(x_test).view_as(y_test).float()
    robustness = {}
    if occlusion is not None:
        def nme_of(dataset) -> float:
            x, y, _ = extract(encoder, dataset, grid, batch_size, workers, device)
            return scores(model.predict(x).view_as(y).float(), y, norm)["nme"]

        robustness["robustness"] = occlusion.sweep(test, nme_of, "nme", lower_is_better=True)
    size = test.transform.size
    outside = ((y_test < 0) | (y_test >= size)).any(-1).any(-1)
    preview = _preview(encoder, model, test, grid, device)
    return {
        **scores(pred, y_test, norm),
        "mean_shape_nme": scores(y_train.mean(0, keepdim=True).expand_as(y_test), y_test, norm)["nme"],
        "norm": norm, "points": train.num_points, "train_faces": len(y_train), "test_faces": len(y_test),
        "test_faces_with_points_outside_the_crop": int(outside.sum()), "features": x_train.shape[1], "grid": grid,
        "penalty": search["penalty"], "val_nme": [100 * v for v in search["val_nme"]],
        "skipped_train": skipped_train.counts, "skipped_test": skipped_test.counts,
        "skipped_files": skipped_files(train=skipped_train, test=skipped_test), "preview": preview, **robustness,
    }


__all__ = ["nme", "scores", "face_scale", "benchmark_scale", "failure_rate", "auc", "EYE_PUPILS",
           "fit_ridge", "gram", "Ridge", "AlignmentImages", "features", "extract",
           "evaluate", "EYE_CORNERS"]
