"""Face parsing probe: how well the frozen encoder's patch tokens separate facial regions.

    pacofr eval-parsing --config tiny --encoder runs/demo/encoder.safetensors --classes 11 \\
        --train lapa/train/images --train-labels lapa/train/labels \\
        --test lapa/test/images --test-labels lapa/test/labels [--output parsing.json]

A label map is a PNG of class ids (0 = background; 255 = ignored) at the path of its image
relative to the image folder, with the extension .png (LaPa's layout). Images and label maps
are centre-cropped to a square and resized to the model's input (labels by nearest neighbour).
Each patch token is regressed, by ridge, onto the fractions of its patch's pixels in each class;
at test time the per-patch class scores are upsampled bilinearly to pixels and the arg max is
the prediction. The ridge is solved from streamed sufficient statistics (X'X, X'Y: width^2
float64), so the train set is read once and never held in memory; its penalty is the one with
the lowest squared error on a held-out tenth of the train images, computed from their own
statistics, and the probe is then refitted on all of them.

Scores over all test pixels of the centre crops at the model's input size: per-class F1 = 2 TP / (2 TP + FP + FN) and IoU of the classes present
in the test labels, their means over those other than the background (as LaPa's mean F1 is
reported), and pixel accuracy.
Beside them, the position prior: each pixel's most frequent train class at its position, the
floor a probe must beat. A linear probe compares encoders; it is not the fine-tuned parsing
model behind the paper's LaPa figures. Label maps of no image of the folder are counted
("no_image", named by the label map). LaPa's and CelebAMask-HQ's own layouts, warped crops and
scores at the labels' resolution: parsing_formats.py (a test set's `confusions` scores it).
"""

import os

import numpy as np
import torch
from PIL import Image

from ..data.decode import load, open_image, read_bytes
from ..data.items import MAX_PIXELS
from .alignment import PREVIEW
from .common import (MIN_TEST, FaceImages, Skipped, Stats, autocast, batches, check_test_size, fit_on_held_out,
                     held_out, skipped_files)

IGNORE = 255


