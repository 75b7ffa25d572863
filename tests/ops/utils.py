"""What the op tests share: the float64 brute forces each op is checked against, the tolerance
table, and how a test picks a backend and the device its tensors live on.

Every numeric test of an op's public API is parametrized over ``pacofr.ops.backends(op)`` and
forces the backend with the ``PACOFR_OPS`` environment variable (the ``use_backend`` fixture),
so a backend added later runs the same tests. The "reference" backend is exercised on CPU; any
other backend on CUDA (on a CPU-only machine the Triton backend runs under TRITON_INTERPRET=1
on CPU tensors).

All expected values come from the float64 brute forces written here, independently of the
implementation, evaluated on the inputs *after* their rounding to the test dtype (so a bf16
input is compared against float64 maths on the bf16 values).

Tolerances (stated once, used by the public-API tests):
  codebook_topk scores:  |err| <= r * (||x_n||^2 + max_k ||c_k||^2) per row,
                         r = 1e-4 for fp32, 2e-4 for bf16/fp16 (inputs are rounded, but the op
                         accumulates in fp32, so the error against float64 maths on the rounded
                         inputs stays at fp32 level).
  gradients (all ops):   max|err| <= tol * max|ref|; tol = 1e-4 (fp32), 1.5e-2 (bf16/fp16,
                         the gradient itself is rounded to the 8-bit mantissa); masked_attention
                         in bf16: 3e-2 (its inputs, output and upstream gradient are all bf16).
  masked_attention out:  elementwise atol = rtol = 2e-4 (fp32), 2e-2 (bf16), 4e-3 (fp16).
  patch_pixel_loss:      relative 1e-4 (fp32 pred), 2e-4 (bf16/fp16 pred) on the loss value.
Exact-zero properties are asserted with ``== 0``, never with a tolerance. The kernel-level tests
(one Triton launcher against these brute forces or the reference backend) state their bounds
where they use them.
"""

import importlib
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pacofr.ops as ops

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
ROOT = Path(os.path.abspath(__file__)).parents[2]  # the checkout
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernels run

CODEBOOK_RTOL = {F32: 1e-4, BF16: 2e-4, F16: 2e-4}
GRAD_TOL = {F32: 1e-4, BF16: 1.5e-2, F16: 1.5e-2}
ATTENTION_GRAD_TOL = {F32: 1e-4, BF16: 3e-2}
ATTENTION_OUT_TOL = {F32: 2e-4, BF16: 2e-2, F16: 4e-3}
LOSS_RTOL = {F32: 1e-4, BF16: 2e-4, F16: 2e-4}


# --------------------------------------------------------------------------- backends


# torch.compile of the reference: every new shape is a compile of seconds, so it is checked by
# its own test (test_patch_pixel_loss.py), not over the shape grids of the others
COMPILED = "compiled"


def backends_of(op):
    names = [name for name in ops.backends(op) if name != COMPILED]
    assert names, f"no backend for {op}"
    return names


def device_for(backend):
    # the reference and the native (C++) backend run on CPU; Triton on CUDA when there is one (a
    # Triton backend listed on a CPU-only machine runs under TRITON_INTERPRET=1 on CPU tensors)
    if backend in ("reference", "native") or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def triton_kernels(op):
    """The op's Triton kernel module, or None where Triton cannot run here (the kernel-level
    tests then skip; the public-API tests still run on the other backends)."""
    if "triton" not in ops.backends(op):
        return None
    return importlib.import_module(f"pacofr.kernels.{op}")


def needs_triton(kernel):
    return pytest.mark.skipif(kernel is None, reason="Triton cannot run here")


def op_under_test(op):
    """(the op's backends here, its Triton kernel module or None, the skip mark of the kernel
    tests, the kernel's SWEEP of launch configurations or [])."""
    kernel = triton_kernels(op)
    return backends_of(op), kernel, needs_triton(kernel), kernel.SWEEP if kernel else []


def skip_fp64_unless_reference(backend):
    # float64 is not one of the ops' specified dtypes; gradcheck needs it, so it runs on the
    # reference backend (the other backends' backward passes are checked against float64
    # brute forces in fp32/bf16).
    if backend != "reference":
        pytest.skip("float64 gradcheck runs on the reference backend only")


def assert_close_scaled(actual, expected, tol, name="tensor", floor=0.0):
    """max|actual - expected| <= tol * max(max|expected|, floor).

    With floor=0 an all-zero expected tensor must be matched exactly; a floor is used where a
    gradient is mathematically zero but only zero up to rounding (e.g. dq when N == 1)."""
    assert actual is not None, f"{name}: missing"
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double()
    e = expected.detach().double().to(a.device)
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    if a.numel() == 0:
        return
    scale = max(e.abs().max().item(), floor)
    err = (a - e).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs err {err:.3e} > {tol:.1e} * max|ref| ({scale:.3e})"


