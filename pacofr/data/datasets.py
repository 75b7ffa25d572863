"""Datasets of face crops: embedded faces, image folders, file lists, WebDataset shards.

Every item is dict(image=FloatTensor[3, S, S] (ImageNet-normalized), landmarks=FloatTensor[5, 2]
(x, y in output pixels, NaN when unknown), issue=str | None); a skipped sample is
dict(image=None, landmarks=None, issue=reason). `collate` drops skipped items and counts every
reason, so reasons reach the main process through DataLoader workers.

Augmentation randomness is a pure function of the sample's identity and the epoch:
(seed, epoch, index) for map-style datasets, (seed, epoch, shard, position in shard) for
shards, so it does not depend on the rank, the number of workers, the shuffle, or on whether
the run was resumed. `set_epoch(epoch)` must be called before the DataLoader iterator is made
(workers copy the dataset when they start: use persistent_workers=False).
"""

import io
import json
import os
import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .decode import REASONS, decode_rgb, draft, join_issues, open_image, read_bytes, split_issues
from .landmarks import NAN5, check_landmarks, load_landmarks_file, norm_key, parse_points
from .transforms import FaceTransform, sample_seed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# The astronaut's face in skimage.data.astronaut() (512 x 512): PIL box (left, top, right,
# bottom), chosen by eye on a 32-px grid drawn over the image: hair top to chin, both ears.
ASTRONAUT_FACE_BOX = (150, 30, 300, 180)
N_LFW_FACES = 100  # lfw_subset(): the first 100 of its 200 images are faces
MASK_KEY = 0x6D61736B  # derives a sample's mask seed from its augmentation seed


def skipped(reason: str) -> dict:
    return dict(image=None, landmarks=None, issue=reason)


def _landmarks_missing(item: dict) -> dict:
    """An item of a dataset that gives landmarks, but none for this image: the masker's template
    stands in, and it is counted (a skipped item counts its skip reason alone)."""
    if item.get("image") is not None or item.get("encoded") is not None:
        item["issue"] = join_issues([item["issue"], "landmarks_missing"])
    return item


def collate(items: list[dict]) -> dict:
    """-> dict(images=[B, 3, S, S], landmarks=[B, 5, 2], issues={reason: count}). Skipped items
    are dropped; every reason (skipped and repaired) is counted. When every item was skipped,
    B = 0 and, the size being unknown, images is [0, 3, 0, 0]."""
    issues: dict[str, int] = {}
    images, landmarks = [], []
    for it in items:
        for r in split_issues(it.get("issue")):
            issues[r] = issues.get(r, 0) + 1
        if it.get("image") is not None:
            images.append(it["image"])
            landmarks.append(it["landmarks"])
    if images:
        return dict(images=torch.stack(images), landmarks=torch.stack(landmarks), issues=issues)
    return dict(images=torch.zeros(0, 3, 0, 0), landmarks=torch.zeros(0, 5, 2), issues=issues)


def _given_points(points: np.ndarray | None, width: int, height: int) -> tuple[np.ndarray, list[str]]:
    if points is None:
        return NAN5, []
    if not check_landmarks(points, width, height):
        return NAN5, ["landmarks_invalid"]
    return points, []


def make_item(raw: bytes | None, points: np.ndarray | None, transform: FaceTransform, min_size: int,
              seed: int) -> dict:
    """Encoded image (+ given landmarks in original pixels, or None) -> item."""
    im, reason = open_image(raw, min_size)
    if im is None:
        return skipped(reason)
    width, height = im.size
    points, issues = _given_points(points, width, height)
    params = transform.params(width, height, seed)
    scale = draft(im, transform.draft_size(params, width, height))
    rgb, repair = decode_rgb(im)
    if rgb is None:
        return skipped(repair)
    image, lm = transform.apply(rgb, params, torch.from_numpy(np.array(points, dtype=np.float32)), scale)
    return dict(image=image, landmarks=lm, issue=join_issues([repair] + issues))


# What DALI decodes as PIL does; anything else (alpha, CMYK, palette, 16 bits, BMP's many
# layouts, other formats) is decoded and repaired in the worker and passed on as PNG.
DALI_FORMATS = ("JPEG", "PNG")
DALI_MODES = ("RGB", "L")
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)  # (fast; DALI decodes it anywhere)
    return buf.getvalue()


