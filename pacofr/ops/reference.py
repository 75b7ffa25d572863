"""Torch references of the fused ops: the ground truth the kernels are tested against.

Each op has a forward and an explicit backward (the same split the kernels use), computed in
float32 (float64 for float64 inputs) whatever the input dtype. They are memory-sane:
`codebook_topk` never holds the N x K score matrix, only one tile of it.
"""

import math

import torch
from torch import Tensor

# Tiles of the codebook search: at most 2^21 scores (8 MB in fp32), up to 8192 codes wide, so
# that a codebook of that size is searched in one topk per row. The backward's row tile is
# TOPK_ROW_TILE.
TOPK_TILE_SCORES = 1 << 21
TOPK_CODE_TILE = 8192
TOPK_ROW_TILE = 2048


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else accumulates in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------- codebook_topk


def _keys(x: Tensor, x_sq: Tensor | None, codes: Tensor, codes_sq: Tensor | None) -> Tensor:
    """Scores turned so that higher is better (ip: the scores, l2 when the squared norms are
    given: minus the squared distances), in place on the product. Negation is exact, so this
    is bit for bit -((x.x - 2 x.c) + c.c)."""
    key = x @ codes.T
    if codes_sq is None:
        return key
    return key.mul_(2.0).sub_(x_sq).sub_(codes_sq)


def _rank_key(key: Tensor) -> Tensor:
    """The key the selection ranks by: infinitely bad (-inf) becomes the lowest finite value,
    NaN -inf, so that NaN ranks last and torch.topk never picks it first; +inf stays."""
    low = torch.finfo(key.dtype).min
    return torch.nan_to_num(key.masked_fill(key == -math.inf, low), nan=-math.inf, posinf=math.inf)


def _best_positions(key: Tensor, k: int) -> Tensor:
    """Column positions of the k largest keys of each row, best first, equal keys in column
    order. torch.topk gives the k-th value but no tie order, so the ties at that value are
    resolved explicitly: the lowest columns among them are taken."""
    kth = key.topk(k, dim=1).values[:, -1:]
    better, equal = key > kth, key == kth
    take = better | (equal & (equal.cumsum(1) <= k - better.sum(1, keepdim=True)))
    pos = take.nonzero()[:, 1].view(-1, k)  # ascending columns
    order = key.gather(1, pos).argsort(dim=1, descending=True, stable=True)
    return pos.gather(1, order)