def launch_grids(monkeypatch, run):
    """{kernel name: grids} of the launches that run() makes (in the interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction

    grids = {}
    original = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        grids.setdefault(self.__name__, []).append(tuple(grid))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", record)
    run()
    monkeypatch.setattr(InterpretedFunction, "run", original)
    return grids


def assert_grids_grow_only_along_axis_0(monkeypatch, launch):
    """CUDA caps grid axes 1 and 2 at 65535 programs, axis 0 at 2^31 - 1: what scales with the
    batch (B x H attention slabs, patches, rows) must go along axis 0. launch(batch) runs an
    op's launchers for a batch of that size."""
    small, large = (launch_grids(monkeypatch, lambda b=b: launch(b)) for b in (2, 4))
    assert small.keys() == large.keys() and small
    for name in small:
        assert [g[1:] for g in small[name]] == [g[1:] for g in large[name]], name
    # the sizes are large enough that the batch changes some grid (the test is not vacuous)
    assert any(s[0] < g[0] for name in small for s, g in zip(small[name], large[name]))


# --------------------------------------------------------------------------- codebook_topk


def codebook_scores(x, c, metric):
    """[N, K] brute-force scores in the direct form (no expansion), in x's and c's dtype (float64,
    or int64 for exact ones), a block of rows at a time so that no [N, K, D] tensor is built."""
    rows = max(1, (1 << 22) // max(1, c.numel()))
    return torch.cat([_direct_scores(x[i:i + rows], c[None], metric) for i in range(0, x.shape[0], rows)])


def codebook_selected_scores(x, c, idx, metric):
    """[N, k] scores of the codes idx[n] picked for each row x[n] (differentiable)."""
    return _direct_scores(x, c[idx], metric)


def _direct_scores(x, codes, metric):
    """x [N, D] against codes [N or 1, K, D]."""
    if metric == "l2":
        return ((x[:, None, :] - codes) ** 2).sum(-1)
    return (x[:, None, :] * codes).sum(-1)


def check_topk(scores, idx, x, c, k, metric, rtol, rows=None):
    """Check (scores, idx) against the float64 brute force; return the fraction of positions
    whose expected index is unambiguous (and therefore compared exactly)."""
    N, K = x.shape[0], c.shape[0]
    assert scores.shape == (N, k) and idx.shape == (N, k)
    assert scores.dtype == F32, scores.dtype
    assert idx.dtype == torch.int64, idx.dtype
    assert not idx.requires_grad
    x64, c64 = x.detach().double(), c.detach().double()
    if rows is not None:
        x64, scores, idx = x64[rows], scores[rows], idx[rows]
    scores = scores.detach().double().cpu()
    idx = idx.cpu()
    x64, c64 = x64.cpu(), c64.cpu()
    n = x64.shape[0]
    full = codebook_scores(x64, c64, metric)
    key = full if metric == "l2" else -full  # ascending key: best first
    key_sorted, ref_idx = torch.sort(key, dim=1, stable=True)
    ref_sorted = full.gather(1, ref_idx)
    tol = rtol * (x64.pow(2).sum(1) + c64.pow(2).sum(1).max())  # [n]
    tol = tol[:, None]

    assert torch.isfinite(scores).all()
    assert ((idx >= 0) & (idx < K)).all(), "index out of range"
    # distinct indices per row
    srt = idx.sort(1).values
    assert (srt[:, 1:] != srt[:, :-1]).all(), "duplicate index in a row"
    # scores are the best-k values
    err = (scores - ref_sorted[:, :k]).abs()
    assert (err <= tol).all(), f"score err {err.max().item():.3e} > tol {tol.min().item():.3e}"
    # scores are the scores of the returned indices
    chosen = full.gather(1, idx)
    err2 = (scores - chosen).abs()
    assert (err2 <= tol).all(), f"scores inconsistent with idx: {err2.max().item():.3e}"
    # best first, and among equal computed scores the lower index first
    if k > 1:
        a, b = scores[:, :-1], scores[:, 1:]
        ordered = (a <= b) if metric == "l2" else (a >= b)
        assert ordered.all(), "scores not sorted best-first"
        tie = a == b
        assert (idx[:, :-1][tie] < idx[:, 1:][tie]).all(), "equal scores not ordered by index"
    # exact index where the expected one is separated from its neighbours by > 2*tol
    inf = torch.full((n, 1), math.inf, dtype=F64)
    gaps = key_sorted[:, 1:] - key_sorted[:, :-1]  # [n, K-1]
    gap_prev = torch.cat([inf, gaps], 1)[:, :k]
    gap_next = torch.cat([gaps, inf], 1)[:, :k]
    sep = (gap_prev > 2 * tol) & (gap_next > 2 * tol)
    mism = (idx != ref_idx[:, :k]) & sep
    assert not mism.any(), f"{int(mism.sum())} separated positions with wrong index, e.g. row {mism.nonzero()[0].tolist()}"
    return sep.double().mean().item()


# --------------------------------------------------------------------------- masked_attention


def attention_inputs(B, H, N, d, dev, dtype, seed, requires_grad=False):
    torch.manual_seed(seed)
    qkv = [torch.randn(B, H, N, d, device=dev).to(dtype) for _ in range(3)]
    if requires_grad:
        for t in qkv:
            t.requires_grad_()
    return qkv


def attention_valid(B, N, seqlens, key_mask, dev):
    """(valid queries [B, N], valid keys [B, N])."""
    pos = torch.arange(N, device=dev)
    if seqlens is not None:
        vq = pos[None, :] < seqlens.to(dev).long()[:, None]
    else:
        vq = torch.ones(B, N, dtype=torch.bool, device=dev)
    vk = vq.clone()
    if key_mask is not None:
        vk = vk & key_mask
    return vq, vk


def attention_ref(q, k, v, seqlens, key_mask, scale):
    """Hand-written float64 softmax attention; padded query rows and rows without a valid key
    are exactly zero, and everything stays finite under autograd."""
    B, H, N, d = q.shape
    vq, vk = attention_valid(B, N, seqlens, key_mask, q.device)
    allowed = vq[:, None, :, None] & vk[:, None, None, :]  # [B,1,N,N]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, -1e30)
    p = torch.softmax(s, -1) * allowed
    has = allowed.any(-1, keepdim=True)
    return torch.matmul(p, v) * has


def attention_sdpa_ref(q, k, v, seqlens, key_mask, scale):
    B, H, N, d = q.shape
    vq, vk = attention_valid(B, N, seqlens, key_mask, q.device)
    allowed = vq[:, None, :, None] & vk[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    has = allowed.any(-1, keepdim=True)
    return torch.where(has, out, torch.zeros((), dtype=out.dtype, device=out.device))


def attention_zero_sets(B, N, seqlens, key_mask, dev):
    """(zero query rows [B,N], padded keys [B,N])."""
    vq, vk = attention_valid(B, N, seqlens, key_mask, dev)
    zero_rows = ~vq | ~vk.any(-1, keepdim=True)
    if seqlens is not None:
        padded = ~(torch.arange(N, device=dev)[None, :] < seqlens.to(dev).long()[:, None])
    else:
        padded = torch.zeros(B, N, dtype=torch.bool, device=dev)
    return zero_rows, padded


# --------------------------------------------------------------------------- patch_pixel_loss


def patchify_loops(images, p):
    """[B,C,H,W] -> [B, (H/p)*(W/p), p*p*C], patches row-major, pixels (row, col, channel)."""
    B, C, H, W = images.shape
    h, w = H // p, W // p
    cols = []
    for r in range(h):
        for c in range(w):
            blk = images[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p]  # [B,C,p,p]
            cols.append(blk.permute(0, 2, 3, 1).reshape(B, p * p * C))
    return torch.stack(cols, 1)


def patch_pixel_loss_ref(pred64, images, weight, p, norm_pix, eps):
    """Float64 brute force; returns (l_pix, l_sc) as differentiable functions of pred64."""
    images = images.double()
    w64 = weight.double()
    B, C, H, W = images.shape
    h, w = H // p, W // p
    t = patchify_loops(images, p)
    P = t.shape[-1]
    if norm_pix:
        mean = t.sum(-1, keepdim=True) / P
        var = ((t - mean) ** 2).sum(-1, keepdim=True) / (P - 1)
        std = torch.sqrt(var + eps)
        tn = (t - mean) / std
        dpred = pred64 * std + mean
    else:
        tn = t
        dpred = pred64
    mse = ((pred64 - tn) ** 2).sum(-1) / P
    wsum = w64.sum()
    l_pix = (w64 * mse).sum() / wsum if wsum.item() != 0 else (pred64 * 0).sum()

    d6 = dpred.reshape(B, h, w, p, p, C)
    t6 = t.reshape(B, h, w, p, p, C)
    num = torch.zeros((), dtype=F64, device=pred64.device)
    den = torch.zeros((), dtype=F64, device=pred64.device)
    for r in range(h):  # horizontal pairs a=(r,c), b=(r,c+1)
        for c in range(w - 1):
            pd = d6[:, r, c + 1, :, 0, :] - d6[:, r, c, :, p - 1, :]
            td = t6[:, r, c + 1, :, 0, :] - t6[:, r, c, :, p - 1, :]
            pm = ((pd - td) ** 2).mean(dim=(1, 2))
            pw = torch.maximum(w64[:, r * w + c], w64[:, r * w + c + 1])
            num = num + (pw * pm).sum()
            den = den + pw.sum()
    for r in range(h - 1):  # vertical pairs a=(r,c), b=(r+1,c)
        for c in range(w):
            pd = d6[:, r + 1, c, 0, :, :] - d6[:, r, c, p - 1, :, :]
            td = t6[:, r + 1, c, 0, :, :] - t6[:, r, c, p - 1, :, :]
            pm = ((pd - td) ** 2).mean(dim=(1, 2))
            pw = torch.maximum(w64[:, r * w + c], w64[:, (r + 1) * w + c])
            num = num + (pw * pm).sum()
            den = den + pw.sum()
    l_sc = num / den if den.item() != 0 else (pred64 * 0).sum()
    return l_pix, l_sc
