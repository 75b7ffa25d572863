"""data.dali_reader='mxnet': an insightface RecordIO pair read by DALI's own MXNet reader
(fn.readers.mxnet, on DALI's CPU threads) in place of DataLoader workers. Each record's encoded
image then goes the way of every sample with data.decoder='dali': make_encoded_item (header
checks, crop, flip and jitter seeded by the record, as with the python reader), the run's
collate (masks, labels), DaliDecoder.

What DALI's reader does not do by itself, done here:
- It reads every record the .idx lists, insightface's header record 0 and identity records too
  (as empty images). It is given an .idx of the readable image records alone, written for each
  epoch's pipeline into a temporary folder and removed once DALI has read it; the .rec is read
  as it is.
- It trusts the .idx: a record without its magic stops the pipeline, and one running past the
  next listed offset is read out of bounds. The records' framing and headers are checked once,
  at the start (recordio.check_records); those that fail are left out and counted as
  bad_record (by rank 0, in the first micro-batch of an epoch read from its start). A record
  whose image is corrupt is read as bytes and caught where any file's is (the header and end
  marker checks, DaliDecoder's PIL fallback).
- Sharding: rank r reads DALI's shard r of the rank count (a contiguous range of the records
  in file order, stick_to_shard), shuffled within a buffer of data.shuffle_buffer records
  seeded by (train.seed, epoch). A pipeline is built per epoch, so an epoch's order is a
  function of (seed, epoch, rank, rank count) alone. Every rank reads the epoch's
  Batches.steps() x accum micro-batches, which the shortest shard (floor(N / ranks) records)
  holds: no rank waits on another, none reads a record twice, and the rest of each shard is
  left for that epoch (N mod the global batch records in all, as on the python path).
- Resume: the epoch's pipeline is rebuilt and its first epoch_step x accum micro-batches read
  and dropped (not decoded): the samples of the uninterrupted run, at the same rank count.
"""

import gc
import tempfile
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .dali import _dali
from .items import MAX_PIXELS
from .recordio import BAD_RECORD, check_records
from .sources import RecordIODataset
from .transforms import FaceTransform


def _why(error: RuntimeError) -> str:
    """The line of a DALI pipeline error that says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    return next((line for line in lines if "RecordIO" in line), lines[-1])[:200]


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of an epoch's pipeline (DALI takes a non-negative 32-bit seed)."""
    return (int(seed) * 100003 + int(epoch)) % (1 << 31)


class MXNetRecordIODataset(RecordIODataset):
    """A RecordIODataset whose readable image records DALI's MXNet reader reads (epoch_batches).
    As a map-style dataset its items are the readable records, each with its seed, landmarks
    and name of RecordIODataset; `bad` holds (record, why) of the others."""

    def __init__(self, rec: str, transform: FaceTransform, min_size: int, seed: int = 0,
                 max_pixels: int = MAX_PIXELS, align: bool = False, shuffle_buffer: int = 1000, threads: int = 4):
        _dali()
        super().__init__(rec, transform, min_size, seed, None, True, max_pixels, align)
        with self.records:
            self.readable, self.bad = check_records(self.records)
        if not self.readable:
            raise ValueError(f"data.source '{rec}': none of its {len(self.keys)} image records can be read "
                             f"({self.bad[0][1]})")
        position = {r: i for i, r in enumerate(self.records.images)}
        self.positions = [position[r] for r in self.readable]
        self.at_offset = {self.records.offsets[r]: position[r] for r in self.readable}
        self.shuffle_buffer, self.threads = int(shuffle_buffer), int(threads)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int):
        return super().__getitem__(self.positions[index])

    def _pipeline(self, per_rank: int, rank: int, world: int, seed: int):
        dali, fn, _ = _dali()
        with tempfile.TemporaryDirectory(prefix="pacofr-idx-") as tmp:
            idx = Path(tmp) / "images.idx"
            idx.write_text("".join(f"{r}\t{self.records.offsets[r]}\n" for r in self.readable))
            pipe = dali.Pipeline(batch_size=per_rank, num_threads=self.threads, device_id=None, seed=seed)
            with pipe:
                encoded, labels = fn.readers.mxnet(
                    path=[str(self.records.rec)], index_path=[str(idx)], shard_id=rank, num_shards=world,
                    stick_to_shard=True, random_shuffle=self.shuffle_buffer > 1,
                    initial_fill=max(self.shuffle_buffer, 1), seed=seed, name="records")
                pipe.set_outputs(encoded, labels)
            pipe.build()  # (the reader has read the .idx here: it may go)
        return pipe

    def _sample(self, encoded, labels, k: int):
        """Row k of a reader batch as the python reader's sample of that record."""
        offset = int(encoded[k].source_info().rsplit(" ", 1)[1])  # "<rec> at index <offset>"
        position = self.at_offset[offset]
        name = f"{self.records.rec}#{self.records.images[position]}"
        label = int(np.asarray(labels.at(k))[0])  # (an identity: check_records saw it)
        return self._item(encoded.at(k).tobytes(), position, name, label)

    def epoch_batches(self, batches, collate_fn, epoch_step: int):
        """This rank's micro-batches of epoch `batches.epoch` from step `epoch_step` on, each
        collated by `collate_fn`; `batches` (loader.Batches) gives the steps, accumulation,
        rank, rank count and seed."""
        accum, world = batches.accum, batches.world
        per_rank = batches.global_batch // accum // world
        pipe = self._pipeline(per_rank, batches.rank, world, epoch_seed(batches.seed, batches.epoch))
        try:
            for n in range(batches.steps() * accum):
                try:
                    encoded, labels = pipe.run()
                except RuntimeError as e:  # (the checks passed: the file changed, or could not be read)
                    why = _why(e)
                    del e, pipe  # (the error's frames must not keep the pipeline's threads alive)
                    raise ConfigError(f"data.source '{self.records.rec}': DALI's MXNet reader stopped ({why}); "
                                      "data.dali_reader=python skips and counts a record it cannot read") from None
                if n < epoch_step * accum:  # (resuming: read to the data position, not decoded)
                    continue
                batch = collate_fn([self._sample(encoded, labels, k) for k in range(len(encoded))])
                if n == 0 and batches.rank == 0 and self.bad:
                    batch.issues[BAD_RECORD] += len(self.bad)
                    batch.skipped.extend((f"{self.records.rec}#{r}", BAD_RECORD) for r, _ in self.bad)
                yield batch
        finally:
            # A DALI pipeline sits in reference cycles, so dropping it leaves it to the garbage
            # collector, which may first run in a process forked later (a DataLoader worker):
            # there its destructor waits for threads that were not copied, for ever. Destroy it
            # here, with its epoch, also when the epoch is left early.
            pipe = None
            gc.collect()


__all__ = ["MXNetRecordIODataset", "epoch_seed"]
