"""patch_pixel_loss and patch_pixel_loss_terms: the public ops against the float64 brute force on
every backend (image sizes, norm_pix, boundary weights, weights all-zero and one-hot, dtypes,
sc_weight with any upstream gradients, NaN in a prediction, gradients only to pred); then the
Triton kernel's launchers against the reference backend (the gradient buffer poisoned before
the call, the forward's gradient and its rescale, every configuration in its SWEEP) and their
launch grids."""

import math

import pytest
import torch

from pacofr.ops import backends as ops_backends
from pacofr.ops import explain as ops_explain
from pacofr.ops import patch_pixel_loss, patch_pixel_loss_terms, reference

from .utils import (BF16, DEVICE, F16, F32, F64, GRAD_TOL, LOSS_RTOL, assert_close_scaled,
                    assert_grids_grow_only_along_axis_0, device_for, op_under_test, patch_pixel_loss_ref,
                    patchify_loops, skip_fp64_unless_reference)

BACKENDS, kernel, requires_kernel, SWEEP = op_under_test("patch_pixel_loss")  # (kernel None where Triton cannot run)


# ============================================================================================
# the public ops, every backend, against float64
# ============================================================================================


def test_patchify_helper_matches_mae_formula():
    torch.manual_seed(60)
    B, C, H, W, p = 2, 3, 24, 40, 8
    img = torch.randn(B, C, H, W, dtype=F64)
    h, w = H // p, W // p
    mae = img.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)
    assert torch.equal(patchify_loops(img, p), mae)


# (B, H, W, p, C)
PPL_SIZES = [(3, 64, 64, 8, 3), (2, 224, 224, 16, 3), (3, 112, 112, 16, 3), (3, 56, 42, 14, 3), (3, 32, 48, 8, 1)]


