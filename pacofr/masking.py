"""Structured facial-region masking (docs/design.md 1.1).

Per image: facial regions from 5 landmarks (or the canonical template), optionally 1..n whole
regions masked, then the mask grown to its target count with rectangular blocks, then a
replace set drawn among the visible patches. Everything is vectorized over the batch and
draws only from the given `torch.Generator`, so a mask is reproducible on CPU or GPU.
"""

from dataclasses import dataclass

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


def _uniform(shape, generator, device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _rank(keys: Tensor) -> Tensor:
    """Rank of every entry of each row when sorted descending (0 = largest)."""
    order = keys.argsort(dim=1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(order))


def whole_regions(regions: Tensor, n_mask: Tensor, cfg: MaskingConfig, generator, device) -> Tensor:
    """[B, L] bool: 1..regions_max whole facial regions per image (with prob. region_prob),
    only regions that fit in the image's masked count."""
    b = regions.shape[0]
    n_regions = BACKGROUND  # facial regions only
    onehot = regions[..., None] == torch.arange(n_regions, device=device)  # [B, L, R]
    sizes = onehot.sum(1)  # [B, R]
    use = _uniform((b,), generator, device) < cfg.region_prob
    want = 1 + (_uniform((b,), generator, device) * cfg.regions_max).long().clamp_max(cfg.regions_max - 1)
    order = _uniform((b, n_regions), generator, device).argsort(1)  # random order of regions
    chosen = torch.zeros(b, n_regions, dtype=torch.bool, device=device)
    count = torch.zeros(b, dtype=torch.long, device=device)
    for j in range(n_regions):  # greedy in random order: take a region if it fits (R = 8 steps)
        r = order[:, j]
        size = sizes.gather(1, r[:, None])[:, 0]
        take = use & (chosen.sum(1) < want) & (size > 0) & (count + size <= n_mask)
        chosen.scatter_(1, r[:, None], take[:, None] | chosen.gather(1, r[:, None]))
        count = count + take * size
    return (onehot & chosen[:, None, :]).any(-1)


def block_priority(batch: int, grid: tuple[int, int], cfg: MaskingConfig, generator, device) -> Tensor:
    """[B, L] priorities constant on random rectangles (side block_min..block_max patches,
    random aspect and offset per image), so taking the top ones masks whole blocks."""
    gh, gw = grid
    span = cfg.block_max - cfg.block_min + 1
    bh = cfg.block_min + (_uniform((batch, 1, 1), generator, device) * span).long().clamp_max(span - 1)
    bw = cfg.block_min + (_uniform((batch, 1, 1), generator, device) * span).long().clamp_max(span - 1)
    off_y = (_uniform((batch, 1, 1), generator, device) * bh).long()
    off_x = (_uniform((batch, 1, 1), generator, device) * bw).long()
    ys = torch.arange(gh, device=device)[None, :, None]
    xs = torch.arange(gw, device=device)[None, None, :]
    cell = ((ys + off_y) // bh) * (gw + 1) + (xs + off_x) // bw  # [B, gh, gw], < (gh + 1) * (gw + 1)
    cell_value = _uniform((batch, (gh + 1) * (gw + 1)), generator, device)
    coarse = cell_value.gather(1, cell.reshape(batch, -1))
    # A small per-patch jitter orders patches inside the one block that is cut by the count.
    return coarse + 1e-3 * _uniform((batch, gh * gw), generator, device)


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
    num_patches = grid[0] * grid[1]
    device = torch.device(device)

    points = resolve_landmarks(landmarks, batch, height, width, device)
    regions = patch_regions(points, grid, patch_size)

    ratio = cfg.ratio_min + (cfg.ratio_max - cfg.ratio_min) * _uniform((batch,), generator, device)
    # Round inside [ceil(min * L), floor(max * L)] so every image's ratio stays in range.
    lo = torch.ceil(torch.tensor(cfg.ratio_min * num_patches - 1e-6)).long().item()
    hi = max(lo, int(cfg.ratio_max * num_patches + 1e-6))
    n_mask = torch.round(ratio * num_patches).long().clamp(lo, hi)

    region_mask = whole_regions(regions, n_mask, cfg, generator, device)
    priority = block_priority(batch, grid, cfg, generator, device)
    priority = torch.where(region_mask, torch.full_like(priority, 2.0), priority)  # regions first
    mask = _rank(priority) < n_mask[:, None]

    # Replace set: replace_ratio of the visible patches, drawn with weights (Gumbel top-k):
    # facial regions 1, background `background_replace_weight`.
    n_visible = num_patches - n_mask
    n_replace = torch.round(cfg.replace_ratio * n_visible).long()
    weight = torch.where(regions == BACKGROUND, cfg.background_replace_weight, 1.0)
    gumbel = -torch.log(-torch.log(_uniform((batch, num_patches), generator, device).clamp(1e-20, 1 - 1e-7)))
    keys = torch.where(mask | (weight <= 0), -torch.inf, torch.log(weight.clamp_min(1e-20)) + gumbel)
    replace = (_rank(keys) < n_replace[:, None]) & torch.isfinite(keys)  # (never masked, nor of weight 0)
    return Masks(mask=mask, replace=replace, regions=regions)


def sample_masks(seeds: list[int], image_size: tuple[int, int], patch_size: int, cfg: MaskingConfig,
                 landmarks: Tensor | None = None) -> Masks:
    """Masks drawn per sample, each from a generator seeded with its own `seeds[i]`: a sample's
    mask depends only on its seed, not on the batch or the rank it lands in (so data-parallel
    and resumed runs see the masks of a single uninterrupted process)."""
    parts = [
        structured_masks(1, image_size, patch_size, cfg, None if landmarks is None else landmarks[i : i + 1],
                         torch.Generator().manual_seed(int(seed)))
        for i, seed in enumerate(seeds)
    ]
    if not parts:
        num_patches = (image_size[0] // patch_size) * (image_size[1] // patch_size)
        empty = torch.zeros(0, num_patches, dtype=torch.bool)
        return Masks(empty, empty.clone(), empty.long())
    return Masks(*(torch.cat([getattr(p, name) for p in parts]) for name in ("mask", "replace", "regions")))
