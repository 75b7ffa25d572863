"""data.decoder='dali': DALI decodes (on CPU operators here; 'mixed' is the same pipeline
with nvJPEG) what the DataLoader workers left encoded. Compared with the PIL path on the same
samples: skip and repair counts, landmarks, pixels; a file DALI cannot decode is skipped and
counted without stopping the run; training is deterministic across workers and resumes. RecordIO
read by DALI's MXNet reader (data.dali_reader=mxnet): every image record once per epoch over
the shards, never the header, the unreadable records counted, the python reader's samples."""

import dataclasses
import gc
import importlib.util
import json
import struct
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


@pytest.fixture(autouse=True)
def _no_dali_pipeline_left():
    """A test's DALI pipelines are destroyed with it: left to the garbage collector, one could
    be finalized in a DataLoader worker that a later test forks, where its destructor waits for
    threads that the fork did not copy."""
    yield
    gc.collect()


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


# DALI's MXNet reader (data.dali_reader=mxnet) on an insightface pair written byte for byte:
# header record 0 naming images 1..23 and identity records 24, 25; record 3 framed in two parts
# (its JPEG holds the magic, in a comment); record 5 without its magic; record 8 cut into parts
# inside its labels (its second label float is the magic's bytes: DALI reads the labels from
# the first part); record 11 a JPEG cut short; record 14's length 4 bytes too long, running
# into record 15; record 23 listed at the offset of record 3's second part. Readable: the 18 of
# 1..22 but 5, 8, 14 and 15.
REC_IMAGES = 23
REC_IDENTITY = {i: (i * 7) % 23 for i in range(1, REC_IMAGES + 1)}
NO_MAGIC, SPLIT_LABELS, CUT, LONG, INSIDE, PARTS = 5, 8, 11, 14, 23, 3
UNREADABLE = {str(i) for i in (NO_MAGIC, SPLIT_LABELS, LONG, LONG + 1, INSIDE)}


def _with_magic_inside(jpeg: bytes) -> bytes:
    """The JPEG with a comment segment right after its start marker holding the RecordIO magic
    at a 4-byte aligned payload offset (24-byte header + 2 + 4 + 2 = 32)."""
    from pacofr.data.recordio import MAGIC

    comment = b"\0\0" + struct.pack("<I", MAGIC) + b"\0\0"
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", 2 + len(comment)) + comment + jpeg[2:]


