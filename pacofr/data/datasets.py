"""`build_dataset`: a `DataConfig` -> the dataset its source names (sources.py: the embedded
faces, an image folder, a .txt file list, an insightface RecordIO pair; dali_reader.py: that
pair read by DALI's MXNet reader; shards.py: WebDataset .tar shards), checked at once."""

import os

from .dali_reader import MXNetRecordIODataset
from .landmarks import load_landmarks_file
from .shards import ShardDataset, expand_shards
from .sources import FacesDataset, ImageFilesDataset, RecordIODataset, image_files, labelled_files
from .transforms import FaceTransform


def build_dataset(cfg, img_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                  augment: bool = True):
    """`cfg` is a `DataConfig`. A map-style Dataset (faces, folder, file list, RecordIO) or an
    IterableDataset (.tar shards, split per rank and per worker); each item is a Sample, or
    with data.decoder='dali' an EncodedSample for DaliDecoder. Every one has set_epoch. A wrong
    path or an empty source raises at once, naming the path."""
    encoded, align = cfg.decoder == "dali", cfg.align == "arcface"
    transform = FaceTransform(img_size, cfg.scale_min, cfg.ratio_max, cfg.hflip, cfg.color_jitter, augment)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    source = str(cfg.source)
    shards = expand_shards(source)
    if cfg.labels != "none" and (source == "faces" or shards is not None or source.lower().endswith(".rec")):
        raise ValueError(f"data.labels='{cfg.labels}' is for image folders and .txt lists; data.source '{source}' "
                         "is not one (a RecordIO record carries its identity): use data.labels=none")
    dali_rec = encoded and source.lower().endswith(".rec")
    mxnet = cfg.dali_reader == "mxnet" or (cfg.dali_reader == "auto" and dali_rec)
    if cfg.dali_reader == "mxnet" and not dali_rec:
        raise ValueError(f"data.dali_reader=mxnet reads an insightface .rec with data.decoder=dali; data.source "
                         f"'{source}' with data.decoder={cfg.decoder} is not one (leave data.dali_reader at auto)")
    if source == "faces":
        if cfg.landmarks or align:
            raise ValueError(f"data.{'landmarks' if cfg.landmarks else 'align'} is not used with "
                             "data.source='faces' (no landmarks exist for them)")
        return FacesDataset(img_size, transform, seed, encoded)

    if shards is not None:
        if cfg.landmarks:
            raise ValueError(f"data.landmarks='{cfg.landmarks}' does not apply to shards: "
                             "landmarks come from each sample's .json member")
        if not shards:
            raise FileNotFoundError(f"data.source '{source}': no shard matches")
        missing = [p for p in shards if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"data.source '{source}': shard '{missing[0]}' does not exist"
                                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if len(shards) < world_size:
            raise ValueError(f"data.source '{source}' has {len(shards)} shard(s) for world_size={world_size}: "
                             "every rank needs at least one shard")
        return ShardDataset(shards, transform, cfg.min_size, seed, rank, world_size, cfg.shuffle_buffer, encoded,
                            cfg.max_pixels, align)

    if align and not cfg.landmarks:
        raise ValueError(f"data.align='{cfg.align}' warps each face by its landmarks: set data.landmarks")
    if source.lower().endswith(".rec"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"data.source '{source}': no such file")
        if mxnet:
            dataset = MXNetRecordIODataset(source, transform, cfg.min_size, seed, cfg.max_pixels, align,
                                           cfg.shuffle_buffer, cfg.dali_threads)
        else:
            dataset = RecordIODataset(source, transform, cfg.min_size, seed, None, encoded, cfg.max_pixels, align)
        if cfg.landmarks:
            dataset.set_landmarks(dataset.keys, source_landmarks(cfg.landmarks, dataset.keys, source))
        return dataset

    paths, keys, labels = labelled_files(source, cfg.labels)
    landmarks = source_landmarks(cfg.landmarks, keys, source) if cfg.landmarks else None
    return ImageFilesDataset(paths, keys, transform, cfg.min_size, seed, landmarks, encoded, cfg.max_pixels,
                             labels, align)


def source_landmarks(path: str, keys: list[str], source: str, what: str = "data.landmarks",
                     source_what: str = "data.source") -> dict:
    """The landmarks file `path` for the images `keys` of `source`: refused, naming it, when it
    holds no entries or names none of them (paths relative to another folder, most likely)."""
    landmarks = load_landmarks_file(path, what=what)
    if not landmarks:
        raise ValueError(f"{what} '{path}' holds no entries")
    if not any(k in landmarks for k in keys):
        raise ValueError(f"{what} '{path}': none of its paths (e.g. '{next(iter(landmarks))}') "
                         f"names a file of {source_what} '{source}' (e.g. '{keys[0]}'); "
                         "paths must be relative to the source folder or list")
    return landmarks


__all__ = ["build_dataset", "image_files", "source_landmarks"]
