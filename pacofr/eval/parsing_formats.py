"""Face parsing in the benchmarks' own layouts (`eval-parsing --format lapa|celebamask`).

- lapa: LaPa (Liu et al., AAAI 2020). `--train` / `--test` name a split folder (`train`, `val`
  or `test`) holding `images/NAME.jpg`, `labels/NAME.png` (class ids, LAPA_CLASSES) and
  `landmarks/NAME.txt` (the point count, 106, on the first line, then `x y` a line). Each face
  is warped by the least-squares similarity (no reflection) that takes five of its points, the
  eye centres 104 and 105, the nose tip 54 and the mouth corners 84 and 90 (0-based, in the
  106-point markup LaPa's release defines, that of JD's 106-point landmark challenge), onto
  the ArcFace five-point template shrunk by HEAD about the crop's centre (the crop then holds
  the whole head, hair included).
- celebamask: CelebAMask-HQ (Lee et al., CVPR 2020). `--train` / `--test` name the release's
  folder: `CelebA-HQ-img/<i>.jpg` (1024 px), `CelebAMask-HQ-mask-anno/<i // 2000>/<iiiii>_<part>.png`
  (one binary 512 px mask per part present) and `CelebA-HQ-to-CelebA-mapping.txt`; the split is
  CelebA's (`list_eval_partition.txt`, --partition) of each image's CelebA original (24183
  train, 2993 val, 2824 test), the common one. The parts are merged into one class-id map,
  class k + 1 for CELEBAMASK_PARTS[k], a later part drawn over an earlier one (the order of the
  release's own conversion script). The images are aligned already: the whole image is the crop.

To fit, the image (bilinear) and its label map (nearest neighbour; pixels from outside it
IGNORE) are warped into the crop. To score, the probe's per-pixel prediction in the crop is
warped back onto the label map's own pixels (nearest neighbour; pixels from outside the crop
are predicted background) and compared there: LaPa at each image's resolution, CelebAMask-HQ
at the masks' 512 px.
"""

import os

import numpy as np
import torch
from PIL import Image

from ..data.align import template, similarity, warp
from ..data.decode import decode_rgb, draft, load, open_image, read_bytes
from ..data.items import MAX_PIXELS
from ..data.sources import source_root
from ..data.transforms import normalize
from .celeba import read_hq_mapping, read_partition, split_keys
from .common import FaceImages
from .parsing import IGNORE, _confusion, _label_maps, read_ids

LAPA_CLASSES = ("background", "skin", "left_eyebrow", "right_eyebrow", "left_eye", "right_eye", "nose",
                "upper_lip", "inner_mouth", "lower_lip", "hair")
LAPA_FIVE = (104, 105, 54, 84, 90)  # eye centres, nose tip, mouth corners (image left first): the template's
HEAD = 0.5  # the template's scale about the crop's centre
CELEBAMASK_PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth",
                    "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
CELEBAMASK_CLASSES = ("background", *CELEBAMASK_PARTS)


def head_template(size: int) -> np.ndarray:
    """The five template points [5, 2] of an S x S crop, shrunk by HEAD about its centre."""
    return size / 2 + HEAD * (template(size) - size / 2)


def scaled(matrix: np.ndarray, k: float) -> np.ndarray:
    """The 2 x 3 matrix of points given k times smaller (p -> matrix(k p))."""
    return np.hstack([matrix[:, :2] * k, matrix[:, 2:]])


