"""Map-style sources: the embedded faces, an image folder, a .txt file list, an insightface
RecordIO pair (recordio.py). Rank and loader worker split these by batch (loader.Batches).

Identity labels: a RecordIO record's identity; with data.labels='folders', the folder right
under the root (`root/<identity>/...`), numbered in sorted name order; with data.labels='list',
the last column of a `.txt` list (`path label`).

Augmentation randomness is a pure function of (seed, epoch, index), so it does not depend on
the rank, the number of workers, the shuffle, or on whether the run was resumed.
`set_epoch(epoch)` must be called before the DataLoader iterator is made (workers copy the
dataset when they start: use persistent_workers=False)."""

import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from functools import partial

from .decode import read_bytes
from .items import (MAX_PIXELS, EncodedSample, Sample, landmarks_missing, make_encoded_item, make_item, png_bytes,
                    skipped)
from .landmarks import NAN5, norm_key
from .recordio import BAD_RECORD, InsightFaceRecords, RecordIOError, identity, index_of, read_property
from .transforms import FaceTransform, sample_seed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# The astronaut's face in skimage.data.astronaut() (512 x 512): PIL box (left, top, right,
# bottom), chosen by eye on a 32-px grid drawn over the image: hair top to chin, both ears.
ASTRONAUT_FACE_BOX = (150, 30, 300, 180)
N_LFW_FACES = 100  # lfw_subset(): the first 100 of its 200 images are faces


def embedded_faces(img_size: int) -> np.ndarray:
    """The 100 LFW faces of scikit-image's lfw_subset (25 x 25 gray) and the astronaut's face,
    as RGB uint8 [101, S, S, 3] (bicubic resize). Loaded at run time, never stored here."""
    try:
        from skimage import data
    except ImportError as e:
        raise ImportError("data.source='faces' needs scikit-image (pip install scikit-image)") from e

    faces = []
    for a in data.lfw_subset()[:N_LFW_FACES]:
        im = Image.fromarray(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8), "L").convert("RGB")
        faces.append(np.asarray(im.resize((img_size, img_size), Image.BICUBIC)))
    astro = Image.fromarray(data.astronaut()).crop(ASTRONAUT_FACE_BOX)
    faces.append(np.asarray(astro.resize((img_size, img_size), Image.BICUBIC)))
    return np.stack(faces)


class _MapDataset(Dataset):
    def __init__(self, transform: FaceTransform, seed: int, encoded: bool, align: bool = False):
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.encoded = encoded
        self.make_item = partial(make_encoded_item if encoded else make_item, align=align)
        self.num_classes = None

    def set_landmarks(self, keys: list[str], landmarks: dict[str, np.ndarray] | None) -> None:
        """Each sample's given points (by key); with a landmarks file, a sample it lacks is counted."""
        self.points = np.full((len(keys), 5, 2), np.nan, dtype=np.float32)
        self.has_points = np.zeros(len(keys), dtype=bool)
        self.expects_points = landmarks is not None
        for i, k in enumerate(keys):
            if landmarks and k in landmarks:
                self.points[i] = landmarks[k]
                self.has_points[i] = True

    def _item(self, raw: bytes | None, index: int, name: str, label: int | None) -> Sample | EncodedSample:
        """Sample `index` from its bytes, with its given points, name and label."""
        points = self.points[index] if self.has_points[index] else None
        sample = self.make_item(raw, points, self.transform, self.min_size, self.sample_seed(index), self.max_pixels)
        sample.name, sample.label = name, label
        return landmarks_missing(sample) if points is None and self.expects_points else sample

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_seed(self, index: int) -> int:
        return sample_seed(self.seed, self.epoch, index)


class FacesDataset(_MapDataset):
    """Source "faces": 101 real faces embedded in scikit-image; landmarks unknown (NaN).
    `encoded`: samples for DaliDecoder (make_encoded_item), the faces encoded as PNG."""

    def __init__(self, img_size: int, transform: FaceTransform, seed: int = 0, encoded: bool = False):
        super().__init__(transform, seed, encoded)
        self.images = embedded_faces(img_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample | EncodedSample:
        im = Image.fromarray(self.images[index])
        if self.encoded:
            return make_encoded_item(png_bytes(im), None, self.transform, 0, self.sample_seed(index))
        image, lm = self.transform(im, torch.from_numpy(NAN5.copy()), self.sample_seed(index))
        return Sample(image, lm)


class ImageFilesDataset(_MapDataset):
    """An image folder or a file list. `keys` are the paths relative to the folder (or as the
    list writes them), the names a landmarks file uses; `labels` each image's class (None: no
    labels). `encoded`: samples for DaliDecoder; `align`: warp faces with landmarks to the
    ArcFace template. Each sample is named by its path."""

    def __init__(self, paths: list[str], keys: list[str], transform: FaceTransform, min_size: int,
                 seed: int = 0, landmarks: dict[str, np.ndarray] | None = None, encoded: bool = False,
                 max_pixels: int = MAX_PIXELS, labels: list[int] | None = None, align: bool = False):
        super().__init__(transform, seed, encoded, align)
        self.paths, self.keys = list(paths), list(keys)
        self.min_size, self.max_pixels = int(min_size), int(max_pixels)
        self.labels = None if labels is None else list(labels)
        self.num_classes = None if labels is None else max(labels) + 1
        self.set_landmarks(self.keys, landmarks)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample | EncodedSample:
        raw, _ = read_bytes(self.paths[index])
        return self._item(raw, index, self.paths[index], None if self.labels is None else self.labels[index])


class RecordIODataset(_MapDataset):
    """An insightface RecordIO pair (`rec` and the .idx beside it), each image record read by its
    offset (each loader worker opens the file itself) and labelled with its identity. `keys`
    are the image records' indices, the names a landmarks file uses. A record that cannot be
    read is skipped as "bad_record". Each sample is named `rec#index`. num_classes: the
    `property` file's, else the count of the header's identity records, else None."""

    def __init__(self, rec: str, transform: FaceTransform, min_size: int, seed: int = 0,
                 landmarks: dict[str, np.ndarray] | None = None, encoded: bool = False,
                 max_pixels: int = MAX_PIXELS, align: bool = False):
        super().__init__(transform, seed, encoded, align)
        self.records = InsightFaceRecords(rec, index_of(rec, "data.source"))
        self.records.close()  # (opened again where it is read: in each worker)
        self.keys = [str(i) for i in self.records.images]
        if not self.keys:
            raise ValueError(f"data.source '{rec}': its header names no image records")
        self.min_size, self.max_pixels = int(min_size), int(max_pixels)
        self.num_classes = read_property(rec) or len(self.records.identity_records) or None
        self.set_landmarks(self.keys, landmarks)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Sample | EncodedSample:
        i = self.records.images[index]
        name = f"{self.records.rec}#{i}"
        try:
            header, raw = self.records.read(i)
            label = identity(header, name)
        except (RecordIOError, OSError) as e:
            sample = skipped(BAD_RECORD if isinstance(e, RecordIOError) else "unreadable")
            sample.name = name
            return sample
        return self._item(raw, index, name, label)


def _raise(err: OSError):
    raise err


def _scan_folder(root: str) -> tuple[list[str], list[str]]:
    found = []
    for d, dirs, files in os.walk(root, onerror=_raise):  # (a folder it may not list is an error, not left out)
        dirs.sort()
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                path = os.path.join(d, name)
                found.append((norm_key(os.path.relpath(path, root)), path))
    found.sort()
    return [p for _, p in found], [k for k, _ in found]


def source_root(source: str) -> str:
    """The folder that the keys of an image folder or a .txt list are relative to."""
    return source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))


