"""Structured facial-region masking (docs/design.md 1.1).

Per image: facial regions from 5 landmarks (or the canonical template), optionally 1..n whole
regions masked, then the mask grown to its target count with rectangular blocks, then a
replace set drawn among the visible patches. Everything is vectorized over the batch and
draws only from the given `torch.Generator`, so a mask is reproducible on CPU or GPU.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .config import MaskingConfig
from .data.landmarks import five_points

# Canonical 5 points of an aligned face crop, as fractions of width and height: left eye,
# right eye, nose tip, left and right mouth corners (the usual 112 x 112 alignment template).
TEMPLATE_5 = torch.tensor(
    [[0.3419, 0.4616], [0.6565, 0.4598], [0.5003, 0.6405], [0.3710, 0.8247], [0.6315, 0.8232]]
)

REGIONS = ("left_eye", "right_eye", "nose", "mouth", "forehead", "left_cheek", "right_cheek", "chin", "background")
BACKGROUND = REGIONS.index("background")


@dataclass
class Masks:
    mask: Tensor  # [B, L] bool, True = hidden from the encoder, predicted by the decoder
    replace: Tensor  # [B, L] bool, visible patches replaced by codebook mixtures
    regions: Tensor  # [B, L] int64, index into REGIONS

    def to(self, device, non_blocking: bool = False) -> "Masks":
        return Masks(*(t.to(device, non_blocking=non_blocking) for t in (self.mask, self.replace, self.regions)))

    def select(self, rows: Tensor) -> "Masks":
        """The masks of the samples at `rows` (indices into the batch)."""
        return Masks(self.mask[rows], self.replace[rows], self.regions[rows])


def resolve_landmarks(landmarks: Tensor | None, batch: int, height: int, width: int, device) -> Tensor:
    """5 points per image in pixels; NaN, infinite or out-of-image landmarks -> the template."""
    template = (TEMPLATE_5.to(device) * torch.tensor([width, height], device=device)).expand(batch, 5, 2)
    if landmarks is None:
        return template
    lm = five_points(landmarks.to(device, torch.float32))
    inside = (lm[..., 0] >= 0) & (lm[..., 0] < width) & (lm[..., 1] >= 0) & (lm[..., 1] < height)
    good = (torch.isfinite(lm).all(-1) & inside).all(-1)
    return torch.where(good[:, None, None], lm, template)


def patch_regions(points: Tensor, grid: tuple[int, int], patch_size: int) -> Tensor:
    """Region index of every patch [B, L]: background outside a face ellipse, else the
    nearest facial anchor (a Voronoi split, so every region is one connected piece)."""
    gh, gw = grid
    device = points.device
    ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    centers = (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * patch_size  # [L, 2] (x, y)

    le, re, nose, lm, rm = points.unbind(1)  # each [B, 2]
    eye_mid, mouth_mid = (le + re) / 2, (lm + rm) / 2
    up = eye_mid - mouth_mid  # mouth -> eyes
    across = le - re  # towards the left-eye side
    anchors = torch.stack(
        [
            le, re, nose, mouth_mid,
            eye_mid + 0.8 * up,  # forehead
            (le + lm) / 2 + 0.35 * across,  # left cheek
            (re + rm) / 2 - 0.35 * across,  # right cheek
            mouth_mid - 0.6 * up,  # chin
        ],
        dim=1,
    )  # [B, 8, 2]
    nearest = torch.cdist(centers.expand(points.shape[0], -1, -1), anchors).argmin(-1)

    # Face ellipse in the face's own frame: from 0.9 eye-mouth distances below the mouth to
    # 1.0 above the eyes, 1.25 eye distances to each side of the centre line.
    em = up.norm(dim=-1, keepdim=True).clamp_min(1e-3)
    de = across.norm(dim=-1, keepdim=True).clamp_min(1e-3)
    axis_up = up / em
    axis_across = torch.stack([-axis_up[:, 1], axis_up[:, 0]], -1)
    center = mouth_mid + 0.55 * up
    rel = centers[None] - center[:, None]  # [B, L, 2]
    u = (rel * axis_across[:, None]).sum(-1) / (1.25 * de)
    v = (rel * axis_up[:, None]).sum(-1) / (1.45 * em)
    inside = u**2 + v**2 <= 1.0
    return torch.where(inside, nearest, torch.full_like(nearest, BACKGROUND))


# A source of uniform draws: shape -> a tensor of that shape. Every mask is built from the draws
# of one such source, in a fixed order and count (see `_draw_count`).
Draw = Callable[[tuple[int, ...]], Tensor]


def _generator_draw(generator, device) -> Draw:
    return lambda shape: torch.rand(shape, generator=generator, device=device)


class _RowDraws:
    """Draws served from pre-drawn uniforms [B, total], column by column: row i holds what its
    own generator would have produced call after call (each float is one draw of the stream)."""

    def __init__(self, uniforms: Tensor):
        self.uniforms, self.used = uniforms, 0

    def __call__(self, shape: tuple[int, ...]) -> Tensor:
        n = math.prod(shape[1:])
        out = self.uniforms[:, self.used : self.used + n].reshape(shape)
        self.used += n
        return out


def _rank(keys: Tensor) -> Tensor:
    """Rank of every entry of each row when sorted descending (0 = largest)."""
    order = keys.argsort(dim=1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(order))


def whole_regions(regions: Tensor, n_mask: Tensor, cfg: MaskingConfig, draw: Draw) -> Tensor:
    """[B, L] bool: 1..regions_max whole facial regions per image (with prob. region_prob),
    only regions that fit in the image's masked count."""
    b, device = regions.shape[0], regions.device
    n_regions = BACKGROUND  # facial regions only
    onehot = regions[..., None] == torch.arange(n_regions, device=device)  # [B, L, R]
    sizes = onehot.sum(1)  # [B, R]
    use = draw((b,)) < cfg.region_prob
    want = 1 + (draw((b,)) * cfg.regions_max).long().clamp_max(cfg.regions_max - 1)
    order = draw((b, n_regions)).argsort(1)  # random order of regions
    chosen = torch.zeros(b, n_regions, dtype=torch.bool, device=device)
    count = torch.zeros(b, dtype=torch.long, device=device)
    for j in range(n_regions):  # greedy in random order: take a region if it fits (R = 8 steps)
        r = order[:, j]
        size = sizes.gather(1, r[:, None])[:, 0]
        take = use & (chosen.sum(1) < want) & (size > 0) & (count + size <= n_mask)
        chosen.scatter_(1, r[:, None], take[:, None] | chosen.gather(1, r[:, None]))
        count = count + take * size
    return (onehot & chosen[:, None, :]).any(-1)


