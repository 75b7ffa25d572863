"""Triton patch-pixel alignment loss: norm_pix MSE plus the border (spatial consistency) term,
reading the prediction and the NCHW image directly (no patchify copy).

Both terms depend on a patch only through its residual. With the target statistics (m, s) of
a patch, u = s * pred + m - target is the de-normalized prediction error: the MSE term is
mean((u / s)^2) and the border error of a pair is u_nb - u on the shared border line.

Forward: one pass over pred and image computes each patch's statistics and weighted MSE
(`_pix_kernel`); a second, small pass reads only the border lines of each patch and its right
and lower neighbours (`_border_kernel`), since those need the neighbours' statistics; one
small program sums the per-patch parts in a fixed order into the two losses and their
normalizers (`_finish_kernel`, one launch where torch would take about eight). The
statistics are kept for the backward, a single pass (`_grad_kernel`) that reads pred and
image once more, plus the four neighbours' border lines, and writes the gradient.

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


@triton.jit
def _axes(BC: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
    """Channel, row and column index vectors, shaped to broadcast against [L, BC, BR, BP]."""
    c = tl.arange(0, BC)[None, :, None, None]
    i = tl.arange(0, BR)[None, None, :, None]
    j = tl.arange(0, BP)[None, None, None, :]
    return c, i, j


@triton.jit
def _patches(pid, NP, GW, LPI, BLOCK_L: tl.constexpr):
    """This program's patch ids [L], whether they exist, and each one's image and grid position."""
    ids = pid * BLOCK_L + tl.arange(0, BLOCK_L)
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
def _pix_kernel(PRED, IMG, WGT, STATS, PART, NP, GW, LPI, W, HW, CHW, eps,
                PS: tl.constexpr, CH: tl.constexpr, NORM: tl.constexpr,
                BLOCK_L: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
    """Per patch: target mean and std into STATS[0:2], w * mse into PART[0], w into PART[1]."""
    P: tl.constexpr = PS * PS * CH
    ids, ok, b, gi, gj = _patches(tl.program_id(0), NP, GW, LPI, BLOCK_L)
    c, i, j = _axes(BC, BR, BP)
    x_off, t_off = _offsets(ids, b, gi, gj, c, i, j, HW, W, CHW, PS, CH)
    m = ok[:, None, None, None] & (c < CH) & (i < PS) & (j < PS)
    t = tl.load(IMG + t_off, mask=m, other=0.0).to(tl.float32)
    x = tl.load(PRED + x_off, mask=m, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(tl.sum(tl.sum(t, axis=3), axis=2), axis=1) / P
        d = tl.where(m, t - mean[:, None, None, None], 0.0)
        std = tl.sqrt(tl.sum(tl.sum(tl.sum(d * d, axis=3), axis=2), axis=1) / (P - 1) + eps)
        r = tl.where(m, x - d * (1.0 / std)[:, None, None, None], 0.0)
    else:
        mean = tl.zeros((BLOCK_L,), tl.float32)
        std = mean + 1.0
        r = x - t
    w = tl.load(WGT + ids, mask=ok, other=0.0)
    tl.store(STATS + ids, mean, mask=ok)
    tl.store(STATS + NP + ids, std, mask=ok)
    tl.store(PART + ids, w * tl.sum(tl.sum(tl.sum(r * r, axis=3), axis=2), axis=1) / P, mask=ok)
    tl.store(PART + NP + ids, w, mask=ok)


@triton.jit
def _border(PRED, IMG, WGT, STATS, x_off, t_off, m, ids, has, w, mean, std, NP, step, x_shift, t_shift,
            P: tl.constexpr):
    """One side's border: the error u_nb - u on a line of this patch (offsets x_off, t_off,
    mask m) against the touching line of the neighbour patch `ids + step` (its pred elements
    x_shift further inside a patch, its pixels t_shift further in the image), zero where the
    pair does not exist; and the pair weight max(w, w_nb) [L]."""
    nb = tl.where(has, ids + step, ids)
    m = m & has[:, None, None, None]
    mean_nb = tl.load(STATS + nb, mask=has, other=0.0)[:, None, None, None]
    std_nb = tl.load(STATS + NP + nb, mask=has, other=1.0)[:, None, None, None]
    u = (std[:, None, None, None] * tl.load(PRED + x_off, mask=m, other=0.0).to(tl.float32)
         + mean[:, None, None, None] - tl.load(IMG + t_off, mask=m, other=0.0).to(tl.float32))
    u_nb = (std_nb * tl.load(PRED + x_off + (step * P + x_shift), mask=m, other=0.0).to(tl.float32) + mean_nb
            - tl.load(IMG + t_off + t_shift, mask=m, other=0.0).to(tl.float32))
    pw = tl.where(has, tl.maximum(w, tl.load(WGT + nb, mask=has, other=0.0)), 0.0)
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
    line = ok[:, None, None, None] & (c < CH) & (i < PS)
    e_col, pw_col = _border(PRED, IMG, WGT, STATS, x_off, t_off, line, ids, ok & has_col, w, mean, std, NP,
                            sign, -sign * (PS - 1) * CH, sign, P)
    x_off, t_off = _offsets(ids, b, gi, gj, c, edge, j, HW, W, CHW, PS, CH)
    line = ok[:, None, None, None] & (c < CH) & (j < PS)
    e_row, pw_row = _border(PRED, IMG, WGT, STATS, x_off, t_off, line, ids, ok & has_row, w, mean, std, NP,
                            sign * GW, -sign * (PS - 1) * PS * CH, sign * W, P)
    return e_col, pw_col, e_row, pw_row


@triton.jit
def _weight_and_stats(WGT, STATS, ids, ok, NP):
    return (tl.load(WGT + ids, mask=ok, other=0.0), tl.load(STATS + ids, mask=ok, other=0.0),
            tl.load(STATS + NP + ids, mask=ok, other=1.0))


@triton.jit
def _twice_per_unit(G, norm, count):
    """2 g / (count * norm) for the upstream gradient at G; 0 when the normalizer is 0."""
    return tl.where(norm > 0, 2.0 * tl.load(G).to(tl.float32) / (count * tl.where(norm > 0, norm, 1.0)), 0.0)


@triton.jit
def _sum_line(e):
    return tl.sum(tl.sum(tl.sum(e * e, axis=3), axis=2), axis=1)


@triton.jit
def _border_kernel(PRED, IMG, WGT, STATS, PART, NP, GH, GW, LPI, W, HW, CHW, PS: tl.constexpr, CH: tl.constexpr,
                   BLOCK_L: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
    """Per patch, over its right and lower pairs: sum of pw * mean(err^2) into PART[2] and the
    pair weights into PART[3]."""
    ids, ok, b, gi, gj = _patches(tl.program_id(0), NP, GW, LPI, BLOCK_L)
    c, i, j = _axes(BC, BR, BP)
    w, mean, std = _weight_and_stats(WGT, STATS, ids, ok, NP)
    e_col, pw_col, e_row, pw_row = _sides(PRED, IMG, WGT, STATS, ids, ok, b, gi, gj, w, mean, std, NP, GH, GW,
                                          W, HW, CHW, c, i, j, True, PS, CH)
    sc = (pw_col * _sum_line(e_col) + pw_row * _sum_line(e_row)) / (PS * CH)
    tl.store(PART + 2 * NP + ids, sc, mask=ok)
    tl.store(PART + 3 * NP + ids, pw_col + pw_row, mask=ok)


@triton.jit
def _grad_kernel(PRED, IMG, WGT, STATS, NORMS, G_PIX, G_SC, GRAD, NP, GH, GW, LPI, W, HW, CHW,
                 PS: tl.constexpr, CH: tl.constexpr,
                 BLOCK_L: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
    """d/dpred of g_pix * l_pix + g_sc * l_sc. The pixel term gives 2 g_pix w r / (P sum w)
    with r = u / s; each border this patch shares adds -2 g_sc pw (u_nb - u) s / (p C sum pw)
    on its line, the same expression from either side of the pair."""
    P: tl.constexpr = PS * PS * CH
    ids, ok, b, gi, gj = _patches(tl.program_id(0), NP, GW, LPI, BLOCK_L)
    c, i, j = _axes(BC, BR, BP)
    g_pix = _twice_per_unit(G_PIX, tl.load(NORMS), P)
    g_sc = _twice_per_unit(G_SC, tl.load(NORMS + 1), PS * CH)
    x_off, t_off = _offsets(ids, b, gi, gj, c, i, j, HW, W, CHW, PS, CH)
    m = ok[:, None, None, None] & (c < CH) & (i < PS) & (j < PS)
    w, mean, std = _weight_and_stats(WGT, STATS, ids, ok, NP)
    t = tl.load(IMG + t_off, mask=m, other=0.0).to(tl.float32)
    x = tl.load(PRED + x_off, mask=m, other=0.0).to(tl.float32)
    grad = (g_pix * w)[:, None, None, None] * (x - (t - mean[:, None, None, None]) * (1.0 / std)[:, None, None, None])
    e_right, pw_right, e_down, pw_down = _sides(PRED, IMG, WGT, STATS, ids, ok, b, gi, gj, w, mean, std, NP, GH, GW,
                                                W, HW, CHW, c, i, j, True, PS, CH)
    e_left, pw_left, e_up, pw_up = _sides(PRED, IMG, WGT, STATS, ids, ok, b, gi, gj, w, mean, std, NP, GH, GW,
                                          W, HW, CHW, c, i, j, False, PS, CH)
    col = (tl.where(j == PS - 1, pw_right[:, None, None, None] * e_right, 0.0)
           + tl.where(j == 0, pw_left[:, None, None, None] * e_left, 0.0))
    row = (tl.where(i == PS - 1, pw_down[:, None, None, None] * e_down, 0.0)
           + tl.where(i == 0, pw_up[:, None, None, None] * e_up, 0.0))
    grad -= (g_sc * std)[:, None, None, None] * (col + row)
    tl.store(GRAD + x_off, grad.to(GRAD.dtype.element_ty), mask=m)


@triton.jit
def _finish_kernel(PART, L_PIX, L_SC, NORMS, NP, BLOCK: tl.constexpr):
    """One program: PART's rows (w * mse, w, pair error, pair w) [4, NP] summed in a fixed
    order, then l_pix and l_sc (each exactly 0 when its weights sum to 0) and the normalizers."""
    pair = tl.arange(0, 2)  # (l_pix, l_sc): their error rows are 0 and 2, their weight rows 1 and 3
    err = tl.zeros((2, BLOCK), tl.float32)
    norm = tl.zeros((2, BLOCK), tl.float32)
    for start in range(0, NP, BLOCK):
        ids = start + tl.arange(0, BLOCK)
        offs = (2 * pair)[:, None] * NP + ids[None, :]
        err += tl.load(PART + offs, mask=ids[None, :] < NP, other=0.0)
        norm += tl.load(PART + offs + NP, mask=ids[None, :] < NP, other=0.0)
    err_sum = tl.sum(err, axis=1)
    norm_sum = tl.sum(norm, axis=1)
    loss = tl.where(norm_sum > 0, err_sum / tl.where(norm_sum > 0, norm_sum, 1.0), 0.0)
    tl.store(L_PIX, tl.sum(tl.where(pair == 0, loss, 0.0)))
    tl.store(L_SC, tl.sum(tl.where(pair == 1, loss, 0.0)))
    tl.store(NORMS + pair, norm_sum)


# Elements of the padded [patches, C, p, p] tile per program and warps, for the two full passes
# (`_pix_kernel`, `_grad_kernel`); the border pass takes 512 elements of its lines per program.
# The defaults keep both passes free of register spills on sm_80 and sm_90
# (benchmarks/compile_report.py); gpu_report.py times the SWEEP on a GPU.
DEFAULT_CONFIG = dict(BLOCK=2048, num_warps=4)
SWEEP = [dict(BLOCK=1024, num_warps=2), dict(BLOCK=1024, num_warps=4), dict(BLOCK=2048, num_warps=8),
         dict(BLOCK=4096, num_warps=8)]


def _launch(kernel, config, num, tile, *args, **constexprs):
    """Runs `kernel` over `num` patches, BLOCK_L patches per program: config["BLOCK"] elements
    of the padded tile, or without a config many patches in the interpreter (its cost is per
    block operation)."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    block_l = 64 if _interpreting() and config is None else max(1, cfg["BLOCK"] // tile)
    kernel[(triton.cdiv(num, block_l),)](*args, BLOCK_L=block_l, num_warps=cfg["num_warps"], **constexprs)