def _list_label(line: str, list_path: str, n: int) -> tuple[str, int]:
    """A `path label` line -> (path, label)."""
    parts = line.rsplit(None, 1)
    try:
        label = int(parts[1]) if len(parts) == 2 else -1
    except ValueError:
        label = -1
    if label < 0:
        raise ValueError(f"data.source '{list_path}' line {n}: {line[:60]!r} is not 'path label' "
                         "(data.labels=list: the label a whole number >= 0, after a space)")
    return parts[0], label


def _read_list(list_path: str, what: str, labelled: bool = False) -> tuple[list[str], list[str], list[int]]:
    base = source_root(list_path)
    paths, keys, labels = [], [], []
    try:
        with open(list_path) as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError:
        raise ValueError(f"{what} '{list_path}' is not UTF-8 text: give a .txt list of image paths, "
                         "one a line") from None
    for n, line in enumerate(lines, 1):
        if line and not line.startswith("#"):
            if labelled:
                line, label = _list_label(line, list_path, n)
                labels.append(label)
            paths.append(os.path.join(base, line))
            keys.append(norm_key(line))
    return paths, keys, labels


def folder_labels(keys: list[str], root: str) -> list[int]:
    """Each image's identity: the folder right under `root` holding it, numbered in sorted name
    order. An image directly in `root` raises, naming it."""
    names = [k.split("/", 1)[0] if "/" in k else None for k in keys]
    if None in names:
        loose = keys[names.index(None)]
        raise ValueError(f"data.source '{root}': '{loose}' is not in an identity folder "
                         "(data.labels=folders reads root/<identity>/<image>)")
    number = {name: i for i, name in enumerate(sorted(set(names)))}
    return [number[n] for n in names]


def image_files(source: str, what: str = "data.source") -> tuple[list[str], list[str]]:
    """An image folder or a .txt file list -> (paths, keys: the paths relative to the folder
    or as listed). A wrong path or an empty source raises, naming the path."""
    paths, keys, _ = labelled_files(source, "none", what)
    return paths, keys


def labelled_files(source: str, labels: str, what: str = "data.source") -> tuple[list[str], list[str], list | None]:
    """image_files, and each image's label as `labels` (data.labels: 'folders', 'list') gives
    them (None for 'none')."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"{what} '{source}': no such file or directory")
    if os.path.isdir(source):
        if labels == "list":
            raise ValueError(f"data.labels=list reads a .txt list of 'path label' lines; data.source '{source}' "
                             "is a folder (use data.labels=folders)")
        paths, keys = _scan_folder(source)
        if not paths:
            raise ValueError(f"{what} '{source}': no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                             "in this folder or below")
    elif source.lower().endswith(".txt"):
        if labels == "folders":
            raise ValueError(f"data.labels=folders reads an image folder; data.source '{source}' is a list "
                             "(use data.labels=list, with lines 'path label')")
        paths, keys, listed = _read_list(source, what, labels == "list")
        if not paths:
            raise ValueError(f"{what} '{source}': the file list has no entries")
        if not any(os.path.exists(p) for p in paths[:10]):
            raise FileNotFoundError(f"{what} '{source}': listed files do not exist (first: '{paths[0]}'); "
                                    "paths are relative to the list's folder")
    else:
        kinds = ("'faces', a folder, a .txt file list, a .rec file or .tar shard(s)" if what == "data.source"
                 else "a folder or a .txt file list")
        raise ValueError(f"{what} '{source}' is not {kinds}")
    if labels == "none":
        return paths, keys, None
    return paths, keys, folder_labels(keys, source) if labels == "folders" else listed


__all__ = ["IMAGE_EXTENSIONS", "ASTRONAUT_FACE_BOX", "embedded_faces", "FacesDataset", "ImageFilesDataset",
           "RecordIODataset", "image_files", "labelled_files", "folder_labels", "source_root"]
