"""The Triton patch-pixel loss (interpreter on CPU, the GPU when there is one) at the issue's
image sizes, with the gradient buffer poisoned before the call. tests/test_ops.py runs the
op-level suite (loss and gradient against float64, weights all-zero and one-hot, both
norm_pix settings, boundary weights, fp32 and bf16) on this backend too."""

import math

import pytest
import torch

kernel = pytest.importorskip("pacofr.kernels.patch_pixel_loss")
from pacofr.ops import backends, reference  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in backends("patch_pixel_loss"), reason="Triton cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference_grad(g_pix, g_sc, pred, images, weight, p, norm_pix):
    return reference.patch_pixel_loss_backward(torch.tensor(g_pix, dtype=torch.float64),
                                               torch.tensor(g_sc, dtype=torch.float64), pred.double().cpu(),
                                               images.double().cpu(), weight.double().cpu(), p, norm_pix, 1e-6)


@pytest.mark.parametrize("h, w, p, c", [(224, 224, 16, 3), (112, 112, 16, 3), (64, 64, 8, 3), (224, 224, 14, 3),
                                        (96, 160, 16, 3), (64, 40, 8, 1)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_and_every_gradient_element(h, w, p, c, norm_pix):
    gen = torch.Generator().manual_seed(h + w + p + c)
    b, L = 2, (h // p) * (w // p)
    pred = torch.randn(b, L, p * p * c, generator=gen).to(DEVICE)
    images = torch.randn(b, c, h, w, generator=gen).to(DEVICE)
    weight = (torch.rand(b, L, generator=gen) > 0.6).float().to(DEVICE)
    l_pix, l_sc, stats, norms = kernel.patch_pixel_loss_forward(pred, images, weight, p, norm_pix, 1e-6)
    r_stats = reference.patch_stats(images.double().cpu(), p, norm_pix, 1e-6)
    assert torch.allclose(stats.cpu(), r_stats, rtol=1e-5, atol=1e-6)
    r_pix, r_sc = reference.patch_pixel_loss(pred.double().cpu(), images.double().cpu(), weight.double().cpu(), p,
                                             norm_pix, 1e-6)
    assert abs(l_pix.item() - r_pix.item()) <= 1e-5 * max(1.0, r_pix.item())
    assert abs(l_sc.item() - r_sc.item()) <= 1e-5 * max(1.0, r_sc.item())
    out = torch.full_like(pred, math.nan)
    grad = kernel.patch_pixel_loss_backward(torch.tensor(0.7), torch.tensor(0.3), pred, images, weight, stats, norms,
                                            p, norm_pix, 1e-6, out=out)
    assert grad is out and not out.isnan().any()
    ref = _reference_grad(0.7, 0.3, pred, images, weight, p, norm_pix)
    assert (grad.double().cpu() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("config", kernel.SWEEP,
                         ids=lambda c: "{BLOCK}w{num_warps}".format(**c) + ("_preload" if c.get("PRELOAD") else ""))
def test_every_swept_launch_configuration_is_correct(config):
    """The alternatives gpu_report.py times (a few patches per program, so programs also end
    mid-image) give the float64 loss and gradient, bf16 pred, the gradient buffer poisoned."""
    gen = torch.Generator().manual_seed(3)
    b, p, c, h, w = 3, 8, 3, 40, 56
    L = (h // p) * (w // p)
    pred = torch.randn(b, L, p * p * c, generator=gen).to(DEVICE, torch.bfloat16)
    images = torch.randn(b, c, h, w, generator=gen).to(DEVICE)
    weight = (torch.rand(b, L, generator=gen) > 0.5).float().to(DEVICE)
    l_pix, l_sc, stats, norms = kernel.patch_pixel_loss_forward(pred, images, weight, p, True, 1e-6, config=config)
    args = (pred.double().cpu(), images.double().cpu(), weight.double().cpu(), p, True, 1e-6)
    r_pix, r_sc = reference.patch_pixel_loss(*args)
    assert abs(l_pix.item() - r_pix.item()) <= 1e-5 * r_pix.item()
    assert abs(l_sc.item() - r_sc.item()) <= 1e-5 * r_sc.item()
    out = torch.full_like(pred, math.nan)
    kernel.patch_pixel_loss_backward(torch.tensor(1.0), torch.tensor(0.5), pred, images, weight, stats, norms, p,
                                     True, 1e-6, out=out, config=config)
    ref = _reference_grad(1.0, 0.5, pred, images, weight, p, True)
    assert not out.isnan().any()
    assert (out.double().cpu() - ref).abs().max() <= 1e-2 * ref.abs().max()  # bf16 gradient rounding
    fused = torch.full_like(pred, math.nan)
    *losses, _, _, _ = kernel.patch_pixel_loss_forward_with_grad(pred, images, weight, p, True, 1e-6, 0.5, out=fused,
                                                                 config=config)
    # (two compiled variants: equal up to fp32 rounding, bitwise in the interpreter)
    assert torch.allclose(torch.stack(losses), torch.stack([l_pix, l_sc]), rtol=1e-6, atol=0)
    assert torch.allclose(fused.float(), out.float(), rtol=2**-7, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h, w, p, c, norm_pix", [(64, 64, 8, 3, True), (96, 160, 16, 3, False), (64, 40, 8, 1, True)])
def test_forward_with_grad_then_rescale(h, w, p, c, norm_pix, dtype):
    """The forward's gradient of l_pix + sc_weight * l_sc, and the backward's in-place rescale
    for upstream gradients equal to (1, sc_weight) (unchanged), a multiple of them
    and others, near the told ratio and far below it (where the stored border part would
    have to be taken out again); against float64, every element written."""
    gen = torch.Generator().manual_seed(h * w + c)
    b, L, sc_weight = 3, (h // p) * (w // p), 2.0
    pred = torch.randn(b, L, p * p * c, generator=gen).to(DEVICE, dtype)
    images = torch.randn(b, c, h, w, generator=gen).to(DEVICE)
    weight = (torch.rand(b, L, generator=gen) > 0.5).float().to(DEVICE)
    out = torch.full_like(pred, math.nan)
    l_pix, l_sc, stats, norms, grad = kernel.patch_pixel_loss_forward_with_grad(pred, images, weight, p, norm_pix,
                                                                                1e-6, sc_weight, out=out)
    assert grad is out and not out.isnan().any()
    without = kernel.patch_pixel_loss_forward(pred, images, weight, p, norm_pix, 1e-6)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip((l_pix, l_sc, stats, norms), without))
    # per element: the gradient's rounding (bf16: one ulp, the interpreter rounds toward zero)
    # and fp32 arithmetic against the largest element
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-23
    ref = _reference_grad(1.0, sc_weight, pred, images, weight, p, norm_pix)
    assert ((grad.double().cpu() - ref).abs() <= ulp * ref.abs() + 1e-6 * ref.abs().max()).all()
    kept = grad.clone()
    one, r = torch.tensor(1.0, device=DEVICE), torch.tensor(sc_weight, device=DEVICE)
    assert kernel.patch_pixel_loss_rescale(one, r * one, grad, sc_weight, pred, images, weight, stats, norms, p) is grad
    assert torch.equal(grad, kept)
    pix = _reference_grad(1.0, 0.0, pred, images, weight, p, norm_pix).abs()  # the two terms' gradients
    border = _reference_grad(0.0, 1.0, pred, images, weight, p, norm_pix).abs()
    for g_pix, g_sc in ((0.5, 0.5 * sc_weight), (0.7, 2.0), (1.0, 3.0), (1.0, 0.5), (1.0, 0.0), (0.0, 0.0),
                        (-1.5, 0.25)):
        g = kept.clone()
        kernel.patch_pixel_loss_rescale(torch.tensor(g_pix, device=DEVICE), torch.tensor(g_sc, device=DEVICE), g,
                                        sc_weight, pred, images, weight, stats, norms, p)
        want = _reference_grad(g_pix, g_sc, pred, images, weight, p, norm_pix)
        # the result's rounding, and the stored gradient's, scaled: at most twice each term's
        # share of the result (so not the stored border part left over far below the ratio)
        bound = ulp * (want.abs() + abs(g_pix) * pix + 2 * abs(g_sc) * border) + 1e-6 * want.abs().max()
        assert ((g.double().cpu() - want).abs() <= bound).all(), (g_pix, g_sc)
        if g_pix == g_sc == 0.0:
            assert not g.any()


def test_forward_with_grad_zero_weights():
    """All-zero weights: both losses exactly 0 and a gradient of exact zeros."""
    p, c, h, w = 8, 3, 32, 48
    L = (h // p) * (w // p)
    pred, images = torch.randn(2, L, p * p * c, device=DEVICE), torch.randn(2, c, h, w, device=DEVICE)
    out = torch.full_like(pred, math.nan)
    l_pix, l_sc, *_, grad = kernel.patch_pixel_loss_forward_with_grad(pred, images, torch.zeros(2, L, device=DEVICE),
                                                                      p, True, 1e-6, 0.5, out=out)
    assert l_pix.item() == 0.0 and l_sc.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(pred))


@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter runs programs one after another: nothing to race")
@pytest.mark.parametrize("config", [kernel.SWEEP[0], None], ids=["one_patch_per_program", "default"])
def test_forward_programs_wait_for_the_statistics_they_read(config):
    """On a GPU, thousands of programs read statistics that other programs store during the
    same launch: repeated forwards give bitwise-equal results, equal to the two-pass ones."""
    gen = torch.Generator().manual_seed(5)
    b, p, c, size = 64, 16, 3, 224
    L = (size // p) ** 2
    pred = torch.randn(b, L, p * p * c, generator=gen).to(DEVICE, torch.bfloat16)
    images = torch.randn(b, c, size, size, generator=gen).to(DEVICE)
    weight = (torch.rand(b, L, generator=gen) > 0.4).float().to(DEVICE)
    runs = [kernel.patch_pixel_loss_forward_with_grad(pred, images, weight, p, True, 1e-6, 0.1, config=config)
            for _ in range(5)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
    l_pix, l_sc, stats, norms, grad = runs[0]
    want = kernel.patch_pixel_loss_backward(torch.tensor(1.0), torch.tensor(0.1), pred, images, weight, stats, norms,
                                            p, True, 1e-6, config=config)
    assert torch.allclose(grad.float(), want.float(), rtol=2**-7, atol=1e-6 * want.abs().max().item())
    r_pix, r_sc = reference.patch_pixel_loss(pred.double(), images.double(), weight.double(), p, True, 1e-6)
    assert abs(l_pix.item() - r_pix.item()) <= 1e-5 * r_pix.item()
    assert abs(l_sc.item() - r_sc.item()) <= 1e-5 * r_sc.item()
