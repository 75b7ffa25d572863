"""patch_pixel_loss: per-patch normalized pixel MSE and the border (spatial consistency) term."""

import functools

import torch
from torch import Tensor

from . import native, reference
from .autograd import define_op, first_order
from .checks import as_int, check_inputs
from .dispatch import Backend, choose, register, register_triton


def _reference_forward(pred, images, weight, patch_size, norm_pix, eps):
    """The reference losses, plus what the op's backward receives: per-patch target (mean,
    std) [2, B*L] and the normalizers (sum of weights, sum of pair weights)."""
    l_pix, l_sc = reference.patch_pixel_loss(pred, images, weight, patch_size, norm_pix, eps)
    grid = (images.shape[2] // patch_size, images.shape[3] // patch_size)
    norms = torch.stack(patch_pixel_loss_normalizers(weight.to(l_pix.dtype), grid)).to(l_pix.dtype)
    return l_pix, l_sc, reference.patch_stats(images, patch_size, norm_pix, eps), norms


def _reference_backward(grad_pix, grad_sc, pred, images, weight, stats, norms, patch_size, norm_pix, eps):
    # the ground truth recomputes everything from the inputs
    return reference.patch_pixel_loss_backward(grad_pix, grad_sc, pred, images, weight, patch_size, norm_pix, eps)


register("patch_pixel_loss", Backend("reference", _reference_forward, _reference_backward))


def _triton_supports(pred: Tensor, images: Tensor, patch_size: int) -> list[str]:
    return ["float64 runs on the reference"] if torch.float64 in (pred.dtype, images.dtype) else []


# forward_with_grad and rescale: the one-pass forward that also writes the gradient, and its
# backward (see PatchPixelLoss)
register_triton("patch_pixel_loss", _triton_supports, extra=("forward_with_grad", "rescale"))


def _native_supports(pred: Tensor, images: Tensor, patch_size: int) -> list[str]:
    reasons = [] if pred.device.type == "cpu" else ["CPU tensors only"]
    if torch.float64 in (pred.dtype, images.dtype):
        reasons.append("float64 runs on the reference")
    elif images.dtype not in (torch.float32, pred.dtype):
        reasons.append(f"images must be float32 or pred's dtype, got {images.dtype} with {pred.dtype} pred")
    return reasons


def _native_forward(pred, images, weight, patch_size, norm_pix, eps):
    return native.op("patch_pixel_loss_forward")(pred, images, weight, patch_size, norm_pix, eps)


def _native_backward(grad_pix, grad_sc, pred, images, weight, stats, norms, patch_size, norm_pix, eps):
    # norm_pix and eps are in the forward's statistics
    return native.op("patch_pixel_loss_backward")(grad_pix, grad_sc, pred, images, weight, stats, norms, patch_size)


def _native_forward_with_grad(pred, images, weight, patch_size, norm_pix, eps, sc_weight):
    return native.op("patch_pixel_loss_forward_with_grad")(pred, images, weight, patch_size, norm_pix, eps, sc_weight)


def _native_rescale(grad_pix, grad_sc, grad, sc_weight, pred, images, weight, stats, norms, patch_size):
    """The forward's gradient of l_pix + sc_weight * l_sc for upstream gradients (grad_pix,
    grad_sc): scaled in place when they are in that ratio (to fp32 rounding), else afresh."""
    g_pix, g_sc = float(grad_pix), float(grad_sc)
    if abs(g_sc - sc_weight * g_pix) > 1e-6 * abs(sc_weight * g_pix):
        return _native_backward(grad_pix, grad_sc, pred, images, weight, stats, norms, patch_size, None, None)
    return grad if g_pix == 1.0 else grad.mul_(g_pix)


register("patch_pixel_loss", Backend("native", _native_forward, _native_backward, native.unavailable, _native_supports,
                                     {"forward_with_grad": _native_forward_with_grad, "rescale": _native_rescale}))


@functools.cache
def _compiled_reference():
    # (compiled on first use; dynamic=False: one graph per input shape, as training repeats one)
    return torch.compile(reference.patch_pixel_loss, dynamic=False)


def _compiled(pred: Tensor, images: Tensor, weight: Tensor, patch_size: int, norm_pix: bool, eps: float):
    """The reference loss through torch.compile, differentiated by autograd (what a user would
    write instead of the op)."""
    return _compiled_reference()(pred, images, weight, patch_size, norm_pix, eps)


def _compiled_supports(pred: Tensor, images: Tensor, patch_size: int) -> list[str]:
    return ["float64 runs on the reference"] if torch.float64 in (pred.dtype, images.dtype) else []


register("patch_pixel_loss", Backend("compiled", None, None, supports=_compiled_supports, differentiable=_compiled))


def _backend(pred: Tensor, images: Tensor, patch_size: int) -> Backend:
    return choose("patch_pixel_loss", pred.device, pred=pred, images=images, patch_size=patch_size)


def _forward(
    pred: Tensor, images: Tensor, weight: Tensor, patch_size: int, norm_pix: bool, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(l_pix, l_sc, stats, norms); the last two are what the backward takes."""
    return _backend(pred, images, patch_size).forward(pred, images, weight, patch_size, norm_pix, eps)


def _forward_fake(pred, images, weight, patch_size, norm_pix, eps):
    dtype = torch.float64 if torch.float64 in (pred.dtype, images.dtype) else torch.float32
    loss = pred.new_empty((), dtype=dtype)
    return loss, loss.clone(), pred.new_empty((2, pred.shape[0] * pred.shape[1]), dtype=torch.float32), \
        pred.new_empty((2,), dtype=dtype)


def _backward(
    grad_pix: Tensor, grad_sc: Tensor, pred: Tensor, images: Tensor, weight: Tensor, stats: Tensor, norms: Tensor,
    patch_size: int, norm_pix: bool, eps: float,
) -> Tensor:
    return _backend(pred, images, patch_size).backward(grad_pix, grad_sc, pred, images, weight, stats, norms,
                                                       patch_size, norm_pix, eps)


def _backward_fake(grad_pix, grad_sc, pred, images, weight, stats, norms, patch_size, norm_pix, eps):
    return torch.empty_like(pred)


def _setup_context(ctx, inputs, output):
    pred, images, weight, patch_size, norm_pix, eps = inputs
    ctx.save_for_backward(pred, images, weight, output[2], output[3])
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.args = (patch_size, norm_pix, eps)


def _gradients(ctx, backward, grad_pix, grad_sc, _grad_stats, _grad_norms):
    return backward(grad_pix, grad_sc, *ctx.saved_tensors, *ctx.args), None, None, None, None, None


class PatchPixelLoss(torch.autograd.Function):
    """The op outside torch.compile. Given the weight the caller will give l_sc against l_pix
    (`sc_weight`), a backend with `forward_with_grad` (Triton) also writes the gradient of
    l_pix + sc_weight * l_sc in its one pass over the data, and its `rescale` adapts it in the
    backward, on the device (nothing to do for upstream gradients (1, sc_weight), an in-place
    rescale near that ratio, a fresh gradient far below it; see kernels/patch_pixel_loss.py).
    A second backward through a retained graph recomputes it."""

    @staticmethod
    def forward(ctx, pred, images, weight, patch_size, norm_pix, eps, sc_weight):
        backend = _backend(pred, images, patch_size)
        ctx.grad = None
        if sc_weight is not None and "forward_with_grad" in backend.extra:
            *output, ctx.grad = backend.extra["forward_with_grad"](pred, images, weight, patch_size, norm_pix, eps,
                                                                   sc_weight)
            ctx.rescale = backend.extra["rescale"]
        else:
            output = backend.forward(pred, images, weight, patch_size, norm_pix, eps)
        _setup_context(ctx, (pred, images, weight, patch_size, norm_pix, eps), output)
        ctx.sc_weight = sc_weight
        return tuple(output)

    @staticmethod
    @first_order("patch_pixel_loss")
    def backward(ctx, grad_pix, grad_sc, _grad_stats, _grad_norms):
        if ctx.grad is None:
            return *_gradients(ctx, _backward, grad_pix, grad_sc, None, None), None
        pred, images, weight, stats, norms = ctx.saved_tensors
        grad_pred = ctx.rescale(grad_pix, grad_sc, ctx.grad, ctx.sc_weight, pred, images, weight, stats, norms,
                                ctx.args[0])
        ctx.grad = None  # rescaled in place: a later backward recomputes
        return grad_pred, None, None, None, None, None, None


def _eager(pred, images, weight, patch_size, norm_pix, eps, sc_weight=None):
    if not (torch.is_grad_enabled() and pred.requires_grad):
        sc_weight = None  # no gradient to compute ahead
    return PatchPixelLoss.apply(pred, images, weight, patch_size, norm_pix, eps, sc_weight)


_op = define_op("patch_pixel_loss", _forward, _forward_fake, _backward, _backward_fake, _setup_context, _gradients,
                eager=_eager)


def patch_pixel_loss_terms(
    pred: Tensor, images: Tensor, weight: Tensor, patch_size: int, norm_pix: bool = True, eps: float = 1e-6,
    sc_weight: float | None = None,
) -> tuple[Tensor, Tensor]:
    """`(l_pix, l_sc)`, the two terms that `patch_pixel_loss` adds up (for logging them apart).

    `pred[B, L, p*p*C]` holds each patch's pixels in (row, column, channel) order, patches
    row-major over the grid; `images[B, C, H, W]` is read as NCHW; `weight[B, L]` weighs each
    patch (0 = ignored). l_pix = sum(w * mse) / sum(w) with MAE's norm_pix target; l_sc compares
    predicted and target pixel differences across the border of each adjacent pair of patches
    (pair weight max(w_a, w_b)), the prediction de-normalized with the target's statistics.
    Both are exactly 0 when their weights sum to 0. Gradient w.r.t. `pred` only.

    `sc_weight`: the weight the caller gives l_sc against l_pix, if it knows it. The Triton
    forward then also computes the gradient, so that the loss reads its inputs once (the
    backward is free when the upstream gradients are in that ratio, as with
    `l_pix + sc_weight * l_sc`, and an in-place rescale otherwise), at the cost of holding a
    pred-sized gradient from the forward to the backward.
    """
    p = as_int("patch_pixel_loss", "patch_size", patch_size)
    if p < 1:
        raise ValueError(f"patch_pixel_loss: patch_size must be >= 1, got {p}")
    check_inputs("patch_pixel_loss", pred=pred, images=images)
    if images.dim() != 4 or images.shape[2] % p or images.shape[3] % p:
        raise ValueError(f"patch_pixel_loss: images must be [B, C, H, W] with H, W divisible by {p}, got {tuple(images.shape)}")
    b, c, h, w = images.shape
    num_patches = (h // p) * (w // p)
    if pred.shape != (b, num_patches, p * p * c):
        raise ValueError(f"patch_pixel_loss: pred must be [B, L, p*p*C]=({b}, {num_patches}, {p * p * c}), got {tuple(pred.shape)}")
    if weight.shape != (b, num_patches):
        raise ValueError(f"patch_pixel_loss: weight must be [B, L]=({b}, {num_patches}), got {tuple(weight.shape)}")
    weight = weight.to(pred.device, torch.float32 if weight.dtype != torch.float64 else weight.dtype)
    backend = choose("patch_pixel_loss", pred.device, outside=True, pred=pred, images=images, patch_size=p)
    if backend.differentiable is not None:
        return backend.differentiable(pred, images.detach(), weight.detach(), p, bool(norm_pix), float(eps))
    l_pix, l_sc, _, _ = _op(pred.contiguous(), images.detach().contiguous(), weight.detach().contiguous(), p,
                            bool(norm_pix), float(eps), sc_weight=None if sc_weight is None else float(sc_weight))
    return l_pix, l_sc


def patch_pixel_loss_normalizers(weight: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The denominators of (l_pix, l_sc): the weight sum and the border-pair weight sum.
    Data-parallel training sums them over ranks to normalize by the global batch."""
    w = weight.reshape(weight.shape[0], *grid).float()
    pwh, pwv = reference._border_pairs(w)
    return w.sum(), pwh.sum() + pwv.sum()


def patch_pixel_loss(
    pred: Tensor, images: Tensor, weight: Tensor, patch_size: int, norm_pix: bool = True,
    boundary_weight: float = 0.0, eps: float = 1e-6,
) -> Tensor:
    """Scalar `l_pix + boundary_weight * l_sc` (see `patch_pixel_loss_terms`)."""
    l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, patch_size, norm_pix, eps, boundary_weight)
    return l_pix + boundary_weight * l_sc
