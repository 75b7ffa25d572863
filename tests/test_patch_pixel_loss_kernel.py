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
    ref = reference.patch_pixel_loss_backward(torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64),
                                              pred.double().cpu(), images.double().cpu(), weight.double().cpu(), p,
                                              norm_pix, 1e-6)
    assert (grad.double().cpu() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("config", kernel.SWEEP, ids=lambda c: "{BLOCK}w{num_warps}".format(**c))
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
    ref = reference.patch_pixel_loss_backward(torch.tensor(1.0, dtype=torch.float64),
                                              torch.tensor(0.5, dtype=torch.float64), *args)
    assert not out.isnan().any()
    assert (out.double().cpu() - ref).abs().max() <= 1e-2 * ref.abs().max()  # bf16 gradient rounding
