"""Triton codebook search: the k best codes per row without the N x K score matrix.

Forward: each program owns BLOCK_M rows and one contiguous range of codes (a split of K). It
computes a BLOCK_M x BLOCK_N tile of scores with `tl.dot` (fp32 accumulation), then merges the
tile into a running best-k kept on chip: while some row has a tile score better than its
current worst, that row's best tile entry replaces its worst slot. Rows stop merging as soon
as nothing in the tile beats them, so late tiles cost little. Only N x k (per split) leaves
the chip; when N is too small to fill the GPU, K is split and a second small kernel merges the
partial lists (no host synchronisation, unlike a torch sort-and-select).

No tl.sort / tl.topk: the selection is built from max/min reductions, which also keeps the
interpreter (TRITON_INTERPRET=1, CPU) fast.

Order and ties: scores become keys where higher is better (ip: score, l2: -distance). Among
equal keys the lower code index wins: tiles are visited in index order, a tile entry must be
strictly better than the worst slot to enter, the slot evicted among equal worst ones is the
one with the highest index, and within a tile the lowest column is taken first. NaN scores
rank below every number (their rows still get indices inside [0, K)) and are returned as NaN;
infinitely bad scores (ip -inf, l2 +inf) rank just above NaN. Only keys and indices are kept:
the scores are recovered from the keys.

Packed selection (config PACKED, fp16/bf16 inputs; in the SWEEP until a GPU run decides): each
tile key becomes an int32 in the same order with the tile column in its low log2(BLOCK_N) bits,
so one integer max finds a row's best entry and its lowest column among equal keys, and one
compare removes it: three operations per tile entry and insertion instead of six or seven.
Keys then rank at 23 - log2(BLOCK_N) mantissa bits (2^-16 relative with 128-code tiles, finer
than 16-bit inputs' own rounding; ties to the lower index below that), and the returned scores
are rounded toward zero to as many bits (exact for scores that have no more).

Backward: one kernel gathers the selected codes per row for grad_x and, by default, scatters
into the codebook gradient with fp32 atomics from the same loads. The deterministic option
sorts the (code, row) pairs instead and lets one program sum each code's segment in order.
"""

import torch
import triton
import triton.language as tl

from . import deterministic_default
from . import hopper as _hopper
from . import interpreting as _interpreting
from . import on_device

# Keys (higher is better) that stand for a score of NaN and for a key of -inf: the lowest two
# finite floats, so both rank below every other number and above the empty slot's -inf, NaN
# last. Keys are scores or their negation, so the score comes back from the key exactly (a
# finite key equal to a sentinel comes back as what it stands for). Constexprs: compiled
# kernels may read only constexpr globals.
NAN_KEY = tl.constexpr(-3.4028234663852886e38)
NEG_INF_KEY = tl.constexpr(-3.4028232635611926e38)


@triton.jit
def _rank_keys(key):
    """Scores made keys (higher is better) ranked as documented: NaN and -inf become the two
    sentinels just above the empty slot's -inf."""
    key = tl.where(key == -float("inf"), NEG_INF_KEY, key)
    return tl.where(key != key, NAN_KEY, key)


@triton.jit
def _score_of(key, METRIC_L2: tl.constexpr):
    """The score a key came from (exact: keys are scores or their negation)."""
    key = tl.where(key == NAN_KEY, float("nan"), tl.where(key == NEG_INF_KEY, -float("inf"), key))
    return -key if METRIC_L2 else key


# Packed selection (config PACKED, 16-bit inputs): int32 keys whose order is the float keys'
# order, the low COL_BITS replaced by the tile column. EMPTY ranks below all (empty slots, codes
# past the range), NaN's bucket (EMPTY + 2^COL_BITS) just above it; both stand for bit patterns
# of NaNs only, so no number is mistaken for them. FULL fills the padding slots past TOPK.
EMPTY = tl.constexpr(-2147483648)
FULL = tl.constexpr(2147483647)


