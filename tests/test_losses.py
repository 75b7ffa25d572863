"""pacofr.losses against sums written out by hand."""

import torch

from pacofr.config import load_config
from pacofr.losses import TERMS, PaCoFRLoss
from pacofr.masking import Masks


def _masks(b, grid, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, grid * grid, generator=gen) < 0.5
    replace = ~mask & (torch.rand(b, grid * grid, generator=gen) < 0.3)
    return Masks(mask, replace, torch.zeros(b, grid * grid, dtype=torch.long))


def test_patch_weights_and_normalizers_by_hand():
    cfg = load_config("tiny", ["loss.weight_visible=0.25", "loss.weight_replaced=0.5"])
    loss = PaCoFRLoss(cfg)
    g = cfg.model.img_size // cfg.model.patch_size
    masks = _masks(3, g, 0)
    w = loss.patch_weights(masks)
    for b in range(3):
        for i in range(g * g):
            want = 1.0 if masks.mask[b, i] else 0.5 if masks.replace[b, i] else 0.25
            assert w[b, i] == want
    searched = ~masks.mask
    norms = loss.normalizers(masks, searched)
    pairs = 0.0  # every horizontally or vertically adjacent pair, weighed by its larger weight
    grid = w.reshape(3, g, g)
    for b in range(3):
        for r in range(g):
            for c in range(g):
                if c + 1 < g:
                    pairs += max(grid[b, r, c], grid[b, r, c + 1])
                if r + 1 < g:
                    pairs += max(grid[b, r, c], grid[b, r + 1, c])
    assert norms.shape == (len(TERMS),) and norms.dtype == torch.float32
    assert torch.allclose(norms[0], w.sum()) and abs(float(norms[1]) - float(pairs)) < 1e-4
    assert norms[2] == searched.sum() and norms[3] == (searched & masks.replace).sum()


def test_terms_weights_and_shares():
    cfg = load_config("tiny")
    loss = PaCoFRLoss(cfg)
    g, p = cfg.model.img_size // cfg.model.patch_size, cfg.model.patch_size
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, g * p, g * p, generator=gen)
    out = {"pred": torch.randn(2, g * g, p * p * 3, generator=gen), "masks": _masks(2, g, 1),
           "belief_ce": torch.rand(7, generator=gen), "commit": torch.zeros(0), "incubating": True}
    terms = loss(out, images)
    assert torch.allclose(terms["l_belief"], out["belief_ce"].mean()) and terms["l_commit"] == 0  # (an empty mean)
    c = cfg.loss
    assert loss.weights(True) == {"l_pix": 1.0, "l_sc": c.w_sc, "l_belief": c.w_belief_incubation, "l_commit": 0.0}
    assert loss.weights(False) == {"l_pix": 1.0, "l_sc": c.w_sc, "l_belief": c.w_belief, "l_commit": c.w_commit}
    expected = terms["l_pix"] + c.w_sc * terms["l_sc"] + c.w_belief_incubation * terms["l_belief"]
    assert torch.allclose(terms["loss"], expected)
    share = torch.tensor([0.5, 2.0, 3.0, 4.0])
    shared = loss(out, images, share)
    expected = 0.5 * terms["l_pix"] + 2.0 * c.w_sc * terms["l_sc"] + 3.0 * c.w_belief_incubation * terms["l_belief"]
    assert torch.allclose(shared["loss"], expected)
