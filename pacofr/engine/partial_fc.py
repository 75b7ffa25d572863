"""Margin softmax over a class-centre matrix sharded over the ranks (a model-parallel partial FC).

The centres W [C, E] are split by rows: rank r holds `shard(C, r, world)`, C // world rows, one
more on the first C % world ranks (insightface's rule). A step gathers every rank's embeddings
(all ranks see the whole micro-batch), each rank computes the margin logits of its classes, and
the softmax normalizer (the max, then the sum of exponentials) and each sample's target logit
are reduced over the ranks, so each rank holds the cross-entropy of the whole gathered batch
without ever holding all C logits of a sample.

Gradients: every rank computes the same loss, so the reductions pass gradients straight back
(no sum over ranks); the embeddings' gradients, computed by each rank for its classes, are
summed over ranks and each rank keeps its own rows. The centres stay out of the data-parallel
wrapper (nothing averages them): each rank's shard gets the gradient of its classes alone.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch import distributed as dist

MARGINS = ("arcface", "cosface")
INIT_STD = 0.01  # the centres' initial normal spread (insightface's)
INIT_BLOCK = 4096  # rows drawn per seeded block: the same matrix for any rank count, drawn in slices


def shard(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the classes rank `rank` holds."""
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def init_centres(num_classes: int, dim: int, start: int, end: int, seed: int) -> Tensor:
    """Rows [start, end) of the initial centre matrix: blocks of INIT_BLOCK rows, each drawn
    from its own seed, so that no rank draws (or holds) the whole matrix."""
    rows = []
    for block in range(start // INIT_BLOCK, (end - 1) // INIT_BLOCK + 1 if end > start else 0):
        lo, hi = block * INIT_BLOCK, min((block + 1) * INIT_BLOCK, num_classes)
        g = torch.Generator().manual_seed(seed * 1_000_003 + block)
        full = torch.randn(hi - lo, dim, generator=g) * INIT_STD
        rows.append(full[max(start, lo) - lo : min(end, hi) - lo])
    return torch.cat(rows) if rows else torch.zeros(0, dim)


def margin_logits(cos: Tensor, target: Tensor, margin: str, m: float, s: float, easy_margin: bool = False) -> Tensor:
    """s * cosines [N, c] with the margin on each sample's target column (`target[N]`, -1:
    not among these columns). ArcFace: cos(theta + m) where theta + m stays below pi, else
    insightface's fallback cos(theta) - m sin(m), which keeps the target logit decreasing in
    theta (with `easy_margin`: the margin only where cos(theta) > 0). CosFace: cos(theta) - m."""
    rows = torch.nonzero(target >= 0).squeeze(1)
    t = cos[rows, target[rows]]
    if margin == "arcface":
        sin = torch.sqrt((1.0 - t * t).clamp_min(1e-12))
        shifted = t * math.cos(m) - sin * math.sin(m)
        if easy_margin:
            t_new = torch.where(t > 0, shifted, t)
        else:
            t_new = torch.where(t > math.cos(math.pi - m), shifted, t - math.sin(math.pi - m) * m)
    elif margin == "cosface":
        t_new = t - m
    else:
        raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
    return cos.index_put((rows, target[rows]), t_new) * s


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _counts(count: int, device: torch.device, group) -> list[int]:
    """Every rank's row count, in rank order."""
    size = torch.tensor([count], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size, group=group)
    return [int(n) for n in sizes]


def _gather(x: Tensor, counts: list[int], group) -> Tensor:
    """Every rank's rows (`counts` of them), in rank order: padded to the largest count for
    the collective."""
    padded = x.new_zeros(max(counts), *x.shape[1:])
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


class _Gather(torch.autograd.Function):
    """`_gather` with a gradient: that of the gathered rows summed over ranks (each computed
    its classes' part), this rank's rows, times `scale`."""

    @staticmethod
    def forward(ctx, x: Tensor, counts: list[int], scale: float, group) -> Tensor:
        ctx.counts, ctx.rank, ctx.scale, ctx.group = counts, dist.get_rank(), scale, group
        return _gather(x, counts, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]] * ctx.scale, None, None, None


