"""A collated batch, and the two collates: decoded samples (`collate`) and encoded ones for
DaliDecoder (`collate_encoded`). Both drop skipped samples and count every reason, so the
reasons reach the main process through DataLoader workers, and list each skipped sample by
name (`skipped`: (name, reason) pairs, for the run's skipped.csv)."""

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .items import EncodedSample, Sample

if TYPE_CHECKING:  # (set by the masking collate, one layer up)
    from ..masking import Masks


@dataclass
class Batch:
    """images [B, 3, S, S] (None while `encoded` waits for DaliDecoder; [0, 3, 0, 0] when
    every sample was skipped), landmarks [B, 5, 2] (NaN = unknown), issues {reason: count},
    masks (set by MaskingCollate), encoded (the rows DaliDecoder has yet to decode), skipped
    ((name, skip reason) of each sample left out), labels (int64 [B], the samples' classes;
    None unless every kept sample has one)."""

    images: torch.Tensor | None
    landmarks: torch.Tensor | None = None
    issues: Counter = field(default_factory=Counter)
    masks: "Masks | None" = None
    encoded: list[EncodedSample] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    labels: torch.Tensor | None = None

    def pin_memory(self) -> "Batch":
        """(DataLoader's pin_memory calls this.) The images, landmarks and labels in pinned memory."""
        return replace(self, images=self.images.pin_memory(), landmarks=self.landmarks.pin_memory(),
                       labels=None if self.labels is None else self.labels.pin_memory())


def _check(sample) -> None:
    if not isinstance(sample, (Sample, EncodedSample)):
        raise TypeError(f"a dataset item must be a pacofr.data Sample (or EncodedSample), not {type(sample).__name__}")


def labels_of(samples) -> torch.Tensor | None:
    """The kept samples' labels as int64 [B], or None when any has none."""
    labels = [s.label for s in samples]
    return None if not labels or None in labels else torch.tensor(labels, dtype=torch.int64)


def collate(samples: list[Sample]) -> Batch:
    """Samples -> Batch. Skipped samples are dropped; every reason (skipped and repaired) is
    counted. When every sample was skipped, B = 0 and, the size being unknown, images is
    [0, 3, 0, 0]."""
    issues, kept, skipped = Counter(), [], []
    for s in samples:
        _check(s)
        issues.update(s.issues)
        if s.image is not None:
            kept.append(s)
        else:
            skipped.extend((s.name, r) for r in s.issues)
    if kept:
        return Batch(torch.stack([s.image for s in kept]), torch.stack([s.landmarks for s in kept]), issues,
                     skipped=skipped, labels=labels_of(kept))
    return Batch(torch.zeros(0, 3, 0, 0), torch.zeros(0, 5, 2), issues, skipped=skipped)


def collate_encoded(samples: list[EncodedSample | Sample]) -> Batch:
    """Encoded samples -> Batch with `encoded` (the kept rows) and their landmarks [B, 5, 2];
    the skipped samples dropped and counted as in `collate`. The repairs and landmark issues
    of the kept rows stay in their samples until DaliDecoder has decoded them (a row it cannot
    decode is counted by its skip reason alone, as make_item does)."""
    issues, kept, skipped = Counter(), [], []
    for s in samples:
        _check(s)
        if isinstance(s, EncodedSample):
            kept.append(s)
        elif s.image is not None:
            raise TypeError("data.decoder='dali' needs items with encoded pixels (make_encoded_item); this "
                            "dataset decodes its images itself: use data.decoder='pil'")
        else:
            issues.update(s.issues)
            skipped.extend((s.name, r) for r in s.issues)
    landmarks = torch.stack([s.landmarks for s in kept]) if kept else torch.zeros(0, 5, 2)
    return Batch(None, landmarks, issues, encoded=kept, skipped=skipped, labels=labels_of(kept))


__all__ = ["Batch", "collate", "collate_encoded", "labels_of"]