def block_priority(batch: int, grid: tuple[int, int], cfg: MaskingConfig, draw: Draw, device) -> Tensor:
    """[B, L] priorities constant on random rectangles (side block_min..block_max patches,
    random aspect and offset per image), so taking the top ones masks whole blocks."""
    gh, gw = grid
    span = cfg.block_max - cfg.block_min + 1
    bh = cfg.block_min + (draw((batch, 1, 1)) * span).long().clamp_max(span - 1)
    bw = cfg.block_min + (draw((batch, 1, 1)) * span).long().clamp_max(span - 1)
    off_y = (draw((batch, 1, 1)) * bh).long()
    off_x = (draw((batch, 1, 1)) * bw).long()
    ys = torch.arange(gh, device=device)[None, :, None]
    xs = torch.arange(gw, device=device)[None, None, :]
    cell = ((ys + off_y) // bh) * (gw + 1) + (xs + off_x) // bw  # [B, gh, gw], < (gh + 1) * (gw + 1)
    cell_value = draw((batch, (gh + 1) * (gw + 1)))
    coarse = cell_value.gather(1, cell.reshape(batch, -1))
    # A small per-patch jitter orders patches inside the one block that is cut by the count.
    return coarse + 1e-3 * draw((batch, gh * gw))


def structured_masks(
    batch: int,
    image_size: tuple[int, int],
    patch_size: int,
    cfg: MaskingConfig,
    landmarks: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Masks:
    """Masks for a batch of face crops of `image_size` (H, W); `landmarks` [B, 5|68, 2] in
    crop pixels (x, y), or None for the canonical template."""
    height, width = image_size
    grid = (height // patch_size, width // patch_size)
    device = torch.device(device)

    points = resolve_landmarks(landmarks, batch, height, width, device)
    regions = patch_regions(points, grid, patch_size)
    return _draw_masks(regions, grid, cfg, _generator_draw(generator, device))


def _draw_count(grid: tuple[int, int]) -> int:
    """Uniforms one image's mask consumes, in `_draw_masks`'s order: its ratio; region use, count
    and order; block height, width and offsets, cell values and jitter; Gumbel keys."""
    gh, gw = grid
    return 1 + 2 + BACKGROUND + 4 + (gh + 1) * (gw + 1) + 2 * gh * gw


def _draw_masks(regions: Tensor, grid: tuple[int, int], cfg: MaskingConfig, draw: Draw) -> Masks:
    """Masks for the region maps `regions` [B, L] from `draw`'s uniforms."""
    batch, num_patches = regions.shape
    device = regions.device
    ratio = cfg.ratio_min + (cfg.ratio_max - cfg.ratio_min) * draw((batch,))
    # Round inside [ceil(min * L), floor(max * L)] so every image's ratio stays in range.
    lo = torch.ceil(torch.tensor(cfg.ratio_min * num_patches - 1e-6)).long().item()
    hi = max(lo, int(cfg.ratio_max * num_patches + 1e-6))
    n_mask = torch.round(ratio * num_patches).long().clamp(lo, hi)

    region_mask = whole_regions(regions, n_mask, cfg, draw)
    priority = block_priority(batch, grid, cfg, draw, device)
    priority = torch.where(region_mask, torch.full_like(priority, 2.0), priority)  # regions first
    mask = _rank(priority) < n_mask[:, None]

    # Replace set: replace_ratio of the visible patches, drawn with weights (Gumbel top-k):
    # facial regions 1, background `background_replace_weight`.
    n_visible = num_patches - n_mask
    n_replace = torch.round(cfg.replace_ratio * n_visible).long()
    weight = torch.where(regions == BACKGROUND, cfg.background_replace_weight, 1.0)
    gumbel = -torch.log(-torch.log(draw((batch, num_patches)).clamp(1e-20, 1 - 1e-7)))
    keys = torch.where(mask | (weight <= 0), -torch.inf, torch.log(weight.clamp_min(1e-20)) + gumbel)
    replace = (_rank(keys) < n_replace[:, None]) & torch.isfinite(keys)  # (never masked, nor of weight 0)
    return Masks(mask=mask, replace=replace, regions=regions)


@lru_cache(maxsize=16)
def _template_regions(height: int, width: int, patch_size: int) -> Tensor:
    """[L] region map of the canonical template (every image without usable landmarks)."""
    points = resolve_landmarks(None, 1, height, width, "cpu")
    return patch_regions(points, (height // patch_size, width // patch_size), patch_size)[0]


def _sample_regions(landmarks: Tensor | None, batch: int, image_size: tuple[int, int], patch_size: int) -> Tensor:
    """[B, L] region maps: the cached template map, or an image's own landmarks' map, as
    `structured_masks` computes it for a batch of one (every step is row-wise)."""
    height, width = image_size
    template = _template_regions(height, width, patch_size)
    regions = template.expand(batch, -1).clone()
    if landmarks is None:
        return regions
    points = resolve_landmarks(landmarks, batch, height, width, "cpu")
    own = (points != resolve_landmarks(None, 1, height, width, "cpu")).flatten(1).any(1)
    if own.any():
        regions[own] = patch_regions(points[own], (height // patch_size, width // patch_size), patch_size)
    return regions


def _seeded_uniforms(seeds: list[int], count: int) -> Tensor:
    """[B, count]: row i is the first `count` uniforms of a generator seeded with seeds[i]."""
    out = torch.empty(len(seeds), count)
    generator = torch.Generator()
    for row, seed in zip(out, seeds):
        torch.rand(count, generator=generator.manual_seed(int(seed)), out=row)
    return out


def sample_masks(seeds: list[int], image_size: tuple[int, int], patch_size: int, cfg: MaskingConfig,
                 landmarks: Tensor | None = None) -> Masks:
    """Masks drawn per sample, each from a generator seeded with its own `seeds[i]`: a sample's
    mask depends only on its seed, not on the batch or the rank it lands in (so data-parallel
    and resumed runs see the masks of a single uninterrupted process). Bit for bit the masks of
    `structured_masks` called on each sample alone; the draws of all samples are taken first
    and the rest runs once for the batch (every step is row-wise, so rows do not interact)."""
    grid = (image_size[0] // patch_size, image_size[1] // patch_size)
    if not seeds:
        empty = torch.zeros(0, grid[0] * grid[1], dtype=torch.bool)
        return Masks(empty, empty.clone(), empty.long())
    regions = _sample_regions(landmarks, len(seeds), image_size, patch_size)
    draws = _RowDraws(_seeded_uniforms(seeds, _draw_count(grid)))
    masks = _draw_masks(regions, grid, cfg, draws)
    assert draws.used == draws.uniforms.shape[1], "the draw count is out of step with _draw_masks"
    return masks