def _geometry(images, patch_size):
    """Patch count, runtime ints (grid height and width, patches per image, row, plane and
    image strides) and compile-time constants (patch size, channels, padded tile sides)."""
    b, c, h, w = images.shape
    p = patch_size
    gh, gw = h // p, w // p
    consts = dict(PS=p, CH=c, BC=triton.next_power_of_2(c), BR=triton.next_power_of_2(p),
                  BP=triton.next_power_of_2(p))
    return b * gh * gw, (gh, gw, gh * gw, w, h * w, c * h * w), consts


def patch_pixel_loss_forward(pred, images, weight, patch_size, norm_pix, eps, config=None):
    """(l_pix, l_sc, stats, norms): the two losses as float32 scalars (each exactly 0 when its
    weights sum to 0); per-patch target (mean, std) [2, B*L] and the two normalizers (sum of
    weights, sum of pair weights) [2], which the backward takes. `config` overrides the
    launch configuration of the full pass (see SWEEP)."""
    pred, images, weight = pred.contiguous(), images.contiguous(), weight.float().contiguous()
    num, (gh, gw, lpi, w, hw, chw), consts = _geometry(images, patch_size)
    stats = torch.empty(2, num, dtype=torch.float32, device=pred.device)
    part = torch.empty(4, num, dtype=torch.float32, device=pred.device)  # w*mse, w, pair err, pair w
    if num:
        tile = consts["BC"] * consts["BR"] * consts["BP"]
        _launch(_pix_kernel, config, num, tile, pred, images, weight, stats, part, num, gw, lpi, w, hw, chw,
                float(eps), NORM=bool(norm_pix), **consts)
        _launch(_border_kernel, dict(BLOCK=512, num_warps=4), num, consts["BC"] * consts["BR"], pred, images, weight,
                stats, part, num, gh, gw, lpi, w, hw, chw, **consts)
    l_pix, l_sc = (torch.empty((), dtype=torch.float32, device=pred.device) for _ in range(2))
    norms = torch.empty(2, dtype=torch.float32, device=pred.device)
    _finish_kernel[(1,)](part, l_pix, l_sc, norms, num, BLOCK=4096 if _interpreting() else 1024)
    return l_pix, l_sc, stats, norms


def patch_pixel_loss_backward(grad_pix, grad_sc, pred, images, weight, stats, norms, patch_size, norm_pix, eps,
                              out=None, config=None):
    """Gradient w.r.t. pred from the forward's `stats` and `norms` (written into `out` when
    given; its content is never read). norm_pix and eps are already in `stats`; `config` as in
    the forward."""
    pred, images, weight = pred.contiguous(), images.contiguous(), weight.float().contiguous()
    num, (gh, gw, lpi, w, hw, chw), consts = _geometry(images, patch_size)
    grad = torch.empty_like(pred) if out is None else out
    if num:
        g_pix, g_sc = (torch.as_tensor(g, device=pred.device) for g in (grad_pix, grad_sc))
        _launch(_grad_kernel, config, num, consts["BC"] * consts["BR"] * consts["BP"], pred, images, weight, stats,
                norms.float().contiguous(), g_pix, g_sc, grad, num, gh, gw, lpi, w, hw, chw, **consts)
    return grad
