"""Triton patch-pixel alignment loss: norm_pix MSE plus the border (spatial consistency) term,
reading the prediction and the NCHW image directly (no patchify copy).

Both terms depend on a patch only through its residual. With the target statistics (m, s) of
a patch, u = s * pred + m - target is the de-normalized prediction error: the MSE term is
mean((u / s)^2) and the border error of a pair is u_nb - u on the shared border line.

Forward (`_loss_kernel`, one launch): a program first computes the statistics of one block of
patches (reading its pixels) and flags them stored; then it computes the loss parts of the
block LAG blocks before it: everything its borders need (the neighbours' statistics) was
flagged by programs that started earlier, and its pixels were read a moment ago (likely
still in L2). Programs take their block from a counter in the order they start, so any block
they wait for belongs to a program that is running and waits on nothing later: no deadlock,
whatever order the GPU schedules them in. Which program handles a block changes from run to run, the arithmetic does not:
results are bitwise reproducible. Partial weight sums come first (`_norms_kernel`, a few
programs); the per-block parts are summed in two levels by the last program to finish each
group of blocks, then by the last group's: fixed orders, and no launch after the forward's.

Asked to (`patch_pixel_loss_forward_with_grad`), the same pass also writes the gradient of
l_pix + sc_weight * l_sc, so the whole loss reads pred once, the image twice (the second time
a moment after the first: likely from L2) and writes the gradient once. The backward
(`patch_pixel_loss_rescale`) then has nothing to do when the upstream gradients are
(1, sc_weight); in that ratio with another factor it scales the gradient in place; in another
ratio it also adds the border term's missing share (reading border lines), and far below the
told ratio it computes the gradient afresh. The choice is made on the device from the
upstream gradients (no host synchronisation).
`patch_pixel_loss_backward` computes the gradient from scratch (pred, image, statistics).

Tiles are [patches, channel, row, column] with the patch size and channel count as
compile-time constants, so every address is a sum of broadcast parts (no per-element
division) and image rows are contiguous in the last dimension. pred[b, l] holds a patch in
(row, column, channel) order, the MAE/timm patchify order: element (c, i, j) of patch
(gi, gj) is pred[b, gi * GW + gj, (i * p + j) * C + c] and image[b, c, gi * p + i, gj * p + j].
"""

import torch
import triton
import triton.language as tl

from . import interpreting as _interpreting
from . import on_device


