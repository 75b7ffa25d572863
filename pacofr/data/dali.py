"""Decoding with NVIDIA DALI (data.decoder='dali'): JPEG decode on the GPU, crop-resize and
flip there, colour jitter and normalization in torch on the same device.

The DataLoader workers still read the files, parse headers, skip and repair, draw each
sample's augmentation (crop box, flip, jitter: `FaceTransform.params`, as with PIL) and its
masks; what they hand over is the encoded bytes (`make_encoded_item`: an EncodedSample).
`DaliDecoder` then turns a Batch of those into images in one pipeline run:

    decoders.image (device 'mixed' = nvJPEG on the GPU, or 'cpu')
      -> resize of the continuous crop box to S x S (bilinear, antialiased; PIL's box resize)
      -> flip -> uint8 [B, S, S, 3] -> transforms.normalize (jitter, ImageNet normalization)

A file cut short (no end marker) is decoded by the worker, as on the PIL path. DALI stops a
whole pipeline on one undecodable file (one broken inside); when it does, the decoder rebuilds
it and decodes that batch with PIL instead, so the file is skipped and counted ("truncated" or
"unreadable") as on the PIL path, and the run goes on.

Pixels differ from the PIL path by the decoders' and resamplers' rounding (PIL drafts a JPEG
at reduced scale first); landmarks, crops, flips, jitter factors and skip reasons are the
same. Masks are seeded by the sample's identity (its augmentation seed), not by its pixels.
"""

import re
import warnings

import numpy as np
import torch

from ..config import ConfigError
from .batch import Batch
from .decode import decode_rgb, open_image
from .transforms import FaceTransform, normalize

INSTALL = "data.decoder='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or the build for your CUDA)"


def _dali():
    try:
        import nvidia.dali as dali
        from nvidia.dali import fn, types
    except ImportError:
        raise ConfigError(INSTALL) from None
    return dali, fn, types


def resolve_device(device: str) -> str:
    """'auto' -> 'mixed' when CUDA is available, else 'cpu'; 'mixed' without CUDA fails here."""
    if device == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    if device == "mixed" and not torch.cuda.is_available():
        raise ConfigError("data.dali_device='mixed' decodes on the GPU, and no CUDA device is available "
                          "(use data.dali_device=cpu)")
    return device


class DaliDecoder:
    """Batch from `collate_encoded` -> the same Batch with images [B, 3, S, S] (float32,
    normalized, on the decode device: CUDA for 'mixed'), `encoded` cleared. Rows that could
    not be decoded are dropped from images, landmarks and masks, and counted."""

    def __init__(self, img_size: int, max_batch: int, device: str = "auto", threads: int = 4,
                 device_id: int | None = None):
        _dali()
        self.size, self.max_batch, self.threads = int(img_size), int(max_batch), int(threads)
        self.device = resolve_device(device)
        if self.device == "mixed":
            self.device_id = torch.cuda.current_device() if device_id is None else int(device_id)
        else:
            self.device_id = None
        self.host_batches = 0  # batches DALI could not decode, decoded with PIL instead
        self.pipe = self._build()

    def _build(self):
        dali, fn, types = _dali()
        gpu = self.device == "mixed"
        pipe = dali.Pipeline(batch_size=self.max_batch, num_threads=self.threads, device_id=self.device_id,
                             exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            # (EXIF orientation ignored, as PIL's decode does: landmarks refer to stored pixels)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       dtype=types.UINT8, adjust_orientation=False)
            images = fn.resize(images, size=[self.size, self.size], roi_start=start, roi_end=end,
                               roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=True)
            pipe.set_outputs(fn.flip(images, horizontal=flip))
        pipe.build()
        return pipe

    def _run(self, encoded: list[np.ndarray], params: list[dict]) -> torch.Tensor:
        boxes = [p["box"] for p in params]  # x0, y0, w, h; DALI takes (y, x): the shape order
        self.pipe.feed_input("encoded", encoded)
        self.pipe.feed_input("roi_start", [np.array([y0, x0], dtype=np.float32) for x0, y0, _, _ in boxes])
        self.pipe.feed_input("roi_end", [np.array([y0 + h, x0 + w], dtype=np.float32) for x0, y0, w, h in boxes])
        self.pipe.feed_input("flip", [np.array(int(p["flip"]), dtype=np.int32) for p in params])
        (out,) = self.pipe.run()
        out = out.as_tensor()
        if self.device == "mixed":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            pixels = torch.empty(out.shape(), dtype=torch.uint8, device=torch.device("cuda", self.device_id))
            stream = torch.cuda.current_stream(pixels.device)
            feed_ndarray(out, pixels, cuda_stream=stream)
            stream.synchronize()  # the next run() reuses DALI's output buffer, which torch's stream reads
            return pixels
        return torch.from_numpy(np.array(out))

    def _run_on_host(self, encoded: list[np.ndarray], params: list[dict]) -> tuple[torch.Tensor, list[int], list]:
        """PIL decodes the batch: (pixels of the decodable rows, their indices, (index, skip
        reason) of the others). The rows are within the pixel budget (make_encoded_item)."""
        transform = FaceTransform(self.size)
        pixels, kept, failed = [], [], []
        for i, (raw, p) in enumerate(zip(encoded, params)):
            im, reason = open_image(raw.tobytes(), 0)
            rgb, repair = (None, reason) if im is None else decode_rgb(im)
            if rgb is None:
                failed.append((i, repair))
                continue
            pixels.append(torch.from_numpy(transform.pixels(rgb, p)))
            kept.append(i)
        stacked = torch.stack(pixels) if pixels else torch.zeros(0, self.size, self.size, 3, dtype=torch.uint8)
        return stacked, kept, failed

    def __call__(self, batch: Batch) -> Batch:
        rows, batch.encoded = batch.encoded, None
        if not rows:
            batch.images = torch.zeros(0, 3, 0, 0)
            return batch
        if len(rows) > self.max_batch:
            raise ValueError(f"a batch of {len(rows)} images; this decoder was built for {self.max_batch}")
        encoded, params = [r.data for r in rows], [r.params for r in rows]
        try:
            pixels = self._run(encoded, params)
        except RuntimeError as e:  # the pipeline is dead after this: rebuild it, decode here
            self.host_batches += 1
            found = re.search(r"Failed to decode sample #\d+", str(e))
            why = found.group(0) if found else str(e).strip().splitlines()[-1][:200]
            warnings.warn(f"DALI could not decode a batch ({why}); decoding it with PIL", RuntimeWarning, stacklevel=2)
            self.pipe = self._build()
            pixels, kept, failed = self._run_on_host(encoded, params)
            batch.issues.update(reason for _, reason in failed)
            batch.skipped.extend((rows[i].name, reason) for i, reason in failed)
            if len(kept) < len(rows):
                at = torch.tensor(kept, dtype=torch.long)
                rows = [rows[i] for i in kept]
                batch.landmarks = batch.landmarks[at]
                if batch.labels is not None:
                    batch.labels = batch.labels[at]
                if batch.masks is not None:
                    batch.masks = batch.masks.select(at)
        for r in rows:  # the repairs and landmark issues of the decoded rows
            batch.issues.update(r.issues)
        if not rows:
            batch.images = torch.zeros(0, 3, 0, 0)
            return batch
        jitter = [r.params["jitter"] for r in rows]
        factors = None if all(j is None for j in jitter) else torch.tensor(
            [j if j is not None else (1.0, 1.0, 1.0) for j in jitter], dtype=torch.float32)
        batch.images = normalize(pixels, factors)
        return batch


__all__ = ["DaliDecoder", "resolve_device", "INSTALL"]
