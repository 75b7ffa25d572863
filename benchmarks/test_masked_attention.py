"""pytest-benchmark: masked_attention (forward, forward+backward) on ragged lengths, Triton
against SDPA with the equivalent boolean mask, SDPA on unmasked input (its flash path on a
GPU), our op on that same unmasked input, the torch reference, and the varlen kernels of
flash-attn and xformers when installed. `valid_tflops` counts the tokens each one computes
over: the valid ones, all N for the unmasked rows."""

import pytest
import torch
import torch.nn.functional as F

from common import DEVICE, forced_backend, grads_of, skip_unless_gpu

# (B, H, N, d); lengths uniform in 40-100% of N per sample
SHAPES = [(8, 4, 197, 64), (256, 12, 197, 64), (16, 12, 1024, 64)]
BIG = {(256, 12, 197, 64), (16, 12, 1024, 64)}


def ragged_inputs(b, h, n, d, dtype, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, device=DEVICE, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    lo = int(0.4 * n)
    seqlens = torch.randint(lo, n + 1, (b,), device=DEVICE, generator=gen)
    return q, k, v, seqlens


# these run on the unmasked input (every token valid), so their FLOPs count all N tokens
UNMASKED = {"sdpa_unmasked", "triton_unmasked"}


def counted_lengths(impl: str, seqlens, n: int):
    """The lengths an implementation computes over: all N for the unmasked ones."""
    return torch.full_like(seqlens, n) if impl in UNMASKED else seqlens


def valid_flops(seqlens, h, d, backward: bool) -> float:
    """Matmul FLOPs of the valid tokens only: 4 L^2 d per head forward, 2.5x that backward."""
    fwd = 4.0 * float((seqlens.double() ** 2).sum()) * h * d
    return fwd * (3.5 if backward else 1.0)


def implementations():
    from pacofr.ops import reference

    def sdpa_masked(q, k, v, seqlens):
        valid = torch.arange(q.shape[2], device=q.device)[None] < seqlens[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])

    impls = {
        "triton": _triton,
        "sdpa_bool_mask": sdpa_masked,
        "sdpa_unmasked": lambda q, k, v, s: F.scaled_dot_product_attention(q, k, v),
        # the same unmasked input through our kernel: what SDPA's flash path is measured against
        "triton_unmasked": lambda q, k, v, s: _triton(q, k, v, None),
        "reference": lambda q, k, v, s: reference.masked_attention(q, k, v, s, None, q.shape[-1] ** -0.5)[0],
    }
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401

        impls["flash_attn_varlen"] = _flash_varlen
    except ImportError:
        pass
    try:
        from xformers.ops import fmha  # noqa: F401

        impls["xformers_varlen"] = _xformers_varlen
    except ImportError:
        pass
    return impls


def _triton(q, k, v, seqlens):
    from pacofr.ops import masked_attention

    with forced_backend("triton"):
        return masked_attention(q, k, v, seqlens=seqlens)


def _packed(q, k, v, seqlens):
    """The valid tokens of q, k, v packed back to back, [total, H, d] each (varlen layout)."""
    valid = torch.arange(q.shape[2], device=q.device)[None] < seqlens[:, None]
    return (t.transpose(1, 2)[valid] for t in (q, k, v))


def _flash_varlen(q, k, v, seqlens):
    from flash_attn import flash_attn_varlen_func

    cu = torch.zeros(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    cu[1:] = torch.cumsum(seqlens, 0)
    m = int(seqlens.max())
    return flash_attn_varlen_func(*_packed(q, k, v, seqlens), cu, cu, m, m)


def _xformers_varlen(q, k, v, seqlens):
    from xformers.ops import fmha

    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(seqlens.tolist())
    return fmha.memory_efficient_attention(*(t[None] for t in _packed(q, k, v, seqlens)), attn_bias=bias)


IMPLS = ["triton", "sdpa_bool_mask", "sdpa_unmasked", "triton_unmasked", "reference", "flash_attn_varlen",
         "xformers_varlen"]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_H{}_N{}_d{}".format(*s))
def test_masked_attention(benchmark, shape, impl, backward):
    skip_unless_gpu(impl, shape in BIG)
    impls = implementations()
    if impl not in impls:
        pytest.skip(f"{impl} is not installed")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q, k, v, seqlens = ragged_inputs(*shape, dtype)
    fn = impls[impl]

    def run():
        out = fn(q, k, v, seqlens)
        if backward:
            grads_of(out, (q, k, v))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(run)
    flops = valid_flops(counted_lengths(impl, seqlens, shape[2]), shape[1], shape[3], backward)
    benchmark.extra_info["valid_tflops"] = flops / benchmark.stats["median"] / 1e12