def _tile_best(key: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(positions, rank keys, keys) of the k best columns of each row of a tile, in column order.

    One topk of k + 1 decides most rows: where its k-th and (k+1)-th values differ and none of
    them is NaN or -inf, the set is exact whatever order topk returns it in. The other rows (a
    tie at the k-th place, non-finite scores) take the exact tie resolution."""
    k = min(k, key.shape[1])
    vals, pos = key.topk(min(k + 1, key.shape[1]), dim=1)
    hard = ~(vals > -math.inf).all(1)  # NaN or -inf among them (topk ranks NaN first)
    if vals.shape[1] > k:
        hard |= vals[:, k - 1] == vals[:, k]
    rank, vals, pos = vals[:, :k], vals[:, :k].clone(), pos[:, :k].clone()
    rows = hard.nonzero()[:, 0]
    if rows.numel():
        sub = _rank_key(key[rows])
        sub_pos = _best_positions(sub, k)
        pos[rows], vals[rows], rank[rows] = sub_pos, key[rows].gather(1, sub_pos), sub.gather(1, sub_pos)
    pos, order = pos.sort(1)
    return pos, rank.gather(1, order), vals.gather(1, order)


def codebook_topk(x: Tensor, codebook: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """Best k codes per row: l2 = squared distance ascending, ip = inner product descending.

    Tiles are visited in index order; each tile's best k (in index order) follow the running
    best, and a stable sort of those 2k candidates keeps ties to the lower index. Infinitely bad
    scores rank after every finite one, NaN scores last.
    """
    acc = accumulation_dtype(x, codebook)
    n, k_codes = x.shape[0], codebook.shape[0]
    codes = codebook.to(acc)
    codes_sq = (codes * codes).sum(1) if metric == "l2" else None
    code_tile = max(1, min(k_codes, TOPK_CODE_TILE))
    row_tile = max(1, TOPK_TILE_SCORES // code_tile)
    scores = torch.empty(n, k, dtype=acc, device=x.device)
    idx = torch.empty(n, k, dtype=torch.int64, device=x.device)
    for r0 in range(0, n, row_tile):
        xr = x[r0 : r0 + row_tile].to(acc)
        xr_sq = (xr * xr).sum(1, keepdim=True) if metric == "l2" else None
        best = None  # (indices, rank keys, keys) of the running best, best first
        for c0 in range(0, k_codes, code_tile):
            tile_sq = None if codes_sq is None else codes_sq[c0 : c0 + code_tile]
            pos, rank, vals = _tile_best(_keys(xr, xr_sq, codes[c0 : c0 + code_tile], tile_sq), k)
            cand = (pos + c0, rank, vals)
            if best is not None:
                cand = tuple(torch.cat([b, c], 1) for b, c in zip(best, cand))
            order = cand[1].sort(dim=1, descending=True, stable=True).indices[:, :k]
            best = tuple(t.gather(1, order) for t in cand)
        idx[r0 : r0 + row_tile] = best[0]
        scores[r0 : r0 + row_tile] = best[2] if metric == "ip" else best[2].neg()
    return scores, idx


def codebook_topk_backward(
    grad_scores: Tensor, x: Tensor, codebook: Tensor, idx: Tensor, metric: str
) -> tuple[Tensor, Tensor]:
    """Gradients of sum(grad_scores * scores) w.r.t. x and codebook (scatter-add over codes)."""
    acc = accumulation_dtype(x, codebook)
    grad_x = torch.empty_like(x)
    grad_codebook = torch.zeros(codebook.shape, dtype=acc, device=codebook.device)
    for r0 in range(0, x.shape[0], TOPK_ROW_TILE):
        xr = x[r0 : r0 + TOPK_ROW_TILE].to(acc)
        ir = idx[r0 : r0 + TOPK_ROW_TILE]
        g = grad_scores[r0 : r0 + TOPK_ROW_TILE].to(acc)
        codes = codebook[ir].to(acc)  # [n, k, D]
        if metric == "ip":
            gx = torch.einsum("nk,nkd->nd", g, codes)
            gc = g[..., None] * xr[:, None, :]
        else:  # d/dx |x - c|^2 = 2 (x - c), d/dc = -2 (x - c)
            diff = 2.0 * (xr[:, None, :] - codes)
            gx = torch.einsum("nk,nkd->nd", g, diff)
            gc = -g[..., None] * diff
        grad_x[r0 : r0 + TOPK_ROW_TILE] = gx
        grad_codebook.index_add_(0, ir.reshape(-1), gc.reshape(-1, x.shape[1]))
    return grad_x, grad_codebook.to(codebook.dtype)


# ------------------------------------------------------------------------ masked_attention


def attention_masks(
    batch: int, n: int, seqlens: Tensor | None, key_mask: Tensor | None, device
) -> tuple[Tensor, Tensor]:
    """(query_valid[B,N], key_valid[B,N]) from per-sample lengths and/or a key mask."""
    pos = torch.arange(n, device=device)
    query_valid = torch.ones(batch, n, dtype=torch.bool, device=device)
    if seqlens is not None:
        query_valid = pos[None, :] < seqlens.to(device)[:, None]
    key_valid = query_valid if key_mask is None else query_valid & key_mask.to(device, torch.bool)
    return query_valid, key_valid


def _valid_only(q, k, v, query_valid, key_valid):
    """q, k, v with zeros for the queries and keys that take no part: what padding holds, NaN
    included, then never reaches a product (0 * NaN would)."""
    keep = lambda t, valid: torch.where(valid[:, None, :, None], t, 0.0)  # noqa: E731
    return keep(q, query_valid), keep(k, key_valid), keep(v, key_valid)


def _attention_probs(q, k, scale, lse, key_valid):
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~key_valid[:, None, None, :], -math.inf)
    return torch.exp(s - lse[..., None])


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor | None, key_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """Returns (out, lse). lse is +inf on rows that take no part (padded queries, no valid
    key), so exp(s - lse) is exactly 0 there in forward and backward."""
    acc = accumulation_dtype(q, k, v)
    b, _, n, _ = q.shape
    query_valid, key_valid = attention_masks(b, n, seqlens, key_mask, q.device)
    qf, kf, vf = _valid_only(q.to(acc), k.to(acc), v.to(acc), query_valid, key_valid)
    s = (qf @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~key_valid[:, None, None, :], -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # -inf where no key is valid
    lse = lse.masked_fill(~query_valid[:, None, :] | torch.isinf(lse), math.inf)
    out = torch.exp(s - lse[..., None]) @ vf
    return out.to(q.dtype), lse


def masked_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    seqlens: Tensor | None, key_mask: Tensor | None, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = accumulation_dtype(q, k, v)
    b, _, n, _ = q.shape
    query_valid, key_valid = attention_masks(b, n, seqlens, key_mask, q.device)
    qf, kf, vf = _valid_only(q.to(acc), k.to(acc), v.to(acc), query_valid, key_valid)
    of, go = out.to(acc), torch.where(query_valid[:, None, :, None], grad_out.to(acc), 0.0)
    p = _attention_probs(qf, kf, scale, lse, key_valid)
    dv = p.transpose(-1, -2) @ go
    dp = go @ vf.transpose(-1, -2)
    ds = p * (dp - (go * of).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------ patch_pixel_loss


def _patches(t: Tensor, p: int) -> Tensor:
    """NCHW image -> [B, h, w, p, p, C] view (row, column, channel inside a patch); no copy."""
    hh, ww = t.shape[2:]
    return t.unflatten(2, (hh // p, p)).unflatten(4, (ww // p, p)).permute(0, 2, 4, 3, 5, 1)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and exactly 0 where den == 0 (then num is 0 too: all weights are 0)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), 0.0)


def _pixel_loss_parts(pred, images, weight, p, norm_pix, eps):
    acc = accumulation_dtype(pred, images)
    b, c, hh, ww = images.shape
    gh, gw = hh // p, ww // p
    t = _patches(images, p).to(acc)
    x = pred.reshape(b, gh, gw, p, p, c).to(acc)
    w = weight.reshape(b, gh, gw).to(acc)
    mean, std = _target_stats(t, norm_pix, eps)
    return t, x, w, mean, std


def _target_stats(t, norm_pix, eps):
    """Per-patch target mean and std (unbiased variance + eps) of patches [B, h, w, p, p, C];
    0 and 1 without norm_pix."""
    if not norm_pix:
        return torch.zeros((), dtype=t.dtype, device=t.device), torch.ones((), dtype=t.dtype, device=t.device)
    mean = t.mean(dim=(3, 4, 5), keepdim=True)
    # unbiased variance, written out: torch.var warns on an empty batch
    var = ((t - mean) ** 2).sum(dim=(3, 4, 5), keepdim=True) / (math.prod(t.shape[3:]) - 1)
    return mean, torch.sqrt(var + eps)


def patch_stats(images: Tensor, patch_size: int, norm_pix: bool, eps: float) -> Tensor:
    """float32 [2, B*L]: each patch's target mean and std, patches row-major over the grid."""
    t = _patches(images, patch_size).to(accumulation_dtype(images))
    mean, std = _target_stats(t, norm_pix, eps)
    shape = t.shape[:3] + (1, 1, 1)
    return torch.stack([mean.expand(shape).flatten(), std.expand(shape).flatten()]).float()


def _border_pairs(w):
    """Pair weights max(w_a, w_b) of horizontal (a left of b) and vertical (a above b) pairs."""
    return torch.maximum(w[:, :, 1:], w[:, :, :-1]), torch.maximum(w[:, 1:], w[:, :-1])


def _border_errors(d, t, p):
    """Predicted minus target pixel differences across each shared border."""
    eh = (d[:, :, 1:, :, 0] - d[:, :, :-1, :, p - 1]) - (t[:, :, 1:, :, 0] - t[:, :, :-1, :, p - 1])
    ev = (d[:, 1:, :, 0] - d[:, :-1, :, p - 1]) - (t[:, 1:, :, 0] - t[:, :-1, :, p - 1])
    return eh, ev  # [B, h, w-1, p, C], [B, h-1, w, p, C]


def patch_pixel_loss(
    pred: Tensor, images: Tensor, weight: Tensor, patch_size: int, norm_pix: bool, eps: float
) -> tuple[Tensor, Tensor]:
    """(l_pix, l_sc): weighted per-patch normalized MSE and the border-difference term."""
    p = patch_size
    t, x, w, mean, std = _pixel_loss_parts(pred, images, weight, p, norm_pix, eps)
    mse = ((x - (t - mean) / std) ** 2).mean(dim=(3, 4, 5))
    l_pix = _safe_div((w * mse).sum(), w.sum())
    pwh, pwv = _border_pairs(w)
    eh, ev = _border_errors(x * std + mean, t, p)
    num = (pwh * (eh**2).mean(dim=(3, 4))).sum() + (pwv * (ev**2).mean(dim=(3, 4))).sum()
    l_sc = _safe_div(num, pwh.sum() + pwv.sum())
    out = torch.float64 if l_pix.dtype == torch.float64 else torch.float32
    return l_pix.to(out), l_sc.to(out)


def patch_pixel_loss_backward(
    grad_pix: Tensor, grad_sc: Tensor, pred: Tensor, images: Tensor, weight: Tensor,
    patch_size: int, norm_pix: bool, eps: float,
) -> Tensor:
    p = patch_size
    t, x, w, mean, std = _pixel_loss_parts(pred, images, weight, p, norm_pix, eps)
    n_pix = p * p * x.shape[-1]  # (also for an empty batch)
    g = _safe_div(2.0 * grad_pix.to(x.dtype), w.sum()) / n_pix
    grad = g * w[..., None, None, None] * (x - (t - mean) / std)
    # Border term: d(l_sc)/d(denormalized pred), then the chain rule through `* std`.
    pwh, pwv = _border_pairs(w)
    eh, ev = _border_errors(x * std + mean, t, p)
    gs = _safe_div(2.0 * grad_sc.to(x.dtype), pwh.sum() + pwv.sum()) / (p * x.shape[-1])
    gh = gs * pwh[..., None, None] * eh
    gv = gs * pwv[..., None, None] * ev
    gd = torch.zeros_like(x)
    gd[:, :, 1:, :, 0] += gh
    gd[:, :, :-1, :, p - 1] -= gh
    gd[:, 1:, :, 0] += gv
    gd[:, :-1, :, p - 1] -= gv
    grad = grad + gd * std
    return grad.reshape(pred.shape).to(pred.dtype)
