"""data.decoder='dali': DALI decodes (on CPU operators here; 'mixed' is the same pipeline
with nvJPEG) what the DataLoader workers left encoded. Compared with the PIL path on the same
samples: skip and repair counts, landmarks, pixels; a file DALI cannot decode is skipped and
counted without stopping the run; training is deterministic across workers and resumes."""

import dataclasses
import importlib.util
import json
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pacofr.config import ConfigError, load_config
from pacofr.data import MaskingCollate, build_dataset, collate, collate_encoded, denormalize
from pacofr.data.transforms import FLIP_PERM
from pacofr.masking import sample_masks
from pacofr.engine.pretrain import pretrain
from test_data import POINTS, S, cfg, encode, face_rgb, messy, shards  # noqa: F401 (fixtures)
from test_train import _cfg, _losses

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None,
                                reason="NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")


def _decoder_size(size, max_batch):
    from pacofr.data.dali import DaliDecoder

    return DaliDecoder(size, max_batch, "cpu", threads=2)


def _decoder(max_batch):
    return _decoder_size(S, max_batch)


def replace_decoder(data_cfg, decoder):
    return dataclasses.replace(data_cfg, decoder=decoder)


def _both(source: str, **kw):
    """The PIL and the encoded dataset of one source, with the same seed and augmentation."""
    return (build_dataset(cfg(source=source, **kw), S, seed=3),
            build_dataset(cfg(source=source, decoder="dali", **kw), S, seed=3))


def _decode(decoder, items):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decoder(collate_encoded(items))
    return out, [str(w.message) for w in caught]


def _assert_same_samples(pil_batch, dali_batch, mean_tol, max_tol):
    """The same samples, landmarks and counts; pixels (in 0..255) within the tolerances."""
    assert dali_batch.issues == pil_batch.issues
    assert dali_batch.images.shape == pil_batch.images.shape
    assert dali_batch.images.dtype == torch.float32 and torch.isfinite(dali_batch.images).all()
    assert torch.equal(dali_batch.landmarks.isnan(), pil_batch.landmarks.isnan())
    assert torch.allclose(dali_batch.landmarks.nan_to_num(), pil_batch.landmarks.nan_to_num())
    diff = (denormalize(dali_batch.images) - denormalize(pil_batch.images)).abs() * 255
    assert diff.mean((1, 2, 3)).max() <= mean_tol and diff.max() <= max_tol, (diff.mean((1, 2, 3)), diff.max())


@needs_dali
@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_dali_decodes_what_pil_decodes(messy, jitter):
    """Every file of the messy folder (good, repaired, broken), with crops, flips and jitter:
    the broken ones are caught in the workers (headers, end markers), the rest decoded by DALI
    (no fallback), with the PIL path's counts, landmarks and pixels to rounding."""
    pil, enc = _both(str(messy), color_jitter=jitter)
    a, b = [pil[i] for i in range(len(pil))], [enc[i] for i in range(len(enc))]
    decoder = _decoder(len(b))
    out, warned = _decode(decoder, b)
    assert decoder.host_batches == 0 and not warned
    assert out.images.shape[0] == 9 and out.issues["truncated"] == 1
    # (no drafting at these sizes: the difference is the decoders' and resamplers' rounding)
    _assert_same_samples(collate(a), out, mean_tol=0.5, max_tol=2.0)


def _broken_inside(png: bytes) -> bytes:
    """Zeros in the middle of the image data: the header and end marker are intact."""
    raw = bytearray(png)
    at = raw.index(b"IDAT") + 200
    raw[at:at + 300] = bytes(300)
    return bytes(raw)


@pytest.fixture(scope="module")
def broken_inside(tmp_path_factory):
    """Two PNGs that only a decoder finds broken (one gray, one with landmarks outside the
    image), between good files, and their landmark file."""
    d = tmp_path_factory.mktemp("broken_inside")
    face_rgb(0).save(d / "a.jpg", quality=92)
    (d / "b.png").write_bytes(_broken_inside(encode(face_rgb(1).convert("L"), "PNG")))
    face_rgb(2).convert("L").save(d / "c.png")
    (d / "d.png").write_bytes(_broken_inside(encode(face_rgb(3), "PNG")))
    face_rgb(4).save(d / "e.jpg", quality=92)
    pts = POINTS.tolist()
    (d / "lm.json").write_text(json.dumps({"a.jpg": pts, "c.png": pts, "d.png": (POINTS + 200).tolist(),
                                           "e.jpg": pts}))
    return d


