"""Data loading: decode, repair or skip, augment, collate, batch (docs/design.md 2, 6).

    from pacofr.data import build_dataset, collate
    ds = build_dataset(cfg.data, cfg.model.img_size, seed=cfg.train.seed, rank=rank, world_size=world)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=..., collate_fn=collate, num_workers=cfg.data.num_workers)
    for batch in loader:   # a Batch: images [B,3,S,S], landmarks [B,5,2] (NaN = unknown), issues {reason: n}

A dataset's items are `Sample`s (a skipped one has no image; `skipped(reason)`). Sources:
"faces" (101 real faces embedded in scikit-image), an image folder, a .txt file list, an
insightface RecordIO pair (sources.py, recordio.py), WebDataset .tar shards (shards.py);
datasets.py builds one from the config; align.py warps faces to the ArcFace 5-point template.
items.py builds a sample from an image's bytes, batch.py collates; decode.py names the
reasons a sample is skipped or repaired, transforms.py the augmentation and the landmark
coordinate convention, landmarks.py the landmark file formats. loader.py batches for
training: `Batches` (this rank's indices), `MaskingCollate` (draws the masks),
`micro_batches` (the DataLoader over an epoch).

With data.decoder='dali' the items stay encoded (`EncodedSample`, collated by
collate_encoded) and dali.DaliDecoder decodes each batch in the main process:
`batch = DaliDecoder(S, max_batch)(collate_encoded(items))`. With data.dali_reader='mxnet' a
RecordIO pair is read by DALI's own MXNet reader (dali_reader.MXNetRecordIODataset, whose
`epoch_batches` micro_batches uses in place of a DataLoader).
"""

from .batch import Batch, collate, collate_encoded
from .datasets import build_dataset
from .decode import REASONS, REPAIR_REASONS, SKIP_REASONS
from .items import EncodedSample, Sample, skipped
from .loader import Batches, MaskingCollate, micro_batches
from .shards import ShardDataset
from .sources import (ASTRONAUT_FACE_BOX, IMAGE_EXTENSIONS, FacesDataset, ImageFilesDataset, RecordIODataset,
                      embedded_faces)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, FaceTransform, denormalize, sample_seed

__all__ = [
    "build_dataset", "collate", "collate_encoded", "Batch", "Sample", "EncodedSample", "skipped", "Batches",
    "MaskingCollate", "micro_batches", "denormalize", "IMAGENET_MEAN", "IMAGENET_STD", "REASONS", "SKIP_REASONS",
    "REPAIR_REASONS", "IMAGE_EXTENSIONS", "ASTRONAUT_FACE_BOX", "FaceTransform", "FacesDataset",
    "ImageFilesDataset", "RecordIODataset", "ShardDataset", "embedded_faces", "sample_seed",
]