class ParsingImages(FaceImages):
    """(image [3, S, S] normalized, labels [S, S] int64) or None with the skip reason: an
    unreadable image or label map, no label map, a label map of another shape than its image
    (one at another resolution of the same shape is scaled; CelebAMask-HQ's per-part masks are
    read by parsing_formats.py),
    a label map that is not of class ids (colours), one over the pixel budget ("too_large":
    label maps are never drafted)."""

    def __init__(self, source: str, labels: str, img_size: int, num_classes: int, what: str = "--train",
                 max_pixels: int = MAX_PIXELS):
        super().__init__(source, img_size, what, max_pixels)
        keys = self.keys
        if not os.path.isdir(labels):
            raise FileNotFoundError(f"{what}-labels '{labels}': no such folder")
        # a label map is found by its image's path relative to the folder or list: one listed
        # as an absolute path or above the list's folder has no place under `labels`
        outside = next((k for k in keys if os.path.isabs(k) or ".." in k.split("/")), None)
        if outside is not None:
            raise ValueError(f"{what} '{source}' lists '{outside}': label maps are found by the image's path "
                             f"relative to the list's folder, so list paths below that folder")
        self.labels = [os.path.join(labels, os.path.splitext(k)[0] + ".png") for k in keys]
        if not any(os.path.isfile(p) for p in self.labels):
            raise ValueError(f"{what}-labels '{labels}': no label map for any image (e.g. '{self.labels[0]}')")
        if not 2 <= num_classes < IGNORE:
            raise ValueError(f"--classes must be in [2, {IGNORE}), got {num_classes}")
        self.num_classes, self.class_names = num_classes, None
        self.protocol = {"protocol": "pngs", "conventions": {
            "crop": "the centred square of the image and of its label map, resized to the model's input "
                    "(labels by nearest neighbour)",
            "scoring": "all test pixels of the crops at the model's input size",
            "mean": "over the classes other than 0 present in the test labels"}}
        maps = {os.path.normpath(p) for p in self.labels}
        self.orphans = [(p, "no_image") for p in _label_maps(labels) if os.path.normpath(p) not in maps]

    def __getitem__(self, index: int):
        if not os.path.isfile(self.labels[index]):
            return None, "no_labels"
        ids, reason = read_ids(self.labels[index], self.num_classes, self.max_pixels)
        if ids is None:
            return None, reason
        read, reason = self.crop(index)
        if read is None:
            return None, reason
        x, _, params, (iw, ih) = read
        lh, lw = ids.shape
        if abs(lw * ih - lh * iw) > max(iw, ih):  # (another aspect, beyond a pixel's rounding)
            return None, "labels_size_mismatch"
        s = self.transform.size
        fx, fy = lw / iw, lh / ih
        x0, y0, w, h = params["box"]
        box = (x0 * fx, y0 * fy, (x0 + w) * fx, (y0 + h) * fy)
        ids = np.array(Image.fromarray(ids.astype(np.int32), "I").resize((s, s), Image.NEAREST, box=box), dtype=np.int64)
        return (x, torch.from_numpy(ids)), None

    def labelled(self) -> list[int]:
        """The indices of the images with a label map (those the held-out tenth is drawn from)."""
        return [i for i, path in enumerate(self.labels) if os.path.isfile(path)]

    def confusions(self, preds: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
        """The confusion of each prediction [B, S, S] against a batch's labels, the crops' here."""
        return [_confusion(p, labels, self.num_classes) for p in preds]


def read_ids(path: str, num_classes: int, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    """A label map of class ids (int64 [H, W]) or (None, skip reason): unreadable, over the pixel
    budget ("too_large": never drafted), colours rather than ids ("labels_not_ids"). An id
    outside [0, num_classes) other than IGNORE is an error naming the file."""
    label, reason = open_image(read_bytes(path)[0], 1)
    if label is None:
        return None, reason
    if label.size[0] * label.size[1] > max_pixels:
        return None, "too_large"
    reason = load(label)
    if reason:
        return None, reason
    ids = np.asarray(label).astype(np.int64)
    if ids.ndim == 3:  # ids written as gray RGB(A); colour renderings of the classes are refused
        if not (ids[..., :3] == ids[..., :1]).all():
            return None, "labels_not_ids"
        ids = ids[..., 0]
    bad = (ids >= num_classes) & (ids != IGNORE)
    if bad.any() or (ids < 0).any():
        raise ValueError(f"{path}: class id {int(ids[bad | (ids < 0)][0])} outside "
                         f"[0, --classes {num_classes}) and not {IGNORE}")
    return ids, None


def _label_maps(folder: str) -> list[str]:
    """The .png files under `folder`, sorted."""
    found = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.lower().endswith(".png")]
    return sorted(found)


def patch_fractions(labels: torch.Tensor, patch: int, num_classes: int) -> torch.Tensor:
    """[B, S, S] class ids -> [B, L, C]: each patch's fraction of (not ignored) pixels per class
    (zeros for a patch with none)."""
    b, s, _ = labels.shape
    g, k = s // patch, num_classes + 1  # (class id num_classes: the ignored pixels)
    cell = torch.arange(s, device=labels.device) // patch
    where = (cell[:, None] * g + cell[None, :]).view(1, -1) + torch.arange(b, device=labels.device)[:, None] * g * g
    idx = where * k + labels.clamp_max(num_classes).view(b, -1)
    counts = torch.bincount(idx.view(-1), minlength=b * g * g * k).view(b, g * g, k)[..., :num_classes].double()
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def confusion_scores(confusion: torch.Tensor) -> dict:
    """[C, C] confusion (rows: truth, columns: prediction) -> per-class F1 and IoU (%) of the
    classes present in the truth (None for the others), their means over those other than the
    background (None if there is none), pixel accuracy."""
    c = confusion.double()
    tp = c.diagonal()
    fp, fn = c.sum(0) - tp, c.sum(1) - tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    iou = tp / (tp + fp + fn)
    present = (tp + fn) > 0
    mean = present.clone()
    mean[0] = False
    return {"mean_f1": 100 * float(f1[mean].mean()) if mean.any() else None,
            "mean_iou": 100 * float(iou[mean].mean()) if mean.any() else None,
            "pixel_accuracy": 100 * float(tp.sum() / c.sum()),
            "f1": [100 * float(v) if s else None for v, s in zip(f1, present)],
            "iou": [100 * float(v) if s else None for v, s in zip(iou, present)]}


def upsample_scores(scores: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """Per-patch class scores [B, L, C] (row-major patches) -> per-pixel classes [B, S, S]:
    bilinear between patch centres, the arg max."""
    maps = scores.transpose(1, 2).reshape(scores.shape[0], -1, *grid)
    return torch.nn.functional.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False).argmax(1)


def _confusion(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    keep = labels != IGNORE
    idx = labels[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


@torch.no_grad()
def _tokens(encoder, images: torch.Tensor, device) -> torch.Tensor:
    with autocast(device):
        return encoder.forward_features(images.to(device))[:, 1:].float()


def evaluate(encoder, train: ParsingImages, test: ParsingImages, batch_size: int = 32, workers: int = 2,
             holdout: float = 0.1, seed: int = 0, min_test: int = MIN_TEST, occlusion=None) -> dict:
    """Fits the probe on `train` (one pass), scores it and the position prior on `test`;
    fewer than `min_test` usable test images are refused. `occlusion` (occlusion.Occlusion):
    the mean F1 at each of its levels too."""
    if train.num_classes != test.num_classes:
        raise ValueError(f"--classes differs between train ({train.num_classes}) and test ({test.num_classes})")
    c, device = train.num_classes, next(encoder.parameters()).device
    p, s = encoder.patch_size, train.transform.size
    labelled = train.labelled()
    held, rest = held_out(labelled, len(train), holdout, seed)
    width = encoder.embed_dim
    fit, val = Stats(width, c, device), Stats(width, c, device)
    prior = torch.zeros(s, s, c + 1, dtype=torch.long)
    skipped_train, skipped_test, images_seen = Skipped(train), Skipped(test), [0, 0]
    for part, stats in ((held, val), (rest, fit)):
        for images, labels in batches(train, batch_size, workers, skipped_train, part):
            tokens = _tokens(encoder, images, device)
            frac = patch_fractions(labels, p, c).to(device)
            rows = frac.sum(-1) > 0  # patches with some labelled pixel
            stats.add(tokens[rows], frac[rows])
            at = torch.arange(s * s) * (c + 1) + labels.clamp_max(c).view(labels.shape[0], -1)
            prior += torch.bincount(at.view(-1), minlength=s * s * (c + 1)).view(s, s, c + 1)
            images_seen[stats is fit] += images.shape[0]
    if not fit.n or not val.n:
        raise ValueError(f"the probe needs labelled train images in both its fit and held-out parts "
                         f"(skipped: {skipped_train.counts})")
    (w, b), search = fit_on_held_out(fit, val)
    position_prior = prior[..., :c].argmax(-1)  # (the ignored count left out)


    def confusions(dataset, skipped: Skipped, preview: list | None = None):
        """The probe's and the prior's confusions over `dataset` (by its own `confusions`), and
        its usable images' count; the first PREVIEW (image, prediction) into `preview`."""
        probe, floor = torch.zeros(c, c, dtype=torch.long), torch.zeros(c, c, dtype=torch.long)
        test_images = 0
        for images, labels in batches(dataset, batch_size, workers, skipped):
            pred = upsample_scores((_tokens(encoder, images, device).double() @ w + b).float(), encoder.grid, s).cpu()
            ours, prior_ = dataset.confusions([pred, position_prior.expand_as(pred)], labels)
            probe += ours
            floor += prior_
            if preview is not None:
                preview += list(zip(images, pred))[: PREVIEW - len(preview)]
            test_images += images.shape[0]
        if not test_images:
            raise ValueError(f"no usable test image (skipped: {skipped.counts})")
        return probe, floor, test_images

    preview = []
    probe, floor, test_images = confusions(test, skipped_test, preview)
    check_test_size(test_images, min_test, test)
    prior_scores, scores = confusion_scores(floor), confusion_scores(probe)
    if test.class_names:
        scores.update({f"{k}_by_class": dict(zip(test.class_names, scores[k])) for k in ("f1", "iou")})
    robustness = {}
    if occlusion is not None:
        mean_f1 = lambda dataset: confusion_scores(confusions(dataset, Skipped(test))[0])["mean_f1"]  # noqa: E731
        robustness["robustness"] = occlusion.sweep(test, mean_f1, "mean_f1", lower_is_better=False)
    return {**test.protocol, **scores, "prior_mean_f1": prior_scores["mean_f1"],
            "prior_mean_iou": prior_scores["mean_iou"], "classes": c, "train_images": sum(images_seen),
            "test_images": test_images, "train_patches": fit.n + val.n, **search,
            "skipped_train": skipped_train.counts, "skipped_test": skipped_test.counts,
            "skipped_files": skipped_files(train=skipped_train, test=skipped_test), **robustness,
            "preview": [(k, p, p) for k, (_, p) in enumerate(preview)],
            "preview_images": [((x,), None) for x, _ in preview]}


__all__ = ["ParsingImages", "patch_fractions", "confusion_scores", "upsample_scores", "evaluate", "read_ids", "IGNORE"]
