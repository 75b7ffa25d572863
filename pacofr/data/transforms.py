"""Train-time augmentation of one face image and its landmarks, a pure function of a seed.

Coordinates: landmarks are (x, y) in continuous pixel coordinates: pixel (i, j) (column i,
row j) covers [i, i + 1) x [j, j + 1), so its centre is (i + 0.5, j + 0.5) and an S-pixel image
spans [0, S]. This is the convention of PIL's resize boxes and of `pacofr.masking` (patch
centres at (k + 0.5) * p, inside means 0 <= x < S). Under it:

- random resized crop of the box (x0, y0, w, h) to S x S: x' = (x - x0) * S / w (same for y);
- horizontal flip: x' = S - x (pixel i goes to S - 1 - i, its centre i + 0.5 to S - i - 0.5),
  and the points swap sides: left eye <-> right eye, left mouth <-> right mouth, nose stays.
  "Left" is the point with the smaller x in an upright, unflipped face (as in the template).

Points a crop cuts off stay where the transform puts them (outside [0, S)); the masker falls
back to its template for them. Annotations made with the "pixel centre = integer" convention
are off by half a pixel, which is far below what the masker can resolve (a patch).

Randomness: every draw comes from one `torch.Generator` seeded by `sample_seed(...)` of the
caller's keys (seed, epoch, index), so a sample's augmentation does not depend on the order
or the process in which it is produced, and no global RNG is touched.
"""

import math

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLIP_PERM = (1, 0, 2, 4, 3)  # left eye, right eye, nose, left mouth, right mouth after a flip
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
_INV_STD_255 = 1.0 / (255.0 * _STD.view(3, 1))
_MEAN_OVER_STD = _MEAN.view(3, 1) / _STD.view(3, 1)
_GRAY = torch.tensor([0.299, 0.587, 0.114])
_TRIES = 10
_N_DRAWS = 4 * _TRIES + 1 + 3


def sample_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of integer keys (any sign)."""
    ss = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys])
    a, b = ss.generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)


def draws(seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(_N_DRAWS, generator=g, dtype=torch.float64).tolist()


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Normalized images [..., 3, H, W] -> [0, 1] (for PNG grids)."""
    mean = _MEAN.to(images.device, images.dtype)
    std = _STD.to(images.device, images.dtype)
    return (images * std + mean).clamp(0.0, 1.0)