@pytest.fixture
def mxnet_rec(tmp_path):
    from test_prepare import MAGIC_FLOAT, _frame, _jpeg, _pack

    first_identity = REC_IMAGES + 1
    records = {0: _pack((float(first_identity), float(first_identity + 2)))}
    for i in range(1, REC_IMAGES):
        image = _jpeg(i, size=(40 + i, 44))
        image = {PARTS: _with_magic_inside(image), CUT: image[: len(image) // 2]}.get(i, image)
        label = {SPLIT_LABELS: (float(REC_IDENTITY[i]), MAGIC_FLOAT, 0.5),
                 9: (float(REC_IDENTITY[i]), 0.25, 7.0)}.get(i, float(REC_IDENTITY[i]))
        records[i] = _pack(label, image, id_=i)
    records[first_identity], records[first_identity + 1] = _pack((1.0, 9.0)), _pack((9.0, 22.0))
    rec, offsets = bytearray(), {}
    for i, payload in records.items():
        offsets[i] = len(rec)
        rec += _frame(payload)
    assert [rec[offsets[i] + 7] >> 5 for i in (PARTS, SPLIT_LABELS)] == [1, 1]  # (framed in parts)
    rec[offsets[NO_MAGIC]:offsets[NO_MAGIC] + 4] = bytes(4)
    lrecord = struct.unpack_from("<I", rec, offsets[LONG] + 4)[0]
    rec[offsets[LONG] + 4:offsets[LONG] + 8] = struct.pack("<I", lrecord + 4)
    offsets[INSIDE] = offsets[PARTS] + 8 + 32  # (the first part: 24 header bytes, 8 of the JPEG)
    d = tmp_path / "emore"
    d.mkdir()
    (d / "train.rec").write_bytes(bytes(rec))
    (d / "train.idx").write_text("".join(f"{i}\t{o}\n" for i, o in sorted(offsets.items())))
    return d / "train.rec"


def _mxnet_dataset(rec, **kw):
    return build_dataset(cfg(source=str(rec), decoder="dali", dali_reader="mxnet", dali_threads=1, min_size=16,
                             **kw), S, seed=3)


def _reader_epoch(ds, rank, world, epoch, global_batch=6, epoch_step=0):
    """What rank `rank` of `world` reads in `epoch`: its encoded micro-batches."""
    from pacofr.data import Batches

    batches = Batches(len(ds), global_batch, 1, rank, world, seed=3)
    batches.epoch = epoch
    ds.set_epoch(epoch)
    return list(ds.epoch_batches(batches, collate_encoded, epoch_step))


def _names(batches):
    return [[r.name.rsplit("#", 1)[1] for r in b.encoded] + [n.rsplit("#", 1)[1] for n, _ in b.skipped]
            for b in batches]


@needs_dali
def test_mxnet_reader_reads_each_image_record_once_per_epoch_over_shards(mxnet_rec):
    ds = _mxnet_dataset(mxnet_rec)
    readable = [str(i) for i in range(1, REC_IMAGES) if str(i) not in UNREADABLE]
    assert len(ds) == len(readable) == 18 and {str(r) for r, _ in ds.bad} == UNREADABLE
    orders = {}
    for epoch in (0, 1):
        read = []
        for rank in (0, 1):
            got = _reader_epoch(ds, rank, 2, epoch)
            assert len(got) == 3  # 18 records / 6 a step; each micro-batch 3
            first = got[0]
            assert first.issues["bad_record"] == (1 - rank) * 5  # counted once, by rank 0
            for b in got:
                labels = [REC_IDENTITY[int(r.name.rsplit("#", 1)[1])] for r in b.encoded]
                assert b.labels.tolist() == labels  # the reader's labels are the records' identities
                assert all(r.data.size > 0 and r.data[:2].tobytes() == b"\xff\xd8" for r in b.encoded)
            names = [n for n in sum(_names(got), []) if n not in UNREADABLE]
            read += names
            orders[epoch, rank] = names
        assert sorted(read, key=int) == readable  # every one once: never the header, nor an identity record
    assert orders[0, 0] + orders[0, 1] != orders[1, 0] + orders[1, 1]  # shuffled again per epoch
    again = _reader_epoch(ds, 1, 2, 0)
    assert [n for n in sum(_names(again), [])] == orders[0, 1]  # the seeded order, reproduced
    resumed = _reader_epoch(ds, 0, 2, 0, epoch_step=1)  # from step 1: the same micro-batches after it
    whole = _reader_epoch(ds, 0, 2, 0)
    assert _names(resumed) == _names(whole)[1:] and "bad_record" not in resumed[0].issues


@needs_dali
def test_mxnet_reader_uneven_shards_end_together(mxnet_rec):
    """18 records over 4 ranks (shards of 4 and 5), 8 a step: every rank reads 2 steps of 2."""
    ds = _mxnet_dataset(mxnet_rec)
    read = []
    for rank in range(4):
        got = _reader_epoch(ds, rank, 4, 0, global_batch=8)
        assert [len(n) for n in _names(got)] == [2 + 5 * (rank == 0), 2]  # (rank 0 lists the 5 bad records)
        read += [n for n in sum(_names(got), []) if n not in UNREADABLE]
    assert len(read) == 16 == len(set(read))


@needs_dali
def test_mxnet_reader_decodes_as_the_python_reader(mxnet_rec):
    """The same records give the python reader's samples (crop, flip, jitter seeded by the
    record), the cut JPEG is skipped as 'truncated', and DALI's pixels are PIL's to rounding."""
    ds = _mxnet_dataset(mxnet_rec, color_jitter=0.3)
    pil = build_dataset(cfg(source=str(mxnet_rec), min_size=16, color_jitter=0.3), S, seed=3)
    pil.set_epoch(1)
    key = {k: i for i, k in enumerate(pil.keys)}
    decoder = _decoder(3)
    truncated = 0
    for batch in _reader_epoch(ds, 0, 1, 1, global_batch=3):
        batch.issues.pop("bad_record", None)  # (the records the python reader would read here, left out)
        names = [r.name.rsplit("#", 1)[1] for r in batch.encoded]
        names += [n.rsplit("#", 1)[1] for n, reason in batch.skipped if reason == "truncated"]
        expected = collate([pil[key[n]] for n in names])
        truncated += batch.issues["truncated"]
        out = decoder(batch)
        assert torch.equal(out.labels, expected.labels)
        _assert_same_samples(expected, out, mean_tol=0.5, max_tol=2.0)
    assert truncated == 1 and decoder.host_batches == 0


@needs_dali
def test_mxnet_reader_trains_and_resumes_mid_epoch(mxnet_rec, tmp_path):
    """Pretraining reads through DALI's reader (3 steps an epoch); a run resumed at step 2, in
    the middle of epoch 0, ends with the uninterrupted run's losses and weights; the unreadable
    records are counted and listed."""
    import shutil

    over = {"data.source": mxnet_rec, "data.decoder": "dali", "data.dali_reader": "mxnet", "data.dali_threads": 1,
            "data.min_size": 16, "train.max_steps": 4, "train.ckpt_every": 2, "train.batch_size": 6}
    whole = tmp_path / "whole"
    summary = pretrain(_cfg(**over), whole)
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    skipped = (whole / "skipped.csv").read_text()
    assert all(f"train.rec#{r}," in skipped for r in sorted(UNREADABLE) + [str(CUT)])
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "ckpt-00000002", resumed / "checkpoints" / "ckpt-00000002")
    pretrain(_cfg(**over), resumed, resume="auto")
    assert _losses(resumed) == _losses(whole)[2:]
    a, b = load_file(str(whole / "encoder.safetensors")), load_file(str(resumed / "encoder.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mxnet_reader_is_for_recordio_with_dali(tmp_path):
    with pytest.raises(ConfigError, match="data.dali_reader must be 'auto', 'python' or 'mxnet'"):
        load_config("tiny", ["data.dali_reader=native"])
    with pytest.raises(ValueError, match="data.dali_reader=mxnet reads an insightface .rec with data.decoder=dali"):
        build_dataset(cfg(source="faces", decoder="dali", dali_reader="mxnet"), S)
    with pytest.raises(ValueError, match="data.decoder=pil is not one"):
        build_dataset(cfg(source=str(tmp_path / "train.rec"), dali_reader="mxnet"), S)


@needs_dali
def test_mxnet_reader_stopped_by_a_record_says_so_in_one_line(mxnet_rec):
    """A record that turns bad after the checks (the file changed under the run) stops the epoch
    with one line naming the file and the way out, not a DALI traceback."""
    ds = _mxnet_dataset(mxnet_rec)
    rec = bytearray(mxnet_rec.read_bytes())
    rec[ds.records.offsets[1]:ds.records.offsets[1] + 4] = bytes(4)
    mxnet_rec.write_bytes(bytes(rec))
    with pytest.raises(ConfigError, match=r"train.rec': DALI's MXNet reader stopped \(.*Invalid RecordIO.*"
                                          r"data.dali_reader=python") as caught:
        _reader_epoch(ds, 0, 1, 0)
    assert "\n" not in str(caught.value)
