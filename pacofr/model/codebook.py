"""The pixel-space codebook, the Belief Predictor, and top-k candidate mixing (docs/design.md 1.2).

Codes are patches in normalized pixel space (p*p*C values, same layout as `patchify`), so a
mixture of codes can be pasted into the image as is. Each code also has a key in the belief
space; the Belief Predictor maps a patch's pixels to a belief embedding, and the top-k codes by
inner product with the keys are the candidates that replace the patch.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch import distributed as dist

from ..ops import codebook_topk


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class PixelCodebook(nn.Module):
    def __init__(self, num_codes: int, code_dim: int, key_dim: int, ema_decay: float = 0.99,
                 dead_code_threshold: float = 0.05):
        super().__init__()
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.codes = nn.Parameter(torch.randn(num_codes, code_dim))
        self.keys = nn.Parameter(torch.randn(num_codes, key_dim) * key_dim**-0.5)
        self.register_buffer("ema_count", torch.zeros(num_codes))
        self.register_buffer("ema_sum", torch.zeros(num_codes, code_dim))
        self.register_buffer("initialized", torch.tensor(False))
        self.written = None  # the code table as last written in place (see take_written)
        self.pending = None  # EMA statistics gathered while deferred (see defer_ema)

    @property
    def num_codes(self) -> int:
        return self.ema_count.shape[0]  # (a buffer: never partitioned away, unlike a ZeRO-3 parameter)

    def take_written(self) -> Tensor | None:
        """A copy of the code table as the last initialization or EMA step wrote it in place,
        once (None if none since): for an optimizer that keeps its own copy of the parameter."""
        written, self.written = self.written, None
        return written

    def _sample(self, chunks: list[Tensor], count: int, generator: torch.Generator | None) -> Tensor | None:
        """`count` random patches of the step's global batch, given as this rank's patches of
        each micro-batch (`chunks`). Every rank draws the same indices (the generator is seeded
        alike on all ranks) into the concatenation in the order of a single process's batch
        (micro-batch by micro-batch, rank by rank within each), and the owners fill them in:
        the draw of one process from the whole batch."""
        dev = chunks[0].device
        device = generator.device if generator is not None else dev
        world, rank = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
        sizes = torch.zeros(len(chunks), world, dtype=torch.long, device=dev)
        sizes[:, rank] = torch.tensor([c.shape[0] for c in chunks], device=dev)
        if _distributed():
            dist.all_reduce(sizes)
        if int(sizes.sum()) == 0:
            return None
        starts = (sizes.flatten().cumsum(0) - sizes.flatten()).view_as(sizes)[:, rank]
        pick = torch.randint(int(sizes.sum()), (count,), generator=generator, device=device).to(dev)
        new = torch.zeros(count, chunks[0].shape[1], dtype=self.codes.dtype, device=dev)
        for chunk, start in zip(chunks, starts):
            local = pick - start
            mine = (local >= 0) & (local < chunk.shape[0])
            new[mine] = chunk[local[mine]].to(self.codes.dtype)
        if _distributed():
            dist.all_reduce(new)
        return new

    @torch.no_grad()
    def init_from(self, chunks: Tensor | list[Tensor], generator: torch.Generator | None = None) -> None:
        """Codes start as random data patches (once, before the first incubation step): from
        `chunks`, a batch's patches or those of every micro-batch of a step."""
        chunks = [c[torch.isfinite(c).all(1)] for c in ([chunks] if isinstance(chunks, Tensor) else chunks)]
        fresh = None if bool(self.initialized) else self._sample(chunks, self.num_codes, generator)
        if fresh is None:
            return
        self.codes.copy_(fresh)
        self.ema_sum.copy_(self.codes)
        self.ema_count.fill_(1.0)
        self.initialized.fill_(True)
        self.written = self.codes.detach().clone()

    def defer_ema(self) -> None:
        """From now on ema_update only gathers its statistics, until `flush_ema` makes one EMA
        step of them all: over the micro-batches of a step, the step one batch of them makes."""
        if self.pending is None:
            self.pending = {"counts": torch.zeros_like(self.ema_count), "sums": torch.zeros_like(self.ema_sum),
                            "chunks": []}

    @torch.no_grad()
    def flush_ema(self, generator: torch.Generator | None = None) -> int:
        """The EMA step of what ema_update gathered since `defer_ema` (every rank calls it);
        updates are immediate again after it. Returns the number of restarted codes."""
        pending, self.pending = self.pending, None
        if pending is None or not pending["chunks"]:
            return 0
        return self._ema_step(pending["counts"], pending["sums"], pending["chunks"], generator)

    @torch.no_grad()
    def ema_update(self, patches: Tensor, assign: Tensor, generator: torch.Generator | None = None) -> int:
        """VQ-style EMA step: each code moves to the running mean of the patches assigned to it;
        codes whose usage count decays below the threshold restart at random patches.
        Returns the number of restarted codes (0 while deferred). Non-finite patches are left out."""
        finite = torch.isfinite(patches).all(1)
        patches, assign = patches[finite], assign[finite]
        counts = torch.bincount(assign, minlength=self.num_codes).to(self.ema_count.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, assign, patches.to(self.ema_sum.dtype))
        if self.pending is not None:
            self.pending["counts"] += counts
            self.pending["sums"] += sums
            self.pending["chunks"].append(patches)
            return 0
        return self._ema_step(counts, sums, [patches], generator)

    def _ema_step(self, counts: Tensor, sums: Tensor, chunks: list[Tensor], generator) -> int:
        if _distributed():  # every rank sees the codebook of the global batch
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        d = self.ema_decay
        self.ema_count.mul_(d).add_(counts, alpha=1 - d)
        self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        n = self.ema_count.sum()
        eps = 1e-5
        smoothed = (self.ema_count + eps) / (n + self.num_codes * eps) * n
        self.codes.copy_(self.ema_sum / smoothed[:, None])
        dead = (self.ema_count < self.dead_code_threshold).nonzero()[:, 0]
        fresh = self._sample(chunks, dead.numel(), generator) if dead.numel() else None
        if fresh is not None:
            self.codes[dead] = fresh
            self.ema_sum[dead] = fresh
            self.ema_count[dead] = 1.0
        self.written = self.codes.detach().clone()
        return int(dead.numel())

    @torch.no_grad()
    def perplexity(self) -> float:
        """exp(entropy) of the EMA usage distribution: K when all codes are used equally."""
        p = self.ema_count / self.ema_count.sum().clamp_min(1e-12)
        return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


