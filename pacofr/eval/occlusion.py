"""Occlusion robustness of a probe (`--occlude LEVELS --occluder eyes|mouth|random`): the probe,
fitted on the clean train set, scores the test set again at each level with a synthetic
occluder drawn over every test face.

The occluder is one rectangle over the face crop the probe sees (its S x S input: the face box
in this measure), of round(level x S^2) pixels give or take the rounding of its sides, filled
with a solid colour or with uniform noise (one or the other per face). `eyes` centres it on
the eyes and `mouth` on the mouth, taken from the face's landmarks where the probe has them
(5, 68 and 98-point layouts) and from the ArcFace template's points scaled to the crop
otherwise; `random` places it anywhere inside the crop. It never leaves the crop, so its
area is the level's. Every draw (position, shape, fill) is seeded by the seed, the level and
the face (its path and index): two encoders scored on the same test set see the same pixels.
Level 0 draws nothing, so it is the probe's clean score.
"""

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from ..data.align import template
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .overlay import face_tile

KINDS = ("eyes", "mouth", "random")
# Landmarks of each region, by the layout's point count: 5 points (eyes, nose, mouth corners),
# iBUG 68 and WFLW 98.
EYES = {5: (0, 1), 68: tuple(range(36, 48)), 98: tuple(range(60, 76))}
MOUTH = {5: (3, 4), 68: tuple(range(48, 68)), 98: tuple(range(76, 96))}
ASPECT = {"eyes": 3.0, "mouth": 2.0}  # width / height: a band over both eyes, a wide mouth
PREVIEW_FACES = 4  # test faces per level in FILE.occluded.png


def parse_levels(text: str) -> list[float]:
    """'0,0.1,0.2' -> [0.0, 0.1, 0.2]: fractions of the face crop in [0, 1], each once."""
    try:
        levels = [float(v) for v in text.split(",")]
    except ValueError:
        levels = []
    if not levels or not all(0 <= v <= 1 for v in levels) or len(set(levels)) < len(levels):
        raise ValueError(f"--occlude '{text}': give distinct comma-separated fractions of the face crop in [0, 1], "
                         "e.g. 0,0.1,0.2,0.3,0.4,0.5")
    return levels


def face_rng(seed: int, level: float, path: str, index: int) -> np.random.Generator:
    """The generator of one face's occluder: the same for the same seed, level and face."""
    return np.random.default_rng([seed, zlib.crc32(f"{level!r}|{path}|{index}".encode())])


def region_centre(kind: str, size: int, points: torch.Tensor | None) -> tuple[float, float]:
    """(x, y) in crop pixels of the eyes' or the mouth's points: the face's landmarks if their
    layout is known and they are finite, else the template's."""
    table = EYES if kind == "eyes" else MOUTH
    if points is not None and points.shape[0] in table and bool(torch.isfinite(points).all()):
        return tuple(points[list(table[points.shape[0]])].double().mean(0).tolist())
    tpl = template(size)
    return tuple(tpl[list(table[5])].mean(0).tolist())


def rectangle(kind: str, level: float, size: int, rng: np.random.Generator,
              points: torch.Tensor | None = None) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) of the occluder: w x h ~ level x size^2 pixels, inside the crop."""
    area = level * size * size
    aspect = ASPECT.get(kind) or math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    h = min(max(round(math.sqrt(area / aspect)), 1), size)
    w = min(max(round(area / h), 1), size)
    h = min(max(round(area / w), 1), size)  # (refitted when the width hit the crop's side)
    if kind == "random":
        return int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1)), w, h
    cx, cy = region_centre(kind, size, points)
    clamp = lambda v, hi: int(min(max(round(v), 0), hi))  # noqa: E731
    return clamp(cx - w / 2, size - w), clamp(cy - h / 2, size - h), w, h


def occlude(image: torch.Tensor, box: tuple, rng: np.random.Generator) -> torch.Tensor:
    """A copy of normalized `image` [3, S, S] with `box` filled: a solid colour or uniform noise."""
    x0, y0, w, h = box
    noise = bool(rng.random() < 0.5)
    pixels = rng.random((3, h, w) if noise else (3, 1, 1))
    mean, std = (torch.tensor(v, dtype=image.dtype).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    out = image.clone()
    out[:, y0:y0 + h, x0:x0 + w] = (torch.from_numpy(pixels).to(image.dtype) - mean) / std
    return out


class Occluded(Dataset):
    """A probe's test set with the occluder of `level` drawn over each face's image (the first
    element of its items); everything else is the test set's (its attributes too). Landmarks
    come from the set's `crop_points(index, item)` where it has one."""

    def __init__(self, dataset, level: float, kind: str = "random", seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"--occluder must be one of {', '.join(KINDS)}, got '{kind}'")
        self.dataset, self.level, self.kind, self.seed = dataset, float(level), kind, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "dataset":  # (unpickling, in a loader's worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def box(self, index: int, item) -> tuple:
        """The occluder's (x0, y0, w, h) on the `index`-th face, and its generator (for the fill)."""
        rng = face_rng(self.seed, self.level, self.dataset.paths[index], index)
        points = self.dataset.crop_points(index, item) if hasattr(self.dataset, "crop_points") else None
        return rectangle(self.kind, self.level, item[0].shape[-1], rng, points), rng

    def __getitem__(self, index: int):
        item, reason = self.dataset[index]
        if item is None or self.level == 0:
            return item, reason
        box, rng = self.box(index, item)
        return (occlude(item[0], box, rng), *item[1:]), None


