"""sample_masks draws all samples' uniforms first and builds the masks once for the batch; a
sample's mask must stay bit for bit what its own generator gave before. The reference below is
the per-sample implementation frozen as it was (region maps from the shared helpers, which
tests/test_masking.py pins)."""

import math

import pytest
import torch

from pacofr.config import MaskingConfig
from pacofr.masking import BACKGROUND, TEMPLATE_5, Masks, patch_regions, resolve_landmarks, sample_masks


def _uniform(shape, generator, device):
    return torch.rand(shape, generator=generator, device=device)


def _rank(keys):
    order = keys.argsort(dim=1, descending=True, stable=True)
    return torch.empty_like(order).scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(order))


def _whole_regions(regions, n_mask, cfg, generator, device):
    b = regions.shape[0]
    n_regions = BACKGROUND
    onehot = regions[..., None] == torch.arange(n_regions, device=device)
    sizes = onehot.sum(1)
    use = _uniform((b,), generator, device) < cfg.region_prob
    want = 1 + (_uniform((b,), generator, device) * cfg.regions_max).long().clamp_max(cfg.regions_max - 1)
    order = _uniform((b, n_regions), generator, device).argsort(1)
    chosen = torch.zeros(b, n_regions, dtype=torch.bool, device=device)
    count = torch.zeros(b, dtype=torch.long, device=device)
    for j in range(n_regions):
        r = order[:, j]
        size = sizes.gather(1, r[:, None])[:, 0]
        take = use & (chosen.sum(1) < want) & (size > 0) & (count + size <= n_mask)
        chosen.scatter_(1, r[:, None], take[:, None] | chosen.gather(1, r[:, None]))
        count = count + take * size
    return (onehot & chosen[:, None, :]).any(-1)


