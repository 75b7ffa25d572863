"""One sample, decoded (`Sample`, the PIL path) or left encoded for DaliDecoder
(`EncodedSample`, data.decoder='dali'), built from an image's bytes and its given landmarks.

A skipped sample is a `Sample` without an image, its `issues` naming the skip reason; a kept
one lists its repairs (decode.py names every reason). Its `name` (the file, or a shard sample's
`shard.tar/key`) is set by the dataset, so the files skipped can be listed (batch.py).

No image is decoded to more than `max_pixels` (data.max_pixels): the budget is checked on the
header, and a larger JPEG is decoded at reduced scale within it, or the sample is skipped.

With `align` (data.align='arcface'), an image with usable landmarks is first warped to the
ArcFace template at the output size (align.py), and the augmentation crops that aligned face;
one without them goes on unaligned, its landmark reason counted."""

import io
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from ..config import DataConfig
from .align import align as align_face
from .decode import decode_rgb, draft, open_image
from .landmarks import NAN5, check_landmarks
from .transforms import FaceTransform, sample_seed

MASK_KEY = 0x6D61736B  # derives a sample's mask seed from its augmentation seed
MAX_PIXELS = DataConfig.max_pixels


@dataclass
class Sample:
    """image: FloatTensor [3, S, S] (ImageNet-normalized), None when skipped; landmarks:
    FloatTensor [5, 2] (x, y in output pixels, NaN when unknown), None when skipped; issues:
    the reasons it was skipped or repaired, in the order they were found; label: its class
    (an identity), None for sources without labels."""

    image: torch.Tensor | None
    landmarks: torch.Tensor | None
    issues: tuple[str, ...] = ()
    name: str = ""
    label: int | None = None


@dataclass
class EncodedSample:
    """A sample whose pixels DaliDecoder decodes: data (the encoded file, uint8), params (crop,
    flip, jitter: FaceTransform.params), landmarks [5, 2] (output pixels), mask_seed (a function
    of the sample's identity and epoch), issues (its repairs and landmark issues, counted once
    it is decoded), label (as Sample's)."""

    data: np.ndarray
    params: dict
    landmarks: torch.Tensor
    mask_seed: int
    issues: tuple[str, ...] = ()
    name: str = ""
    label: int | None = None


def skipped(reason: str) -> Sample:
    return Sample(None, None, (reason,))


def landmarks_missing(sample: Sample | EncodedSample) -> Sample | EncodedSample:
    """A sample of a dataset that gives landmarks, but none for this image: the masker's
    template stands in, and it is counted (a skipped sample counts its skip reason alone)."""
    if isinstance(sample, Sample) and sample.image is None:
        return sample
    return replace(sample, issues=sample.issues + ("landmarks_missing",))


def _given_points(points: np.ndarray | None, width: int, height: int) -> tuple[np.ndarray, tuple[str, ...]]:
    if points is None:
        return NAN5, ()
    if not check_landmarks(points, width, height):
        return NAN5, ("landmarks_invalid",)
    return points, ()


def _reasons(repair: str | None, issues: tuple[str, ...]) -> tuple[str, ...]:
    return ((repair,) if repair else ()) + issues


def _aligned(im: Image.Image, points: np.ndarray, size: int, max_pixels: int):
    """The image decoded (within the budget) and warped to the template: (aligned RGB image,
    its points, the decode's repair or None), or a skipped Sample."""
    scale, reason = draft(im, None, max_pixels)
    if scale is None:
        return skipped(reason)
    rgb, repair = decode_rgb(im)
    if rgb is None:
        return skipped(repair)
    return *align_face(rgb, np.asarray(points, dtype=np.float64) / scale, size), repair


def _open(raw: bytes | None, points: np.ndarray | None, transform: FaceTransform, min_size: int, seed: int,
          max_pixels: int, align: bool):
    """The image opened (its header read, no pixel decoded; decoded and aligned with `align`
    and usable points), its given points checked and its crop drawn: (image, points, issues,
    crop params), or a skipped Sample."""
    im, reason = open_image(raw, min_size)
    if im is None:
        return skipped(reason)
    points, issues = _given_points(points, *im.size)
    if align and not issues and np.isfinite(points).all():
        aligned = _aligned(im, points, transform.size, max_pixels)
        if isinstance(aligned, Sample):
            return aligned
        im, points, repair = aligned
        issues = _reasons(repair, issues)
    return im, points, issues, transform.params(*im.size, seed)