@dataclass
class Occlusion:
    """The sweep of `--occlude` levels with one kind of occluder."""

    levels: list
    kind: str = "random"
    seed: int = 0

    def sweep(self, test, score, metric: str, lower_is_better: bool) -> dict:
        """The result's `robustness` table: `score(dataset) -> float` (the probe's own metric,
        from its fitted predictor) of `test` occluded at each level."""
        scores = {f"{level:g}": score(Occluded(test, level, self.kind, self.seed)) for level in self.levels}
        return {"metric": metric, "lower_is_better": lower_is_better, "occluder": self.kind, "seed": self.seed,
                "area": "fraction of the face crop (the probe's input) covered by one rectangle",
                "levels": scores}


# -- the files beside --output ---------------------------------------------------------------------
def write_preview(path, test, occlusion: Occlusion) -> None:
    """The first PREVIEW_FACES usable test faces (columns) at each level (rows), as one PNG."""
    shown = []
    for i in range(len(test)):
        if len(shown) == PREVIEW_FACES:
            break
        if test[i][0] is not None:
            shown.append(i)
    if not shown:
        return
    rows = [[face_tile(Occluded(test, level, occlusion.kind, occlusion.seed)[i][0][0]) for i in shown]
            for level in occlusion.levels]
    s = rows[0][0].size[0]
    sheet = Image.new("RGB", (len(shown) * s, len(rows) * s))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile, (c * s, r * s))
    sheet.save(path)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round values spanning [lo, hi]."""
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / count
    unit = 10 ** math.floor(math.log10(raw))
    step = next(m * unit for m in (1, 2, 5, 10) if m * unit >= raw)
    return [k * step for k in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def write_plot(path, robustness: dict, width: int = 560, height: int = 380) -> None:
    """The metric against the occluded fraction, drawn with PIL: axes, ticks, labels, the curve."""
    points = [(float(k), v) for k, v in robustness["levels"].items() if v is not None and math.isfinite(v)]
    img = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, right, top, bottom = 70, width - 20, 40, height - 50
    better = "lower" if robustness["lower_is_better"] else "higher"
    title = f"{robustness['metric']} vs occlusion ({robustness['occluder']} occluder, {better} is better)"
    draw.text((left, 10), title, fill="black", font=font)
    draw.line((left, top, left, bottom, right, bottom), fill="black")
    xs = sorted(float(k) for k in robustness["levels"])
    x_lo = min(xs + [0.0])
    x_hi = max(xs) if max(xs) > x_lo else x_lo + 0.1
    yt = nice_ticks(min((v for _, v in points), default=0.0), max((v for _, v in points), default=1.0))
    px = lambda x: left + (x - x_lo) / (x_hi - x_lo) * (right - left)  # noqa: E731
    py = lambda y: bottom - (y - yt[0]) / (yt[-1] - yt[0]) * (bottom - top)  # noqa: E731
    for x in xs:
        draw.line((px(x), bottom, px(x), bottom + 5), fill="black")
        draw.text((px(x) - 10, bottom + 8), f"{100 * x:g}%", fill="black", font=font)
    for y in yt:
        draw.line((left - 5, py(y), left, py(y)), fill="black")
        draw.line((left + 1, py(y), right, py(y)), fill=(225, 225, 225))
        draw.text((5, py(y) - 6), f"{y:.4g}", fill="black", font=font)
    draw.text(((left + right) // 2 - 90, bottom + 28), "occluded fraction of the face crop", fill="black", font=font)
    draw.text((5, top - 16), robustness["metric"], fill="black", font=font)
    line = [(px(x), py(y)) for x, y in sorted(points)]
    if len(line) > 1:
        draw.line(line, fill=(200, 30, 30), width=2)
    for x, y in line:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(200, 30, 30))
    img.save(path)


__all__ = ["KINDS", "Occlusion", "Occluded", "parse_levels", "rectangle", "occlude", "region_centre",
           "write_plot", "write_preview", "nice_ticks"]