def _ppl_inputs(size, dtype, norm_pix, dev, seed, weights="random"):
    torch.manual_seed(seed)
    B, H, W, p, C = size
    L, P = (H // p) * (W // p), p * p * C
    # per-image brightness/contrast so that patch statistics vary
    images = torch.rand(B, C, H, W, device=dev) * torch.rand(B, 1, 1, 1, device=dev) * 2 + torch.randn(B, 1, 1, 1, device=dev)
    if weights == "random":
        weight = torch.rand(B, L, device=dev)
        weight[torch.rand(B, L, device=dev) < 0.3] = 0.0
    elif weights == "zero":
        weight = torch.zeros(B, L, device=dev)
    else:
        raise KeyError(weights)
    pred = torch.randn(B, L, P, device=dev)
    if not norm_pix:
        pred = pred * 0.5 + images.mean()
    return pred.to(dtype), images, weight


def _check_loss(val, ref, rtol, name):
    assert val.dtype == F32 and val.dim() == 0, f"{name}: dtype {val.dtype}, shape {tuple(val.shape)}"
    assert torch.isfinite(val), f"{name} not finite"
    r = ref.item()
    assert abs(val.item() - r) <= rtol * abs(r) + 1e-12, f"{name}: {val.item():.8g} vs ref {r:.8g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("boundary_weight", [0.0, 0.5])
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("size", PPL_SIZES, ids=lambda s: "B{}_{}x{}_p{}_C{}".format(*s))
def test_patch_pixel_loss_matches_bruteforce(use_backend, backend, dtype, boundary_weight, norm_pix, size):
    dev = use_backend(backend)
    p = size[3]
    pred, images, weight = _ppl_inputs(size, dtype, norm_pix, dev, seed=61)
    pred.requires_grad_()
    loss = patch_pixel_loss(pred, images, weight, p, norm_pix=norm_pix, boundary_weight=boundary_weight)
    (loss * 1.7).backward()  # non-unit upstream gradient
    pred64 = pred.detach().double().requires_grad_()
    l_pix, l_sc = patch_pixel_loss_ref(pred64, images, weight, p, norm_pix, 1e-6)
    ref = l_pix + boundary_weight * l_sc
    (ref * 1.7).backward()
    _check_loss(loss, ref, LOSS_RTOL[dtype], "loss")
    assert pred.grad is not None and pred.grad.dtype == dtype
    assert_close_scaled(pred.grad, pred64.grad, GRAD_TOL[dtype], "dpred")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_compiled_backend_matches_bruteforce(use_backend, dtype):
    """The `compiled` backend (torch.compile of the reference, autograd's gradient) at one odd
    shape per dtype, both terms weighted: it is checked here alone, each shape being a compile."""
    if "compiled" not in ops_backends("patch_pixel_loss"):
        pytest.skip("torch.compile cannot run here")
    dev = use_backend("compiled")
    size = PPL_SIZES[3]
    p = size[3]
    pred, images, weight = _ppl_inputs(size, dtype, True, dev, seed=67)
    pred.requires_grad_()
    assert ops_explain("patch_pixel_loss", dev, pred=pred, images=images, patch_size=p).startswith(
        "patch_pixel_loss: compiled")
    loss = patch_pixel_loss(pred, images, weight, p, norm_pix=True, boundary_weight=0.5)
    (loss * 1.7).backward()
    pred64 = pred.detach().double().requires_grad_()
    l_pix, l_sc = patch_pixel_loss_ref(pred64, images, weight, p, True, 1e-6)
    ((l_pix + 0.5 * l_sc) * 1.7).backward()
    _check_loss(loss, l_pix + 0.5 * l_sc, LOSS_RTOL[dtype], "loss")
    assert pred.grad is not None and pred.grad.dtype == dtype
    assert_close_scaled(pred.grad, pred64.grad, GRAD_TOL[dtype], "dpred")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_patch_pixel_loss_fp16(use_backend, backend, norm_pix):
    dev = use_backend(backend)
    size = (3, 56, 42, 14, 3)
    pred, images, weight = _ppl_inputs(size, F16, norm_pix, dev, seed=62)
    pred.requires_grad_()
    loss = patch_pixel_loss(pred, images, weight, 14, norm_pix=norm_pix, boundary_weight=0.5)
    loss.backward()
    pred64 = pred.detach().double().requires_grad_()
    l_pix, l_sc = patch_pixel_loss_ref(pred64, images, weight, 14, norm_pix, 1e-6)
    ref = l_pix + 0.5 * l_sc
    ref.backward()
    _check_loss(loss, ref, LOSS_RTOL[F16], "loss")
    assert pred.grad.dtype == F16
    assert_close_scaled(pred.grad, pred64.grad, GRAD_TOL[F16], "dpred")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("size", [PPL_SIZES[0], PPL_SIZES[3], PPL_SIZES[4]], ids=lambda s: "B{}_{}x{}_p{}_C{}".format(*s))
def test_patch_pixel_loss_terms(use_backend, backend, eps, norm_pix, size):
    dev = use_backend(backend)
    p = size[3]
    pred, images, weight = _ppl_inputs(size, F32, norm_pix, dev, seed=63)
    pred.requires_grad_()
    t_pix, t_sc = patch_pixel_loss_terms(pred, images, weight, p, norm_pix=norm_pix, eps=eps)
    pred64 = pred.detach().double().requires_grad_()
    r_pix, r_sc = patch_pixel_loss_ref(pred64, images, weight, p, norm_pix, eps)
    _check_loss(t_pix, r_pix, LOSS_RTOL[F32], "l_pix")
    _check_loss(t_sc, r_sc, LOSS_RTOL[F32], "l_sc")
    assert t_sc.item() > 0 and t_pix.item() > 0
    # gradient of each term separately
    g_pix, = torch.autograd.grad(t_pix, pred, retain_graph=True)
    g_sc, = torch.autograd.grad(t_sc, pred)
    rg_pix, = torch.autograd.grad(r_pix, pred64, retain_graph=True)
    rg_sc, = torch.autograd.grad(r_sc, pred64)
    assert_close_scaled(g_pix, rg_pix, GRAD_TOL[F32], "d l_pix")
    assert_close_scaled(g_sc, rg_sc, GRAD_TOL[F32], "d l_sc")
    # patch_pixel_loss == l_pix + boundary_weight * l_sc
    for bw in (0.0, 0.5, 2.0):
        loss = patch_pixel_loss(pred, images, weight, p, norm_pix=norm_pix, boundary_weight=bw, eps=eps)
        comb = t_pix.detach().double() + bw * t_sc.detach().double()
        assert abs(loss.item() - comb.item()) <= 1e-6 * abs(comb.item()) + 1e-12, (bw, loss.item(), comb.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_patch_pixel_loss_zero_weights(use_backend, backend, dtype, norm_pix):
    dev = use_backend(backend)
    size = (2, 64, 64, 8, 3)
    pred, images, weight = _ppl_inputs(size, dtype, norm_pix, dev, seed=64, weights="zero")
    pred.requires_grad_()
    for bw in (0.0, 0.5):
        pred.grad = None
        loss = patch_pixel_loss(pred, images, weight, 8, norm_pix=norm_pix, boundary_weight=bw)
        assert loss.dtype == F32 and loss.dim() == 0
        assert loss.item() == 0.0, f"loss {loss.item()} with all-zero weights"
        loss.backward()
        assert pred.grad is not None
        assert not torch.isnan(pred.grad).any()
        assert (pred.grad == 0).all(), "grad not exactly zero with all-zero weights"
    l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, 8, norm_pix=norm_pix)
    assert l_pix.item() == 0.0 and l_sc.item() == 0.0
    (l_pix + l_sc).backward()
    assert (pred.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_pixel_loss_empty_batch(use_backend, backend):
    dev = use_backend(backend)
    pred = torch.randn(0, 16, 192, device=dev, requires_grad=True)
    for sc_weight in (None, 0.5):
        pred.grad = None
        l_pix, l_sc = patch_pixel_loss_terms(pred, torch.randn(0, 3, 32, 32, device=dev), torch.ones(0, 16, device=dev),
                                             8, sc_weight=sc_weight)
        assert l_pix.item() == 0.0 and l_sc.item() == 0.0
        (l_pix + l_sc).backward()
        assert pred.grad.shape == pred.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("boundary_weight", [0.0, 0.5])
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("where", ["corner", "edge", "interior"])
def test_patch_pixel_loss_one_hot_weight(use_backend, backend, boundary_weight, norm_pix, where):
    dev = use_backend(backend)
    size = (2, 56, 42, 14, 3)  # grid 4 x 3
    B, H, W, p, C = size
    h, w = H // p, W // p
    pred, images, weight = _ppl_inputs(size, F32, norm_pix, dev, seed=65)
    weight.zero_()
    r, c = {"corner": (0, 0), "edge": (2, 2), "interior": (1, 1)}[where]
    i = r * w + c
    weight[1, i] = 0.7
    pred.requires_grad_()
    loss = patch_pixel_loss(pred, images, weight, p, norm_pix=norm_pix, boundary_weight=boundary_weight)
    loss.backward()
    pred64 = pred.detach().double().requires_grad_()
    l_pix, l_sc = patch_pixel_loss_ref(pred64, images, weight, p, norm_pix, 1e-6)
    ref = l_pix + boundary_weight * l_sc
    ref.backward()
    _check_loss(loss, ref, LOSS_RTOL[F32], "loss")
    assert_close_scaled(pred.grad, pred64.grad, GRAD_TOL[F32], "dpred")
    # gradient support: the weighted patch, plus its 4-neighbours when the boundary term is on
    support = torch.zeros(B, h * w, dtype=torch.bool, device=dev)
    support[1, i] = True
    if boundary_weight > 0:
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < h and 0 <= cc < w:
                support[1, rr * w + cc] = True
    assert (pred.grad[~support] == 0).all(), "gradient outside the weighted patch (and its neighbours)"
    assert (pred.grad[support].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn_name", ["loss", "terms"])
def test_patch_pixel_loss_no_grad_to_images_and_weight(use_backend, backend, fn_name):
    dev = use_backend(backend)
    size = (2, 32, 48, 8, 1)
    pred, images, weight = _ppl_inputs(size, F32, True, dev, seed=66)
    pred.requires_grad_()
    images.requires_grad_()
    weight.requires_grad_()
    if fn_name == "loss":
        out = patch_pixel_loss(pred, images, weight, 8, norm_pix=True, boundary_weight=0.5)
    else:
        a, b = patch_pixel_loss_terms(pred, images, weight, 8, norm_pix=True)
        out = a + b
    out.backward()
    assert pred.grad is not None and (pred.grad != 0).any()
    assert images.grad is None, "images received a gradient"
    assert weight.grad is None, "weight received a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_patch_pixel_loss_gradcheck(use_backend, backend, norm_pix):
    skip_fp64_unless_reference(backend)
    dev = use_backend(backend)
    torch.manual_seed(67)
    B, C, H, W, p = 2, 2, 4, 6, 2
    L, P = (H // p) * (W // p), p * p * C
    images = torch.rand(B, C, H, W, dtype=F64, device=dev)
    weight = torch.rand(B, L, dtype=F64, device=dev)
    weight[0, 2] = 0.0
    pred = torch.randn(B, L, P, dtype=F64, device=dev, requires_grad=True)

    def fn(pr):
        return patch_pixel_loss(pr, images, weight, p, norm_pix=norm_pix, boundary_weight=0.5).double()

    def fn_terms(pr):
        a, b = patch_pixel_loss_terms(pr, images, weight, p, norm_pix=norm_pix)
        return a.double(), b.double()

    assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(fn_terms, (pred,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sc_weight", [0.3, 10.0])
@pytest.mark.parametrize("unit", [(1.0, 1.0), (0.5, 0.5), (2.0, 1 / 3), (0.0, 1.0), (1.0, None)],
                         ids=["as_told", "scaled", "other_ratio", "l_sc_only", "l_pix_only"])
def test_patch_pixel_loss_terms_sc_weight_any_upstream(use_backend, backend, dtype, sc_weight, unit):
    """Terms computed with `sc_weight` (Triton: the gradient comes from the forward) give the
    float64 gradient of a * l_pix + b * l_sc for any a, b: the told ratio (b = sc_weight * a),
    a multiple of it, another, and a term left out of the loss (far below the told ratio
    with l_pix alone after sc_weight=10)."""
    dev = use_backend(backend)
    size = (3, 40, 56, 8, 3)
    pred, images, weight = _ppl_inputs(size, dtype, True, dev, seed=68)
    pred.requires_grad_()
    a, b = unit[0], None if unit[1] is None else unit[1] * sc_weight
    l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, 8, sc_weight=sc_weight)
    (a * l_pix + (b * l_sc if b is not None else 0)).backward()
    pred64 = pred.detach().double().cpu().requires_grad_()
    r_pix, r_sc = patch_pixel_loss_ref(pred64, images.cpu(), weight.cpu(), 8, True, 1e-6)
    (a * r_pix + (b * r_sc if b is not None else 0)).backward()
    err = (pred.grad.double().cpu() - pred64.grad).abs().max().item()
    assert err <= GRAD_TOL[dtype] * pred64.grad.abs().max().item(), err


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_pixel_loss_second_backward_through_retained_graph(use_backend, backend, monkeypatch):
    """The forward's gradient is rescaled in place by the first backward (Triton: the rescale
    kernel runs, the recomputing one does not); a second one through the retained graph
    (other upstream gradients) recomputes and still gets the exact gradient."""
    dev = use_backend(backend)
    calls = []
    if backend == "triton":
        for name in ("patch_pixel_loss_rescale", "patch_pixel_loss_backward"):
            real = getattr(kernel, name)
            monkeypatch.setattr(kernel, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    pred, images, weight = _ppl_inputs((2, 32, 48, 8, 3), F32, True, dev, seed=69)
    pred.requires_grad_()
    l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, 8, sc_weight=0.5)
    first, = torch.autograd.grad(0.5 * l_pix + 0.25 * l_sc, pred, retain_graph=True)
    assert calls == (["patch_pixel_loss_rescale"] if backend == "triton" else [])
    second, = torch.autograd.grad(l_pix + 2.0 * l_sc, pred)
    assert calls == (["patch_pixel_loss_rescale", "patch_pixel_loss_backward"] if backend == "triton" else [])
    pred64 = pred.detach().double().cpu().requires_grad_()
    r_pix, r_sc = patch_pixel_loss_ref(pred64, images.cpu(), weight.cpu(), 8, True, 1e-6)
    for got, (a, b) in ((first, (0.5, 0.25)), (second, (1.0, 2.0))):
        want, = torch.autograd.grad(a * r_pix + b * r_sc, pred64, retain_graph=True)
        assert (got.double().cpu() - want).abs().max() <= GRAD_TOL[F32] * want.abs().max()


@requires_kernel
def test_patch_pixel_loss_gradient_in_forward_only_when_needed(monkeypatch):
    """The Triton forward computes the gradient only when pred needs one and the weight of
    l_sc is told (spy on the kernel module's entry)."""
    monkeypatch.setenv("PACOFR_OPS", "triton")
    calls = []
    real = kernel.patch_pixel_loss_forward_with_grad
    monkeypatch.setattr(kernel, "patch_pixel_loss_forward_with_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    pred, images, weight = _ppl_inputs((2, 32, 48, 8, 3), F32, True, device_for("triton"), seed=70)
    patch_pixel_loss(pred.requires_grad_(), images, weight, 8, boundary_weight=0.5).backward()
    assert calls == [1]
    with torch.no_grad():
        patch_pixel_loss(pred, images, weight, 8, boundary_weight=0.5)
    patch_pixel_loss_terms(pred, images, weight, 8)
    patch_pixel_loss(pred.detach(), images, weight, 8, boundary_weight=0.5)
    assert calls == [1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sc_weight", [None, 0.5])
def test_patch_pixel_loss_nan_in_pred_is_reported(use_backend, backend, sc_weight):
    """A NaN in a prediction gives NaN losses and NaN gradient elements exactly where the
    float64 reference has them (that patch, and its neighbours' border lines), not a
    finite number that hides it."""
    dev = use_backend(backend)
    pred, images, weight = _ppl_inputs((2, 32, 48, 8, 3), F32, True, dev, seed=72)
    pred[1, 7, 11] = float("nan")
    pred.requires_grad_()
    l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, 8, sc_weight=sc_weight)
    (l_pix + 0.5 * l_sc).backward()
    pred64 = pred.detach().double().cpu().requires_grad_()
    r_pix, r_sc = patch_pixel_loss_ref(pred64, images.cpu(), weight.cpu(), 8, True, 1e-6)
    (r_pix + 0.5 * r_sc).backward()
    assert l_pix.isnan() and l_sc.isnan() and r_pix.isnan() and r_sc.isnan()
    assert torch.equal(pred.grad.isnan().cpu(), pred64.grad.isnan())
    assert pred64.grad.isnan().any() and not pred64.grad.isnan().all()


# ============================================================================================
# the Triton kernel's launchers (interpreter on CPU, the GPU when there is one)
# ============================================================================================


def _reference_grad(g_pix, g_sc, pred, images, weight, p, norm_pix):
    return reference.patch_pixel_loss_backward(torch.tensor(g_pix, dtype=torch.float64),
                                               torch.tensor(g_sc, dtype=torch.float64), pred.double().cpu(),
                                               images.double().cpu(), weight.double().cpu(), p, norm_pix, 1e-6)


@requires_kernel
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


@requires_kernel
@pytest.mark.parametrize("config", SWEEP,
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


@requires_kernel
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


@requires_kernel
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


@requires_kernel
@pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter runs programs one after another: nothing to race")
@pytest.mark.parametrize("config", [kernel.SWEEP[0] if kernel else None, None],
                         ids=["one_patch_per_program", "default"])
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


# ============================================================================================
# host-side launch logic that only a GPU run would otherwise reach
# ============================================================================================


def _launch(batch):
    pred, images, weight = torch.randn(batch, 64, 48), torch.rand(batch, 3, 32, 32), torch.rand(batch, 64)
    *_, stats, norms, grad = kernel.patch_pixel_loss_forward_with_grad(pred, images, weight, 4, True, 1e-6, 0.5)
    kernel.patch_pixel_loss_rescale(torch.tensor(0.5), torch.tensor(1.0), grad, 0.5, pred, images, weight, stats,
                                    norms, 4)
    kernel.patch_pixel_loss_backward(1.0, 0.5, pred, images, weight, stats, norms, 4, True, 1e-6)


@requires_kernel
def test_grids_grow_with_the_batch_only_along_axis_0(monkeypatch):
    assert_grids_grow_only_along_axis_0(monkeypatch, _launch)


# ============================================================================================
# the native (C++) backend's ops against float64
# ============================================================================================

requires_native = pytest.mark.skipif("native" not in BACKENDS, reason="the C++ extension is not built")


def _native(name):
    from pacofr.ops import native

    return native.op(f"patch_pixel_loss_{name}")


def _native_inputs(b, c, h, w, p, pred_dtype, image_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    L = (h // p) * (w // p)
    pred = torch.randn(b, L, p * p * c, generator=gen).to(pred_dtype)
    images = (torch.rand(b, c, h, w, generator=gen) * 3 - 1).to(image_dtype)
    weight = torch.rand(b, L, generator=gen)
    weight[torch.rand(b, L, generator=gen) < 0.3] = 0.0
    weight[-1] = 0.0  # a sample whose patches are all ignored
    return pred, images, weight


# (B, C, H, W, p): non-square grids, p = 8, 14 and 16, one and three channels
NATIVE_SIZES = [(3, 3, 56, 40, 8), (3, 1, 42, 70, 14), (2, 3, 48, 32, 16), (3, 1, 16, 8, 8)]
NATIVE_DTYPES = [(F32, F32), (BF16, F32), (F16, F32), (BF16, BF16)]  # (pred, images)


@requires_native
@pytest.mark.parametrize("dtypes", NATIVE_DTYPES, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("size", NATIVE_SIZES, ids=lambda s: "B{}_C{}_{}x{}_p{}".format(*s))
def test_native_ops_every_element(size, norm_pix, dtypes):
    """Forward (losses, statistics, normalizers), backward for upstream gradients (0.7, 0.3), and
    the forward's own gradient of l_pix + 0.5 l_sc, each element against float64 on the
    rounded inputs; patches with a zero weight and zero-weight neighbours get an exact 0."""
    b, c, h, w, p = size
    pred, images, weight = _native_inputs(b, c, h, w, p, *dtypes, seed=sum(size))
    l_pix, l_sc, stats, norms = _native("forward")(pred, images, weight, p, norm_pix, 1e-6)
    args64 = (pred.double(), images.double(), weight.double(), p, norm_pix, 1e-6)
    r_pix, r_sc = reference.patch_pixel_loss(*args64)
    assert l_pix.dtype == l_sc.dtype == stats.dtype == norms.dtype == F32
    assert abs(l_pix.item() - r_pix.item()) <= 1e-5 * r_pix.item()
    assert abs(l_sc.item() - r_sc.item()) <= 1e-5 * r_sc.item()
    assert torch.allclose(stats.double(), reference.patch_stats(images.double(), p, norm_pix, 1e-6).double(), rtol=1e-5,
                          atol=1e-6)
    grid = (h // p, w // p)
    w64 = weight.double().reshape(b, *grid)
    pairs = sum(x.sum() for x in reference._border_pairs(w64))
    assert torch.allclose(norms.double(), torch.stack([w64.sum(), pairs]), rtol=1e-6)
    # one rounding to pred's dtype (half an ulp), and fp32 arithmetic against the largest element
    ulp = {F32: 2**-24, BF16: 2**-8, F16: 2**-11}[dtypes[0]]
    pix = _reference_grad(1.0, 0.0, pred, images, weight, p, norm_pix)
    border = _reference_grad(0.0, 1.0, pred, images, weight, p, norm_pix)
    for (g_pix, g_sc), grad in (
        ((0.7, 0.3), _native("backward")(torch.tensor(0.7), torch.tensor(0.3), pred, images, weight, stats, norms, p)),
        ((1.0, 0.5), _native("forward_with_grad")(pred, images, weight, p, norm_pix, 1e-6, 0.5)[4]),
    ):
        assert grad.dtype == pred.dtype and grad.shape == pred.shape
        want = g_pix * pix + g_sc * border
        bound = ulp * want.abs() + 1e-5 * want.abs().max()
        assert ((grad.double() - want).abs() <= bound).all(), (g_pix, g_sc)
        assert (grad[-1] == 0).all()  # the sample with no weight
        assert (grad[want == 0] == 0).all()


@requires_native
def test_native_forward_with_grad_matches_forward_and_backward():
    """The one-pass forward gives the forward's losses, statistics and normalizers bit for bit,
    and the backward's gradient for upstream gradients (1, sc_weight) to fp32 rounding."""
    pred, images, weight = _native_inputs(3, 3, 40, 56, 8, F32, F32, seed=80)
    with_grad = _native("forward_with_grad")(pred, images, weight, 8, True, 1e-6, 0.1)
    without = _native("forward")(pred, images, weight, 8, True, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(with_grad[:4], without))
    grad = _native("backward")(torch.tensor(1.0), torch.tensor(0.1), pred, images, weight, *without[2:], 8)
    assert torch.allclose(with_grad[4], grad, rtol=1e-6, atol=1e-7 * grad.abs().max().item())


@requires_native
def test_native_results_do_not_depend_on_the_threads():
    """Threads split the (sample, patch row) work; every per-patch value is computed alike and the
    sums over patches run in a fixed order: 1 and 2 threads give identical bits."""
    pred, images, weight = _native_inputs(5, 3, 56, 72, 8, BF16, F32, seed=81)
    runs = []
    n = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = _native("forward_with_grad")(pred, images, weight, 8, True, 1e-6, 0.3)
            grad = _native("backward")(torch.tensor(0.4), torch.tensor(1.1), pred, images, weight, *out[2:4], 8)
            runs.append((*out, grad))
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@requires_native
@pytest.mark.parametrize("dtypes, why", [((F64, F32), "float64 runs on the reference"),
                                         ((F32, BF16), "images must be float32 or pred's dtype")])
def test_native_says_which_inputs_it_leaves_to_the_reference(monkeypatch, dtypes, why):
    pred, images, _ = _native_inputs(2, 3, 16, 16, 8, *dtypes, seed=82)
    assert ops_explain("patch_pixel_loss", "cpu", pred=pred, images=images, patch_size=8).startswith(
        "patch_pixel_loss: reference")
    monkeypatch.setenv("PACOFR_OPS", "native")
    assert why in ops_explain("patch_pixel_loss", "cpu", pred=pred, images=images, patch_size=8)