class _ReduceReplicated(torch.autograd.Function):
    """The sum over ranks of a value that feeds a loss every rank computes alike: its gradient
    is the same on every rank and passes back as it is."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class PartialFC(nn.Module):
    """This rank's slice of the class centres and the margin cross-entropy over all classes.

    `forward(embeddings[b, E], labels[b])` -> the cross-entropy [N] of every sample of the
    gathered micro-batch (all ranks' rows, in rank order; N = b in one process) and the
    position of this rank's rows among them. The logits are computed in float32 (or the
    centres' dtype), outside autocast: s = 64 magnifies the rounding of bf16 cosines."""

    def __init__(self, num_classes: int, dim: int, margin: str = "arcface", m: float = 0.5, s: float = 64.0,
                 easy_margin: bool = False, seed: int = 0, rank: int | None = None, world: int | None = None):
        super().__init__()
        if margin not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
        found = _world()
        self.rank, self.world = (found[0] if rank is None else rank), (found[1] if world is None else world)
        if num_classes < self.world:
            raise ValueError(f"{num_classes} classes cannot be split over {self.world} ranks")
        self.num_classes, self.margin, self.m, self.s, self.easy_margin = num_classes, margin, m, s, easy_margin
        self.start, self.end = shard(num_classes, self.rank, self.world)
        self.weight = nn.Parameter(init_centres(num_classes, dim, self.start, self.end, seed))
        # a process group of its own (made by every rank alike): the collectives of the loss, some
        # in the backward, never share one with the data-parallel wrapper's asynchronous ones
        self.group = dist.new_group() if self.world > 1 else None

    def forward(self, embeddings: Tensor, labels: Tensor, embedding_grad_scale: float = 1.0) -> tuple[Tensor, slice]:
        """`embedding_grad_scale` multiplies the gradient passed back to this rank's
        embeddings over several ranks (the caller undoes there the data-parallel average of
        what they feed)."""
        own = slice(0, embeddings.shape[0])
        with torch.autocast(embeddings.device.type, enabled=False):
            x = embeddings.to(self.weight.dtype)
            if self.world > 1:
                counts = _counts(x.shape[0], x.device, self.group)
                x = _Gather.apply(x, counts, embedding_grad_scale, self.group)
                labels = _gather(labels, counts, self.group)
                own = slice(sum(counts[: self.rank]), sum(counts[: self.rank + 1]))
            local = torch.where((labels >= self.start) & (labels < self.end), labels - self.start, -1)
            cos = F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1)).clamp(-1, 1)
            logits = margin_logits(cos, local, self.margin, self.m, self.s, self.easy_margin)
            top = logits.detach().max(1).values
            if self.world > 1:  # (a shift of the exponent only: no gradient goes through it)
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
            sum_exp = (logits - top[:, None]).exp().sum(1)
            rows = torch.nonzero(local >= 0).squeeze(1)
            target = logits.new_zeros(x.shape[0]).index_put((rows,), logits[rows, local[rows]])
            if self.world > 1:
                sum_exp = _ReduceReplicated.apply(sum_exp, self.group)
                target = _ReduceReplicated.apply(target, self.group)
            return sum_exp.log() + top - target, own


def gather_rows(t: Tensor, num_rows: int) -> Tensor | None:
    """The whole matrix [num_rows, ...] of the row shards `t` of every rank (shard's rule), on
    rank 0's CPU (None elsewhere). Collective."""
    rank, world = _world()
    main = rank == 0
    if world == 1:
        return t.detach().cpu().clone()
    size = shard(num_rows, 0, world)[1]  # (the largest shard: the first rank's)
    padded = t.new_zeros(size, *t.shape[1:])
    padded[: t.shape[0]] = t.detach()
    parts = [torch.empty_like(padded) for _ in range(world)] if main else None
    dist.gather(padded, parts, dst=0)
    if not main:
        return None
    return torch.cat([p[: shard(num_rows, r, world)[1] - shard(num_rows, r, world)[0]].cpu()
                      for r, p in enumerate(parts)])


__all__ = ["PartialFC", "margin_logits", "shard", "init_centres", "gather_rows", "MARGINS"]
