"""Triton flash attention over ragged rows: per-sample lengths and/or a boolean key mask.

Forward: one program per (query block, batch x head); online softmax in fp32 over key tiles,
storing the log-sum-exp. With `seqlens`, a program stops at its sample's length, and query
blocks that lie wholly past it do no work: padded tiles are skipped, not computed and masked.
Padded query rows and rows with no valid key store zeros and lse = +inf, so exp(s - lse) is
exactly 0 for them in the backward too. Softmax work per score is what bounds these kernels at
small head dims, so the scale is folded into the exponent (one FMA and one exp2 per entry) and
only the tile that crosses the length is masked: the others, wholly inside it, skip the select
(without a key mask; `PEEL`).

Backward: delta = rowsum(dO * O) in fp32, then dq, dk and dv, either
- split (the default): a small kernel computes delta (reading dO and O once), one kernel per
  key block accumulates dk and dv over the query blocks (P unmasked: an invalid key's P only
  reaches its own dk and dv rows, which are zeroed once at the end), another per query block
  accumulates dq over the key blocks, recomputing P and dP;
- fused (config FUSED_BWD): one launch; one program per (batch x head) slab computes its
  delta, then walks its key blocks in turn and adds each block's share of dq to fp32 rows
  that it alone owns, so P and dP are computed once (five tile products instead of seven)
  and the sums still run in a fixed order;
- atomic (config ATOMIC_DQ): the split backward's dk/dv kernel also computes each key
  block's share of dq and adds it to an fp32 buffer with atomics (five tile products, no dq
  kernel, P masked), then one copy casts it into dq.
Split and fused are atomic-free: no program writes another's output, so their gradients are
bitwise reproducible. The atomic backward's dq is not (the order of its sums varies).

q, k, v are read through their batch, head and row strides (shared by the three), and out
and its gradient through theirs, so the views a ViT block splits from one qkv projection and
the [B, N, H, d] output it reshapes need no copies. The gradients are written through strides
of their own (shared by the three), so they can land in one dqkv buffer.
Head dims that are not powers of two (80, 96) are padded to the next one inside the kernel.
The CPU interpreter computes bf16/fp16 dots wrongly, so there the tiles are upcast to fp32.
"""

import torch
import triton
import triton.language as tl

from . import deterministic_default
from . import hopper as _hopper
from . import interpreting as _interpreting
from . import on_device

LOG2E = tl.constexpr(1.4426950408889634)  # the kernels work in base 2: exp(x) = exp2(x * LOG2E)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _row_length(SEQ, b, N, HAS_SEQ: tl.constexpr):
    if HAS_SEQ:
        return tl.minimum(tl.load(SEQ + b), N)
    return N


@triton.jit
def _tile(PTR, base, idx, SN, dims, D, limit):
    """Rows `idx` (those < limit; others 0) of an [N, D] slab at PTR + base with row stride
    SN, padded to BLOCK_D."""
    return tl.load(PTR + base + idx[:, None] * SN + dims[None, :], mask=(idx[:, None] < limit) & (dims[None, :] < D),
                   other=0.0)


@triton.jit
def _kv_tiles(K, V, KM, base, SN, b, N, D, cols, dims, length, HAS_KM: tl.constexpr):
    """A key tile's k and v, and which of its keys take part. Keys that take no part read as 0
    (past the length; with HAS_KM, outside the key mask too, in the same masked load), so what
    padding holds, NaN included, never reaches a product."""
    valid = _key_valid(KM, b, N, cols, length, HAS_KM)
    offs = base + cols[:, None] * SN + dims[None, :]
    m = valid[:, None] & (dims[None, :] < D)
    return tl.load(K + offs, mask=m, other=0.0), tl.load(V + offs, mask=m, other=0.0), valid


@triton.jit
def _key_valid(KM, b, N, cols, length, HAS_KM: tl.constexpr):
    valid = cols < length
    if HAS_KM:
        valid = valid & (tl.load(KM + b * N + cols, mask=cols < N, other=0) != 0)
    return valid