def read_lapa_landmarks(path: str) -> np.ndarray | None:
    """A LaPa landmarks file -> [K, 2], or None when it does not parse (K: its first line)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.split() for ln in f if ln.strip()]
        k = int(lines[0][0])
        points = np.array([[float(v) for v in ln] for ln in lines[1:]])
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    ok = len(lines[0]) == 1 and points.shape == (k, 2) and np.isfinite(points).all()
    return points if ok else None


class WarpedParsing(FaceImages):
    """A benchmark's faces, each warped into the crop by its 2 x 3 matrix (`matrix`: the image's
    pixels -> the crop's) with its label map (`ids`, at the image's resolution or a fraction of
    it). Items: (image [3, S, S] normalized, labels [S, S]) to fit; with `scored_back`, (image,
    its index [1]) and the scores are taken by `confusions` at the label map's resolution."""

    protocol: dict
    class_names: tuple

    def __init__(self, source: str, img_size: int, what: str, max_pixels: int):
        super().__init__(source, img_size, what, max_pixels)
        self.num_classes, self.scored_back = len(self.class_names), what == "--test"

    def ids(self, index: int):
        raise NotImplementedError

    def labelled(self) -> list[int]:
        """The indices the held-out tenth is drawn from: every face (a face without labels is
        found out, and counted, when it is read)."""
        return list(range(len(self)))

    def matrix(self, index: int, width: int, height: int):
        raise NotImplementedError

    def _read(self, index: int):
        """(ids, the image opened, its matrix), or (None, reason)."""
        ids, reason = self.ids(index)
        if ids is None:
            return None, reason
        im, reason = open_image(read_bytes(self.paths[index])[0], 1)
        if im is None:
            return None, reason
        (iw, ih), (lh, lw) = im.size, ids.shape
        if abs(lw * ih - lh * iw) > max(iw, ih):  # (another aspect, beyond a pixel's rounding)
            return None, "labels_size_mismatch"
        matrix, reason = self.matrix(index, iw, ih)
        return (None, reason) if matrix is None else ((ids, im, matrix), None)

    def __getitem__(self, index: int):
        read, reason = self._read(index)
        if read is None:
            return None, reason
        ids, im, matrix = read
        iw, lw = im.size[0], ids.shape[1]
        scale, reason = draft(im, None, self.max_pixels)  # (over the budget: a JPEG at reduced scale)
        rgb, reason = (None, reason) if scale is None else decode_rgb(im)
        if rgb is None:
            return None, reason
        s = self.transform.size
        x = normalize(torch.from_numpy(np.asarray(warp(rgb, scaled(matrix, scale), (s, s))).copy())[None])[0]
        if self.scored_back:
            return (x, torch.tensor([index])), None
        labels = warp(Image.fromarray(ids.astype(np.uint8), "L"), scaled(matrix, iw / lw), (s, s),
                      Image.Resampling.NEAREST, IGNORE)
        return (x, torch.from_numpy(np.asarray(labels).astype(np.int64))), None

    def back(self, pred: np.ndarray, matrix: np.ndarray, label_size: tuple[int, int]) -> np.ndarray:
        """A prediction [S, S] in the crop -> on the label map's pixels (width, height), by the
        inverse warp (nearest neighbour; from outside the crop: background)."""
        inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
        out = warp(Image.fromarray(pred.astype(np.uint8), "L"), inverse, label_size, Image.Resampling.NEAREST, 0)
        return np.asarray(out).astype(np.int64)

    def confusions(self, preds: list[torch.Tensor], indices: torch.Tensor) -> list[torch.Tensor]:
        """The confusion of each prediction [B, S, S] (crops of the faces `indices` [B, 1]) against
        the label maps at their own resolution."""
        c = self.num_classes
        out = [torch.zeros(c, c, dtype=torch.long) for _ in preds]
        for b, index in enumerate(indices[:, 0].tolist()):
            (ids, im, matrix), _ = self._read(index)
            to_crop = scaled(matrix, im.size[0] / ids.shape[1])
            truth = torch.from_numpy(ids)
            for conf, pred in zip(out, preds):
                conf += _confusion(torch.from_numpy(self.back(pred[b].numpy(), to_crop, ids.shape[::-1])), truth, c)
        return out


class LapaFaces(WarpedParsing):
    """The faces of a LaPa split folder (module doc)."""

    class_names = LAPA_CLASSES
    protocol = {"protocol": "lapa",
                "source": "LaPa (Liu et al., AAAI 2020): {train,val,test}/{images,labels,landmarks}",
                "conventions": {
                    "crop": f"the similarity taking the 106 points {list(LAPA_FIVE)} (eye centres, nose tip, mouth "
                            f"corners, 0-based, LaPa's 106-point markup) onto the ArcFace template scaled by {HEAD} "
                            "about the crop's centre",
                    "scoring": "predictions warped back to each image's resolution (nearest neighbour; outside the "
                               "crop: background) and compared with its label map there",
                    "mean": "over the 10 classes other than background, hair included (as LaPa's tables)"}}

    def __init__(self, split: str, img_size: int, what: str, max_pixels: int = MAX_PIXELS):
        folders = [os.path.join(split, f) for f in ("images", "labels", "landmarks")]
        missing = next((f for f in folders if not os.path.isdir(f)), None)
        if missing is not None:
            raise ValueError(f"{what} '{split}': no folder '{missing}': give a LaPa split folder "
                             "(train, val or test, holding images/, labels/ and landmarks/)")
        super().__init__(folders[0], img_size, what, max_pixels)
        stems = [os.path.splitext(k)[0] for k in self.keys]
        self.labels = [os.path.join(folders[1], s + ".png") for s in stems]
        self.landmarks = [os.path.join(folders[2], s + ".txt") for s in stems]
        maps = {os.path.normpath(p) for p in self.labels}
        self.orphans = [(p, "no_image") for p in _label_maps(folders[1]) if os.path.normpath(p) not in maps]

    def labelled(self) -> list[int]:
        return [i for i, path in enumerate(self.labels) if os.path.isfile(path)]

    def ids(self, index: int):
        if not os.path.isfile(self.labels[index]):
            return None, "no_labels"
        return read_ids(self.labels[index], self.num_classes, self.max_pixels)

    def matrix(self, index: int, width: int, height: int):
        if not os.path.isfile(self.landmarks[index]):
            return None, "no_landmarks"
        points = read_lapa_landmarks(self.landmarks[index])
        if points is None or len(points) <= max(LAPA_FIVE):
            return None, "landmarks_invalid"
        five = points[list(LAPA_FIVE)]
        if ((five - five.mean(0)) ** 2).sum() <= 0:
            return None, "landmarks_invalid"
        return similarity(five, head_template(self.transform.size)), None


