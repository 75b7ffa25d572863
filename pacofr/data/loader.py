"""(interim) batching and mask collation."""
import zlib
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from ..masking import sample_masks
from .datasets import collate, collate_encoded

class Batches:
    """This rank's share of each global batch, as DataLoader batch indices.

    Epoch e shuffles all samples with seed (seed, e); global batch s is the slice
    [s*G, (s+1)*G) of that order, micro-batch m the m-th of its `accum` parts, and rank r the
    r-th part of that, so the union over ranks is exactly a single process's batch."""

    def __init__(self, size: int, global_batch: int, accum: int, rank: int, world: int, seed: int):
        self.size, self.global_batch, self.accum, self.rank, self.world, self.seed = size, global_batch, accum, rank, world, seed
        self.epoch, self.start = 0, 0

    def steps(self) -> int:
        return self.size // self.global_batch

    def __len__(self) -> int:
        return (self.steps() - self.start) * self.accum

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        micro = self.global_batch // self.accum
        part = micro // self.world
        for s in range(self.start, self.steps()):
            for m in range(self.accum):
                lo = s * self.global_batch + m * micro + self.rank * part
                yield order[lo : lo + part].tolist()


class MaskingCollate:
    """Stacks the samples, counts bad ones, and draws each sample's masks from a seed made of
    the run seed, the epoch and the sample's pixels: the same masks whatever the rank,
    worker or batch position of the sample. Encoded samples (data.decoder='dali', decoded
    later by DaliDecoder) bring their seed, a function of the sample's identity and epoch."""

    def __init__(self, cfg):
        self.cfg, self.epoch = cfg, 0

    def __call__(self, items: list[dict]) -> dict:
        if self.cfg.data.decoder == "dali":
            batch = collate_encoded(items)
            seeds = batch["mask_seeds"]
        else:
            batch = collate(items)
            seeds = [zlib.crc32(img[:, ::7, ::7].contiguous().numpy().tobytes(), self.cfg.train.seed * 1000 + self.epoch)
                     for img in batch["images"]]
        m = self.cfg.model
        batch["masks"] = sample_masks(seeds, (m.img_size, m.img_size), m.patch_size, self.cfg.masking, batch["landmarks"])
        return batch


def micro_batches(cfg, dataset, batches, collate_fn, per_rank, epoch_step, device, decoder=None):
    """An iterator over this rank's micro-batches of the current epoch, from `epoch_step` on;
    `decoder` (a DaliDecoder) decodes each one in this process."""
    pin = device.type == "cuda" and decoder is None
    if batches is not None:  # map-style: the batch sampler starts at the data position
        batches.epoch, batches.start = collate_fn.epoch, epoch_step
        it = iter(DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn,
                             num_workers=cfg.data.num_workers, pin_memory=pin))
    else:
        it = iter(DataLoader(dataset, batch_size=per_rank, collate_fn=collate_fn, drop_last=True,
                             num_workers=cfg.data.num_workers, pin_memory=pin))
        for _ in range(epoch_step * cfg.train.accum_steps):  # streams: replay up to the data position
            next(it, None)
    it = it if decoder is None else map(decoder, it)
    return (SimpleNamespace(**b) for b in it)