@triton.jit
def _row_stats(LSE, DELTA, bh, N, rows, limit):
    """lse in base 2 (+inf past `limit`, so those rows' probabilities are 0) and delta of
    `rows`."""
    lse = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=rows < limit, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=rows < limit, other=0.0)
    return lse * LOG2E, delta


@triton.jit
def _probs_and_ds(q, k, v, do, lse2, delta, valid, qk_scale, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr):
    """The backward's tile: probabilities P = 2^(S * qk_scale - lse2) (one FMA and one exp2 per
    entry) and dS = P * (dP - delta). MASKED zeroes P outside `valid`; without it P is left as
    computed for keys past the length (their k and v read as 0), which only rows of dk and dv
    that the caller discards depend on."""
    p = tl.math.exp2(_dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(valid[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _key_block(K, V, KM, base, SN, b, N, D, cols, dims, length, HAS_KM: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """A key block's k and v (rows past the length read as 0), which of its keys take part, and
    zeroed dk and dv accumulators."""
    k, v, valid = _kv_tiles(K, V, KM, base, SN, b, N, D, cols, dims, length, HAS_KM)
    return k, v, valid, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), tl.zeros((BLOCK_N, BLOCK_D), tl.float32)


@triton.jit
def _dkdv_step(Q, DO, LSE, DELTA, bh, base, SN, base_o, ON, N, D, m0, dims, length, k, v, valid, dk, dv, qk_scale,
               MASKED: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dk and dv of a key block plus the share of the query block at m0; also its dS and rows."""
    rows = m0 + tl.arange(0, BLOCK_M)
    q = _tile(Q, base, rows, SN, dims, D, length)
    do = _tile(DO, base_o, rows, ON, dims, D, length)
    lse2, delta = _row_stats(LSE, DELTA, bh, N, rows, length)
    p, ds = _probs_and_ds(q, k, v, do, lse2, delta, valid, qk_scale, MASKED, UPCAST, PRECISION)
    dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST, PRECISION)
    dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST, PRECISION)
    return dk, dv, ds, rows


@triton.jit
def _offset(b, h, SB, SH):
    """Where slab (b, h) starts in a tensor with batch and head strides SB, SH."""
    return b.to(tl.int64) * SB + h.to(tl.int64) * SH


@triton.jit
def _slab(SEQ, H, N, D, SB, SH, OB, OH, GB, GH, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """A program's share of its (batch x head) slab [N, D]: the slab's index, its sample, the
    slab's offset in q/k/v, in out/dout and in the gradients, the sample's length,
    the program's BLOCK positions along N, the (padded) head dims, the in-bounds mask of that
    tile, and where its loop over the other side stops (0 for a block wholly past the length:
    no work). One grid axis, the slab's blocks next to each other (grid y would cap B x H at
    65535)."""
    blocks = tl.cdiv(N, BLOCK)
    bh = tl.program_id(0) // blocks
    b = bh // H
    h = bh - b * H
    length = _row_length(SEQ, b, N, HAS_SEQ)
    first = (tl.program_id(0) - bh * blocks) * BLOCK
    idx = first + tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    mask = (idx[:, None] < N) & (dims[None, :] < D)
    return (bh, b, _offset(b, h, SB, SH), _offset(b, h, OB, OH), _offset(b, h, GB, GH), length, idx, dims, mask,
            tl.where(first < length, length, 0))


@triton.jit
def _fwd_tile(q, K, V, KM, base, SN, b, N, D, n0, dims, length, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr,
              HAS_KM: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax (base 2). MASKED drops keys past the length or outside
    the key mask; an unmasked tile (every key valid, qk_scale > 0) skips that select and takes
    the row max before scaling, so that S * qk_scale - max is one FMA per entry."""
    cols = n0 + tl.arange(0, BLOCK_N)
    k, v, valid = _kv_tiles(K, V, KM, base, SN, b, N, D, cols, dims, length, HAS_KM)
    s = _dot(q, tl.trans(k), UPCAST, PRECISION)
    if MASKED:  # scaled here, so that the select can put -inf
        s = tl.where(valid[None, :], s * qk_scale, -float("inf"))
        qk_scale = 1.0
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with no valid key yet
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, SEQ, KM, scale, H, N, D, SB, SH, SN, OB, OH, ON,
                     HAS_SEQ: tl.constexpr, HAS_KM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, PEEL: tl.constexpr):
    # no gradients here: out's strides stand in for theirs
    bh, b, base, base_o, _, length, rows, dims, o_mask, hi = _slab(SEQ, H, N, D, SB, SH, OB, OH, OB, OH, HAS_SEQ,
                                                                    BLOCK_M, BLOCK_D)
    q = _tile(Q, base, rows, SN, dims, D, length)

    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    qk_scale = scale * LOG2E  # work in base 2
    # PEEL (no key mask, scale > 0): the tiles wholly inside the length unmasked, then the tail
    full = hi // BLOCK_N * BLOCK_N if PEEL else 0
    for n0 in range(0, full, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(q, K, V, KM, base, SN, b, N, D, n0, dims, length, m_i, l_i, acc, qk_scale, False,
                                  HAS_KM, BLOCK_N, UPCAST, PRECISION)
    for n0 in tl.range(full, hi, BLOCK_N, num_stages=1 if PEEL else None):
        m_i, l_i, acc = _fwd_tile(q, K, V, KM, base, SN, b, N, D, n0, dims, length, m_i, l_i, acc, qk_scale, True,
                                  HAS_KM, BLOCK_N, UPCAST, PRECISION)

    row_ok = (rows < length) & (l_i > 0)
    out = tl.where(row_ok[:, None], acc / tl.where(row_ok, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(row_ok, (m_i + tl.math.log2(tl.where(row_ok, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(O + base_o + rows[:, None] * ON + dims[None, :], out.to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + bh.to(tl.int64) * N + rows, lse, mask=rows < N)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, ROWS, H, N, D, OB, OH, ON, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O) in fp32 for the ROWS = B x H x N rows (torch would write fp32
    copies of both)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < ROWS) & (dims[None, :] < D)
    bh = rows // N
    b = bh // H
    offs = (_offset(b, bh - b * H, OB, OH) + (rows - bh * N).to(tl.int64) * ON)[:, None] + dims[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, axis=1), mask=rows < ROWS)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, SEQ, KM, scale, H, N, D, SB, SH, SN, OB, OH, ON,
                          GB, GH, GN, HAS_SEQ: tl.constexpr, HAS_KM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          ATOMIC_DQ: tl.constexpr):
    """dk and dv of a key block; with ATOMIC_DQ also the block's share of dq (scaled), added
    with fp32 atomics to DQ_ACC (contiguous, zeroed), which then needs P masked."""
    bh, b, base, base_o, base_g, length, cols, dims, kv_mask, hi = _slab(SEQ, H, N, D, SB, SH, OB, OH, GB, GH,
                                                                          HAS_SEQ, BLOCK_N, BLOCK_D)
    k, v, valid, dk, dv = _key_block(K, V, KM, base, SN, b, N, D, cols, dims, length, HAS_KM, BLOCK_N, BLOCK_D)
    for m0 in range(0, hi, BLOCK_M):
        dk, dv, ds, rows = _dkdv_step(Q, DO, LSE, DELTA, bh, base, SN, base_o, ON, N, D, m0, dims, length, k, v,
                                      valid, dk, dv, scale * LOG2E, ATOMIC_DQ, BLOCK_M, UPCAST, PRECISION)
        if ATOMIC_DQ:
            dq = _dot(ds.to(k.dtype), k, UPCAST, PRECISION) * scale
            tl.atomic_add(DQ_ACC + bh.to(tl.int64) * N * D + rows[:, None] * D + dims[None, :], dq,
                          mask=(rows[:, None] < length) & (dims[None, :] < D), sem="relaxed")
    # Without ATOMIC_DQ P was not masked: an invalid key's dk and dv rows (its own, nothing
    # else) are dropped here
    dk = tl.where(valid[:, None], dk * scale, 0.0)
    dv = tl.where(valid[:, None], dv, 0.0)
    tl.store(DK + base_g + cols[:, None] * GN + dims[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + base_g + cols[:, None] * GN + dims[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(q, do, K, V, KM, base, SN, b, N, D, n0, dims, length, lse2, delta, dq, qk_scale, MASKED: tl.constexpr,
             HAS_KM: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dq plus the share of the key tile at n0."""
    cols = n0 + tl.arange(0, BLOCK_N)
    k, v, valid = _kv_tiles(K, V, KM, base, SN, b, N, D, cols, dims, length, HAS_KM)
    _, ds = _probs_and_ds(q, k, v, do, lse2, delta, valid, qk_scale, MASKED, UPCAST, PRECISION)
    return dq + _dot(ds.to(k.dtype), k, UPCAST, PRECISION)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEQ, KM, scale, H, N, D, SB, SH, SN, OB, OH, ON, GB, GH, GN,
                        HAS_SEQ: tl.constexpr, HAS_KM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        PEEL: tl.constexpr):
    bh, b, base, base_o, base_g, length, rows, dims, q_mask, hi = _slab(SEQ, H, N, D, SB, SH, OB, OH, GB, GH,
                                                                         HAS_SEQ, BLOCK_M, BLOCK_D)
    q = _tile(Q, base, rows, SN, dims, D, length)  # (padded rows as 0: their dq is 0, whatever they hold)
    do = _tile(DO, base_o, rows, ON, dims, D, length)
    lse2, delta = _row_stats(LSE, DELTA, bh, N, rows, N)
    qk_scale = scale * LOG2E
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # PEEL (no key mask): the tiles wholly inside the length unmasked, then the tail, which
    # needs its mask: P of a key past the length can overflow, and inf * 0 in dS @ K would
    # reach dq
    full = hi // BLOCK_N * BLOCK_N if PEEL else 0
    for n0 in range(0, full, BLOCK_N):
        dq = _dq_tile(q, do, K, V, KM, base, SN, b, N, D, n0, dims, length, lse2, delta, dq, qk_scale, False,
                      HAS_KM, BLOCK_N, UPCAST, PRECISION)
    for n0 in tl.range(full, hi, BLOCK_N, num_stages=1 if PEEL else None):
        dq = _dq_tile(q, do, K, V, KM, base, SN, b, N, D, n0, dims, length, lse2, delta, dq, qk_scale, True,
                      HAS_KM, BLOCK_N, UPCAST, PRECISION)
    tl.store(DQ + base_g + rows[:, None] * GN + dims[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _store_zero_rows(PTR, base, SR, start, N, D, dims, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Zeros into rows [start, N) of an [N, D] slab at PTR + base with row stride SR."""
    for r0 in range(start, N, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        tl.store(PTR + base + rows[:, None] * SR + dims[None, :], tl.zeros((BLOCK, BLOCK_D), PTR.dtype.element_ty),
                 mask=(rows[:, None] < N) & (dims[None, :] < D))


@triton.jit
def _attn_bwd_fused_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, DK, DV, DQ_ACC, SEQ, KM, scale, H, N, D,
                           SB, SH, SN, OB, OH, ON, GB, GH, GN,
                           HAS_SEQ: tl.constexpr, HAS_KM: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                           PRECISION: tl.constexpr):
    """dq, dk and dv of one (batch x head) slab, the whole backward in one launch: first the
    slab's delta, then for each key block in turn dk and dv over the query blocks, and each
    query block's dq share added to its running sum in DQ_ACC (fp32), which the last key block
    finishes into DQ. Rows past the length get zeros."""
    bh = tl.program_id(0)
    b = bh // H
    length = _row_length(SEQ, b, N, HAS_SEQ)
    h = bh - b * H
    base = _offset(b, h, SB, SH)
    base_o = _offset(b, h, OB, OH)
    base_g = _offset(b, h, GB, GH)
    base_acc = bh.to(tl.int64) * N * D  # DQ_ACC is contiguous
    dims = tl.arange(0, BLOCK_D)
    for m0 in range(0, length, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        o = _tile(O, base_o, rows, ON, dims, D, length).to(tl.float32)
        do = _tile(DO, base_o, rows, ON, dims, D, length).to(tl.float32)
        tl.store(DELTA + bh.to(tl.int64) * N + rows, tl.sum(o * do, axis=1), mask=rows < N)
    # DELTA and DQ_ACC rows are read back by other threads of this program than wrote them
    tl.debug_barrier()
    for n0 in range(0, length, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k, v, valid, dk, dv = _key_block(K, V, KM, base, SN, b, N, D, cols, dims, length, HAS_KM, BLOCK_N, BLOCK_D)
        for m0 in range(0, length, BLOCK_M):
            dk, dv, ds, rows = _dkdv_step(Q, DO, LSE, DELTA, bh, base, SN, base_o, ON, N, D, m0, dims, length, k, v,
                                          valid, dk, dv, scale * LOG2E, True, BLOCK_M, UPCAST, PRECISION)
            dq = _dot(ds.to(k.dtype), k, UPCAST, PRECISION)
            acc_offs = base_acc + rows[:, None] * D + dims[None, :]
            q_mask = (rows[:, None] < N) & (dims[None, :] < D)
            if n0 > 0:
                dq += tl.load(DQ_ACC + acc_offs, mask=q_mask, other=0.0)
            if n0 + BLOCK_N >= length:
                tl.store(DQ + base_g + rows[:, None] * GN + dims[None, :], (dq * scale).to(DQ.dtype.element_ty),
                         mask=q_mask)
            else:
                tl.store(DQ_ACC + acc_offs, dq, mask=q_mask)
        kv_offs = base_g + cols[:, None] * GN + dims[None, :]
        kv_mask = (cols[:, None] < N) & (dims[None, :] < D)
        tl.store(DK + kv_offs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)
        tl.debug_barrier()
    _store_zero_rows(DQ, base_g, GN, tl.cdiv(length, BLOCK_M) * BLOCK_M, N, D, dims, BLOCK_M, BLOCK_D)
    _store_zero_rows(DK, base_g, GN, tl.cdiv(length, BLOCK_N) * BLOCK_N, N, D, dims, BLOCK_N, BLOCK_D)
    _store_zero_rows(DV, base_g, GN, tl.cdiv(length, BLOCK_N) * BLOCK_N, N, D, dims, BLOCK_N, BLOCK_D)


def _config(d: int, dtype: torch.dtype) -> dict:
    """Tile sizes and dot precision, one set for the forward and both backward kernels. On a
    GPU, fp16/bf16 tiles are free of register spills on sm_90 (benchmarks/compile_report.py
    reports them); 64 x 64 tiles with 4 warps at d <= 64 were picked from the H100 sweeps
    (benchmarks/results/measurements.md). fp32 keeps IEEE products, which run on CUDA cores
    and need small tiles (above d = 64 the dk/dv kernel still spills, also inside its loop:
    fp32 is the exact path, not the fast one).
    PEEL_TAIL: the forward and dq kernels run the key tiles wholly inside the length without
    the mask and the tail tile with it (fewer instructions per tile); not for fp32, where the
    second loop costs registers (and spills from d = 80)."""
    block_d = max(16, triton.next_power_of_2(d))
    if _interpreting():  # per block-op cost: few, large blocks
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, UPCAST=True, PRECISION="ieee", PEEL_TAIL=True)
    if dtype == torch.float32:  # above d = 64, 32-key tiles spilled in every forward iteration
        return dict(BLOCK_M=32, BLOCK_N=32 if block_d <= 64 else 16, BLOCK_D=block_d, UPCAST=False, PRECISION="ieee",
                    num_warps=8)
    # On sm_90, from d = 64, the forward is held to 128 registers: reading strided q, k, v
    # lets ptxas take a few more, which would cost a block per SM. From d = 80 the cap keeps a
    # few values in local memory across the key loop (none inside it); below d = 64 it is not
    # needed, and on sm_80 it would spill.
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, UPCAST=False, PRECISION="tf32",
                num_warps=4 if block_d <= 64 else 8, FWD_MAXNREG=128 if block_d >= 64 and _hopper() else None,
                PEEL_TAIL=True)


# Alternative launch configurations for bf16/fp16 at head dims up to 64, not yet decided by a
# GPU run (docs/kernels.md says which measurement decides each): gpu_report.py times them
# beside the default, compile_report.py compiles them all. Tile sizes apply to the forward and
# the backward kernels alike; FUSED_BWD and ATOMIC_DQ pick the fused and the atomic backward.
SWEEP = [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
         # FlashAttention-2's tile for d = 64: a quarter of the programs and fewer forward loop
         # instructions per score, one block per SM
         dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
         # the default tiles with the dk/dv kernel held to 168 registers (on sm_90 a few bytes
         # spill, outside its loop): 3 blocks per SM instead of 2
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, DKDV_MAXNREG=168),
         # the fused backward's tiles that do not spill on sm_90 (it holds dq's share as well)
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, FUSED_BWD=True),
         dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, FUSED_BWD=True),
         dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, FUSED_BWD=True),
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2, FUSED_BWD=True),
         # dq by atomics from the dk/dv kernel (not bitwise reproducible): with 128-key blocks
         # each dq row takes two atomic adds at N = 197 (64 x 128 tiles spill on sm_90)
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, ATOMIC_DQ=True),
         dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, ATOMIC_DQ=True)]


def _launch_config(d: int, dtype: torch.dtype, config: dict | None) -> tuple[dict, str, bool, dict, dict]:
    """(launch arguments shared by the kernels, the backward ("split", "fused" or "atomic"),
    whether the tail tile is peeled, and the extra launch arguments of the forward and of the
    dk/dv kernel): the defaults, then `config`. The defaults' register cap goes
    with their tile shape: a config with other tiles or warps has only the caps it names."""
    config = config or {}
    default = _config(d, dtype)
    cfg = {**default, **config}
    if any(cfg.get(key) != default.get(key) for key in ("BLOCK_M", "BLOCK_N", "num_warps")):
        cfg.update({key: config.get(key) for key in ("FWD_MAXNREG", "DKDV_MAXNREG")})
    fwd_regs, dkdv_regs = cfg.pop("FWD_MAXNREG", None), cfg.pop("DKDV_MAXNREG", None)
    fused, atomic = cfg.pop("FUSED_BWD", False), cfg.pop("ATOMIC_DQ", False)
    # torch's deterministic mode (or PACOFR_DETERMINISTIC=1) keeps dq atomic-free
    backward = "fused" if fused else "atomic" if atomic and not deterministic_default() else "split"
    return cfg, backward, bool(cfg.pop("PEEL_TAIL", False)), _max_registers(fwd_regs), _max_registers(dkdv_regs)


def _max_registers(cap: int | None) -> dict:
    return {} if cap is None else dict(maxnreg=cap)


def _masks(q, seqlens, key_mask):
    seq = seqlens.to(torch.int32).contiguous() if seqlens is not None else q.new_empty(0, dtype=torch.int32)
    km = key_mask.to(torch.int8).contiguous() if key_mask is not None else q.new_empty(0, dtype=torch.int8)
    return seq, km, dict(HAS_SEQ=seqlens is not None, HAS_KM=key_mask is not None)


def _shared_layout(*ts):
    """The tensors as the kernels read them and their shared (batch, head, row) strides: as
    given when they share strides with unit stride along d (q, k, v split from one qkv
    projection), else contiguous copies."""
    strides = ts[0].stride()
    if strides[3] != 1 or any(t.stride() != strides for t in ts[1:]):
        ts = tuple(t.contiguous() for t in ts)
        strides = ts[0].stride()
    return ts, strides[:3]


def _output_like(q):
    """The output layout that pacofr.ops.masked_attention promises (see there)."""
    b, h, n, d = q.shape
    return torch.empty_like(q) if q.is_contiguous() else q.new_empty(b, n, h, d).transpose(1, 2)


@on_device
def masked_attention_forward(q, k, v, seqlens, key_mask, scale, out=None, config=None):
    """(out [B, H, N, d] in q's dtype, lse [B, H, N] f32). q, k, v are read in place when
    they share strides (unit stride along d); `out` receives the result (any strides with
    unit stride along d; by default the op's layout, `_output_like`); `config` overrides the
    launch configuration (see SWEEP)."""
    b, h, n, d = q.shape
    out = _output_like(q) if out is None else out
    (q, k, v), in_strides = _shared_layout(q, k, v)
    if out.stride(3) != 1:
        raise ValueError(f"masked_attention_forward: out needs unit stride along d, got strides {out.stride()}")
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    if out.numel():
        seq, km, flags = _masks(q, seqlens, key_mask)
        cfg, _, peel, fwd_extra, _ = _launch_config(d, q.dtype, config)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]) * b * h,)
        # unmasked tiles take the row max before scaling, which needs a positive scale
        _attn_fwd_kernel[grid](q, k, v, out, lse, seq, km, float(scale), h, n, d, *in_strides, *out.stride()[:3],
                               **flags, **cfg, **fwd_extra, PEEL=peel and key_mask is None and scale > 0)
    return out, lse