def make_item(raw: bytes | None, points: np.ndarray | None, transform: FaceTransform, min_size: int,
              seed: int, max_pixels: int = MAX_PIXELS, align: bool = False) -> Sample:
    """Encoded image (+ given landmarks in original pixels, or None) -> Sample."""
    opened = _open(raw, points, transform, min_size, seed, max_pixels, align)
    if isinstance(opened, Sample):
        return opened
    im, points, issues, params = opened
    scale, reason = draft(im, transform.draft_size(params, *im.size), max_pixels)
    if scale is None:
        return skipped(reason)
    rgb, repair = decode_rgb(im)
    if rgb is None:
        return skipped(repair)
    image, lm = transform.apply(rgb, params, torch.from_numpy(np.array(points, dtype=np.float32)), scale)
    return Sample(image, lm, _reasons(repair, issues))


# What DALI decodes as PIL does; anything else (alpha, CMYK, palette, 16 bits, BMP's many
# layouts, other formats) is decoded and repaired in the worker and passed on as PNG.
DALI_FORMATS = ("JPEG", "PNG")
DALI_MODES = ("RGB", "L")
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def dali_reads_as_is(im: Image.Image, raw: bytes) -> bool:
    """The encoded file `raw` (opened as `im`, not decoded yet) decodes in DALI as in PIL, without
    a repair but gray to RGB: a JPEG or PNG in RGB or L, without a transparency key, ending with
    its end marker (one cut short might pass nvJPEG unnoticed)."""
    return (im.format in DALI_FORMATS and im.mode in DALI_MODES and "transparency" not in im.info
            and raw.rstrip(b"\0").endswith(_END_MARKERS[im.format]))


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)  # (fast; DALI decodes it anywhere)
    return buf.getvalue()


def make_encoded_item(raw: bytes | None, points: np.ndarray | None, transform: FaceTransform, min_size: int,
                      seed: int, max_pixels: int = MAX_PIXELS, align: bool = False) -> EncodedSample | Sample:
    """Like make_item, but leaves the pixels encoded for DaliDecoder: an EncodedSample, or a
    skipped Sample. A JPEG or PNG within the pixel budget, in a mode DALI reads as PIL does,
    and ending with its end marker, is passed on as read (only its header is parsed here);
    anything else is decoded here (a JPEG over the budget drafted, as make_item does, and
    its crop box scaled to the decoded pixels), skipped or repaired as make_item does. A file
    broken inside is caught by the decoder (DaliDecoder falls back to PIL). An aligned face is
    passed on as a PNG of its pixels."""
    opened = _open(raw, points, transform, min_size, seed, max_pixels, align)
    if isinstance(opened, Sample):
        return opened
    im, points, issues, params = opened
    width, height = im.size
    landmarks = transform.landmarks(torch.from_numpy(np.array(points, dtype=np.float32)), params)
    repair, over = None, width * height > max_pixels  # (DALI cannot draft: the budget is kept here)
    if over or not dali_reads_as_is(im, raw):
        scale, reason = draft(im, transform.draft_size(params, width, height) if over else None, max_pixels)
        if scale is None:
            return skipped(reason)
        rgb, repair = decode_rgb(im)
        if rgb is None:
            return skipped(repair)
        raw = png_bytes(rgb)
        if scale != 1.0:
            params = dict(params, box=tuple(v / scale for v in params["box"]))
    elif im.mode == "L":
        repair = "gray_converted"  # DALI decodes it to RGB, as to_rgb does
    return EncodedSample(np.frombuffer(raw, dtype=np.uint8), params, landmarks, sample_seed(seed, MASK_KEY),
                         _reasons(repair, issues))


__all__ = ["Sample", "EncodedSample", "skipped", "landmarks_missing", "make_item", "make_encoded_item", "png_bytes",
           "dali_reads_as_is", "MAX_PIXELS"]