class CelebAMaskFaces(WarpedParsing):
    """The faces of one split of CelebAMask-HQ (module doc): --train the train partition,
    --test the test one."""

    class_names = CELEBAMASK_CLASSES
    protocol = {"protocol": "celebamask",
                "source": "CelebAMask-HQ (Lee et al., CVPR 2020): CelebA-HQ-img, CelebAMask-HQ-mask-anno, "
                          "CelebA-HQ-to-CelebA-mapping.txt; split by CelebA's list_eval_partition.txt",
                "conventions": {
                    "merge": "class k + 1 for part k of " + ", ".join(CELEBAMASK_PARTS) + "; a later part over an "
                             "earlier one",
                    "split": "each image's CelebA original's partition: 0 train (--train), 2 test (--test)",
                    "crop": "the whole (aligned) image, resized to the model's input",
                    "scoring": "predictions resized back to the masks' resolution (nearest neighbour) and compared "
                               "there",
                    "mean": "over the 18 classes other than background present in the test labels"}}

    def __init__(self, root: str, partition: str | None, img_size: int, what: str, max_pixels: int = MAX_PIXELS):
        images, self.anno = os.path.join(root, "CelebA-HQ-img"), os.path.join(root, "CelebAMask-HQ-mask-anno")
        for folder in (images, self.anno):
            if not os.path.isdir(folder):
                raise ValueError(f"{what} '{root}': no folder '{folder}': give the CelebAMask-HQ folder")
        partition = partition or os.path.join(root, "list_eval_partition.txt")
        mapping = read_hq_mapping(os.path.join(root, "CelebA-HQ-to-CelebA-mapping.txt"), what)
        parts = read_partition(partition, "--partition")
        hq = sorted(mapping)
        keep = set(split_keys([mapping[i] for i in hq], parts, what.lstrip("-"), "--partition", partition))
        super().__init__(images, img_size, what, max_pixels)
        wanted = {f"{i}.jpg" for i in hq if mapping[i] in keep}
        where = dict(zip(self.keys, self.paths))
        self.keys = sorted((k for k in where if k in wanted), key=lambda k: int(k.split(".")[0]))
        self.paths = [where[k] for k in self.keys]
        self.orphans = [(os.path.join(source_root(images), k), "no_image") for k in sorted(wanted - set(where))]
        if not self.keys:
            raise ValueError(f"{what} '{root}': no image of its {what.lstrip('-')} split in '{images}'")

    def ids(self, index: int):
        i = int(self.keys[index].split(".")[0])
        merged = None
        for k, part in enumerate(CELEBAMASK_PARTS, 1):
            path = os.path.join(self.anno, str(i // 2000), f"{i:05d}_{part}.png")
            if not os.path.isfile(path):
                continue  # (a part the face does not show)
            mask, reason = open_image(read_bytes(path)[0], 1)
            if mask is None or mask.size[0] * mask.size[1] > self.max_pixels:
                return None, reason or "too_large"
            reason = load(mask)
            if reason:
                return None, reason
            on = np.asarray(mask)
            on = (on[..., 0] if on.ndim == 3 else on) != 0
            if merged is None:
                merged = np.zeros(on.shape, dtype=np.int64)
            if on.shape != merged.shape:
                return None, "labels_size_mismatch"
            merged[on] = k
        return (None, "no_labels") if merged is None else (merged, None)

    def matrix(self, index: int, width: int, height: int):
        s = self.transform.size
        return np.array([[s / width, 0.0, 0.0], [0.0, s / height, 0.0]]), None


__all__ = ["LapaFaces", "CelebAMaskFaces", "WarpedParsing", "LAPA_CLASSES", "LAPA_FIVE", "HEAD", "CELEBAMASK_PARTS",
           "CELEBAMASK_CLASSES", "head_template", "read_lapa_landmarks", "scaled"]