@on_device
def masked_attention_backward(grad_out, q, k, v, out, lse, seqlens, key_mask, scale, config=None, grads=None):
    """(dq, dk, dv); bitwise reproducible unless `config` asks for ATOMIC_DQ outside the
    deterministic mode (torch's, or PACOFR_DETERMINISTIC=1). q, k, v as in the forward;
    grad_out is read in place when it has out's strides. `grads` (dq, dk, dv) receive the
    result: any strides shared by the three with unit stride along d, such as views of one
    dqkv buffer (by default new contiguous tensors); `config` as in the forward, FUSED_BWD=True
    for the fused backward, ATOMIC_DQ=True for the atomic one."""
    b, h, n, d = q.shape
    (q, k, v), in_strides = _shared_layout(q, k, v)
    out = out if out.stride(3) == 1 else out.contiguous()
    if grad_out.stride() != out.stride() or grad_out.dtype != q.dtype:  # usually it has them already
        grad_out = torch.empty_strided(out.shape, out.stride(), dtype=q.dtype, device=q.device).copy_(grad_out)
    out_strides = out.stride()[:3]
    delta = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    if grads is None:
        grads = tuple(torch.empty(b, h, n, d, dtype=q.dtype, device=q.device) for _ in range(3))
    elif grads[0].stride(3) != 1 or any(g.stride() != grads[0].stride() or g.shape != q.shape for g in grads):
        raise ValueError(f"masked_attention_backward: grads must be {tuple(q.shape)} with shared strides and unit "
                         f"stride along d, got strides {[g.stride() for g in grads]}")
    dq, dk, dv = grads
    if q.numel():
        seq, km, flags = _masks(q, seqlens, key_mask)
        cfg, backward, peel, _, dkdv_extra = _launch_config(d, q.dtype, config)
        strides = (*in_strides, *out_strides, *dq.stride()[:3])
        if backward == "fused":
            # dq's running sums, needed only when a slab has more than one key block
            acc = torch.empty(q.shape, dtype=torch.float32, device=q.device) if n > cfg["BLOCK_N"] else dq
            _attn_bwd_fused_kernel[(b * h,)](q, k, v, out, grad_out, lse, delta, dq, dk, dv, acc, seq, km, float(scale),
                                             h, n, d, *strides, **flags, **cfg)
        else:
            block_r = 256 if _interpreting() else 64
            _attn_bwd_delta_kernel[(triton.cdiv(b * h * n, block_r),)](out, grad_out, delta, b * h * n, h, n, d,
                                                                         *out_strides, BLOCK_R=block_r,
                                                                         BLOCK_D=cfg["BLOCK_D"])
            args = (q, k, v, grad_out, lse, delta)
            atomic = backward == "atomic"
            acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else dq
            _attn_bwd_dkdv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]) * b * h,)](
                *args, dk, dv, acc, seq, km, float(scale), h, n, d, *strides, **flags, **cfg, **dkdv_extra,
                ATOMIC_DQ=atomic)
            if atomic:  # the sums' order varies from run to run: not bitwise reproducible
                dq.copy_(acc)
            else:
                _attn_bwd_dq_kernel[(triton.cdiv(n, cfg["BLOCK_M"]) * b * h,)](
                    *args, dq, seq, km, float(scale), h, n, d, *strides, **flags, **cfg,
                    PEEL=peel and key_mask is None)
    return dq, dk, dv
