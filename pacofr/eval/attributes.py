"""Face attribute probe: how well the frozen encoder's features tell binary face attributes.

    pacofr eval-attributes --config tiny --encoder runs/demo/encoder.safetensors \\
        --train celeba/train --train-labels celeba/train.csv \\
        --test celeba/test --test-labels celeba/test.csv [--output attributes.json]

Labels: a CSV whose header names the attributes (`path,Smiling,Eyeglasses,...`), one row per
image with its path relative to the image folder (or as a .txt list writes it) and a value per
attribute: 1 / -1 (CelebA's list_attr_celeba.txt as CSV) or 1 / 0. Images are centre-cropped
and resized to the model's input. The features are the class token beside the mean of the patch
tokens; a ridge regression to the 0/1 targets of all attributes at once (streamed statistics,
penalty chosen on a held-out tenth of the train images, then refitted on all) predicts an
attribute when its score is above 0.5 (the test file's columns may come in another order).
Reported on the test set: each attribute's accuracy and
their mean (CelebA's usual figure), and the majority class of each attribute in the train set
as the floor (a tie counts as 0). A linear probe compares encoders; it is not a fine-tuned attribute classifier.
Rows naming no image of the folder are counted ("no_image").
"""

import csv

import numpy as np
import torch

from ..data.items import MAX_PIXELS
from ..data.landmarks import norm_key
from .alignment import PREVIEW
from .common import (MIN_TEST, FaceImages, Skipped, Stats, autocast, batches, check_test_size, fit_on_held_out,
                     held_out, skipped_files)


def load_attribute_file(path: str, what: str) -> tuple[list[str], dict[str, np.ndarray | None]]:
    """-> (attribute names, {relative path: 0/1 float32 [A], None for a row that cannot be used})."""
    try:
        f = open(path, newline="")
    except OSError as e:
        raise FileNotFoundError(f"{what} '{path}': cannot be read ({e.strerror})") from e
    with f:
        try:
            rows = _rows(f)
        except UnicodeDecodeError:
            raise ValueError(f"{what} '{path}' is not UTF-8 text: give a CSV file") from None
    if len(rows) < 2 or len(rows[0]) < 2:
        raise ValueError(f"{what} '{path}' needs a header `path,attribute,...` and at least one row")
    names, table = rows[0][1:], {}
    if all(_is_number(n) for n in names):
        raise ValueError(f"{what} '{path}': its first line is data ({','.join(rows[0][:4])}...); "
                         "it needs a header `path,attribute,...`")
    if len(set(names)) < len(names):
        raise ValueError(f"{what} '{path}': attribute names repeat ({sorted(n for n in set(names) if names.count(n) > 1)})")
    for row in rows[1:]:
        key = norm_key(row[0])
        if key in table:
            raise ValueError(f"{what} '{path}': '{row[0]}' has more than one row")
        try:
            values = np.array([float(v) for v in row[1:]], dtype=np.float32)
        except ValueError:
            values = None
        ok = values is not None and len(values) == len(names) and np.isin(values, (-1.0, 0.0, 1.0)).all()
        table[key] = (values > 0).astype(np.float32) if ok else None
    return names, table


def _rows(f) -> list[list[str]]:
    """The CSV's non-empty rows, stripped (a trailing comma dropped)."""
    rows = []
    for r in csv.reader(f):
        r = [c.strip() for c in r]
        while r and not r[-1]:
            r.pop()
        if r:
            rows.append(r)
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class AttributeImages(FaceImages):
    """(image [3, S, S] normalized, targets [A] in {0, 1}) or None with the skip reason: no
    labels row, an unusable row ("labels_invalid"), an unreadable image."""

    protocol = {"protocol": "csv", "conventions": {
        "crop": "the centred square, resized to the model's input", "prediction": "the ridge's output above 0.5"}}

    def __init__(self, source: str, labels: str, img_size: int, what: str = "--train", max_pixels: int = MAX_PIXELS,
                 split: tuple[list[str], dict] | None = None):
        """`split`: (names, {key: targets}) of a benchmark's split, already read: only the images
        it names are used; without it the CSV `labels` is read."""
        super().__init__(source, img_size, what, max_pixels)
        self.names, table = load_attribute_file(labels, f"{what}-labels") if split is None else split
        if split is not None:
            where = dict(zip(self.keys, self.paths))
            self.keys = [k for k in table if k in where]
            self.paths = [where[k] for k in self.keys]
            if not self.keys:
                raise ValueError(f"{what} '{source}': none of the {len(table)} images of its split is in this folder")
        if not any(k in table for k in self.keys):
            raise ValueError(f"{what}-labels '{labels}': none of its paths names a file of '{source}' "
                             f"(e.g. '{self.keys[0]}'); paths are relative to the folder or list")
        self.targets = [table.get(k, "missing") for k in self.keys]
        self.label_orphans(table)

    def __getitem__(self, index: int):
        targets = self.targets[index]
        if isinstance(targets, str):
            return None, "no_labels"
        if targets is None:
            return None, "labels_invalid"
        read, reason = self.crop(index)
        return (None, reason) if read is None else ((read[0], torch.from_numpy(targets)), None)

    def reorder(self, names: list[str]) -> None:
        """Columns in the order of `names` (another file's), which must be the same attributes."""
        if sorted(names) != sorted(self.names):
            missing, extra = sorted(set(names) - set(self.names)), sorted(set(self.names) - set(names))
            raise ValueError(f"{self.what}-labels name other attributes: missing {missing}, extra {extra}")
        order = [self.names.index(n) for n in names]
        self.targets = [t[order] if isinstance(t, np.ndarray) else t for t in self.targets]
        self.names = list(names)