def make_encoded_item(raw: bytes | None, points: np.ndarray | None, transform: FaceTransform, min_size: int,
                      seed: int) -> dict:
    """Like make_item, but leaves the pixels encoded for DaliDecoder (data.decoder='dali'):
    dict(encoded=uint8 array, params (crop, flip, jitter), landmarks=[5, 2] (output pixels),
    mask_seed, issue). A JPEG or PNG in a mode DALI reads as PIL does, and ending with its end
    marker, is passed on as read (only its header is parsed here); anything else is decoded
    here, skipped or repaired as make_item does. A file broken inside is caught by the
    decoder (DaliDecoder falls back to PIL)."""
    im, reason = open_image(raw, min_size)
    if im is None:
        return skipped(reason)
    width, height = im.size
    points, issues = _given_points(points, width, height)
    repair = None
    if (im.format not in DALI_FORMATS or im.mode not in DALI_MODES or "transparency" in im.info
            or not raw.rstrip(b"\0").endswith(_END_MARKERS[im.format])):  # (cut short: nvJPEG might not tell)
        rgb, repair = decode_rgb(im)
        if rgb is None:
            return skipped(repair)
        raw = png_bytes(rgb)
    elif im.mode == "L":
        repair = "gray_converted"  # DALI decodes it to RGB, as to_rgb does
    params = transform.params(width, height, seed)
    return dict(encoded=np.frombuffer(raw, dtype=np.uint8), params=params,
                landmarks=transform.landmarks(torch.from_numpy(np.array(points, dtype=np.float32)), params),
                mask_seed=sample_seed(seed, MASK_KEY), issue=join_issues([repair] + issues))


def collate_encoded(items: list[dict]) -> dict:
    """Encoded items -> dict(encoded, params, mask_seeds, row_issues: lists; landmarks
    [B, 5, 2]; issues), the skipped items dropped and counted as in `collate`. The repairs and
    landmark issues of the kept rows stay in row_issues until DaliDecoder has decoded them (a
    row it cannot decode is counted by its skip reason alone, as make_item does)."""
    issues: dict[str, int] = {}
    kept = []
    for it in items:
        if it.get("encoded") is not None:
            kept.append(it)
        elif it.get("image") is not None:
            raise TypeError("data.decoder='dali' needs items with encoded pixels (make_encoded_item); this "
                            "dataset decodes its images itself: use data.decoder='pil'")
        else:
            for r in split_issues(it.get("issue")):
                issues[r] = issues.get(r, 0) + 1
    return dict(encoded=[it["encoded"] for it in kept], params=[it["params"] for it in kept],
                mask_seeds=[it["mask_seed"] for it in kept], row_issues=[split_issues(it["issue"]) for it in kept],
                landmarks=torch.stack([it["landmarks"] for it in kept]) if kept else torch.zeros(0, 5, 2),
                issues=issues)


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
    def __init__(self, transform: FaceTransform, seed: int, encoded: bool):
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.make_item = make_encoded_item if encoded else make_item

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def sample_seed(self, index: int) -> int:
        return sample_seed(self.seed, self.epoch, index)


