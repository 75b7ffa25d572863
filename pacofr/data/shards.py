"""WebDataset .tar shards, streamed (an IterableDataset), split per rank and per worker.

Augmentation randomness is a pure function of (seed, epoch, shard, position in shard), so it
does not depend on the rank, the number of workers, the shuffle, or on whether the run was
resumed. `set_epoch(epoch)` must be called before the DataLoader iterator is made."""

import json
import os
import random
from functools import partial

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .items import MAX_PIXELS, EncodedSample, Sample, landmarks_missing, make_encoded_item, make_item, skipped
from .landmarks import NAN5, parse_points
from .sources import IMAGE_EXTENSIONS
from .transforms import FaceTransform, sample_seed


def _shuffled(items, bufsize: int, rng: random.Random):
    buf = []
    for x in items:
        buf.append(x)
        if len(buf) >= bufsize:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _has_end_marker(f) -> bool:
    """A complete tar ends with two zero blocks (then zero padding to its record size)."""
    size = f.seek(0, os.SEEK_END)
    if size < 1024:
        return False
    f.seek(size - 1024)
    return not any(f.read(1024))


def _shard_points(raw_json) -> np.ndarray | None:
    """The .json member: a list of points or {"landmarks": [...]}; None = no landmarks."""
    if raw_json is None:
        return None
    try:
        value = json.loads(raw_json)
    except (ValueError, UnicodeDecodeError):
        return NAN5.copy()  # given, but unusable
    if isinstance(value, dict):
        value = value.get("landmarks")
    if value is None:
        return None
    return parse_points(value)


def _shard_label(raw_cls) -> int | None:
    """The .cls member (an identity, as `pacofr data prepare` writes RecordIO's): an int >= 0,
    None without one, -1 when it is not a whole number >= 0."""
    if raw_cls is None:
        return None
    try:
        label = int(raw_cls.decode() if isinstance(raw_cls, bytes) else raw_cls)
    except (ValueError, UnicodeDecodeError):
        return -1
    return label if label >= 0 else -1


def expand_shards(source: str) -> list[str] | None:
    """'a-{000..003}.tar' / 'a.tar' / 'dir/*.tar' / a folder holding .tar files (as `pacofr data
    prepare` writes them; its images, if any, are not read) -> paths, or None when not shards."""
    import glob

    from braceexpand import braceexpand

    if os.path.isdir(source):
        return sorted(glob.glob(os.path.join(glob.escape(source), "*.tar"))) or None
    paths = list(braceexpand(source))
    if not all(p.lower().endswith(".tar") for p in paths):
        return None
    out = []
    for p in paths:
        if any(c in p for c in "*?["):
            out.extend(sorted(glob.glob(p)))
        else:
            out.append(p)
    return out


class ShardDataset(IterableDataset):
    """WebDataset .tar shards (read with the `webdataset` library). Rank r of world_size reads
    shards r, r + world_size, ...; inside a DataLoader, worker w of W reads every W-th of
    those. Shard order (per rank, per epoch) and a buffer of `shuffle_buffer` raw samples are
    shuffled with local RNGs seeded from (seed, epoch, rank[, worker]). A sample's image is
    its first member named .jpg/.jpeg/.png/.bmp/.webp; its landmarks come from .json. A tar
    that breaks off (or cannot be opened, or lacks its end-of-archive marker) yields one sample
    skipped as "unreadable" after the samples read before the break. `encoded`: samples for
    DaliDecoder; `align`: warp faces with landmarks to the ArcFace template. A sample is named
    `shard.tar/key` (the break: the shard's path)."""

    def __init__(self, shards: list[str], transform: FaceTransform, min_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0, encoded: bool = False,
                 max_pixels: int = MAX_PIXELS, align: bool = False):
        self.shards = list(shards)
        self.make_item = partial(make_encoded_item if encoded else make_item, align=align)
        self.transform, self.min_size, self.seed = transform, int(min_size), int(seed)
        self.max_pixels = int(max_pixels)
        self.rank, self.world_size, self.shuffle_buffer = int(rank), int(world_size), int(shuffle_buffer)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def my_shards(self) -> list[int]:
        """Indices (into self.shards) this rank and worker read this epoch, in order."""
        mine = list(range(self.rank, len(self.shards), self.world_size))
        if self.shuffle_buffer > 0:
            random.Random(sample_seed(self.seed, self.epoch, self.rank, 1)).shuffle(mine)
        info = get_worker_info()
        if info is not None:
            mine = mine[info.id::info.num_workers]
        return mine

    def _raw_samples(self, shard_ids):
        from webdataset import tariterators as wt

        for s in shard_ids:
            url, errors = self.shards[s], []

            def stop(exn, errors=errors):
                errors.append(exn)
                return False

            def skip(exn, errors=errors):
                errors.append(exn)
                return True

            try:
                with open(url, "rb") as stream:
                    members = wt.tar_file_expander([dict(url=url, stream=stream)], handler=stop)
                    for pos, sample in enumerate(wt.group_by_keys(members, handler=skip)):
                        yield s, pos, sample
                    if not errors and not _has_end_marker(stream):
                        # cut at a member boundary: tarfile sees a clean end, the end marker tells
                        errors.append(EOFError(f"{url}: no end-of-archive marker (truncated?)"))
            except OSError as exn:
                errors.append(exn)
            for _ in errors:
                yield s, -1, None

    def _item(self, shard: int, pos: int, sample: dict | None) -> Sample | EncodedSample:
        item = self._read(shard, pos, sample)
        item.name = self.shards[shard] + ("" if sample is None else f"/{sample.get('__key__', pos)}")
        return item

    def _read(self, shard: int, pos: int, sample: dict | None) -> Sample | EncodedSample:
        if sample is None:
            return skipped("unreadable")
        raw = None
        for key, value in sample.items():
            if not key.startswith("__") and "." + key.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                raw = value
                break
        if raw is None:
            return skipped("not_an_image")
        seed = sample_seed(self.seed, self.epoch, shard, pos)
        points = _shard_points(sample.get("json"))
        label = _shard_label(sample.get("cls"))
        if label == -1:
            return skipped("bad_record")
        item = self.make_item(raw, points, self.transform, self.min_size, seed, self.max_pixels)
        item.label = label
        return landmarks_missing(item) if points is None else item

    def __iter__(self):
        samples = self._raw_samples(self.my_shards())
        if self.shuffle_buffer > 1:
            info = get_worker_info()
            wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
            rng = random.Random(sample_seed(self.seed, self.epoch, self.rank, 2, wid, nw))
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        for shard, pos, sample in samples:
            yield self._item(shard, pos, sample)


__all__ = ["ShardDataset", "expand_shards"]
