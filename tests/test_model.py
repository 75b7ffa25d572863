import torch

from pacofr.config import load_config
from pacofr.losses import TERMS, PaCoFRLoss
from pacofr.masking import structured_masks
from pacofr.model import PaCoFR, PixelCodebook, belief_loss, mix_candidates, patchify, unpatchify
from pacofr.ops import patch_pixel_loss_terms


def test_patchify_order_is_the_loss_order():
    images = torch.randn(2, 3, 48, 32)
    patches = patchify(images, 8)
    assert torch.equal(unpatchify(patches, 8, 48, 32), images)
    # patch 1 is grid (0, 1); its first values are pixel (0, 8) channels 0..2
    assert torch.equal(patches[0, 1, :3], images[0, :, 0, 8])
    weight = torch.ones(2, patches.shape[1])
    l_pix, l_sc = patch_pixel_loss_terms(patches, images, weight, 8, norm_pix=False)
    assert l_pix.item() == 0.0 and l_sc.item() == 0.0


def _tiny(**overrides):
    cfg = load_config("tiny", [f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return cfg, PaCoFR(cfg)


def _scored(cfg, model, images, **kw):
    """The model's outputs with the loss terms and L of pacofr.losses."""
    out = model(images, **kw)
    return {**out, **PaCoFRLoss(cfg)(out, images)}


def _fixed_masks(cfg, batch, seed=1):
    size = (cfg.model.img_size, cfg.model.img_size)
    return structured_masks(batch, size, cfg.model.patch_size, cfg.masking, generator=torch.Generator().manual_seed(seed))


def test_forward_outputs_and_replacement(faces64):
    cfg, model = _tiny()
    masks = _fixed_masks(cfg, 8)
    out = _scored(cfg, model, faces64, masks=masks, generator=torch.Generator().manual_seed(0))
    for key in ("loss", "l_pix", "l_sc", "l_belief", "l_commit"):
        assert out[key].dim() == 0 and torch.isfinite(out[key]), key
    assert out["pred"].shape == (8, 64, 8 * 8 * 3)
    lc = cfg.loss  # (incubating: no commitment term)
    expected = out["l_pix"] + lc.w_sc * out["l_sc"] + lc.w_belief_incubation * out["l_belief"]
    assert torch.allclose(out["loss"], expected) and out["l_commit"] > 0
    model.set_incubation(False)
    out = _scored(cfg, model, faces64, masks=masks, generator=torch.Generator().manual_seed(0))
    expected = out["l_pix"] + lc.w_sc * out["l_sc"] + lc.w_belief * out["l_belief"] + lc.w_commit * out["l_commit"]
    assert torch.allclose(out["loss"], expected)
    model.set_incubation(True)
    # The encoder input differs from the image exactly on the replaced patches.
    changed = (patchify(out["input"], 8) != patchify(faces64, 8)).any(-1)
    assert torch.equal(changed, masks.replace)


def test_masked_pixels_never_reach_the_prediction(faces64):
    cfg, model = _tiny()
    model.set_incubation(False)
    model.eval()
    masks = _fixed_masks(cfg, 8)
    noisy = patchify(faces64, 8).clone()
    noisy[masks.mask] = torch.randn_like(noisy[masks.mask]) * 5
    noisy = unpatchify(noisy, 8, 64, 64)
    with torch.no_grad():
        a = model(faces64, masks=masks)["pred"]
        b = model(noisy, masks=masks)["pred"]
    assert torch.allclose(a, b, atol=1e-6)


def test_incubation_switch_controls_codebook_learning(faces64):
    cfg, model = _tiny()
    masks = _fixed_masks(cfg, 8)
    before = model.codebook.codes.detach().clone()
    _scored(cfg, model, faces64, masks=masks)["loss"].backward()
    # incubation: codes move by EMA, not by gradient; the predictor learns from l_belief
    assert model.codebook.codes.grad is None
    assert not torch.equal(model.codebook.codes.detach(), before)
    assert model.belief.fc1.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.set_incubation(False)
    codes = model.codebook.codes.detach().clone()
    _scored(cfg, model, faces64, masks=masks)["loss"].backward()
    assert torch.equal(model.codebook.codes.detach(), codes)  # no EMA step after incubation
    assert model.codebook.codes.grad.abs().sum() > 0 and model.codebook.keys.grad.abs().sum() > 0


def test_ema_update_and_dead_code_restart():
    cb = PixelCodebook(num_codes=4, code_dim=3, key_dim=2, ema_decay=0.5, dead_code_threshold=0.3)
    patches = torch.tensor([[1.0, 0, 0], [3.0, 0, 0], [0, 0, 5.0]])
    cb.init_from(patches, torch.Generator().manual_seed(0))
    assert all(any(torch.equal(c, p) for p in patches) for c in cb.codes)  # codes start as data
    cb.codes.data = torch.tensor([[2.0, 0, 0], [0, 0, 4.0], [9.0, 9, 9], [8.0, 8, 8]])
    cb.ema_sum.copy_(cb.codes.data)
    assign = torch.tensor([0, 0, 1])
    restarted = [cb.ema_update(patches, assign, torch.Generator().manual_seed(0)) for _ in range(3)]
    # code 0 moves to the mean of its patches (2, 0, 0), code 1 towards (0, 0, 5)
    assert torch.allclose(cb.codes[0], torch.tensor([2.0, 0, 0]), atol=1e-3)
    assert cb.codes[1, 2] > 4.5
    # codes 2 and 3 are never used: their counts (1 -> 0.5 -> 0.25) fall below 0.3 at the
    # second step and they restart at data patches
    assert restarted == [0, 2, 0]
    for c in cb.codes[2:]:
        assert any(torch.allclose(c, p, atol=1e-3) for p in patches)
    assert 1.0 < cb.perplexity() <= 4.0


def test_mixing_soft_and_gumbel():
    torch.manual_seed(0)
    codes = torch.randn(10, 6, requires_grad=True)
    scores = torch.randn(5, 3, requires_grad=True)
    idx = torch.randint(10, (5, 3))
    soft = mix_candidates(scores, idx, codes, temperature=0.5, mode="soft")
    w = torch.softmax(scores / 0.5, -1)
    assert torch.allclose(soft, (w[..., None] * codes[idx]).sum(1), atol=1e-6)
    hard = mix_candidates(scores, idx, codes, mode="gumbel", generator=torch.Generator().manual_seed(0))
    picked = [[torch.allclose(hard[i], codes[idx[i, j]], atol=1e-6) for j in range(3)] for i in range(5)]
    assert all(sum(row) >= 1 for row in picked)  # each row is one of its candidates
    hard.sum().backward()
    assert scores.grad.abs().sum() > 0 and codes.grad.abs().sum() > 0


def test_belief_loss_is_cross_entropy_over_candidates():
    belief = torch.randn(3, 4, dtype=torch.float64)
    keys = torch.randn(6, 4, dtype=torch.float64)
    all_scores = belief @ keys.T
    scores, idx = all_scores.topk(2, dim=1)
    target = torch.tensor([idx[0, 0].item(), 5 if 5 not in idx[1] else 4, idx[2, 1].item()])
    got = belief_loss(belief, scores, idx, keys, target)
    for i in range(3):
        cand = sorted(set(idx[i].tolist()) | {int(target[i])})
        logits = all_scores[i, cand]
        expected = -torch.log_softmax(logits, 0)[cand.index(int(target[i]))]
        assert torch.allclose(got[i].double(), expected, atol=1e-6)


def test_tiny_model_overfits_real_faces(faces64):
    """200 steps on 8 LFW faces with fixed masks: 100 of incubation, then end to end."""
    cfg, model = _tiny()
    masks = _fixed_masks(cfg, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    l_pix = []
    for step in range(200):
        if step == 100:
            perplexity = model.codebook.perplexity()
            model.set_incubation(False)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 20)
        out = _scored(cfg, model, faces64, masks=masks, generator=gen)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        l_pix.append(out["l_pix"].item())
    start, end = sum(l_pix[:5]) / 5, sum(l_pix[-5:]) / 5
    assert end < 0.5 * start, (start, end)
    assert perplexity > 0.25 * cfg.model.codebook.num_codes, perplexity


def test_torch_compile_training_step(faces64):
    cfg, model = _tiny()
    model.set_incubation(False)
    masks = _fixed_masks(cfg, 4)
    images = faces64[:4]
    compiled = torch.compile(model, backend="inductor")
    eager_out = _scored(cfg, model, images, masks=masks)
    eager_out["loss"].backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = _scored(cfg, compiled, images, masks=masks)
    out["loss"].backward()
    assert torch.allclose(out["loss"], eager_out["loss"], rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, rtol=1e-3, atol=1e-5), name


def test_nearest_codes_ignore_autocast():
    """The nearest-code search keeps fp32 under bf16 autocast: bf16 rounding would flip the
    assignment of nearly tied patches."""
    from pacofr.model.codebook import nearest_codes

    gen = torch.Generator().manual_seed(3)
    patches, codes = torch.randn(4000, 48, generator=gen), torch.randn(512, 48, generator=gen)
    want = nearest_codes(patches, codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nearest_codes(patches, codes)
    assert torch.equal(got, want)