@needs_dali
def test_dali_fallback_counts_and_drops_as_pil(broken_inside):
    """A batch DALI cannot decode goes to PIL: the broken files are skipped and counted by
    their skip reason alone (their repair or landmark issue is not counted, as on the PIL
    path), their rows of landmarks and masks dropped, the others kept; the rebuilt pipeline
    decodes the next batch."""
    d = broken_inside
    c = load_config("tiny", [f"data.source={d}", f"data.landmarks={d / 'lm.json'}", "data.decoder=dali",
                             "data.color_jitter=0.3"])
    pil = build_dataset(replace_decoder(c.data, "pil"), 64, seed=3)
    enc = build_dataset(c.data, 64, seed=3)
    a, b = [pil[i] for i in range(5)], [enc[i] for i in range(5)]
    assert collate(a).issues == {"truncated": 2, "gray_converted": 1}
    batch = MaskingCollate(c, sample_masks)(b)
    masks = batch.masks
    decoder = _decoder_size(64, 5)
    with pytest.warns(RuntimeWarning, match="Failed to decode sample #1"):
        out = decoder(batch)
    assert decoder.host_batches == 1
    _assert_same_samples(collate(a), out, mean_tol=1e-3, max_tol=0.01)  # (PIL decoded this batch)
    rows = torch.tensor([0, 2, 4])
    assert torch.equal(out.masks.mask, masks.mask[rows]) and torch.equal(out.masks.regions, masks.regions[rows])
    out, warned = _decode(decoder, [b[i] for i in (0, 2, 4)])
    assert decoder.host_batches == 1 and not warned and out.images.shape[0] == 3


@needs_dali
def test_dali_large_jpegs_and_landmarks_follow_the_crop(tmp_path):
    """400-px JPEGs with landmarks (PIL drafts them at 1/4 scale, DALI resizes the full decode):
    the pixels agree to a few levels, the landmarks exactly, and each landmark sits on the dot
    drawn at its position."""
    from test_data import COLOURS, dot_centre, dotted_image

    big = 400
    for i in range(6):
        dotted_image().resize((big, big), Image.NEAREST).save(tmp_path / f"f{i}.jpg", quality=95)
    pts = POINTS * (big / 96)
    (tmp_path / "lm.json").write_text(json.dumps({f"f{i}.jpg": pts.tolist() for i in range(6)}))
    pil, enc = _both(str(tmp_path), landmarks=str(tmp_path / "lm.json"), scale_min=0.6, color_jitter=0.0)
    a, b = [pil[i] for i in range(6)], [enc[i] for i in range(6)]
    out, warned = _decode(_decoder(6), b)
    assert not warned
    _assert_same_samples(collate(a), out, mean_tol=1.0, max_tol=40.0)
    flips = [it.params["flip"] for it in b]
    assert any(flips) and not all(flips)  # both cases seen
    for img, lm, flip in zip(denormalize(out.images), out.landmarks, flips):
        for j in range(5):  # after a flip, point j is the mirror of point FLIP_PERM[j]
            colour = COLOURS[FLIP_PERM[j] if flip else j]
            assert torch.allclose(dot_centre(img, colour), lm[j], atol=1.0), (j, lm[j])


@needs_dali
def test_dali_shards_and_skips_match_pil(shards):
    d, _ = shards
    pil, enc = _both(str(d / "train-{000..003}.tar"), color_jitter=0.2)
    a, b = list(pil), list(enc)
    out, _ = _decode(_decoder(len(b)), b)
    _assert_same_samples(collate(a), out, mean_tol=0.5, max_tol=2.0)
    assert out.issues == {"not_an_image": 1, "truncated": 1, "landmarks_invalid": 1}