class FaceTransform:
    """(RGB image of original size W x H, landmarks [5, 2] in original pixels) ->
    (normalized FloatTensor [3, S, S], landmarks [5, 2] in output pixels).

    With augment=False: no flip, no jitter, and the crop is the centred square of the
    largest side that fits (the whole image when it is square)."""

    def __init__(self, img_size: int, scale_min: float = 0.85, ratio_max: float = 1.1, hflip: float = 0.5,
                 color_jitter: float = 0.1, augment: bool = True):
        if not 0.0 < scale_min <= 1.0:
            raise ValueError(f"data.scale_min must be in (0, 1], got {scale_min}")
        if ratio_max < 1.0:
            raise ValueError(f"data.ratio_max must be >= 1, got {ratio_max}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"data.hflip must be in [0, 1], got {hflip}")
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"data.color_jitter must be in [0, 1), got {color_jitter}")
        self.size = int(img_size)
        self.augment = augment
        self.scale_min = scale_min if augment else 1.0
        self.ratio_max = ratio_max if augment else 1.0
        self.hflip = hflip if augment else 0.0
        self.jitter = color_jitter if augment else 0.0

    # -- parameters -------------------------------------------------------------------------
    def params(self, width: int, height: int, seed: int) -> dict:
        """Crop box (x0, y0, w, h) in original pixels, flip, jitter factors."""
        r = draws(seed)
        area = float(width * height)
        lo, hi = math.log(1.0 / self.ratio_max), math.log(self.ratio_max)
        box = None
        for t in range(_TRIES):  # torchvision's RandomResizedCrop, on a continuous box
            u = r[4 * t: 4 * t + 4]
            target = area * (self.scale_min + (1.0 - self.scale_min) * u[0])
            ratio = math.exp(lo + (hi - lo) * u[1])
            w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if w <= width + 1e-9 and h <= height + 1e-9:
                w, h = min(w, float(width)), min(h, float(height))
                box = ((width - w) * u[2], (height - h) * u[3], w, h)
                break
        if box is None:  # centre crop, aspect clamped into the allowed range
            in_ratio = width / height
            if in_ratio < 1.0 / self.ratio_max:
                w, h = float(width), width * self.ratio_max
            elif in_ratio > self.ratio_max:
                w, h = height * self.ratio_max, float(height)
            else:
                w, h = float(width), float(height)
            box = ((width - w) / 2.0, (height - h) / 2.0, w, h)
        j = self.jitter
        return dict(box=box, flip=r[4 * _TRIES] < self.hflip,
                    jitter=[1.0 - j + 2.0 * j * u for u in r[4 * _TRIES + 1:]] if j > 0 else None)

    def draft_size(self, params: dict, width: int, height: int) -> tuple[int, int]:
        """The smallest decode size that keeps the crop at >= S pixels on each side."""
        _, _, w, h = params["box"]
        f = self.size / max(min(w, h), 1e-6)
        return max(1, math.ceil(width * f)), max(1, math.ceil(height * f))

    # -- application --------------------------------------------------------------------------
    def pixels(self, im: Image.Image, params: dict, scale: float = 1.0) -> np.ndarray:
        """The crop of `params`, resized to S x S and flipped: uint8 [S, S, 3]. `im` may be a
        drafted decode: `scale` original pixels per decoded pixel."""
        s = self.size
        x0, y0, w, h = params["box"]
        out = im.resize((s, s), Image.BILINEAR,
                        box=(x0 / scale, y0 / scale, (x0 + w) / scale, (y0 + h) / scale))
        if params["flip"]:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.array(out, dtype=np.uint8)

    def apply(self, im: Image.Image, params: dict, landmarks: torch.Tensor, scale: float = 1.0):
        s = self.size
        x = torch.from_numpy(self.pixels(im, params, scale)).permute(2, 0, 1).contiguous().view(3, -1).float()
        if params["jitter"] is not None:  # [3, S*S] in 0..255
            x = color_jitter(x.div_(255.0), *params["jitter"]).sub_(_MEAN.view(3, 1)).div_(_STD.view(3, 1))
        else:
            x = x.mul_(_INV_STD_255).sub_(_MEAN_OVER_STD)
        return x.view(3, s, s), self.landmarks(landmarks, params)

    def landmarks(self, landmarks: torch.Tensor, params: dict) -> torch.Tensor:
        """[5, 2] in original pixels -> output pixels, under the crop and flip of `params`."""
        s = self.size
        x0, y0, w, h = params["box"]
        lm = landmarks.clone()
        lm[:, 0] = (lm[:, 0] - x0) * (s / w)
        lm[:, 1] = (lm[:, 1] - y0) * (s / h)
        if params["flip"]:
            lm = lm[list(FLIP_PERM)]
            lm[:, 0] = s - lm[:, 0]
        return lm

    def __call__(self, im: Image.Image, landmarks: torch.Tensor, seed: int):
        return self.apply(im, self.params(im.size[0], im.size[1], seed), landmarks)


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """x: pixels [3, N] in [0, 1]. Brightness, contrast, saturation factors applied in this
    fixed order, as torchvision's formulas (contrast around the mean gray of the image,
    saturation towards each pixel's gray), composed into one affine map and clamped to [0, 1]
    once at the end (torchvision clamps after each step; this differs only where a step
    saturates)."""
    w = _GRAY
    mean = float((w @ x).mean()) * brightness  # mean gray after brightness
    sat = saturation * torch.eye(3) + (1.0 - saturation) * torch.outer(torch.ones(3), w)
    m = sat * (contrast * brightness)  # y = m @ x + (1 - c) * mean (rows of sat sum to 1)
    return torch.addmm(torch.full((3, 1), (1.0 - contrast) * mean), m, x).clamp_(0.0, 1.0)


def color_jitter_batch(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """`color_jitter` of a batch on its device, without a host sync: x [B, 3, N] in [0, 1],
    factors [B, 3] (brightness, contrast, saturation; (1, 1, 1) leaves an image as it is).
    The same map, rounded differently (float32 throughout)."""
    w = _GRAY.to(x.device)
    b, c, s = factors.to(x.device, torch.float32).unbind(-1)
    mean = (w @ x).mean(-1) * b
    eye = torch.eye(3, device=x.device)
    sat = s[:, None, None] * eye + (1.0 - s)[:, None, None] * torch.outer(torch.ones_like(w), w)
    return torch.baddbmm(((1.0 - c) * mean)[:, None, None], sat * (c * b)[:, None, None], x).clamp_(0.0, 1.0)


def normalize(pixels: torch.Tensor, factors: torch.Tensor | None = None) -> torch.Tensor:
    """Decoded uint8 images [B, S, S, 3] (any device) -> ImageNet-normalized float [B, 3, S, S],
    colour-jittered first with per-image `factors` [B, 3] when given (as FaceTransform.apply)."""
    b, h, w, _ = pixels.shape
    x = pixels.permute(0, 3, 1, 2).reshape(b, 3, h * w).float().div_(255.0)
    if factors is not None:
        x = color_jitter_batch(x, factors)
    mean, std = _MEAN.view(3, 1).to(x.device), _STD.view(3, 1).to(x.device)
    return x.sub_(mean).div_(std).view(b, 3, h, w)
