"""Data loading: decode, repair or skip, augment, collate (DESIGN.md 2, 6).

    from pacofr.data import build_dataset, collate
    ds = build_dataset(cfg.data, cfg.model.img_size, seed=cfg.train.seed, rank=rank, world_size=world)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=..., collate_fn=collate, num_workers=cfg.data.num_workers)
    for batch in loader:   # images [B,3,S,S], landmarks [B,5,2] (NaN = unknown), issues {reason: n}

Sources: "faces" (101 real faces embedded in scikit-image), an image folder, a .txt file list,
WebDataset .tar shards. See datasets.py (sources, splitting, seeding), decode.py (the reasons a
sample is skipped or repaired), transforms.py (augmentation and the landmark coordinate
convention), landmarks.py (landmark file formats).

With data.decoder='dali' the items stay encoded (collate_encoded) and dali.DaliDecoder decodes
each batch in the main process: `images = DaliDecoder(S, max_batch)(collate_encoded(items))`.
"""

from .loader import Batches, MaskingCollate, micro_batches
from .datasets import (ASTRONAUT_FACE_BOX, IMAGE_EXTENSIONS, FacesDataset, ImageFilesDataset, ShardDataset,
                       build_dataset, collate, collate_encoded, embedded_faces)
from .decode import REASONS, REPAIR_REASONS, SKIP_REASONS
from .transforms import IMAGENET_MEAN, IMAGENET_STD, FaceTransform, denormalize, sample_seed

__all__ = [
    "build_dataset", "collate", "collate_encoded", "denormalize", "IMAGENET_MEAN", "IMAGENET_STD", "REASONS", "SKIP_REASONS",
    "REPAIR_REASONS", "IMAGE_EXTENSIONS", "ASTRONAUT_FACE_BOX", "FaceTransform", "FacesDataset",
    "ImageFilesDataset", "ShardDataset", "embedded_faces", "sample_seed",
]