@needs_dali
def test_dali_training_is_deterministic_and_resumes(tmp_path):
    """The same losses with 0 and 2 workers (masks and augmentation come from each sample's
    identity), and a run resumed at step 4 ends with the uninterrupted run's weights."""
    over = {"data.decoder": "dali", "data.dali_threads": 1, "train.max_steps": 6, "train.ckpt_every": 4,
            "train.batch_size": 8}
    runs = {}
    for workers in (0, 2):
        summary = pretrain(_cfg(**over, **{"data.num_workers": workers}), tmp_path / f"w{workers}")
        assert summary["steps"] == 6 and summary["skipped_steps"] == 0
        runs[workers] = _losses(tmp_path / f"w{workers}")
    assert runs[0] == runs[2] and len(runs[0]) == 6
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "w0" / "checkpoints" / "ckpt-00000004", resumed / "checkpoints" / "ckpt-00000004")
    pretrain(_cfg(**over), resumed, resume="auto")
    assert _losses(resumed) == runs[0][4:]
    a = load_file(str(tmp_path / "w0" / "encoder.safetensors"))
    b = load_file(str(resumed / "encoder.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dali_config_is_checked():
    with pytest.raises(ConfigError, match="data.decoder must be 'pil' or 'dali'"):
        load_config("tiny", ["data.decoder=nvjpeg"])
    with pytest.raises(ConfigError, match="data.dali_device"):
        load_config("tiny", ["data.dali_device=gpu"])
    from pacofr.data.dali import resolve_device

    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ConfigError, match="no CUDA device.*dali_device=cpu"):
            resolve_device("mixed")


def test_missing_dali_says_how_to_install(monkeypatch):
    from pacofr.data.dali import DaliDecoder

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ConfigError, match="pip install nvidia-dali"):
        DaliDecoder(S, 4, "cpu")


def test_encoded_items_leave_the_pixels_encoded(messy):
    """The worker side needs no DALI: header checks, repairs re-encoded as BMP, the rest as read."""
    from pacofr.data.items import make_encoded_item, make_item
    from pacofr.data.transforms import FaceTransform

    t = FaceTransform(S)
    raw = (messy / "face0.jpg").read_bytes()
    item = make_encoded_item(raw, None, t, 32, 5)
    assert item.data.tobytes() == raw and item.issues == ()
    assert item.landmarks.shape == (5, 2) and item.landmarks.isnan().all()
    cmyk = make_encoded_item((messy / "cmyk.jpg").read_bytes(), None, t, 32, 5)
    assert cmyk.issues == ("cmyk_converted",) and cmyk.data[:4].tobytes() == b"\x89PNG"
    cut = make_encoded_item(raw[:-2], None, t, 32, 5)  # no end marker: decoded here, as make_item does
    assert cut.issues == make_item(raw[:-2], None, t, 32, 5).issues
    assert Image.open((messy / "cmyk.jpg")).size == (96, 96)
    for name, reason in (("empty.jpg", "empty"), ("text.jpg", "not_an_image"), ("tiny.png", "too_small")):
        assert make_encoded_item((messy / name).read_bytes(), None, t, 32, 5).issues == (reason,)
    # the same crop, flip and jitter as make_item draws from the seed; masks seeded per sample
    assert item.params == t.params(96, 96, 5)
    assert make_encoded_item(raw, None, t, 32, 6).mask_seed != item.mask_seed
    assert np.array_equal(make_encoded_item(raw, None, t, 32, 5).data, item.data)
    batch = collate_encoded([item, cmyk, make_encoded_item(b"", None, t, 32, 5)])
    assert len(batch.encoded) == 2 and batch.landmarks.shape == (2, 5, 2)
    assert batch.issues == {"empty": 1} and [r.issues for r in batch.encoded] == [(), ("cmyk_converted",)]
    with pytest.raises(TypeError, match="data.decoder='pil'"):  # a dataset that decodes its images itself
        collate_encoded([make_item(raw, None, t, 32, 5)])