@triton.jit
def _flip_negative(x):
    """int32 float bits -> an int32 in the floats' order (negative floats' magnitude bits
    reversed), and back: the map is its own inverse."""
    return x ^ ((x >> 31) & 0x7FFFFFFF)


@triton.jit
def _bucket_keys(key, COL_BITS: tl.constexpr):
    """Float keys as int32 in the same order (NaN at EMPTY + 2^COL_BITS; -0.0 just below +0.0),
    low COL_BITS cleared: keys equal but for those bits share a bucket."""
    ordered = tl.where(key != key, EMPTY + (1 << COL_BITS), _flip_negative(key.to(tl.int32, bitcast=True)))
    return ordered & ~((1 << COL_BITS) - 1)


@triton.jit
def _key_of_bucket(bucket, COL_BITS: tl.constexpr):
    """The float key of a bucket, rounded toward zero to 23 - COL_BITS mantissa bits (exact for
    keys that have no more); NaN for NaN's bucket, -inf for EMPTY."""
    ordered = tl.where(bucket < 0, bucket | ((1 << COL_BITS) - 1), bucket)
    key = _flip_negative(ordered).to(tl.float32, bitcast=True)
    key = tl.where(bucket == EMPTY + (1 << COL_BITS), float("nan"), key)
    return tl.where(bucket == EMPTY, -float("inf"), key)


@triton.jit
def _merge_tile_packed(key, n0, col_ok, best_key, best_idx, BLOCK_N: tl.constexpr, COL_BITS: tl.constexpr):
    """_merge_tile on packed keys: bucket | (BLOCK_N - 1 - column), so that one integer max
    finds a row's best entry and, among equal buckets, its lowest column, and one compare
    removes it (packed keys are distinct within a row). The lists hold buckets. Per insertion
    that is three operations per tile entry instead of six or seven."""
    low = BLOCK_N - 1
    packed = tl.where(col_ok[None, :], _bucket_keys(key, COL_BITS) | (low - tl.arange(0, BLOCK_N))[None, :], EMPTY)
    worst = tl.min(best_key, axis=1)
    top = tl.max(packed, axis=1)
    active = (top & ~low) > worst
    while tl.max(active.to(tl.int32), axis=0) > 0:
        is_worst = best_key == worst[:, None]
        evict_idx = tl.max(tl.where(is_worst, best_idx, -2147483647), axis=1)
        evict = is_worst & (best_idx == evict_idx[:, None]) & active[:, None]
        best_key = tl.where(evict, (top & ~low)[:, None], best_key)
        best_idx = tl.where(evict, (n0 + low - (top & low))[:, None], best_idx)
        # an inactive row's best entry cannot enter later either: removing it changes nothing
        packed = tl.where(packed == top[:, None], EMPTY, packed)
        worst = tl.min(best_key, axis=1)
        top = tl.max(packed, axis=1)
        active = (top & ~low) > worst
    return best_key, best_idx


@triton.jit
def _merge_tile(acc, n0, cols, col_ok, xn, CN, best_key, best_idx, METRIC_L2: tl.constexpr, SELECT: tl.constexpr,
                PACKED: tl.constexpr, BLOCK_N: tl.constexpr, COL_BITS: tl.constexpr):
    """Merges a [BLOCK_M, BLOCK_N] tile of products (codes `cols`, from n0) into the running
    best lists. SELECT=False is a diagnostic for timing the products alone: it keeps only each
    row's largest product (in every slot), so the lists it returns are not a result."""
    if METRIC_L2:
        cn = tl.load(CN + cols, mask=col_ok, other=0.0)
        key = -(xn[:, None] - 2.0 * acc + cn[None, :])
    else:
        key = acc
    if not SELECT:
        best_key = tl.maximum(best_key, tl.max(acc, axis=1).to(best_key.dtype)[:, None])
    elif PACKED:
        best_key, best_idx = _merge_tile_packed(key, n0, col_ok, best_key, best_idx, BLOCK_N, COL_BITS)
    else:
        best_key, best_idx = _merge_tile_keys(tl.where(col_ok[None, :], _rank_keys(key), -float("inf")), cols,
                                              best_key, best_idx)
    return best_key, best_idx