class BeliefPredictor(nn.Module):
    """Small MLP from a patch's normalized pixels to its belief embedding."""

    def __init__(self, patch_dim: int, hidden: int, belief_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(patch_dim)
        self.fc1 = nn.Linear(patch_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, belief_dim)

    def forward(self, patches: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(patches))))


def mix_candidates(scores: Tensor, idx: Tensor, codes: Tensor, temperature: float = 1.0,
                   mode: str = "soft", generator: torch.Generator | None = None) -> Tensor:
    """Replacement patches [M, P] from the top-k candidates (scores [M, k], higher is better):
    "soft" = softmax(scores / T) mixture; "gumbel" = a straight-through Gumbel-softmax pick
    (one code in the forward pass, the soft gradient in the backward pass)."""
    logits = scores.float() / temperature
    if mode == "gumbel":
        u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-20, 1 - 1e-7)
        soft = F.softmax(logits - torch.log(-torch.log(u)), dim=-1)
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        weights = hard - soft.detach() + soft
    else:
        weights = F.softmax(logits, dim=-1)
    return torch.einsum("mk,mkp->mp", weights, codes[idx].float())


def belief_loss(belief: Tensor, scores: Tensor, idx: Tensor, keys: Tensor, target: Tensor,
                temperature: float = 1.0) -> Tensor:
    """Cross-entropy of the target code against the predictor's own top-k candidates (a
    sampled softmax: the N x K logits are never built). A candidate equal to the target is
    counted once."""
    target_logit = (belief.float() * keys[target].float()).sum(-1, keepdim=True)
    others = scores.float().masked_fill(idx == target[:, None], -torch.inf)
    logits = torch.cat([target_logit, others], dim=1) / temperature
    return -F.log_softmax(logits, dim=-1)[:, 0]


def nearest_codes(patches: Tensor, codes: Tensor) -> Tensor:
    """Index of the nearest code of each patch in pixel space (squared L2), searched in the
    inputs' own precision: autocast is off here, since bf16 rounding would flip the nearest
    code of nearly tied patches (the belief target and the EMA assignment)."""
    with torch.autocast(patches.device.type, enabled=False):
        return codebook_topk(patches, codes, 1, "l2")[1][:, 0]