@torch.no_grad()
def features(encoder, images: torch.Tensor, device) -> torch.Tensor:
    """[B, 3, S, S] -> [B, 2 * width]: the class token and the mean patch token."""
    with autocast(device):
        tokens = encoder.forward_features(images.to(device)).float()
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)


def evaluate(encoder, train: AttributeImages, test: AttributeImages, batch_size: int = 64, workers: int = 2,
             holdout: float = 0.1, seed: int = 0, min_test: int = MIN_TEST, occlusion=None) -> dict:
    """Fits the probe on `train` (one pass), scores it and the majority classes on `test`;
    fewer than `min_test` usable test images are refused. `occlusion` (occlusion.Occlusion):
    the mean accuracy at each of its levels too."""
    test.reorder(train.names)
    a, device = len(train.names), next(encoder.parameters()).device
    width = 2 * encoder.embed_dim
    usable = [i for i, t in enumerate(train.targets) if isinstance(t, np.ndarray)]
    held, rest = held_out(usable, len(train), holdout, seed)
    fit, val = Stats(width, a, device), Stats(width, a, device)
    positives, skipped_train, skipped_test = torch.zeros(a, dtype=torch.float64), Skipped(train), Skipped(test)
    for part, stats in ((held, val), (rest, fit)):
        for images, targets in batches(train, batch_size, workers, skipped_train, part):
            stats.add(features(encoder, images, device), targets.to(device))
            positives += targets.double().sum(0)
    if not fit.n or not val.n:
        raise ValueError(f"the probe needs usable train images in both its fit and held-out parts "
                         f"(skipped: {skipped_train.counts})")
    (w, b), search = fit_on_held_out(fit, val)
    majority = positives / (fit.n + val.n) > 0.5  # each attribute's more frequent value in train


    def accuracies(dataset, skipped: Skipped, preview: list | None = None):
        """Each attribute's accuracy (%) of the probe and of the majority over `dataset`, and
        its usable images' count; the first PREVIEW (image, prediction, truth) into `preview`."""
        correct, floor, n_test = torch.zeros(a, dtype=torch.float64), torch.zeros(a, dtype=torch.float64), 0
        for images, targets in batches(dataset, batch_size, workers, skipped):
            pred = (features(encoder, images, device).double() @ w + b).cpu() > 0.5
            truth = targets > 0.5
            correct += (pred == truth).double().sum(0)
            floor += (majority == truth).double().sum(0)
            if preview is not None:
                preview += list(zip(images, pred, truth))[: PREVIEW - len(preview)]
            n_test += images.shape[0]
        if not n_test:
            raise ValueError(f"no usable test image (skipped: {skipped.counts})")
        return 100 * correct / n_test, 100 * floor / n_test, n_test

    preview = []
    accuracy, prior, n_test = accuracies(test, skipped_test, preview)
    check_test_size(n_test, min_test, test)
    robustness = {}
    if occlusion is not None:
        mean_accuracy = lambda dataset: float(accuracies(dataset, Skipped(test))[0].mean())  # noqa: E731
        robustness["robustness"] = occlusion.sweep(test, mean_accuracy, "mean_accuracy", lower_is_better=False)
    return {**test.protocol, "mean_accuracy": float(accuracy.mean()), "majority_mean_accuracy": float(prior.mean()),
            "accuracy": dict(zip(train.names, accuracy.tolist())), "majority": dict(zip(train.names, prior.tolist())),
            "attributes": a, "train_images": fit.n + val.n, "test_images": n_test, **search,
            "skipped_train": skipped_train.counts, "skipped_test": skipped_test.counts,
            "skipped_files": skipped_files(train=skipped_train, test=skipped_test), **robustness,
            "preview": [(k, p.float(), t.float()) for k, (_, p, t) in enumerate(preview)],
            "preview_images": [((x,), None) for x, _, _ in preview]}


__all__ = ["AttributeImages", "load_attribute_file", "features", "evaluate"]