class FacesDataset(_MapDataset):
    """Source "faces": 101 real faces embedded in scikit-image; landmarks unknown (NaN).
    `encoded`: items for DaliDecoder (make_encoded_item), the faces encoded as PNG."""

    def __init__(self, img_size: int, transform: FaceTransform, seed: int = 0, encoded: bool = False):
        super().__init__(transform, seed, encoded)
        self.images = embedded_faces(img_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        im = Image.fromarray(self.images[index])
        if self.make_item is make_encoded_item:
            return make_encoded_item(png_bytes(im), None, self.transform, 0, self.sample_seed(index))
        image, lm = self.transform(im, torch.from_numpy(NAN5.copy()), self.sample_seed(index))
        return dict(image=image, landmarks=lm, issue=None)


class ImageFilesDataset(_MapDataset):
    """An image folder or a file list. `keys` are the paths relative to the folder (or as the
    list writes them), the names a landmarks file uses. `encoded`: items for DaliDecoder."""

    def __init__(self, paths: list[str], keys: list[str], transform: FaceTransform, min_size: int,
                 seed: int = 0, landmarks: dict[str, np.ndarray] | None = None, encoded: bool = False):
        super().__init__(transform, seed, encoded)
        self.paths, self.keys, self.min_size = list(paths), list(keys), int(min_size)
        self.points = np.full((len(keys), 5, 2), np.nan, dtype=np.float32)
        self.has_points = np.zeros(len(keys), dtype=bool)
        self.expects_points = landmarks is not None  # (a landmarks file: an image it lacks is counted)
        for i, k in enumerate(self.keys):
            if landmarks and k in landmarks:
                self.points[i] = landmarks[k]
                self.has_points[i] = True

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        raw, _ = read_bytes(self.paths[index])
        points = self.points[index] if self.has_points[index] else None
        item = self.make_item(raw, points, self.transform, self.min_size, self.sample_seed(index))
        return _landmarks_missing(item) if points is None and self.expects_points else item


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


class ShardDataset(IterableDataset):
    """WebDataset .tar shards (read with the `webdataset` library). Rank r of world_size reads
    shards r, r + world_size, ...; inside a DataLoader, worker w of W reads every W-th of
    those. Shard order (per rank, per epoch) and a buffer of `shuffle_buffer` raw samples are
    shuffled with local RNGs seeded from (seed, epoch, rank[, worker]). A sample's image is
    its first member named .jpg/.jpeg/.png/.bmp/.webp; its landmarks come from .json. A tar
    that breaks off (or cannot be opened, or lacks its end-of-archive marker) yields one item
    skipped as "unreadable" after the samples read before the break. `encoded`: items for
    DaliDecoder."""

    def __init__(self, shards: list[str], transform: FaceTransform, min_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0, encoded: bool = False):
        self.shards = list(shards)
        self.make_item = make_encoded_item if encoded else make_item
        self.transform, self.min_size, self.seed = transform, int(min_size), int(seed)
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

    def _item(self, shard: int, pos: int, sample: dict | None) -> dict:
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
        item = self.make_item(raw, points, self.transform, self.min_size, seed)
        return _landmarks_missing(item) if points is None else item

    def __iter__(self):
        samples = self._raw_samples(self.my_shards())
        if self.shuffle_buffer > 1:
            info = get_worker_info()
            wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
            rng = random.Random(sample_seed(self.seed, self.epoch, self.rank, 2, wid, nw))
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        for shard, pos, sample in samples:
            yield self._item(shard, pos, sample)


# -- building ---------------------------------------------------------------------------------
def _expand_shards(source: str) -> list[str] | None:
    """'a-{000..003}.tar' / 'a.tar' / 'dir/*.tar' -> paths, or None when not shards."""
    import glob

    from braceexpand import braceexpand

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


def _scan_folder(root: str) -> tuple[list[str], list[str]]:
    found = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                path = os.path.join(d, name)
                found.append((norm_key(os.path.relpath(path, root)), path))
    found.sort()
    return [p for _, p in found], [k for k, _ in found]


def _read_list(list_path: str) -> tuple[list[str], list[str]]:
    base = os.path.dirname(os.path.abspath(list_path))
    paths, keys = [], []
    with open(list_path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                paths.append(os.path.join(base, line))
                keys.append(norm_key(line))
    return paths, keys


def image_files(source: str, what: str = "data.source") -> tuple[list[str], list[str]]:
    """An image folder or a .txt file list -> (paths, keys: the paths relative to the folder
    or as listed). A wrong path or an empty source raises, naming the path."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"{what} '{source}': no such file or directory")
    if os.path.isdir(source):
        paths, keys = _scan_folder(source)
        if not paths:
            raise ValueError(f"{what} '{source}': no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                             "in this folder or below")
    elif source.lower().endswith(".txt"):
        paths, keys = _read_list(source)
        if not paths:
            raise ValueError(f"{what} '{source}': the file list has no entries")
        if not any(os.path.exists(p) for p in paths[:10]):
            raise FileNotFoundError(f"{what} '{source}': listed files do not exist (first: '{paths[0]}'); "
                                    "paths are relative to the list's folder")
    else:
        kinds = "'faces', a folder, a .txt file list or .tar shard(s)" if what == "data.source" else "a folder or a .txt file list"
        raise ValueError(f"{what} '{source}' is not {kinds}")
    return paths, keys


def build_dataset(cfg, img_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                  augment: bool = True):
    """`cfg` is a `DataConfig`. A map-style Dataset (faces, folder, file list) or an
    IterableDataset (.tar shards, split per rank and per worker). Every one has set_epoch.
    A wrong path or an empty source raises at once, naming the path. With data.decoder='dali'
    the items are left encoded (make_encoded_item) for DaliDecoder."""
    encoded = cfg.decoder == "dali"
    transform = FaceTransform(img_size, cfg.scale_min, cfg.ratio_max, cfg.hflip, cfg.color_jitter, augment)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    source = str(cfg.source)
    if source == "faces":
        if cfg.landmarks:
            raise ValueError("data.landmarks is not used with data.source='faces' (no landmarks exist for them)")
        return FacesDataset(img_size, transform, seed, encoded)

    shards = _expand_shards(source)
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
        return ShardDataset(shards, transform, cfg.min_size, seed, rank, world_size, cfg.shuffle_buffer, encoded)

    paths, keys = image_files(source)
    landmarks = None
    if cfg.landmarks:
        landmarks = load_landmarks_file(cfg.landmarks)
        if not landmarks:
            raise ValueError(f"data.landmarks '{cfg.landmarks}' holds no entries")
        if not any(k in landmarks for k in keys):
            raise ValueError(f"data.landmarks '{cfg.landmarks}': none of its paths (e.g. '{next(iter(landmarks))}') "
                             f"names a file of data.source '{source}' (e.g. '{keys[0]}'); "
                             "paths must be relative to the source folder or list")
    return ImageFilesDataset(paths, keys, transform, cfg.min_size, seed, landmarks, encoded)


__all__ = ["REASONS", "IMAGE_EXTENSIONS", "ASTRONAUT_FACE_BOX", "collate", "collate_encoded", "build_dataset",
           "make_item", "make_encoded_item", "embedded_faces", "image_files", "FacesDataset", "ImageFilesDataset", "ShardDataset", "skipped"]
