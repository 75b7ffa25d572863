"""Decoding one image file into RGB, with every problem named (docs/design.md 6).

A sample is either skipped (no image comes out) or repaired (an RGB image comes out, and the
repair is reported). The reasons are fixed strings, counted by `collate` (batch.py):

    skipped:  empty         zero-byte file
              not_an_image  PIL cannot identify it as an image
              truncated     identified, but the pixel data fails to decode fully (truncated
                            or corrupt); PIL raises because LOAD_TRUNCATED_IMAGES stays False
              too_small     either side < min_size (checked on the original size)
              too_large     more pixels than the budget (data.max_pixels), read from the header
                            before any decoding, and not a JPEG that decodes at 1/2, 1/4 or 1/8
                            scale within it (`draft`); also what PIL itself refuses as a
                            decompression bomb (over 2 x Image.MAX_IMAGE_PIXELS, whatever the budget)
              unreadable    any other OSError (missing file, broken link, permissions, a
                            decoder that is not available, a broken tar)
              bad_record    a RecordIO record that cannot be read (an .idx offset at no record,
                            a record cut short, a label that is no identity: recordio.py)
    repaired: gray_converted  1, L, I, I;16*, F, and P whose palette is gray -> RGB. 16-bit
                              data is scaled by 1/257, 32-bit integers likewise when they exceed
                              255, floats by 255 when they lie in [0, 1].
              cmyk_converted  CMYK -> RGB (PIL undoes Adobe's inverted CMYK)
              rgba_converted  anything with alpha (RGBA, LA, PA, RGBa, La, P or L/RGB with a
                              transparency key): composited on black, i.e. rgb * alpha
              landmarks_invalid  landmarks were given but are NaN/inf/outside the image; they
                              become NaN so the masker uses its template

A P image with a coloured palette is converted to RGB without a report: the conversion is
lossless and the image was colour already. Other colour modes (YCbCr, LAB, HSV, RGBX) likewise.
One sample may carry several repairs: its `issues` lists them all (items.py).
"""

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

SKIP_REASONS = ("empty", "not_an_image", "truncated", "too_small", "too_large", "unreadable", "bad_record")
REPAIR_REASONS = ("gray_converted", "cmyk_converted", "rgba_converted", "landmarks_invalid", "landmarks_missing")
REASONS = SKIP_REASONS + REPAIR_REASONS

_GRAY_MODES = ("1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def read_bytes(path) -> tuple[bytes | None, str | None]:
    """The file's bytes, or (None, "unreadable"): also for what is not a regular file (a FIFO
    would block the reader forever)."""
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None, "unreadable"
            return f.read(), None
    except OSError:
        return None, "unreadable"


def open_image(raw: bytes, min_size: int) -> tuple[Image.Image | None, str | None]:
    """Identify the image and check its size; pixel data is not decoded yet (so a JPEG can
    still be drafted, and the pixel budget checked: `draft`). Returns (image, None) or (None,
    reason)."""
    if raw is None:
        return None, "unreadable"
    if len(raw) == 0:
        return None, "empty"
    try:
        with warnings.catch_warnings():  # (PIL's bomb warning: the caller's budget decides, and counts)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        return None, "not_an_image"
    except Image.DecompressionBombError:
        return None, "too_large"
    except (OSError, MemoryError):
        return None, "unreadable"
    except Exception:  # a plugin choking on a malformed header
        return None, "not_an_image"
    w, h = im.size
    if min(w, h) < min_size:
        return None, "too_small"
    return im, None


def draft(im: Image.Image, size: tuple[int, int] | None, max_pixels: int) -> tuple[float | None, str | None]:
    """Before decoding: ask a JPEG to decode at 1/2, 1/4 or 1/8 scale while staying >= `size`
    (None: the full size) and, for one over the pixel budget, at the smallest of those scales
    that fits it. Returns (scale: original pixels per decoded pixel, 1.0 when nothing changed,
    None) or, for an image that would still decode to more than `max_pixels`, (None,
    "too_large"): it must not be decoded."""
    w0, h0 = im.size
    want = size or (w0, h0)
    if w0 * h0 > max_pixels:  # the least reduction that fits (a request of W // k keeps scale >= k)
        k = next((k for k in (2, 4, 8) if -(-w0 // k) * -(-h0 // k) <= max_pixels), None)
        if k is None:
            return None, "too_large"
        want = (min(want[0], w0 // k), min(want[1], h0 // k))
    scale = 1.0
    if want != (w0, h0):
        try:
            res = im.draft(im.mode, want)
        except Exception:
            res = None
        if res:
            scale = w0 / res[1][2]
    w, h = im.size  # (the decode size, after a draft)
    return (scale, None) if w * h <= max_pixels else (None, "too_large")


def load(im: Image.Image) -> str | None:
    """Decode the pixel data. Returns None or the skip reason."""
    try:
        im.load()
    except OSError as e:
        return "unreadable" if "not available" in str(e) else "truncated"
    except Image.DecompressionBombError:
        return "too_large"
    except MemoryError:
        return "unreadable"
    except Exception:  # SyntaxError, ValueError, EOFError, struct.error, zlib.error ...
        return "truncated"
    return None


def _gray_to_l(im: Image.Image) -> Image.Image:
    if im.mode in ("1", "L"):
        return im.convert("L")
    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
    else:
        a = a.astype(np.float64)
        if im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> tuple[Image.Image | None, str | None]:
    """Decoded image -> (RGB image, repair reason or None), or (None, skip reason)."""
    try:
        mode = im.mode
        if mode == "RGB" and "transparency" not in im.info:
            return im, None
        if mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = im.convert("RGBA")
            out = Image.new("RGB", rgba.size, (0, 0, 0))
            out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
            return out, "rgba_converted"
        if mode == "CMYK":
            return im.convert("RGB"), "cmyk_converted"
        if mode in _GRAY_MODES:
            return _gray_to_l(im).convert("RGB"), "gray_converted"
        if mode == "P":
            pal = np.asarray(im.getpalette() or [], dtype=np.int32).reshape(-1, 3)
            gray = bool(len(pal)) and bool((pal == pal[:, :1]).all())
            return im.convert("RGB"), ("gray_converted" if gray else None)
        return im.convert("RGB"), None
    except Image.DecompressionBombError:
        return None, "too_large"
    except MemoryError:
        return None, "unreadable"
    except OSError as e:
        return None, "unreadable" if "not available" in str(e) else "truncated"
    except Exception:
        return None, "unreadable"


def decode_rgb(im: Image.Image) -> tuple[Image.Image | None, str | None]:
    """`load`, then `to_rgb`: (RGB image, repair reason or None), or (None, skip reason)."""
    reason = load(im)
    return (None, reason) if reason else to_rgb(im)
