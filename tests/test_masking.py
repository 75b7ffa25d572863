import math

import pytest
import torch

from pacofr.config import MaskingConfig
from pacofr.data.landmarks import five_points
from pacofr.masking import BACKGROUND, TEMPLATE_5, patch_regions, resolve_landmarks, structured_masks

SHAPES = [((224, 224), 16), ((64, 64), 8), ((96, 64), 8)]


def _masks(shape, p, cfg, seed=0, batch=32, landmarks=None):
    return structured_masks(batch, shape, p, cfg, landmarks, torch.Generator().manual_seed(seed))


def _grid(shape, p):
    return shape[0] // p, shape[1] // p


@pytest.mark.parametrize("shape, p", SHAPES)
@pytest.mark.parametrize("ratios", [(0.4, 0.6), (0.15, 0.2), (0.75, 0.75)])
def test_masked_ratio_in_range_and_varies(shape, p, ratios):
    cfg = MaskingConfig(ratio_min=ratios[0], ratio_max=ratios[1], region_prob=0.5)
    m = _masks(shape, p, cfg, batch=64)
    ratio = m.mask.float().mean(1)
    assert (ratio >= ratios[0] - 1e-9).all() and (ratio <= ratios[1] + 1e-9).all(), ratio
    if ratios[1] - ratios[0] > 0.1:
        assert ratio.unique().numel() > 3  # counts differ between images of a batch


@pytest.mark.parametrize("shape, p", SHAPES)
def test_whole_region_masked_when_region_prob_is_one(shape, p):
    m = _masks(shape, p, MaskingConfig(region_prob=1.0), batch=64)
    for i in range(m.mask.shape[0]):
        whole = [
            r for r in range(BACKGROUND)
            if (m.regions[i] == r).any() and m.mask[i][m.regions[i] == r].all()
        ]
        assert whole, f"image {i}: no facial region masked whole"


def test_no_region_bias_when_region_prob_is_zero():
    # Without whole regions the block growth alone sets the mask: some facial regions stay
    # partly visible in most images (the region step is what guarantees whole regions).
    m = _masks((224, 224), 16, MaskingConfig(region_prob=0.0, block_max=2), batch=64)
    partly = sum(
        all(not m.mask[i][m.regions[i] == r].all() for r in range(BACKGROUND) if (m.regions[i] == r).any())
        for i in range(64)
    )
    assert partly > 16


def _border_fraction(mask, grid):
    g = mask.view(-1, *grid)
    diff = (g[:, 1:] != g[:, :-1]).sum((1, 2)) + (g[:, :, 1:] != g[:, :, :-1]).sum((1, 2))
    pairs = (grid[0] - 1) * grid[1] + grid[0] * (grid[1] - 1)
    return diff.float() / pairs


@pytest.mark.parametrize("shape, p", SHAPES)
def test_masks_are_spatially_coherent(shape, p):
    grid = _grid(shape, p)
    m = _masks(shape, p, MaskingConfig(), batch=64)
    structured = _border_fraction(m.mask, grid).mean()
    # Same counts placed at random: the fraction of neighbouring pairs that differ is ~2r(1-r).
    gen = torch.Generator().manual_seed(5)
    keys = torch.rand(m.mask.shape, generator=gen)
    ranks = keys.argsort(1).argsort(1)
    random_mask = ranks < m.mask.sum(1, keepdim=True)
    scattered = _border_fraction(random_mask, grid).mean()
    assert structured < 0.6 * scattered, (structured, scattered)


def test_deterministic_under_generator():
    cfg = MaskingConfig()
    a, b, c = _masks((224, 224), 16, cfg, seed=3), _masks((224, 224), 16, cfg, seed=3), _masks((224, 224), 16, cfg, seed=4)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.replace, b.replace)
    assert not torch.equal(a.mask, c.mask)