@triton.jit
def _merge_tile_keys(key, cols, best_key, best_idx):
    """While some row has a tile key better than its current worst, that row's best tile entry
    replaces its worst slot."""
    worst = tl.min(best_key, axis=1)
    top = tl.max(key, axis=1)
    active = top > worst
    while tl.max(active.to(tl.int32), axis=0) > 0:
        # the tile's best entry of each row (lowest column among equal keys)
        pos = tl.min(tl.where(key == top[:, None], cols[None, :], 2147483647), axis=1)
        # replaces the worst slot (the highest index among equal worst ones)
        is_worst = best_key == worst[:, None]
        evict_idx = tl.max(tl.where(is_worst, best_idx, -2147483647), axis=1)
        evict = is_worst & (best_idx == evict_idx[:, None]) & active[:, None]
        best_key = tl.where(evict, top[:, None], best_key)
        best_idx = tl.where(evict, pos[:, None], best_idx)
        key = tl.where((cols[None, :] == pos[:, None]) & active[:, None], -float("inf"), key)
        worst = tl.min(best_key, axis=1)
        top = tl.max(key, axis=1)
        active = top > worst
    return best_key, best_idx


@triton.jit
def _tile_dot(acc, X, C, rows, row_ok, cols, col_ok, d0, D, stride_xn, stride_cn,
              BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x[rows, d0:d0+BLOCK_D] @ codebook[cols, d0:d0+BLOCK_D]^T."""
    d = d0 + tl.arange(0, BLOCK_D)
    xt = tl.load(X + rows[:, None] * stride_xn + d[None, :], mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    ct = tl.load(C + cols[:, None] * stride_cn + d[None, :], mask=col_ok[:, None] & (d[None, :] < D), other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
        xt = xt.to(tl.float32)
        ct = ct.to(tl.float32)
    if IEEE:
        return acc + tl.dot(xt, tl.trans(ct), input_precision="ieee")
    return acc + tl.dot(xt, tl.trans(ct))


@triton.jit
def _topk_fwd_kernel(
    X, C, XN, CN, OUT_S, OUT_I,
    N, K, D, SPLIT_LEN,
    stride_xn, stride_cn, stride_os, stride_on, stride_is, stride_in,
    METRIC_L2: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, FLAT: tl.constexpr, SELECT: tl.constexpr, PACKED: tl.constexpr, COL_BITS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    k_lo = pid_s * SPLIT_LEN
    k_hi = tl.minimum(K, k_lo + SPLIT_LEN)

    slots = tl.arange(0, KP)
    # Empty slots hold key -inf (beaten by anything, NaN included); padding slots beyond TOPK
    # hold +inf so they are never the worst and never evicted. Indices are distinct negatives.
    if PACKED:
        best_key = tl.where(slots[None, :] < TOPK, EMPTY, FULL) + tl.zeros((BLOCK_M, KP), tl.int32)
    else:
        best_key = tl.where(slots[None, :] < TOPK, -float("inf"), float("inf")) + tl.zeros((BLOCK_M, KP), tl.float32)
    best_idx = (-1 - slots[None, :]) + tl.zeros((BLOCK_M, KP), tl.int32)
    xn = tl.load(XN + rows, mask=row_ok & METRIC_L2, other=0.0)

    if FLAT:
        # One loop over (code tile, D slice): the software pipeline then keeps loading the next
        # tile's first slices while this tile is merged, instead of refilling for each tile.
        steps = tl.cdiv(D, BLOCK_D)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for it in range(0, tl.cdiv(k_hi - k_lo, BLOCK_N) * steps):
            tile = it // steps
            step = it - tile * steps
            n0 = k_lo + tile * BLOCK_N
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < k_hi
            acc = _tile_dot(acc, X, C, rows, row_ok, cols, col_ok, step * BLOCK_D, D, stride_xn, stride_cn,
                            BLOCK_D, IEEE, UPCAST)
            if step == steps - 1:
                best_key, best_idx = _merge_tile(acc, n0, cols, col_ok, xn, CN, best_key, best_idx, METRIC_L2, SELECT,
                                                 PACKED, BLOCK_N, COL_BITS)
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    else:
        for n0 in range(k_lo, k_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < k_hi
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                acc = _tile_dot(acc, X, C, rows, row_ok, cols, col_ok, d0, D, stride_xn, stride_cn, BLOCK_D, IEEE,
                                UPCAST)
            best_key, best_idx = _merge_tile(acc, n0, cols, col_ok, xn, CN, best_key, best_idx, METRIC_L2, SELECT,
                                             PACKED, BLOCK_N, COL_BITS)

    best_key = tl.where(slots[None, :] < TOPK, best_key, EMPTY if PACKED else -float("inf"))
    _store_best_first(best_key, best_idx, OUT_S + pid_s * stride_os, OUT_I + pid_s * stride_is, rows, row_ok,
                      stride_on, stride_in, METRIC_L2, TOPK, PACKED, COL_BITS)


@triton.jit
def _store_best_first(key, idx, OUT_S, OUT_I, rows, row_ok, stride_on, stride_in, METRIC_L2: tl.constexpr,
                      TOPK: tl.constexpr, PACKED: tl.constexpr, COL_BITS: tl.constexpr):
    """Writes the TOPK best entries of each row of [rows, C] candidates (keys: higher is
    better; PACKED: buckets) as scores and indices, best first, equal keys in ascending index
    order."""
    for j in tl.static_range(TOPK):
        top = tl.max(key, axis=1)
        is_top = key == top[:, None]
        j_idx = tl.min(tl.where(is_top, idx, 2147483647), axis=1)
        picked = is_top & (idx == j_idx[:, None])
        top_key = _key_of_bucket(top, COL_BITS) if PACKED else top
        tl.store(OUT_S + rows * stride_on + j, _score_of(top_key, METRIC_L2), mask=row_ok)
        tl.store(OUT_I + rows * stride_in + j, j_idx.to(tl.int64), mask=row_ok)
        key = tl.where(picked, EMPTY if PACKED else -float("inf"), key)
        idx = tl.where(picked, 2147483647, idx)


@triton.jit
def _merge_kernel(PS, PI, OUT_S, OUT_I, N, S, stride_ps, stride_pn, stride_is, stride_in, stride_on, stride_oi,
                  METRIC_L2: tl.constexpr, TOPK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Best TOPK of each row's S per-split lists [S, N, TOPK]. Keys as in the forward kernel;
    empty slots (negative index, from a split shorter than TOPK) rank below everything."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    cand = tl.arange(0, BLOCK_C)
    split, slot = cand // TOPK, cand % TOPK
    ok = row_ok[:, None] & (cand[None, :] < S * TOPK)
    raw = tl.load(PS + split[None, :] * stride_ps + rows[:, None] * stride_pn + slot[None, :], mask=ok, other=0.0)
    idx = tl.load(PI + split[None, :] * stride_is + rows[:, None] * stride_in + slot[None, :], mask=ok, other=-1)
    idx = idx.to(tl.int32)
    key = tl.where(ok & (idx >= 0), _rank_keys(-raw if METRIC_L2 else raw), -float("inf"))
    _store_best_first(key, idx, OUT_S, OUT_I, rows, row_ok, stride_on, stride_oi, METRIC_L2, TOPK, False, 0)


@triton.jit
def _sq_norms_kernel(X, OUT, N, D, stride, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Squared L2 norm of each row, accumulated in fp32 from the stored dtype (the l2 search's
    row and code norms, without the fp32 copy of X that torch would make)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(X + rows[:, None] * stride + d[None, :], mask=(rows[:, None] < N) & (d[None, :] < D),
                    other=0.0).to(tl.float32)
        acc += v * v
    tl.store(OUT + rows, tl.sum(acc, axis=1), mask=rows < N)


def _sq_norms(t: torch.Tensor) -> torch.Tensor:
    n, d = t.shape
    out = torch.empty(n, dtype=torch.float32, device=t.device)
    block_r = 64 if _interpreting() else 8
    if n:
        _sq_norms_kernel[(triton.cdiv(n, block_r),)](t, out, n, d, t.stride(0), BLOCK_R=block_r,
                                                     BLOCK_D=min(128, max(16, triton.next_power_of_2(d))),
                                                     num_warps=4)
    return out


def _default_config(d: int, topk: int, dtype: torch.dtype) -> dict:
    """BLOCK_M, BLOCK_N, BLOCK_D, num_warps (and num_stages where not Triton's default). The
    interpreter pays per block operation, not per element: it gets large blocks. On a GPU the
    sizes keep the kernels' loops free of register spills on sm_80 and sm_90
    (benchmarks/compile_report.py reports them): fp32 (IEEE products, no tensor cores) takes
    thin D slices in two stages, and a long best-k list (k > 16) 32 x 64 tiles (ip spills with
    128 codes). 16-bit inputs take 64 x 128 tiles, with 4 warps on sm_90 (picked from the H100
    sweeps, benchmarks/results/measurements.md) and 8 elsewhere (with 4 a thread takes all
    the registers it can have on sm_80)."""
    width = max(16, triton.next_power_of_2(d))
    if _interpreting():
        return dict(BLOCK_M=64, BLOCK_N=256, BLOCK_D=min(128, width), num_warps=4)
    low = dtype != torch.float32
    if topk > 16:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_D=min(64 if low else 32, width), num_warps=8)
    if not low:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=16, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=min(64, width), num_warps=4 if _hopper() else 8)


# Alternative launch configurations for the low-precision paper-scale search, not yet decided
# by a GPU run (docs/kernels.md says which measurement decides each): gpu_report.py times them
# beside the default, compile_report.py compiles them all.
SWEEP = [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8),
         dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
         # code tiles and D slices as one loop (see _topk_fwd_kernel)
         dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, FLAT=True),
         dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, FLAT=True),
         # register caps meant to fit one more block per SM on sm_90 without spilling: 3 instead
         # of 2 with 4 warps, 2 instead of 1 with 8
         dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, maxnreg=168),
         dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, maxnreg=128),
         dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, maxnreg=128),
         # packed keys (see _merge_tile_packed): fewer operations per insertion, and fewer
         # registers than the float selection
         dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, PACKED=True),
         dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, FLAT=True, PACKED=True),
         dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, PACKED=True)]


def _splits(n: int, k_codes: int, block_m: int, block_n: int, device: torch.device) -> int:
    """How many K ranges: enough programs to fill the GPU when N alone cannot."""
    if device.type != "cuda" or n == 0:
        return 1
    row_blocks = triton.cdiv(n, block_m)
    want = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(k_codes, block_n), want // row_blocks))


def _common(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(x.dtype, codebook.dtype)
    return x.to(dtype).contiguous(), codebook.to(dtype).contiguous()


@on_device
def codebook_topk_forward(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str,
                          splits: int | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
                          config: dict | None = None):
    """(scores[N, k] f32, idx[N, k] i64). `splits` forces the number of K ranges (merged after);
    `out` receives the result (its previous content is never read); `config` overrides the
    launch configuration (BLOCK_M, BLOCK_N, num_warps, num_stages; see SWEEP)."""
    x, codebook = _common(x, codebook)
    n, d = x.shape
    k_codes = codebook.shape[0]
    launch = {**_default_config(d, k, x.dtype), "FLAT": False, "SELECT": True, "PACKED": False, **(config or {})}
    block_m, block_n = launch["BLOCK_M"], launch["BLOCK_N"]
    # packed keys keep 23 - log2(BLOCK_N) mantissa bits: finer than 16-bit inputs' rounding only
    launch["PACKED"] = launch["PACKED"] and x.dtype != torch.float32
    s = min(splits or _splits(n, k_codes, block_m, block_n, x.device), max(1, MERGE_WIDTH // k))
    # every split covers whole tiles and at least k codes
    split_len = max(triton.cdiv(triton.cdiv(k_codes, s), block_n) * block_n, triton.cdiv(k, block_n) * block_n)
    s = triton.cdiv(k_codes, split_len)
    part_s = torch.empty(s, n, k, dtype=torch.float32, device=x.device)
    part_i = torch.empty(s, n, k, dtype=torch.int64, device=x.device)
    if s == 1 and out is not None:
        part_s, part_i = out[0][None], out[1][None]
    if n:
        xn = _sq_norms(x) if metric == "l2" else x.new_empty(0, dtype=torch.float32)
        cn = _sq_norms(codebook) if metric == "l2" else xn
        grid = (triton.cdiv(n, block_m), s)
        _topk_fwd_kernel[grid](
            x, codebook, xn, cn, part_s, part_i, n, k_codes, d, split_len,
            x.stride(0), codebook.stride(0), part_s.stride(0), part_s.stride(1), part_i.stride(0), part_i.stride(1),
            METRIC_L2=metric == "l2", TOPK=k, KP=max(2, triton.next_power_of_2(k)),
            IEEE=x.dtype == torch.float32 or _interpreting(), UPCAST=_interpreting(),
            COL_BITS=block_n.bit_length() - 1, **launch,
        )
    if s == 1:
        return (part_s[0], part_i[0]) if out is None else out
    return merge_splits(part_s, part_i, k, metric, out)


# The merge holds a row's splits x k candidates on chip: the split count is capped so that
# they fit a MERGE_WIDTH tile.
MERGE_WIDTH = 2048


@on_device
def merge_splits(part_s: torch.Tensor, part_i: torch.Tensor, k: int, metric: str, out=None):
    """Best k of the per-split lists [S, N, k], best first, ties to the lower index, in one
    launch (no host synchronisation). A split shorter than k (the last one can be) leaves
    slots empty (negative index): they rank below everything, NaN scores just above them."""
    s, n, _ = part_s.shape
    scores, idx = out if out is not None else (torch.empty(n, k, dtype=torch.float32, device=part_s.device),
                                                torch.empty(n, k, dtype=torch.int64, device=part_s.device))
    block_c = triton.next_power_of_2(s * k)
    block_r = 16 if _interpreting() else max(1, 1024 // block_c)  # k unrolled rounds over the tile: keep it small
    if n:
        _merge_kernel[(triton.cdiv(n, block_r),)](part_s, part_i, scores, idx, n, s, part_s.stride(0),
                                                  part_s.stride(1), part_i.stride(0), part_i.stride(1),
                                                  scores.stride(0), idx.stride(0), METRIC_L2=metric == "l2",
                                                  TOPK=k, BLOCK_R=block_r, BLOCK_C=block_c,
                                                  num_warps=4)
    return scores, idx


# ---------------------------------------------------------------------------------- backward


@triton.jit
def _topk_bwd_kernel(G, X, C, IDX, GX, GC, N, D, stride_g, stride_x, stride_c, stride_i, stride_gx,
                     METRIC_L2: tl.constexpr, TOPK: tl.constexpr, ATOMIC_C: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """grad_x for a block of rows; with ATOMIC_C also their codebook contributions (fp32
    atomics, relaxed: only later launches read the sums), from the same loads of g, the indices
    and the selected codes."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    m2 = row_ok[:, None] & (d[None, :] < D)
    x = tl.load(X + rows[:, None] * stride_x + d[None, :], mask=m2, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for j in tl.static_range(TOPK):
        g = tl.load(G + rows * stride_g + j, mask=row_ok, other=0.0)
        code = tl.load(IDX + rows * stride_i + j, mask=row_ok, other=0)
        c = tl.load(C + code[:, None] * stride_c + d[None, :], mask=m2, other=0.0).to(tl.float32)
        if METRIC_L2:  # d|x - c|^2 = 2 (x - c) dx - 2 (x - c) dc
            acc += 2.0 * g[:, None] * (x - c)
            if ATOMIC_C:
                tl.atomic_add(GC + code[:, None] * D + d[None, :], 2.0 * g[:, None] * (c - x), mask=m2,
                              sem="relaxed")
        else:
            acc += g[:, None] * c
            if ATOMIC_C:
                tl.atomic_add(GC + code[:, None] * D + d[None, :], g[:, None] * x, mask=m2, sem="relaxed")
    tl.store(GX + rows[:, None] * stride_gx + d[None, :], acc.to(GX.dtype.element_ty), mask=m2)


@triton.jit
def _topk_bwd_c_segment_kernel(G, X, C, ROW, OFFSETS, GC, D, stride_x, stride_c,
                               METRIC_L2: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (code, D block): sums the code's sorted (row, slot) entries in order."""
    code = tl.program_id(0)
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    start = tl.load(OFFSETS + code)
    end = tl.load(OFFSETS + code + 1)
    c = tl.load(C + code * stride_c + d, mask=d_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in range(start, end, BLOCK_S):
        e = s0 + tl.arange(0, BLOCK_S)
        e_ok = e < end
        row = tl.load(ROW + e, mask=e_ok, other=0)
        g = tl.load(G + e, mask=e_ok, other=0.0)
        x = tl.load(X + row[:, None] * stride_x + d[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if METRIC_L2:
            acc += tl.sum(2.0 * g[:, None] * (c[None, :] - x), axis=0)
        else:
            acc += tl.sum(g[:, None] * x, axis=0)
    tl.store(GC + code * D + d, acc, mask=d_ok)


@on_device
def codebook_topk_backward(grad_scores: torch.Tensor, x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor,
                           metric: str, deterministic: bool | None = None):
    """(grad_x, grad_codebook) of sum(grad_scores * scores). The codebook gradient is a
    scatter-add over the selected codes: fp32 atomics, or with `deterministic` (default:
    torch's deterministic mode or PACOFR_DETERMINISTIC=1) a sorted, atomic-free reduction."""
    xc, cc = _common(x, codebook)
    n, d = xc.shape
    k_codes = cc.shape[0]
    k = idx.shape[1]
    g = grad_scores.float().contiguous()
    idx = idx.contiguous()
    grad_x = torch.empty(n, d, dtype=xc.dtype, device=x.device)
    grad_c = torch.zeros(k_codes, d, dtype=torch.float32, device=x.device)
    block_m = 64 if k <= 16 else 32  # 32 selected codes per row: fewer rows, no register spills
    block_d = min(128, max(16, triton.next_power_of_2(d)))
    metric_l2 = metric == "l2"
    if n:
        atomic = not (deterministic if deterministic is not None else deterministic_default())
        grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_d))
        _topk_bwd_kernel[grid](g, xc, cc, idx, grad_x, grad_c, n, d, g.stride(0), xc.stride(0), cc.stride(0),
                               idx.stride(0), grad_x.stride(0), METRIC_L2=metric_l2, TOPK=k, ATOMIC_C=atomic,
                               BLOCK_M=block_m, BLOCK_D=block_d, num_warps=8)
        if not atomic:
            flat = idx.reshape(-1)
            order = torch.sort(flat, stable=True).indices  # stable: a fixed order inside each code
            counts = torch.bincount(flat, minlength=k_codes)
            offsets = torch.zeros(k_codes + 1, dtype=torch.int64, device=x.device)
            offsets[1:] = torch.cumsum(counts, 0)
            rows = (order // k).contiguous()
            g_sorted = g.reshape(-1)[order].contiguous()
            _topk_bwd_c_segment_kernel[(k_codes, triton.cdiv(d, block_d))](
                g_sorted, xc, cc, rows, offsets, grad_c, d, xc.stride(0), cc.stride(0),
                METRIC_L2=metric_l2, BLOCK_S=64, BLOCK_D=block_d)
    return grad_x.to(x.dtype), grad_c.to(codebook.dtype)
