"""Batching for training: this rank's batch indices (`Batches`), the collate that draws each
sample's masks (`MaskingCollate`), and the DataLoader over one epoch (`micro_batches`).

The masks are drawn in the DataLoader workers, by the masking function the caller gives
(pacofr.masking.sample_masks): data flows into masking, so pacofr.data does not import it."""

import zlib

import torch
from torch.utils.data import DataLoader

from ..config import Config
from .batch import Batch, collate, collate_encoded


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
    """Collates the samples, counts bad ones, and draws each sample's masks from a seed made of
    the run seed, the epoch and the sample's pixels: the same masks whatever the rank,
    worker or batch position of the sample. Encoded samples (data.decoder='dali', decoded
    later by DaliDecoder) bring their seed, a function of the sample's identity and epoch.
    `sample_masks(seeds, size, patch_size, masking_cfg, landmarks)` draws them."""

    def __init__(self, cfg: Config, sample_masks):
        self.cfg, self.sample_masks, self.epoch = cfg, sample_masks, 0

    def __call__(self, samples: list) -> Batch:
        if self.cfg.data.decoder == "dali":
            batch = collate_encoded(samples)
            seeds = [s.mask_seed for s in batch.encoded]
        else:
            batch = collate(samples)
            seeds = [zlib.crc32(img[:, ::7, ::7].contiguous().numpy().tobytes(), self.cfg.train.seed * 1000 + self.epoch)
                     for img in batch.images]
        m = self.cfg.model
        batch.masks = self.sample_masks(seeds, (m.img_size, m.img_size), m.patch_size, self.cfg.masking, batch.landmarks)
        return batch


def micro_batches(cfg, dataset, batches, collate_fn, per_rank, epoch_step, device, decoder=None):
    """An iterator over this rank's micro-batches (Batch) of the current epoch, from
    `epoch_step` on. `batches` (Batches) for a map-style dataset, None for a stream (a dataset
    with `epoch_batches`, DALI's MXNet reader, reads its batches itself); `device`
    (a torch.device) decides pinned memory; `decoder` (a DaliDecoder) decodes each batch in
    this process."""
    pin = device.type == "cuda" and decoder is None
    if hasattr(dataset, "epoch_batches"):  # DALI's reader reads the records: no DataLoader
        batches.epoch = collate_fn.epoch
        it = dataset.epoch_batches(batches, collate_fn, epoch_step)
    elif batches is not None:  # map-style: the batch sampler starts at the data position
        batches.epoch, batches.start = collate_fn.epoch, epoch_step
        it = iter(DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn,
                             num_workers=cfg.data.num_workers, pin_memory=pin))
    else:
        it = iter(DataLoader(dataset, batch_size=per_rank, collate_fn=collate_fn, drop_last=True,
                             num_workers=cfg.data.num_workers, pin_memory=pin))
        for _ in range(epoch_step * cfg.train.accum_steps):  # streams: replay up to the data position
            next(it, None)
    return it if decoder is None else map(decoder, it)


__all__ = ["Batches", "MaskingCollate", "micro_batches"]