@pytest.mark.parametrize("shape, p", SHAPES)
def test_replace_set_is_a_fraction_of_visible(shape, p):
    cfg = MaskingConfig(replace_ratio=0.15)
    m = _masks(shape, p, cfg, batch=64)
    assert not (m.replace & m.mask).any()
    visible = (~m.mask).sum(1)
    expected = torch.round(0.15 * visible.double()).long()
    assert torch.equal(m.replace.sum(1), expected)


def test_replace_set_is_region_aware():
    cfg = MaskingConfig(background_replace_weight=0.25)
    m = _masks((224, 224), 16, cfg, batch=512)
    visible = ~m.mask
    bg = m.regions == BACKGROUND
    rate_bg = (m.replace & bg).sum() / (visible & bg).sum()
    rate_face = (m.replace & ~bg).sum() / (visible & ~bg).sum()
    assert rate_bg < 0.6 * rate_face, (rate_bg, rate_face)
    # weight 0: background is never replaced, even when the visible face patches run short
    m = _masks((224, 224), 16, MaskingConfig(background_replace_weight=0.0, replace_ratio=1.0), batch=64)
    assert not (m.replace & (m.regions == BACKGROUND)).any()
    assert torch.equal(m.replace, ~m.mask & (m.regions != BACKGROUND))  # (every visible face patch, at ratio 1)


def test_regions_follow_landmarks_and_bad_ones_fall_back_to_template():
    h = w = 224
    template = TEMPLATE_5 * torch.tensor([w, h])
    shifted = template + torch.tensor([40.0, 20.0])
    nan = template.clone()
    nan[2, 0] = math.nan
    outside = template.clone()
    outside[0, 0] = -5.0
    lm = torch.stack([template, shifted, nan, outside])
    points = resolve_landmarks(lm, 4, h, w, "cpu")
    assert torch.equal(points[2], template) and torch.equal(points[3], template)
    assert torch.equal(points[1], shifted)
    regions = patch_regions(points, (14, 14), 16)
    assert torch.equal(regions[0], regions[2]) and torch.equal(regions[0], regions[3])
    assert not torch.equal(regions[0], regions[1])
    # The eye regions sit where the eyes are: the patch under each eye belongs to its region.
    for b, pts in ((0, template), (1, shifted)):
        for region, (x, y) in enumerate(pts[:2].tolist()):
            assert regions[b, int(y // 16) * 14 + int(x // 16)] == region
    # Missing landmarks give the same masks as the template.
    cfg = MaskingConfig()
    a = _masks((h, w), 16, cfg, batch=4, landmarks=lm)
    b = _masks((h, w), 16, cfg, batch=4, landmarks=None)
    assert torch.equal(a.mask[2], b.mask[2]) and torch.equal(a.regions[3], b.regions[3])


def test_every_facial_region_is_present_and_connected():
    regions = patch_regions(resolve_landmarks(None, 1, 224, 224, "cpu"), (14, 14), 16)[0].view(14, 14)
    for r in range(BACKGROUND + 1):
        cells = {tuple(c) for c in (regions == r).nonzero().tolist()}
        assert cells, f"region {r} is empty"
        # flood fill from one cell reaches all of them
        seen, todo = set(), [next(iter(cells))]
        while todo:
            y, x = todo.pop()
            if (y, x) in seen or (y, x) not in cells:
                continue
            seen.add((y, x))
            todo += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
        if r != BACKGROUND:  # the background ring may be split by the face touching an edge
            assert seen == cells, f"region {r} is not one connected piece"


def test_68_points_reduce_to_5():
    lm68 = torch.rand(2, 68, 2) * 100
    five = five_points(lm68)
    assert torch.allclose(five[:, 0], lm68[:, 36:42].mean(1)) and torch.allclose(five[:, 1], lm68[:, 42:48].mean(1))
    assert torch.equal(five[:, 2], lm68[:, 30]) and torch.equal(five[:, 4], lm68[:, 54])
    with pytest.raises(ValueError, match="68"):
        five_points(torch.zeros(1, 7, 2))