@triton.jit
def _axes(BC: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
    """Channel, row and column index vectors, shaped to broadcast against [L, BC, BR, BP]."""
    c = tl.arange(0, BC)[None, :, None, None]
    i = tl.arange(0, BR)[None, None, :, None]
    j = tl.arange(0, BP)[None, None, None, :]
    return c, i, j


@triton.jit
def _patches(block, NP, GW, LPI, BLOCK_L: tl.constexpr):
    """The block's patch ids [L], whether they exist, and each one's image and grid position."""
    ids = block * BLOCK_L + tl.arange(0, BLOCK_L)
    ok = ids < NP
    ids = tl.where(ok, ids, 0)  # keeps the address arithmetic of missing patches in range
    b = ids // LPI
    g = ids % LPI
    return ids, ok, b, g // GW, g % GW


@triton.jit
def _offsets(ids, b, gi, gj, c, i, j, HW, W, CHW, PS: tl.constexpr, CH: tl.constexpr):
    """pred and image offsets of element (c, i, j) of patches `ids` (any broadcastable c, i, j)."""
    P: tl.constexpr = PS * PS * CH
    base_x = ids.to(tl.int64) * P
    base_t = b.to(tl.int64) * CHW + (gi * PS) * W + gj * PS
    x_off = base_x[:, None, None, None] + (i * PS + j) * CH + c
    t_off = base_t[:, None, None, None] + c * HW + i * W + j
    return x_off, t_off


@triton.jit
def _col(v):
    """[L] -> [L, 1, 1, 1], to broadcast against a tile."""
    return v[:, None, None, None]


@triton.jit
def _sum_sq(e):
    return tl.sum(tl.sum(tl.sum(e * e, axis=3), axis=2), axis=1)


@triton.jit
def _weight_and_stats(WGT, STATS, ids, ok, NP):
    # statistics bypass L1: during the forward other programs store them
    return (tl.load(WGT + ids, mask=ok, other=0.0), tl.load(STATS + ids, mask=ok, other=0.0, cache_modifier=".cg"),
            tl.load(STATS + NP + ids, mask=ok, other=1.0, cache_modifier=".cg"))


@triton.jit
def _pair_weight(w, w_nb):
    """max(w, w_nb), NaN if either is (as torch.maximum; the GPU's max.f32 would drop it)."""
    return tl.maximum(w, w_nb, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _border(PRED, IMG, WGT, STATS, x_off, t_off, m, ids, has, w, mean, std, NP, step, x_shift, t_shift,
            P: tl.constexpr):
    """One side's border: the error u_nb - u on a line of this patch (offsets x_off, t_off,
    mask m) against the touching line of the neighbour patch `ids + step` (its pred elements
    x_shift further inside a patch, its pixels t_shift further in the image), zero where the
    pair does not exist; and the pair weight max(w, w_nb) [L]."""
    nb = tl.where(has, ids + step, ids)
    m = m & _col(has)
    mean_nb = _col(tl.load(STATS + nb, mask=has, other=0.0, cache_modifier=".cg"))
    std_nb = _col(tl.load(STATS + NP + nb, mask=has, other=1.0, cache_modifier=".cg"))
    u = (_col(std) * tl.load(PRED + x_off, mask=m, other=0.0).to(tl.float32)
         + _col(mean) - tl.load(IMG + t_off, mask=m, other=0.0).to(tl.float32))
    u_nb = (std_nb * tl.load(PRED + x_off + (step * P + x_shift), mask=m, other=0.0).to(tl.float32) + mean_nb
            - tl.load(IMG + t_off + t_shift, mask=m, other=0.0).to(tl.float32))
    pw = tl.where(has, _pair_weight(w, tl.load(WGT + nb, mask=has, other=0.0)), 0.0)
    return tl.where(m, u_nb - u, 0.0), pw


@triton.jit
def _sides(PRED, IMG, WGT, STATS, ids, ok, b, gi, gj, w, mean, std, NP, GH, GW, W, HW, CHW, c, i, j,
           AFTER: tl.constexpr, PS: tl.constexpr, CH: tl.constexpr):
    """Border errors and pair weights with the right and lower neighbours (AFTER) or with the
    left and upper ones: a column line [L, BC, BR, 1] and a row line [L, BC, 1, BP]."""
    P: tl.constexpr = PS * PS * CH
    edge: tl.constexpr = (PS - 1) * AFTER  # this patch's border column and row
    sign: tl.constexpr = 2 * AFTER - 1
    if AFTER:
        has_col, has_row = gj + 1 < GW, gi + 1 < GH
    else:
        has_col, has_row = gj > 0, gi > 0
    x_off, t_off = _offsets(ids, b, gi, gj, c, i, edge, HW, W, CHW, PS, CH)
    line = _col(ok) & (c < CH) & (i < PS)
    e_col, pw_col = _border(PRED, IMG, WGT, STATS, x_off, t_off, line, ids, ok & has_col, w, mean, std, NP,
                            sign, -sign * (PS - 1) * CH, sign, P)
    x_off, t_off = _offsets(ids, b, gi, gj, c, edge, j, HW, W, CHW, PS, CH)
    line = _col(ok) & (c < CH) & (j < PS)
    e_row, pw_row = _border(PRED, IMG, WGT, STATS, x_off, t_off, line, ids, ok & has_row, w, mean, std, NP,
                            sign * GW, -sign * (PS - 1) * PS * CH, sign * W, P)
    return e_col, pw_col, e_row, pw_row


@triton.jit
def _border_grad(PRED, IMG, WGT, STATS, ids, ok, b, gi, gj, w, mean, std, NP, GH, GW, W, HW, CHW, c, i, j,
                 e_right, pw_right, e_down, pw_down, PS: tl.constexpr, CH: tl.constexpr):
    """s * sum over this patch's four borders of pw (u_nb - u), on each border's line: the
    gradient of l_sc up to the factor -2 / (p C sum pw), the same expression from either side
    of a pair. The right and lower sides come in (the loss needs them too)."""
    e_left, pw_left, e_up, pw_up = _sides(PRED, IMG, WGT, STATS, ids, ok, b, gi, gj, w, mean, std, NP, GH, GW,
                                          W, HW, CHW, c, i, j, False, PS, CH)
    col = tl.where(j == PS - 1, _col(pw_right) * e_right, 0.0) + tl.where(j == 0, _col(pw_left) * e_left, 0.0)
    row = tl.where(i == PS - 1, _col(pw_down) * e_down, 0.0) + tl.where(i == 0, _col(pw_up) * e_up, 0.0)
    return _col(std) * (col + row)


@triton.jit
def _twice_per_unit(g, norm, count):
    """2 g / (count * norm): the gradient scale of a mean over `count` elements normalized by
    `norm`; 0 when the normalizer is 0."""
    return tl.where(norm > 0, 2.0 * g / (count * tl.where(norm > 0, norm, 1.0)), 0.0)


@triton.jit
def _norms_kernel(WGT, NSUM, B, GH, GW, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Partial weight sums of BLOCK_B images' grids: the weights into NSUM[0, pid] and the
    border-pair weights (pairs with the right and lower neighbour, max(w, w_nb)) into
    NSUM[1, pid]; no index division."""
    pid = tl.program_id(0)
    b = pid * BLOCK_B + tl.arange(0, BLOCK_B)[:, None, None]
    gi = tl.arange(0, BLOCK_H)[None, :, None]
    gj = tl.arange(0, BLOCK_W)[None, None, :]
    ok = (b < B) & (gi < GH) & (gj < GW)
    ids = (b * GH + gi) * GW + gj
    right = ok & (gj + 1 < GW)
    down = ok & (gi + 1 < GH)
    w = tl.load(WGT + ids, mask=ok, other=0.0)
    pw = (tl.where(right, _pair_weight(w, tl.load(WGT + ids + 1, mask=right, other=0.0)), 0.0)
          + tl.where(down, _pair_weight(w, tl.load(WGT + ids + GW, mask=down, other=0.0)), 0.0))
    tl.store(NSUM + pid, tl.sum(tl.sum(tl.sum(w, axis=2), axis=1), axis=0))
    tl.store(NSUM + tl.num_programs(0) + pid, tl.sum(tl.sum(tl.sum(pw, axis=2), axis=1), axis=0))


@triton.jit
def _sum_rows(PTR, n, BLOCK: tl.constexpr):
    """The sums of the two rows of a [2, n] array, in a fixed order (the same in every
    program); loads bypass L1 (other programs of the launch may have written them)."""
    pair = tl.arange(0, 2)
    acc = tl.zeros((2, BLOCK), tl.float32)
    for start in range(0, n, BLOCK):
        k = start + tl.arange(0, BLOCK)[None, :]
        acc += tl.load(PTR + pair[:, None] * n + k, mask=k < n, other=0.0, cache_modifier=".cg")
    sums = tl.sum(acc, axis=1)
    return tl.sum(tl.where(pair == 0, sums, 0.0), axis=0), tl.sum(tl.where(pair == 1, sums, 0.0), axis=0)


@triton.jit
def _mean_of(err, norm):
    """err / norm, exactly 0 when the weights sum to 0."""
    return tl.where(norm > 0, err / tl.where(norm > 0, norm, 1.0), 0.0)


@triton.jit
def _loss_kernel(PRED, IMG, WGT, STATS, PART, NSUM, NPART, NORMS, L_PIX, L_SC, GRAD, SYNC, sc_weight, eps, NP, NB,
                 NG, LAG, GH, GW, LPI, W, HW, CHW, PS: tl.constexpr, CH: tl.constexpr, NORM: tl.constexpr,
                 WRITE_GRAD: tl.constexpr, PRELOAD: tl.constexpr, FLAG_BLOCK: tl.constexpr, GROUP: tl.constexpr,
                 NPART_P: tl.constexpr, BLOCK_L: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
    """Statistics of block v into STATS (flag SYNC[v] set after), then for block q = v - LAG:
    its sums of w * mse and of the right and lower pairs' pw * mean(err^2) into PART[:, q], and
    with WRITE_GRAD the gradient of l_pix + sc_weight * l_sc (the weight sums from their
    partials NSUM [2, NPART]). The last program of each GROUP of blocks to finish sums theirs
    into PART[:, NB + group], and the last group's sums them into the losses and NORMS: fixed
    orders, no launch after this one. SYNC: NB block flags, the start counter, NG group
    counters, the group counter. Grid: NB + LAG programs.
    PRELOAD: block q's own tiles need no statistics, so they are loaded first, to be in flight
    during block v's statistics and the wait (more bytes in flight per program)."""
    P: tl.constexpr = PS * PS * CH
    c, i, j = _axes(BC, BR, BP)
    v = tl.atomic_add(SYNC + NB, 1)  # this program's block: every lower one has a running program
    q = v - LAG
    ids, ok, b, gi, gj = _patches(tl.maximum(q, 0), NP, GW, LPI, BLOCK_L)
    ok = ok & (q >= 0)
    x_off, t_off = _offsets(ids, b, gi, gj, c, i, j, HW, W, CHW, PS, CH)
    m = _col(ok) & (c < CH) & (i < PS) & (j < PS)
    if PRELOAD:
        t = tl.load(IMG + t_off, mask=m, other=0.0)
        x = tl.load(PRED + x_off, mask=m, other=0.0)
    if v < NB:
        ids_v, ok_v, b_v, gi_v, gj_v = _patches(v, NP, GW, LPI, BLOCK_L)
        _, t_off_v = _offsets(ids_v, b_v, gi_v, gj_v, c, i, j, HW, W, CHW, PS, CH)
        m_v = _col(ok_v) & (c < CH) & (i < PS) & (j < PS)
        t_v = tl.load(IMG + t_off_v, mask=m_v, other=0.0).to(tl.float32)
        if NORM:
            mean = tl.sum(tl.sum(tl.sum(t_v, axis=3), axis=2), axis=1) / P
            std = tl.sqrt(_sum_sq(tl.where(m_v, t_v - _col(mean), 0.0)) / (P - 1) + eps)
        else:
            mean = tl.zeros((BLOCK_L,), tl.float32)
            std = mean + 1.0
        tl.store(STATS + ids_v, mean, mask=ok_v)
        tl.store(STATS + NP + ids_v, std, mask=ok_v)
        tl.debug_barrier()  # all of the block's statistics are stored before the flag
        tl.atomic_xchg(SYNC + v, 1, sem="release")
    if q >= 0:
        # the blocks that hold this block's neighbours: q - LAG .. q + LAG = v, all claimed
        blocks = q - LAG + tl.arange(0, FLAG_BLOCK)
        need = (blocks >= 0) & (blocks <= tl.minimum(v, NB - 1))
        waiting = 1
        while waiting > 0:  # (a scalar carried by the loop: a tensor one trips the compiler)
            ready = tl.atomic_add(SYNC + blocks, 0, mask=need, sem="acquire")
            waiting = tl.sum((need & (ready == 0)).to(tl.int32), axis=0)
        if not PRELOAD:
            t = tl.load(IMG + t_off, mask=m, other=0.0)
            x = tl.load(PRED + x_off, mask=m, other=0.0)
        w, mean, std = _weight_and_stats(WGT, STATS, ids, ok, NP)
        # pred - normalized target
        r = tl.where(m, x.to(tl.float32) - (t.to(tl.float32) - _col(mean)) * _col(1.0 / std), 0.0)
        e_right, pw_right, e_down, pw_down = _sides(PRED, IMG, WGT, STATS, ids, ok, b, gi, gj, w, mean, std, NP,
                                                    GH, GW, W, HW, CHW, c, i, j, True, PS, CH)
        if WRITE_GRAD:
            sum_w, sum_pw = _sum_rows(NSUM, NPART, NPART_P)
            grad = _col(_twice_per_unit(1.0, sum_w, P) * w) * r
            if sc_weight != 0.0:
                grad -= _twice_per_unit(sc_weight, sum_pw, PS * CH) * _border_grad(
                    PRED, IMG, WGT, STATS, ids, ok, b, gi, gj, w, mean, std, NP, GH, GW, W, HW, CHW, c, i, j,
                    e_right, pw_right, e_down, pw_down, PS, CH)
            tl.store(GRAD + x_off, grad.to(GRAD.dtype.element_ty), mask=m)
        parts = PART + 2 * NB  # [2, NG]: the groups' sums
        tl.store(PART + q, tl.sum(w * _sum_sq(r), axis=0) / P)
        tl.store(PART + NB + q, tl.sum(pw_right * _sum_sq(e_right) + pw_down * _sum_sq(e_down), axis=0) / (PS * CH))
        tl.debug_barrier()  # the block's sums are stored before it counts as done
        group = q // GROUP
        if tl.atomic_add(SYNC + NB + 1 + group, 1, sem="acq_rel") == tl.minimum(GROUP, NB - group * GROUP) - 1:
            # the group's last block: its sums, in block order
            k = group * GROUP + tl.arange(0, GROUP)
            tl.store(parts + group, tl.sum(tl.load(PART + k, mask=k < NB, other=0.0, cache_modifier=".cg"), axis=0))
            tl.store(parts + NG + group,
                     tl.sum(tl.load(PART + NB + k, mask=k < NB, other=0.0, cache_modifier=".cg"), axis=0))
            tl.debug_barrier()
            if tl.atomic_add(SYNC + NB + 1 + NG, 1, sem="acq_rel") == NG - 1:  # the last group: the losses
                err_pix, err_sc = _sum_rows(parts, NG, GROUP)
                sum_w, sum_pw = _sum_rows(NSUM, NPART, NPART_P)
                tl.store(L_PIX, _mean_of(err_pix, sum_w))
                tl.store(L_SC, _mean_of(err_sc, sum_pw))
                tl.store(NORMS, sum_w)
                tl.store(NORMS + 1, sum_pw)


@triton.jit
def _grad_kernel(PRED, IMG, WGT, STATS, NORMS, G_PIX, G_SC, GRAD, sc_weight, NP, GH, GW, LPI, W, HW, CHW,
                 PS: tl.constexpr, CH: tl.constexpr, RESCALE: tl.constexpr,
                 BLOCK_L: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
    """d/dpred of g_pix * l_pix + g_sc * l_sc: the pixel term 2 g_pix w r / (P sum w) with
    r = u / s; each border this patch shares adds -2 g_sc pw (u_nb - u) s / (p C sum pw) on its
    line. RESCALE: GRAD holds the forward's gradient for (1, sc_weight); it is scaled by g_pix
    and given the border term for g_sc - sc_weight * g_pix (computed afresh when g_sc is far
    below sc_weight * g_pix), and left alone when that is all it already is."""
    P: tl.constexpr = PS * PS * CH
    g_pix = tl.load(G_PIX).to(tl.float32)
    g_sc = tl.load(G_SC).to(tl.float32)
    if RESCALE:
        told = sc_weight * g_pix
        # a compare, not the difference: a fused multiply-add would leave its rounding error
        # and take the border path for upstream gradients exactly in the ratio
        border = g_sc != told
        # Far below the told ratio most of the stored border part must be taken out again, and
        # its rounding in pred's dtype would not go with it (up to 2^-8 |told / g_sc| of the
        # result in bf16): there the gradient is computed afresh, as without RESCALE.
        fresh = tl.abs(told) > 2.0 * tl.abs(g_sc)
        g_border = tl.where(fresh, g_sc, tl.where(border, g_sc - told, 0.0))
        todo = (g_pix != 1.0) | border
    else:
        fresh = True
        g_border = g_sc
        todo = True
    if todo:
        ids, ok, b, gi, gj = _patches(tl.program_id(0), NP, GW, LPI, BLOCK_L)
        c, i, j = _axes(BC, BR, BP)
        x_off, t_off = _offsets(ids, b, gi, gj, c, i, j, HW, W, CHW, PS, CH)
        m = _col(ok) & (c < CH) & (i < PS) & (j < PS)
        w, mean, std = _weight_and_stats(WGT, STATS, ids, ok, NP)
        if fresh:
            t = tl.load(IMG + t_off, mask=m, other=0.0).to(tl.float32)
            x = tl.load(PRED + x_off, mask=m, other=0.0).to(tl.float32)
            grad = _col(_twice_per_unit(g_pix, tl.load(NORMS), P) * w) * (x - (t - _col(mean)) * _col(1.0 / std))
        else:
            grad = g_pix * tl.load(GRAD + x_off, mask=m, other=0.0).to(tl.float32)
        if g_border != 0.0:
            e_right, pw_right, e_down, pw_down = _sides(PRED, IMG, WGT, STATS, ids, ok, b, gi, gj, w, mean, std, NP,
                                                        GH, GW, W, HW, CHW, c, i, j, True, PS, CH)
            grad -= _twice_per_unit(g_border, tl.load(NORMS + 1), PS * CH) * _border_grad(
                PRED, IMG, WGT, STATS, ids, ok, b, gi, gj, w, mean, std, NP, GH, GW, W, HW, CHW, c, i, j,
                e_right, pw_right, e_down, pw_down, PS, CH)
        tl.store(GRAD + x_off, grad.to(GRAD.dtype.element_ty), mask=m)


# Elements of the padded [patches, C, p, p] tile per program and warps, for the forward and
# the gradient kernels, and the forward's PRELOAD (see _loss_kernel). The defaults keep them
# free of register spills on sm_80 and sm_90 (benchmarks/compile_report.py). No GPU run has
# timed this schedule yet: the SWEEP's alternatives are all undecided (docs/kernels.md);
# gpu_report.py times them beside the default.
DEFAULT_CONFIG = dict(BLOCK=2048, num_warps=4, PRELOAD=False)
SWEEP = [dict(BLOCK=1024, num_warps=2), dict(BLOCK=1024, num_warps=4), dict(BLOCK=2048, num_warps=8),
         dict(BLOCK=4096, num_warps=8), dict(BLOCK=1024, num_warps=4, PRELOAD=True),
         dict(BLOCK=2048, num_warps=4, PRELOAD=True), dict(BLOCK=2048, num_warps=8, PRELOAD=True)]


# The rescale has most often nothing to do (each program reads two scalars) or streams the
# gradient: four times fewer programs than the default, still without spills.
RESCALE_CONFIG = dict(BLOCK=4096, num_warps=8)
GROUP = 1024  # blocks per group of the forward's two-level sum of its per-block parts


def _blocking(config, tile):
    """(patches per program, the whole launch configuration): config["BLOCK"] elements of the
    padded tile, or without a config many patches in the interpreter (its cost is per block
    operation)."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    return (64 if _interpreting() and config is None else max(1, cfg["BLOCK"] // tile)), cfg


def _geometry(images, patch_size):
    """Patch count, runtime ints (grid height and width, patches per image, row, plane and
    image strides) and compile-time constants (patch size, channels, padded tile sides)."""
    b, c, h, w = images.shape
    p = patch_size
    gh, gw = h // p, w // p
    consts = dict(PS=p, CH=c, BC=triton.next_power_of_2(c), BR=triton.next_power_of_2(p),
                  BP=triton.next_power_of_2(p))
    return b * gh * gw, (gh, gw, gh * gw, w, h * w, c * h * w), consts


def _tile(consts):
    return consts["BC"] * consts["BR"] * consts["BP"]


def _forward(pred, images, weight, patch_size, norm_pix, eps, config, grad, sc_weight):
    pred, images, weight = pred.contiguous(), images.contiguous(), weight.float().contiguous()
    num, (gh, gw, lpi, w, hw, chw), consts = _geometry(images, patch_size)
    device = pred.device
    stats = torch.empty(2, num, dtype=torch.float32, device=device)
    if not num:
        return (*(torch.zeros((), dtype=torch.float32, device=device) for _ in range(2)), stats,
                torch.zeros(2, dtype=torch.float32, device=device))
    l_pix, l_sc = (torch.empty((), dtype=torch.float32, device=device) for _ in range(2))
    norms = torch.empty(2, dtype=torch.float32, device=device)
    # partial weight sums: a tile of about 8192 grid entries (whole images) per program
    grid = triton.next_power_of_2(gh), triton.next_power_of_2(gw)
    images_per = max(1, 8192 // (grid[0] * grid[1]))
    npart = triton.cdiv(images.shape[0], images_per)
    nsum = torch.empty(2, npart, dtype=torch.float32, device=device)
    _norms_kernel[(npart,)](weight, nsum, images.shape[0], gh, gw, BLOCK_B=images_per, BLOCK_H=grid[0],
                            BLOCK_W=grid[1], num_warps=8)
    block_l, cfg = _blocking(config, _tile(consts))
    nb = triton.cdiv(num, block_l)
    group = 4 if _interpreting() else GROUP  # (the interpreter's tests then see several groups)
    ng = triton.cdiv(nb, group)
    lag = (gw + block_l - 1) // block_l  # blocks from a patch to its lower neighbour, at most
    part = torch.empty(2 * (nb + ng), dtype=torch.float32, device=device)  # per block, then per group
    sync = torch.zeros(nb + ng + 2, dtype=torch.int32, device=device)  # flags, counters (see _loss_kernel)
    _loss_kernel[(nb + lag,)](pred, images, weight, stats, part, nsum, npart, norms, l_pix, l_sc,
                              pred if grad is None else grad, sync, float(sc_weight or 0.0), float(eps), num, nb, ng,
                              lag, gh, gw, lpi, w, hw, chw, NORM=bool(norm_pix), WRITE_GRAD=grad is not None,
                              PRELOAD=cfg["PRELOAD"], FLAG_BLOCK=triton.next_power_of_2(2 * lag + 1), GROUP=group,
                              NPART_P=triton.next_power_of_2(npart), BLOCK_L=block_l, num_warps=cfg["num_warps"],
                              **consts)
    return l_pix, l_sc, stats, norms


@on_device
def patch_pixel_loss_forward(pred, images, weight, patch_size, norm_pix, eps, config=None):
    """(l_pix, l_sc, stats, norms): the two losses as float32 scalars (each exactly 0 when its
    weights sum to 0); per-patch target (mean, std) [2, B*L] and the two normalizers (sum of
    weights, sum of pair weights) [2], which the backward takes. `config` overrides the
    launch configuration (see SWEEP)."""
    return _forward(pred, images, weight, patch_size, norm_pix, eps, config, None, None)


@on_device
def patch_pixel_loss_forward_with_grad(pred, images, weight, patch_size, norm_pix, eps, sc_weight, out=None,
                                       config=None):
    """The forward's four results and the gradient of l_pix + sc_weight * l_sc w.r.t. pred
    (written into `out` when given; its content is never read), from the same pass."""
    grad = torch.empty_like(pred, memory_format=torch.contiguous_format) if out is None else out
    return (*_forward(pred, images, weight, patch_size, norm_pix, eps, config, grad, sc_weight), grad)


def _grad(grad_pix, grad_sc, pred, images, weight, stats, norms, patch_size, grad, sc_weight, config):
    pred, images, weight = pred.contiguous(), images.contiguous(), weight.float().contiguous()
    num, (gh, gw, lpi, w, hw, chw), consts = _geometry(images, patch_size)
    if num:
        g_pix, g_sc = (torch.as_tensor(g, device=pred.device) for g in (grad_pix, grad_sc))
        block_l, cfg = _blocking(config, _tile(consts))
        _grad_kernel[(triton.cdiv(num, block_l),)](pred, images, weight, stats, norms.float().contiguous(), g_pix,
                                                  g_sc, grad, float(sc_weight or 0.0), num, gh, gw, lpi, w, hw, chw,
                                                  RESCALE=sc_weight is not None, BLOCK_L=block_l,
                                                  num_warps=cfg["num_warps"], **consts)
    return grad


@on_device
def patch_pixel_loss_backward(grad_pix, grad_sc, pred, images, weight, stats, norms, patch_size, norm_pix, eps,
                              out=None, config=None):
    """Gradient w.r.t. pred from the forward's `stats` and `norms` (written into `out` when
    given; its content is never read). norm_pix and eps are already in `stats`; `config` as in
    the forward."""
    grad = torch.empty_like(pred, memory_format=torch.contiguous_format) if out is None else out
    return _grad(grad_pix, grad_sc, pred, images, weight, stats, norms, patch_size, grad, None, config)


@on_device
def patch_pixel_loss_rescale(grad_pix, grad_sc, grad, sc_weight, pred, images, weight, stats, norms, patch_size,
                             config=None):
    """`grad`, the forward's gradient for upstream gradients (1, sc_weight), made in place the
    gradient for (grad_pix, grad_sc) (tensors, read on the device); returns it. Without a
    config, RESCALE_CONFIG."""
    if config is None and not _interpreting():
        config = RESCALE_CONFIG
    return _grad(grad_pix, grad_sc, pred, images, weight, stats, norms, patch_size, grad, sc_weight, config)