def _block_priority(batch, grid, cfg, generator, device):
    gh, gw = grid
    span = cfg.block_max - cfg.block_min + 1
    bh = cfg.block_min + (_uniform((batch, 1, 1), generator, device) * span).long().clamp_max(span - 1)
    bw = cfg.block_min + (_uniform((batch, 1, 1), generator, device) * span).long().clamp_max(span - 1)
    off_y = (_uniform((batch, 1, 1), generator, device) * bh).long()
    off_x = (_uniform((batch, 1, 1), generator, device) * bw).long()
    ys = torch.arange(gh, device=device)[None, :, None]
    xs = torch.arange(gw, device=device)[None, None, :]
    cell = ((ys + off_y) // bh) * (gw + 1) + (xs + off_x) // bw
    cell_value = _uniform((batch, (gh + 1) * (gw + 1)), generator, device)
    coarse = cell_value.gather(1, cell.reshape(batch, -1))
    return coarse + 1e-3 * _uniform((batch, gh * gw), generator, device)


def _structured_masks(batch, image_size, patch_size, cfg, landmarks, generator, device="cpu"):
    height, width = image_size
    grid = (height // patch_size, width // patch_size)
    num_patches = grid[0] * grid[1]
    device = torch.device(device)
    points = resolve_landmarks(landmarks, batch, height, width, device)
    regions = patch_regions(points, grid, patch_size)
    ratio = cfg.ratio_min + (cfg.ratio_max - cfg.ratio_min) * _uniform((batch,), generator, device)
    lo = torch.ceil(torch.tensor(cfg.ratio_min * num_patches - 1e-6)).long().item()
    hi = max(lo, int(cfg.ratio_max * num_patches + 1e-6))
    n_mask = torch.round(ratio * num_patches).long().clamp(lo, hi)
    region_mask = _whole_regions(regions, n_mask, cfg, generator, device)
    priority = _block_priority(batch, grid, cfg, generator, device)
    priority = torch.where(region_mask, torch.full_like(priority, 2.0), priority)
    mask = _rank(priority) < n_mask[:, None]
    n_visible = num_patches - n_mask
    n_replace = torch.round(cfg.replace_ratio * n_visible).long()
    weight = torch.where(regions == BACKGROUND, cfg.background_replace_weight, 1.0)
    gumbel = -torch.log(-torch.log(_uniform((batch, num_patches), generator, device).clamp(1e-20, 1 - 1e-7)))
    keys = torch.where(mask | (weight <= 0), -torch.inf, torch.log(weight.clamp_min(1e-20)) + gumbel)
    replace = (_rank(keys) < n_replace[:, None]) & torch.isfinite(keys)
    return Masks(mask=mask, replace=replace, regions=regions)


def reference_sample_masks(seeds, image_size, patch_size, cfg, landmarks=None):
    parts = [
        _structured_masks(1, image_size, patch_size, cfg, None if landmarks is None else landmarks[i : i + 1],
                          torch.Generator().manual_seed(int(seed)))
        for i, seed in enumerate(seeds)
    ]
    return Masks(*(torch.cat([getattr(p, name) for p in parts]) for name in ("mask", "replace", "regions")))


CONFIGS = [
    MaskingConfig(),
    MaskingConfig(region_prob=0.0),
    MaskingConfig(region_prob=1.0, regions_max=3),
    MaskingConfig(ratio_min=0.15, ratio_max=0.2, block_min=2, block_max=6),
    MaskingConfig(ratio_min=0.75, ratio_max=0.75, replace_ratio=1.0, background_replace_weight=0.0),
]
SHAPES = [((224, 224), 16), ((64, 64), 8), ((96, 64), 8), ((112, 160), 14)]


def _landmarks(kind, batch, shape, gen):
    """Given 5 points (template jittered by up to 15% of the crop), some rows NaN or outside the
    image (template fallback), or 68 points."""
    h, w = shape
    base = TEMPLATE_5 * torch.tensor([w, h])
    jitter = (torch.rand(batch, 5, 2, generator=gen) - 0.5) * 0.3 * torch.tensor([w, h])
    lm = base + jitter
    if kind == "5-bad":
        lm[::3, 2, 0] = math.nan
        lm[1::5, 0, 1] = -4.0
        lm[2::7] = base  # exactly the template
        lm[4::9, :3] = base[:3]  # the template but for the mouth
    if kind == "68":
        lm = torch.rand(batch, 68, 2, generator=gen) * 0.2 * torch.tensor([w, h]) + 0.4 * torch.tensor([w, h])
        lm[::4, 30, 0] = math.inf
    return lm


def _check(seeds, shape, p, cfg, landmarks=None):
    new = sample_masks(seeds, shape, p, cfg, landmarks)
    ref = reference_sample_masks(seeds, shape, p, cfg, landmarks)
    for name in ("mask", "replace", "regions"):
        a, b = getattr(new, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), (name, (a != b).any(1).nonzero()[:5].flatten().tolist())


@pytest.mark.parametrize("shape, p", SHAPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_same_masks_as_per_sample_generators_template(shape, p, cfg):
    _check(list(range(3000, 3160)), shape, p, cfg)


@pytest.mark.parametrize("shape, p", SHAPES[:3])
@pytest.mark.parametrize("kind", ["5", "5-bad", "68"])
@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=range(3))
def test_same_masks_as_per_sample_generators_landmarks(shape, p, kind, cfg):
    gen = torch.Generator().manual_seed(hash((shape, p, kind)) % 1000)
    _check(list(range(7, 7 + 48 * 13, 13)), shape, p, cfg, _landmarks(kind, 48, shape, gen))


def test_seeds_large_repeated_and_any_order():
    # seeds past 32 bits, repeated seeds, a batch of one and an empty batch
    seeds = [2**40 + 3, 0, 5, 5, 2**63 - 1, 123456789]
    _check(seeds, (224, 224), 16, MaskingConfig())
    _check(seeds[:1], (224, 224), 16, MaskingConfig())
    empty = sample_masks([], (224, 224), 16, MaskingConfig())
    assert empty.mask.shape == (0, 196) and empty.regions.dtype == torch.int64


def test_a_sample_mask_does_not_depend_on_its_batch():
    cfg = MaskingConfig()
    whole = sample_masks(list(range(40)), (224, 224), 16, cfg)
    for rows in ([5], [39, 0, 17], list(range(20, 40))):
        part = sample_masks(rows, (224, 224), 16, cfg)
        assert torch.equal(part.mask, whole.mask[rows]) and torch.equal(part.replace, whole.replace[rows])


def test_cached_template_map_is_not_shared_with_callers():
    m = sample_masks([1, 2], (64, 64), 8, MaskingConfig())
    m.regions.fill_(BACKGROUND)
    _check([1, 2], (64, 64), 8, MaskingConfig())
