"""codebook_topk: the k best codes of each row, by squared L2 distance or inner product."""

import torch
from torch import Tensor

from . import reference
from .dispatch import (Backend, as_int, autocast_inputs, check_inputs, choose, register, register_triton,
                       with_eager_path)

MAX_K = 32
METRICS = ("l2", "ip")

register("codebook_topk", Backend("reference", reference.codebook_topk, reference.codebook_topk_backward))


def _triton_supports(x: Tensor, codebook: Tensor, k: int, metric: str) -> str | None:
    if torch.float64 in (x.dtype, codebook.dtype):
        return "float64 runs on the reference"
    if max(x.numel(), codebook.numel(), x.shape[0] * k) >= 2**31:
        return "an input or output of 2^31 elements or more (the kernel's offsets are int32)"
    return None


register_triton("codebook_topk", _triton_supports)


def _run(x: Tensor, codebook: Tensor, k: int, metric: str):
    backend = choose("codebook_topk", x.device, x=x, codebook=codebook, k=k, metric=metric)
    return backend.forward(x, codebook, k, metric)


def _run_backward(grad_scores, x, codebook, idx, metric):
    backend = choose("codebook_topk", x.device, x=x, codebook=codebook, k=idx.shape[1], metric=metric)
    return backend.backward(grad_scores, x, codebook, idx, metric)


@torch.library.custom_op("pacofr::codebook_topk", mutates_args=())
def _forward(x: Tensor, codebook: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    return _run(x, codebook, k, metric)


@_forward.register_fake
def _(x, codebook, k, metric):
    n = x.shape[0]
    return x.new_empty(n, k, dtype=reference.accumulation_dtype(x, codebook)), x.new_empty(n, k, dtype=torch.int64)


@torch.library.custom_op("pacofr::codebook_topk_backward", mutates_args=())
def _backward_op(grad_scores: Tensor, x: Tensor, codebook: Tensor, idx: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    return _run_backward(grad_scores, x, codebook, idx, metric)


@_backward_op.register_fake
def _(grad_scores, x, codebook, idx, metric):
    return torch.empty_like(x), torch.empty_like(codebook)


def _setup_context(ctx, inputs, output):
    x, codebook, _, metric = inputs
    ctx.save_for_backward(x, codebook, output[1])
    ctx.metric = metric
    ctx.mark_non_differentiable(output[1])


def _backward_with(run_backward):
    def backward(ctx, grad_scores, _grad_idx):
        x, codebook, idx = ctx.saved_tensors
        grad_x, grad_codebook = run_backward(grad_scores.contiguous(), x, codebook, idx, ctx.metric)
        return grad_x, grad_codebook, None, None
    return backward


_forward.register_autograd(_backward_with(_backward_op), setup_context=_setup_context)
_op = with_eager_path(_forward, _run, _setup_context, _backward_with(_run_backward))


def codebook_topk(x: Tensor, codebook: Tensor, k: int, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """The k best codes of each row of `x[N, D]` among `codebook[K, D]`.

    Returns `(scores[N, k] float32, idx[N, k] int64)`, best first: for `metric="l2"` the squared
    distances ascending, for `"ip"` the inner products descending; ties go to the lower index.
    Differentiable in `x` and `codebook` through `scores`. Never builds the N x K matrix.
    A NaN in a row of `x` gives NaN scores for that row (its indices stay inside [0, K)).
    Under autocast both inputs are cast to autocast's dtype first (scores still accumulate
    in fp32).
    """
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"codebook_topk wants x[N, D] and codebook[K, D], got {tuple(x.shape)} and {tuple(codebook.shape)}")
    if metric not in METRICS:
        raise ValueError(f"codebook_topk: metric must be one of {METRICS}, got {metric!r}")
    k = as_int("codebook_topk", "k", k)
    if not 1 <= k <= min(MAX_K, codebook.shape[0]):
        raise ValueError(f"codebook_topk: need 1 <= k <= min({MAX_K}, K={codebook.shape[0]}), got k={k}")
    check_inputs("codebook_topk", x=x, codebook=codebook)
    x, codebook = autocast_inputs(x.device.type, x, codebook)
    return _op(x.contiguous(), codebook.contiguous(), k, metric)
