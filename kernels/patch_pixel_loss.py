"""Triton patch-pixel alignment loss: norm_pix MSE plus the border (spatial consistency) term,
reading the prediction and the NCHW image directly (no patchify copy).

Each program takes a block of patches (one patch per row of its tile). Pass 1 writes each patch's target mean and std (B x L floats). Pass 2
computes the patch's weighted MSE and the border errors of its right and lower pairs (reading
the neighbour's border and statistics) and writes per-patch partial sums; torch adds them up.
The backward is one pass: each patch's gradient from its own MSE and from the (up to four)
borders it shares, recomputed from the same statistics.

Inside a patch, element e = (row * p + col) * C + ch, the MAE/timm patchify order; its pixel
is image[b, ch, gi * p + row, gj * p + col].
"""

import torch
import triton
import triton.language as tl

from . import interpreting as _interpreting


@triton.jit
def _col(x):
    """[L, 1] -> [L] (a sum over the single column)."""
    return tl.sum(x, axis=1)


@triton.jit
def _patch_tile(pid, NP, GH, GW, p, C, W, HW, P, BLOCK_L: tl.constexpr, BLOCK: tl.constexpr):
    """A program's BLOCK_L patches x BLOCK elements: patch ids [L, 1], element ids [1, E],
    validity, image offsets (within one image), row and column inside the patch."""
    ids = (pid * BLOCK_L + tl.arange(0, BLOCK_L))[:, None]
    e = tl.arange(0, BLOCK)[None, :]
    ok = (ids < NP) & (e < P)
    patch = ids % (GH * GW)
    gi, gj = patch // GW, patch % GW
    row = e // (p * C)
    col = (e // C) % p
    ch = e % C
    off = ch * HW + (gi * p + row) * W + gj * p + col
    return ids, e, ok, gi, gj, off, row, col


@triton.jit
def _stats_kernel(IMG, MEAN, STD, NP, H, W, GH, GW, p, C, P, eps,
                  NORM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK: tl.constexpr):
    ids, e, ok, gi, gj, off, row, col = _patch_tile(tl.program_id(0), NP, GH, GW, p, C, W, H * W, P, BLOCK_L, BLOCK)
    b = ids // (GH * GW)
    t = tl.load(IMG + b.to(tl.int64) * C * H * W + off, mask=ok, other=0.0).to(tl.float32)
    pmask = _col(ids) < NP
    if NORM:
        mean = tl.sum(t, axis=1) / P
        diff = tl.where(ok, t - mean[:, None], 0.0)
        std = tl.sqrt(tl.sum(diff * diff, axis=1) / (P - 1) + eps)
    else:
        mean = tl.zeros((BLOCK_L,), tl.float32)
        std = mean + 1.0
    tl.store(MEAN + _col(ids), mean, mask=pmask)
    tl.store(STD + _col(ids), std, mask=pmask)


@triton.jit
def _border_error(PRED, IMG, MEAN, STD, b, nb, e, sel, shift, nb_off, x, t, mean, std, P, CHW):
    """Errors (d_nb - d_self) - (t_nb - t_self) on the selected border elements, where the
    neighbour patch `nb` holds element e - shift and pixel `nb_off`."""
    x_nb = tl.load(PRED + nb.to(tl.int64) * P + e - shift, mask=sel, other=0.0).to(tl.float32)
    t_nb = tl.load(IMG + b.to(tl.int64) * CHW + nb_off, mask=sel, other=0.0).to(tl.float32)
    m_nb = tl.load(MEAN + nb, mask=sel, other=0.0)
    s_nb = tl.load(STD + nb, mask=sel, other=1.0)
    err = (x_nb * s_nb + m_nb - (x * std + mean)) - (t_nb - t)
    return tl.where(sel, err, 0.0)


@triton.jit
def _load_patch(PRED, IMG, WGT, MEAN, STD, ids, ok, off, NP, GH, GW, C, H, W, P, e):
    b = ids // (GH * GW)
    CHW = C * H * W
    t = tl.load(IMG + b.to(tl.int64) * CHW + off, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(PRED + ids.to(tl.int64) * P + e, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + ids, mask=ids < NP, other=0.0)
    std = tl.load(STD + ids, mask=ids < NP, other=1.0)
    w = tl.load(WGT + ids, mask=ids < NP, other=0.0)
    return b, CHW, t, x, mean, std, w


@triton.jit
def _loss_kernel(PRED, IMG, WGT, MEAN, STD, PIX, SC, PAIRW, NP, H, W, GH, GW, p, C, P,
                 BLOCK_L: tl.constexpr, BLOCK: tl.constexpr):
    ids, e, ok, gi, gj, off, row, col = _patch_tile(tl.program_id(0), NP, GH, GW, p, C, W, H * W, P, BLOCK_L, BLOCK)
    b, CHW, t, x, mean, std, w = _load_patch(PRED, IMG, WGT, MEAN, STD, ids, ok, off, NP, GH, GW, C, H, W, P, e)
    pmask = _col(ids) < NP
    diff = tl.where(ok, x - (t - mean) / std, 0.0)
    tl.store(PIX + _col(ids), _col(w) * tl.sum(diff * diff, axis=1) / P, mask=pmask)

    # right neighbour: its column 0 against this patch's column p - 1
    has = (gj + 1 < GW) & (ids < NP)
    nb = tl.where(has, ids + 1, ids)
    pw_r = tl.where(has, tl.maximum(w, tl.load(WGT + nb, mask=has, other=0.0)), 0.0)
    err = _border_error(PRED, IMG, MEAN, STD, b, nb, e, ok & has & (col == p - 1), (p - 1) * C, off + 1,
                        x, t, mean, std, P, CHW)
    sc = _col(pw_r) * tl.sum(err * err, axis=1) / (p * C)
    # lower neighbour: its row 0 against this patch's row p - 1
    has = (gi + 1 < GH) & (ids < NP)
    nb = tl.where(has, ids + GW, ids)
    pw_d = tl.where(has, tl.maximum(w, tl.load(WGT + nb, mask=has, other=0.0)), 0.0)
    err = _border_error(PRED, IMG, MEAN, STD, b, nb, e, ok & has & (row == p - 1), (p - 1) * p * C, off + W,
                        x, t, mean, std, P, CHW)
    sc += _col(pw_d) * tl.sum(err * err, axis=1) / (p * C)
    tl.store(SC + _col(ids), sc, mask=pmask)
    tl.store(PAIRW + _col(ids), _col(pw_r) + _col(pw_d), mask=pmask)


@triton.jit
def _grad_kernel(PRED, IMG, WGT, MEAN, STD, GRAD, g_pix, g_sc, NP, H, W, GH, GW, p, C, P,
                 BLOCK_L: tl.constexpr, BLOCK: tl.constexpr):
    """g_pix, g_sc: upstream gradients already divided by their normalizers. Where this patch
    is the first of a pair (right/lower neighbour) d(err^2)/d(own pixel) = -2 err; where it is
    the second (left/upper), the error read from its side is the pair's error negated, so the
    same -2 err holds."""
    ids, e, ok, gi, gj, off, row, col = _patch_tile(tl.program_id(0), NP, GH, GW, p, C, W, H * W, P, BLOCK_L, BLOCK)
    b, CHW, t, x, mean, std, w = _load_patch(PRED, IMG, WGT, MEAN, STD, ids, ok, off, NP, GH, GW, C, H, W, P, e)
    grad = g_pix * w * 2.0 * (x - (t - mean) / std) / P
    coef = g_sc * 2.0 / (p * C)
    gd = tl.zeros(x.shape, tl.float32)
    for side in tl.static_range(4):
        if side == 0:  # right
            has = gj + 1 < GW
            step, sel_line, shift, pix = 1, col == p - 1, (p - 1) * C, 1
        elif side == 1:  # lower
            has = gi + 1 < GH
            step, sel_line, shift, pix = GW, row == p - 1, (p - 1) * p * C, W
        elif side == 2:  # left
            has = gj > 0
            step, sel_line, shift, pix = -1, col == 0, -(p - 1) * C, -1
        else:  # upper
            has = gi > 0
            step, sel_line, shift, pix = -GW, row == 0, -(p - 1) * p * C, -W
        has = has & (ids < NP)
        nb = tl.where(has, ids + step, ids)
        pw = tl.where(has, tl.maximum(w, tl.load(WGT + nb, mask=has, other=0.0)), 0.0)
        err = _border_error(PRED, IMG, MEAN, STD, b, nb, e, ok & has & sel_line, shift, off + pix,
                            x, t, mean, std, P, CHW)
        gd -= coef * pw * err
    grad += gd * std
    tl.store(GRAD + ids.to(tl.int64) * P + e, grad.to(GRAD.dtype.element_ty), mask=ok)


# The gradient pass holds a patch and its four borders: eight warps keep it free of register
# spills on sm_80 and sm_90 (benchmarks/compile_report.py reports it).
_GRAD_WARPS = 8


def _block_l(block: int) -> int:
    """Patches per program: many in the interpreter (its cost is per block operation), a few
    on a GPU (BLOCK elements of registers each)."""
    if _interpreting():
        return 64
    return max(1, 2048 // block)


def _launch_stats(pred, images, patch_size, norm_pix, eps):
    b, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    n_pix = patch_size * patch_size * c
    block = triton.next_power_of_2(n_pix)
    num = b * gh * gw
    mean = torch.empty(num, dtype=torch.float32, device=pred.device)
    std = torch.empty_like(mean)
    block_l = _block_l(block)
    if num:
        _stats_kernel[(triton.cdiv(num, block_l),)](images, mean, std, num, h, w, gh, gw, patch_size, c, n_pix,
                                                    float(eps), NORM=bool(norm_pix), BLOCK_L=block_l, BLOCK=block)
    return mean, std, (num, h, w, gh, gw, patch_size, c, n_pix), block, block_l


def patch_pixel_loss_forward(pred, images, weight, patch_size, norm_pix, eps):
    """(l_pix, l_sc) as float32 scalars; each exactly 0 when its weights sum to 0."""
    pred, images, weight = pred.contiguous(), images.contiguous(), weight.float().contiguous()
    mean, std, dims, block, block_l = _launch_stats(pred, images, patch_size, norm_pix, eps)
    pix, sc, pair_w = torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)
    if mean.numel():
        _loss_kernel[(triton.cdiv(mean.numel(), block_l),)](pred, images, weight, mean, std, pix, sc, pair_w, *dims,
                                                            BLOCK_L=block_l, BLOCK=block)
    w_sum, pw_sum = weight.sum(), pair_w.sum()
    l_pix = torch.where(w_sum > 0, pix.sum() / w_sum.clamp_min(1e-30), 0.0)
    l_sc = torch.where(pw_sum > 0, sc.sum() / pw_sum.clamp_min(1e-30), 0.0)
    return l_pix, l_sc


def patch_pixel_loss_backward(grad_pix, grad_sc, pred, images, weight, patch_size, norm_pix, eps, out=None):
    """Gradient w.r.t. pred (written into `out` when given; its content is never read)."""
    pred, images, weight = pred.contiguous(), images.contiguous(), weight.float().contiguous()
    mean, std, dims, block, block_l = _launch_stats(pred, images, patch_size, norm_pix, eps)
    grad = torch.empty_like(pred) if out is None else out
    if mean.numel():
        from pacofr.ops.patch_pixel_loss import patch_pixel_loss_normalizers

        w_sum, pw_sum = patch_pixel_loss_normalizers(weight, (dims[3], dims[4]))
        g_pix = float(grad_pix) / float(w_sum) if float(w_sum) > 0 else 0.0
        g_sc = float(grad_sc) / float(pw_sum) if float(pw_sum) > 0 else 0.0
        _grad_kernel[(triton.cdiv(mean.numel(), block_l),)](pred, images, weight, mean, std, grad, g_pix, g_sc, *dims,
                                                            BLOCK_L=block_l, BLOCK=block, num_warps=_GRAD_WARPS)
    return grad
