"""masked_attention: softmax attention over ragged rows (per-sample lengths and/or a key mask).
masked_attention_qkv: the same from a ViT block's packed qkv projection, with its gradient
written straight into one dqkv buffer."""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .autograd import define_op
from .checks import autocast_inputs, check_inputs
from .dispatch import Backend, choose, register, register_triton


def _reference_backward(grad_out, q, k, v, out, lse, seqlens, key_mask, scale, grads=None):
    result = reference.masked_attention_backward(grad_out, q, k, v, out, lse, seqlens, key_mask, scale)
    if grads is None:
        return result
    for g, r in zip(grads, result):
        g.copy_(r)
    return grads


register("masked_attention", Backend("reference", reference.masked_attention, _reference_backward))


def _triton_supports(q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor | None = None,
                     key_mask: Tensor | None = None) -> list[str]:
    reasons = []
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"{q.dtype} runs on the reference")
    if q.shape[-1] > 128 or q.shape[-1] % 8:
        reasons.append(f"head dim {q.shape[-1]}: the kernel takes multiples of 8 up to 128")
    return reasons


register_triton("masked_attention", _triton_supports)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor | None, key_mask: Tensor | None, scale: float) -> Tensor:
    """The op's semantics through torch's SDPA with a boolean mask, differentiated by autograd.
    Padding and masked keys are zeroed first (0 * NaN would reach the products), and a
    query with no valid key gets zeros: its mask row is opened so that SDPA's softmax stays
    finite, then its output dropped (and with it its gradient)."""
    if seqlens is None and key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    b, _, n, _ = q.shape
    query_valid, key_valid = reference.attention_masks(b, n, seqlens, key_mask, q.device)
    q, k, v = reference._valid_only(q, k, v, query_valid, key_valid)
    answered = query_valid & key_valid.any(1, keepdim=True)
    mask = key_valid | ~key_valid.any(1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return torch.where(answered[:, None, :, None], out, 0.0)


def _sdpa_supports(q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor | None = None,
                   key_mask: Tensor | None = None) -> list[str]:
    return ["float64 runs on the reference"] if q.dtype == torch.float64 else []


register("masked_attention", Backend("sdpa", None, None, supports=_sdpa_supports, differentiable=_sdpa))


def _output_strides(q: Tensor) -> tuple[int, ...]:
    """The output's layout, whatever the backend (torch.compile relies on it): contiguous when
    q is, else [B, N, H, d] memory seen as [B, H, N, d], so that a ViT block's
    out.transpose(1, 2).reshape(B, N, H * d) is a view. The Triton kernel writes it directly."""
    b, h, n, d = q.shape
    return (h * n * d, n * d, d, 1) if q.is_contiguous() else (n * h * d, d, h * d, 1)


def _forward(
    q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor | None, key_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    backend = choose("masked_attention", q.device, q=q, k=k, v=v, seqlens=seqlens, key_mask=key_mask)
    out, lse = backend.forward(q, k, v, seqlens, key_mask, scale)
    strides = _output_strides(q)
    if out.stride() != strides:
        out = torch.empty_strided(out.shape, strides, dtype=out.dtype, device=out.device).copy_(out)
    return out, lse


def _forward_fake(q, k, v, seqlens, key_mask, scale):
    lse = q.new_empty(q.shape[:3], dtype=reference.accumulation_dtype(q, k, v))
    return q.new_empty_strided(q.shape, _output_strides(q)), lse


def _run_backward(grad_out, q, k, v, out, lse, seqlens, key_mask, scale, grads=None):
    """(dq, dk, dv): contiguous, or written into `grads` (views sharing strides)."""
    backend = choose("masked_attention", q.device, q=q, k=k, v=v, seqlens=seqlens, key_mask=key_mask)
    result = backend.backward(grad_out, q, k, v, out, lse, seqlens, key_mask, scale, grads=grads)
    return result if grads is not None else tuple(g.contiguous() for g in result)


def _backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    seqlens: Tensor | None, key_mask: Tensor | None, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return _run_backward(grad_out, q, k, v, out, lse, seqlens, key_mask, scale)


def _backward_fake(grad_out, q, k, v, out, lse, seqlens, key_mask, scale):
    return tuple(q.new_empty(q.shape) for _ in range(3))  # contiguous


def _setup_context(ctx, inputs, output):
    *tensors, scale = inputs  # q, k, v, seqlens, key_mask (qkv, seqlens, key_mask for the qkv op)
    out, lse = output
    ctx.save_for_backward(*tensors, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _gradients(ctx, backward, grad_out, _grad_lse):
    q, k, v, seqlens, key_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = backward(grad_out, q, k, v, out, lse, seqlens, key_mask, ctx.scale)
    return dq, dk, dv, None, None, None


_op = define_op("masked_attention", _forward, _forward_fake, _backward, _backward_fake, _setup_context, _gradients)


def _split(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[B, N, 3, H, d] -> q, k, v [B, H, N, d], views sharing strides."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _qkv_forward(qkv: Tensor, seqlens: Tensor | None, key_mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    out, lse = _forward(*_split(qkv), seqlens, key_mask, scale)
    return out.transpose(1, 2).contiguous(), lse  # [B, N, H, d]: the layout _forward gives strided q


def _qkv_forward_fake(qkv, seqlens, key_mask, scale):
    b, n, _, h, d = qkv.shape
    return qkv.new_empty(b, n, h, d), qkv.new_empty(b, h, n, dtype=reference.accumulation_dtype(qkv))


def _qkv_backward(
    grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, seqlens: Tensor | None, key_mask: Tensor | None,
    scale: float,
) -> Tensor:
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)  # contiguous, as the fake impl says
    _run_backward(grad_out.transpose(1, 2), *_split(qkv), out.transpose(1, 2), lse, seqlens, key_mask, scale,
                  grads=_split(dqkv))
    return dqkv


def _qkv_backward_fake(grad_out, qkv, out, lse, seqlens, key_mask, scale):
    return qkv.new_empty(qkv.shape)


def _qkv_gradients(ctx, backward, grad_out, _grad_lse):
    qkv, seqlens, key_mask, out, lse = ctx.saved_tensors
    return backward(grad_out, qkv, out, lse, seqlens, key_mask, ctx.scale), None, None, None


_qkv_op = define_op("masked_attention_qkv", _qkv_forward, _qkv_forward_fake, _qkv_backward, _qkv_backward_fake,
                    _setup_context, _qkv_gradients)


def _checked_masks(op: str, b: int, n: int, device: torch.device, seqlens: Tensor | None, key_mask: Tensor | None):
    if seqlens is not None:
        if seqlens.shape != (b,):
            raise ValueError(f"{op}: seqlens must be [B]={b}, got {tuple(seqlens.shape)}")
        if seqlens.is_floating_point() or seqlens.is_complex():
            raise TypeError(f"{op}: seqlens must hold integers, got {seqlens.dtype}")
        seqlens = seqlens.to(device, torch.int32).contiguous()
    if key_mask is not None:
        if key_mask.shape != (b, n):
            raise ValueError(f"{op}: key_mask must be [B, N]=({b}, {n}), got {tuple(key_mask.shape)}")
        key_mask = key_mask.to(device, torch.bool).contiguous()
    return seqlens, key_mask


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor | None = None,
    key_mask: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """Softmax attention of `q, k, v [B, H, N, d]` -> `[B, H, N, d]`.

    `seqlens[B]`: only the first seqlens[b] tokens of sample b are real; queries and keys past
    it are padding, with zero outputs and zero gradients. `key_mask[B, N]` (bool, True = the
    key takes part) restricts keys further. A query with no valid key gets zeros, never NaN.
    Under autocast q, k, v are cast to autocast's dtype first (softmax stays in fp32).
    q, k, v may be strided views (the Triton kernel reads them in place when they share
    strides, as when split from one qkv projection); the output is contiguous when q is, else
    laid out as [B, N, H, d] so that `out.transpose(1, 2).reshape(B, N, H * d)` costs no copy.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"masked_attention wants q, k, v of one shape [B, H, N, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_inputs("masked_attention", q=q, k=k, v=v)
    b, _, n, d = q.shape
    seqlens, key_mask = _checked_masks("masked_attention", b, n, q.device, seqlens, key_mask)
    scale = float(d**-0.5 if scale is None else scale)
    q, k, v = autocast_inputs(q.device.type, q, k, v)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"masked_attention wants q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    backend = choose("masked_attention", q.device, outside=True, q=q, k=k, v=v, seqlens=seqlens, key_mask=key_mask)
    if backend.differentiable is not None:
        return backend.differentiable(q, k, v, seqlens, key_mask, scale)
    return _op(q, k, v, seqlens, key_mask, scale)[0]


def masked_attention_qkv(
    qkv: Tensor, seqlens: Tensor | None = None, key_mask: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """`masked_attention` of a packed `qkv [B, N, 3, H, d]` (a ViT block's qkv projection,
    reshaped) -> `[B, N, H, d]`, contiguous, so that `.reshape(B, N, H * d)` is a view.

    Same semantics as `masked_attention(*qkv.permute(2, 0, 3, 1, 4), ...)`. The difference is
    the backward: it writes dq, dk and dv into one contiguous dqkv buffer (on the Triton
    backend, directly), where the split views' gradients would be stacked and copied twice by
    autograd before they reach the projection.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"masked_attention_qkv wants qkv of shape [B, N, 3, H, d], got {tuple(qkv.shape)}")
    check_inputs("masked_attention_qkv", qkv=qkv)
    b, n, _, _, d = qkv.shape
    seqlens, key_mask = _checked_masks("masked_attention_qkv", b, n, qkv.device, seqlens, key_mask)
    scale = float(d**-0.5 if scale is None else scale)
    (qkv,) = autocast_inputs(qkv.device.type, qkv)
    q, k, v = _split(qkv)
    backend = choose("masked_attention", qkv.device, outside=True, q=q, k=k, v=v, seqlens=seqlens, key_mask=key_mask)
    if backend.differentiable is not None:
        return backend.differentiable(q, k, v, seqlens, key_mask, scale).transpose(1, 2).contiguous()
    return _qkv_op(qkv.contiguous(), seqlens, key_mask, scale)[0]
