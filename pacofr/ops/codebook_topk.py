"""codebook_topk: the k best codes of each row, by squared L2 distance or inner product."""

import torch
from torch import Tensor

from . import native, reference
from .autograd import define_op
from .checks import as_int, autocast_inputs, check_inputs
from .dispatch import Backend, choose, register, register_triton

MAX_K = 32
METRICS = ("l2", "ip")

register("codebook_topk", Backend("reference", reference.codebook_topk, reference.codebook_topk_backward))


def _triton_supports(x: Tensor, codebook: Tensor, k: int, metric: str) -> list[str]:
    reasons = []
    if torch.float64 in (x.dtype, codebook.dtype):
        reasons.append("float64 runs on the reference")
    if max(x.numel(), codebook.numel(), x.shape[0] * k) >= 2**31:
        reasons.append("an input or output of 2^31 elements or more (the kernel's offsets are int32)")
    return reasons


register_triton("codebook_topk", _triton_supports)


def _native_supports(x: Tensor, codebook: Tensor, k: int, metric: str) -> list[str]:
    reasons = []
    if x.device.type != "cpu" or codebook.device.type != "cpu":
        reasons.append("CPU tensors only")
    if torch.float64 in (x.dtype, codebook.dtype):
        reasons.append("float64 runs on the reference")
    if codebook.shape[0] >= 2**31:
        reasons.append("2^31 codes or more (the kernel's code indices are int32)")
    return reasons


def _native_forward(x: Tensor, codebook: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    return native.op("codebook_topk")(x, codebook, k, metric)


# The backward is a gather of the selected codes: the reference's does it.
register("codebook_topk", Backend("native", _native_forward, reference.codebook_topk_backward,
                                  native.unavailable, _native_supports))


def _forward(x: Tensor, codebook: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    backend = choose("codebook_topk", x.device, x=x, codebook=codebook, k=k, metric=metric)
    return backend.forward(x, codebook, k, metric)


def _forward_fake(x, codebook, k, metric):
    n = x.shape[0]
    return x.new_empty(n, k, dtype=reference.accumulation_dtype(x, codebook)), x.new_empty(n, k, dtype=torch.int64)


def _backward(grad_scores: Tensor, x: Tensor, codebook: Tensor, idx: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    backend = choose("codebook_topk", x.device, x=x, codebook=codebook, k=idx.shape[1], metric=metric)
    return backend.backward(grad_scores, x, codebook, idx, metric)


def _backward_fake(grad_scores, x, codebook, idx, metric):
    return torch.empty_like(x), torch.empty_like(codebook)


def _setup_context(ctx, inputs, output):
    x, codebook, _, metric = inputs
    ctx.save_for_backward(x, codebook, output[1])
    ctx.metric = metric
    ctx.mark_non_differentiable(output[1])


def _gradients(ctx, backward, grad_scores, _grad_idx):
    x, codebook, idx = ctx.saved_tensors
    grad_x, grad_codebook = backward(grad_scores.contiguous(), x, codebook, idx, ctx.metric)
    return grad_x, grad_codebook, None, None


_op = define_op("codebook_topk", _forward, _forward_fake, _backward, _backward_fake, _setup_context, _gradients)


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
