"""Data a run can trust: the pixel budget (a decompression bomb is skipped from its header, a
large JPEG drafted within the budget, in training, on the DALI path and in the probes), a
source with no usable sample is an error, the files skipped are listed (skipped.csv), and the
probes count absurd labels and label rows without an image, and refuse a tiny test set."""

import csv
import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pacofr.cli import main
from pacofr.data import IMAGENET_MEAN, IMAGENET_STD, collate_encoded, denormalize
from pacofr.data.decode import draft, open_image
from pacofr.data.items import make_encoded_item, make_item
from pacofr.data.transforms import FaceTransform
from pacofr.engine import pretrain
from pacofr.eval.attributes import AttributeImages
from test_dali import needs_dali
from test_data import encode, face_rgb
from test_eval import POINTS, _attribute_faces, _faces, _parsing_faces, probe_data  # noqa: F401 (fixture)
from test_train import BASE, ROOT, _cfg, _env, _write_bad_folder

BOMB = (8000, 8000)  # 64 MP RGBA: over the 40 MP default budget, 256 MB decoded


def png_of_zeros(width: int, height: int, rows: bool = True) -> bytes:
    """An 8-bit RGBA PNG of zero pixels, written chunk by chunk: every row (filter byte and
    zeros) streamed through zlib, or with `rows` False a single row only (a header-valid file
    whose data ends early)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(1)
    row = bytes(1 + 4 * width)
    body = b"".join(z.compress(row) for _ in range(height if rows else 1)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def big_jpeg(width: int = 2048, height: int = 1536) -> bytes:
    """A smooth colour pattern with some texture, as a JPEG."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    a = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 37.0) * np.cos(yy / 23.0)], -1)
    return encode(Image.fromarray((a * 255).astype(np.uint8)), "JPEG", quality=90)


def normalized(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [S, S, 3] -> the ImageNet-normalized [3, S, S] a sample holds."""
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_the_png_writer_writes_pngs():
    """(The bomb below is a real PNG: a small one from the same writer decodes to zeros.)"""
    im = Image.open(io.BytesIO(png_of_zeros(40, 30)))
    assert im.size == (40, 30) and im.mode == "RGBA" and not np.asarray(im).any()


# -- the pixel budget ----------------------------------------------------------------------------
MEASURE = """
import json, resource, sys
from pathlib import Path
from pacofr.data.items import make_encoded_item, make_item
from pacofr.data.transforms import FaceTransform
from pacofr.eval.common import FaceImages

folder = Path(sys.argv[1])
t, images = FaceTransform(64), FaceImages(str(folder), 64, "--test")
small = (folder / "a_small.png").read_bytes()
warm = [make_item(small, None, t, 32, 0).issues, make_encoded_item(small, None, t, 32, 0).issues, images.crop(0)[1]]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
raw = (folder / "bomb.png").read_bytes()
got = [make_item(raw, None, t, 32, 0).issues, make_encoded_item(raw, None, t, 32, 0).issues, images.crop(1)[1]]
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"warm": warm, "got": got, "grown_kib": grown}))
"""


def test_a_png_bomb_is_skipped_from_its_header_in_training_dali_and_probes(tmp_path):
    """A complete 8000 x 8000 RGBA PNG of zeros (1 MB on disk, 256 MB decoded) is skipped as
    too_large by the PIL path, the DALI path's worker and a probe's image loading; the peak
    memory of the process that reads it grows by far less than one decode."""
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "a_small.png")
    (tmp_path / "bomb.png").write_bytes(png_of_zeros(*BOMB))
    assert Image.open(tmp_path / "bomb.png").size == BOMB  # (the header says what the budget reads)
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, env=_env(),
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["warm"] == [[], [], None]
    assert out["got"] == [["too_large"], ["too_large"], "too_large"]
    decoded_kib = BOMB[0] * BOMB[1] * 4 // 1024
    assert out["grown_kib"] < decoded_kib / 16, out
    assert "Bomb" not in run.stderr


def test_pil_bomb_warning_and_error_are_counted_skips_not_noise():
    """Above PIL's own limits (89 MP: a warning; 179 MP: an error) the header alone gives the
    skip, whatever the budget: no DecompressionBombWarning reaches the user."""
    t = FaceTransform(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        for side in (10_000, 20_000):
            raw = png_of_zeros(side, side, rows=False)
            assert make_item(raw, None, t, 32, 0).issues == ("too_large",)
            assert make_encoded_item(raw, None, t, 32, 0).issues == ("too_large",)
        # a budget above PIL's hard limit does not open the door to what PIL refuses outright
        assert make_item(png_of_zeros(20_000, 20_000, rows=False), None, t, 32, 0, 10**9).issues == ("too_large",)


def test_a_large_jpeg_is_drafted_within_the_budget(tmp_path):
    """2048 x 1536 (3.1 MP) against a 500,000-pixel budget: decoded at 1/4 scale (512 x 384;
    1/2 would be 786,432 pixels), where the crop alone asked for 1/2. The sample equals PIL's
    own 1/4-scale decode, cropped and resized; the probes load it the same way; a budget that
    even 1/8 scale exceeds skips it."""
    raw, budget = big_jpeg(), 500_000
    im, _ = open_image(raw, 1)
    assert draft(im, None, budget) == (4.0, None) and im.size == (512, 384)
    im, _ = open_image(raw, 1)
    assert draft(im, (683, 512), 10**9) == (2.0, None)  # (the crop's own need: 1/2)

    t = FaceTransform(512, augment=False)  # the centre square, 1536 px, to 512
    sample = make_item(raw, None, t, 32, 0, budget)
    ref = Image.open(io.BytesIO(raw))
    ref.draft("RGB", (512, 384))
    ref = ref.convert("RGB")
    assert ref.size == (512, 384)
    expected = normalized(np.asarray(ref.resize((512, 512), Image.BILINEAR, box=(64, 0, 448, 384))))
    assert sample.issues == () and torch.allclose(sample.image, expected, atol=1e-5)

    (tmp_path / "big.jpg").write_bytes(raw)
    (tmp_path / "labels.csv").write_text("path,A\nbig.jpg,1\n")
    probe = AttributeImages(str(tmp_path), str(tmp_path / "labels.csv"), 512, "--test", budget)
    (image, _), reason = probe[0]
    assert reason is None and torch.allclose(image, expected, atol=1e-5)
    assert make_item(raw, None, t, 32, 0, 20_000).issues == ("too_large",)  # 1/8: 49,152 pixels
    assert AttributeImages(str(tmp_path), str(tmp_path / "labels.csv"), 512, "--test", 20_000)[0] == (None, "too_large")


def test_the_dali_path_hands_over_a_large_jpeg_drafted_within_the_budget():
    """DALI cannot draft: a JPEG over the budget is drafted and decoded in the worker and
    handed over as a PNG within it, its crop box in the drafted pixels; the landmarks are
    those of the PIL path."""
    raw, budget = big_jpeg(), 500_000
    t = FaceTransform(64)
    points = np.array([[600.0, 500.0], [1400.0, 500.0], [1000.0, 800.0], [700.0, 1100.0], [1300.0, 1100.0]],
                      np.float32)
    item = make_encoded_item(raw, points, t, 32, 7, budget)
    sent = Image.open(io.BytesIO(item.data.tobytes()))
    assert sent.format == "PNG" and sent.size[0] * sent.size[1] <= budget
    scale = 2048 / sent.size[0]
    assert scale in (2.0, 4.0, 8.0)
    assert np.allclose(np.array(item.params["box"]) * scale, t.params(2048, 1536, 7)["box"])
    assert torch.allclose(item.landmarks, make_item(raw, points, t, 32, 7, budget).landmarks)
    assert make_encoded_item(raw, None, t, 32, 7).data.tobytes() == raw  # within the default budget: as read


@needs_dali
def test_dali_decodes_the_drafted_jpeg_as_pil_does():
    from pacofr.data.dali import DaliDecoder

    raw, budget, t = big_jpeg(), 500_000, FaceTransform(64, color_jitter=0.0)
    out = DaliDecoder(64, 1, "cpu", threads=1)(collate_encoded([make_encoded_item(raw, None, t, 32, 7, budget)]))
    pil = make_item(raw, None, t, 32, 7, budget).image
    assert (denormalize(out.images[0]) - denormalize(pil)).abs().mean() * 255 < 1.0  # (gray levels)


# -- no usable sample ----------------------------------------------------------------------------
def _all_bad(folder: Path, n: int) -> None:
    folder.mkdir()
    for i in range(n):
        (folder / f"f{i:02d}.jpg").write_text(f"not an image {i}")
    (folder / "empty.jpg").write_bytes(b"")


@pytest.mark.parametrize("steps", [1, 3])
def test_a_source_without_a_usable_sample_is_an_error_not_an_untrained_encoder(tmp_path, capsys, steps):
    """Every file bad: one line naming the source and the counts, exit 2, no encoder and no
    checkpoint. Stopped before the run's last step (1 step of 2 per epoch), or at the end of
    its first epoch (3 steps, 1 per epoch)."""
    folder = tmp_path / "bad"
    _all_bad(folder, 31 if steps == 1 else 19)  # 32 files: 2 steps of 16; 20: 1 step
    run = tmp_path / "run"
    rc = main(["train", *BASE, "--set", f"data.source={folder}", "--max-steps", str(steps), "--output", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"data.source '{folder}': no usable sample" in err[0] and "not_an_image=" in err[0], err
    assert not (run / "encoder.safetensors").exists() and not list(run.glob("checkpoints/ckpt-*"))
    rows = list(csv.DictReader(open(run / "skipped.csv", newline="")))
    assert rows and all(Path(r["path"]).parent == folder for r in rows)
    assert {r["reason"] for r in rows} <= {"not_an_image", "empty"}


def test_a_stream_without_a_usable_sample_is_an_error(tmp_path, capsys):
    import webdataset as wds

    shard = tmp_path / "bad-0.tar"
    with wds.TarWriter(str(shard)) as w:
        for k in range(20):
            w.write({"__key__": f"s{k:02d}", "jpg": b"not a jpeg"})
    rc = main(["train", *BASE, "--set", f"data.source={shard}", "--set", "data.shuffle_buffer=0", "--max-steps", "3",
               "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no usable sample" in err and "not_an_image=16" in err, err
    rows = list(csv.reader(open(tmp_path / "run" / "skipped.csv", newline="")))
    assert rows[0] == ["path", "reason"] and [r[0] for r in rows[1:]] == [f"{shard}/s{k:02d}" for k in range(16)]


# -- skipped.csv ---------------------------------------------------------------------------------
def _bad_folder(folder: Path) -> set[tuple[str, str]]:
    """20 faces, 3 repaired files and 5 to skip (one over the budget, header only); returns
    the (path, reason) of those 5."""
    _write_bad_folder(folder, good=20)
    (folder / "bomb.png").write_bytes(png_of_zeros(10_000, 10_000, rows=False))
    return {(str(folder / name), reason) for name, reason in (
        ("truncated.jpg", "truncated"), ("empty.jpg", "empty"), ("notes.jpg", "not_an_image"),
        ("tiny.png", "too_small"), ("bomb.png", "too_large"))}


def _skipped(run: Path) -> set[tuple[str, str]]:
    with open(run / "skipped.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "reason"]
    return {tuple(r) for r in rows[1:]}


def test_skipped_csv_names_each_skipped_file_once_across_workers_epochs_and_resume(tmp_path):
    """28 files, two steps of 14 an epoch, two loader workers: two epochs read every file twice
    (counted twice), skipped.csv names each skipped file once. A resumed run that reads half an
    epoch more keeps the list (files it did not read again stay listed) and adds to the counts."""
    expected = _bad_folder(tmp_path / "faces")
    over = {"data.source": tmp_path / "faces", "train.batch_size": 14, "data.num_workers": 2}
    summary = pretrain(_cfg(**over, **{"train.max_steps": 4}), tmp_path / "run")
    assert summary["skipped_files"] == str(tmp_path / "run" / "skipped.csv")
    assert _skipped(tmp_path / "run") == expected
    skips = lambda s: {k: v for k, v in s["skipped_or_repaired_samples"].items() if "converted" not in k}  # noqa: E731
    assert skips(summary) == {reason: 2 for _, reason in expected}
    resumed = pretrain(_cfg(**over, **{"train.max_steps": 5}), tmp_path / "run", resume="auto")
    assert _skipped(tmp_path / "run") == expected
    read_again = sum(skips(resumed).values()) - 10
    assert 0 <= read_again < 5, skips(resumed)  # (some were not read again: the list kept them)


@needs_dali
def test_skipped_csv_on_the_dali_path(tmp_path):
    expected = _bad_folder(tmp_path / "faces")
    over = {"data.source": tmp_path / "faces", "train.batch_size": 28, "train.max_steps": 1, "data.decoder": "dali",
            "data.dali_device": "cpu", "data.dali_threads": 1}
    pretrain(_cfg(**over), tmp_path / "run")
    assert _skipped(tmp_path / "run") == expected


@needs_dali
def test_dali_fallback_names_the_files_it_skips():
    from pacofr.data.dali import DaliDecoder
    from test_dali import _broken_inside

    t = FaceTransform(64)
    good = make_encoded_item(encode(face_rgb(0), "PNG"), None, t, 32, 0)
    broken = make_encoded_item(_broken_inside(encode(face_rgb(1), "PNG")), None, t, 32, 1)
    good.name, broken.name = "good.png", "broken.png"
    with pytest.warns(RuntimeWarning, match="decoding it with PIL"):
        out = DaliDecoder(64, 2, "cpu", threads=1)(collate_encoded([good, broken]))
    assert out.images.shape[0] == 1 and out.skipped == [("broken.png", "truncated")]


def test_skipped_csv_gathers_every_rank_once(tmp_path):
    """Two ranks, 28 files in one global batch of 28 (14 a rank): skipped.csv holds each
    rank's skipped files, none lost, none twice."""
    expected = _bad_folder(tmp_path / "faces")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29741", str(ROOT / "train.py"), *BASE, "--set", f"data.source={tmp_path / 'faces'}",
                          "--set", "train.batch_size=28", "--max-steps", "1", "--output", str(tmp_path / "run")],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _skipped(tmp_path / "run") == expected


# -- the probes ----------------------------------------------------------------------------------
def _probe(capsys, command, encoder, kind, train, train_targets, test, test_targets, out, *extra):
    """`pacofr <command>` on the tiny config: (rc, stderr lines, JSON result or None, skipped rows)."""
    rc = main([command, "--config", "tiny", "--encoder", str(encoder), "--train", str(train),
               f"--train-{kind}", str(train_targets), "--test", str(test), f"--test-{kind}", str(test_targets),
               "--workers", "0", "--output", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    if rc:
        return rc, err, None, None
    with open(out.with_name(out.stem + ".skipped.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "reason", "split"]
    return rc, err, json.loads(out.read_text()), {tuple(r) for r in rows[1:]}


def test_alignment_skips_absurd_landmarks_and_names_rows_without_images(probe_data, tmp_path, capsys):
    """A landmark at 1e30 and one at -inf (JSON cannot hold NaN; a null is the NaN face already
    there) are counted skips, not an NME of nan or inf; a row naming an image that is not
    there is counted and listed, and so is every skipped face."""
    d, train, _ = probe_data
    test = _faces(tmp_path / "test", 24, 5)
    table = json.loads((test / "lm.json").read_text())
    table["f003.png"][2] = [1e30, 40.0]
    table["f004.png"][0] = [50.0, -1e400]  # (json writes -Infinity)
    table["ghost.png"] = POINTS.tolist()
    (test / "lm.json").write_text(json.dumps(table))
    rc, err, result, rows = _probe(capsys, "eval-alignment", d / "encoder.safetensors", "landmarks", train,
                                   train / "lm.json", test, test / "lm.json", tmp_path / "probe.json")
    assert rc == 0, err
    assert np.isfinite(result["nme"]) and result["nme"] < 0.5 * result["mean_shape_nme"], result
    assert result["test_faces"] == 24
    assert result["skipped_test"] == {"no_image": 1, "no_landmarks": 1, "landmarks_invalid": 2,
                                      "landmarks_outside": 2, "degenerate_scale": 1, "not_an_image": 1}
    listed = {(Path(p).name, reason) for p, reason, split in rows if split == "test"}
    assert listed == {("ghost.png", "no_image"), ("unlabelled.png", "no_landmarks"), ("nan.png", "landmarks_invalid"),
                      ("f004.png", "landmarks_invalid"), ("f003.png", "landmarks_outside"),
                      ("outside.png", "landmarks_outside"), ("one_eye.png", "degenerate_scale"),
                      ("broken.png", "not_an_image")}
    assert (str(test / "ghost.png"), "no_image", "test") in rows
    assert {reason for _, reason, split in rows if split == "train"} == {
        "no_landmarks", "landmarks_invalid", "landmarks_outside", "degenerate_scale", "not_an_image"}


def test_alignment_refuses_non_finite_features(probe_data):
    from pacofr.config import load_config
    from pacofr.eval.alignment import AlignmentImages, evaluate
    from pacofr.eval.common import load_encoder

    d, train, test = probe_data
    encoder = load_encoder(load_config("tiny"), str(d / "encoder.safetensors"), torch.device("cpu"))
    with torch.no_grad():
        encoder.norm.weight.fill_(float("nan"))
    sets = [AlignmentImages(str(f), str(f / "lm.json"), 64, what=w) for f, w in ((train, "--train"), (test, "--test"))]
    with pytest.raises(ValueError, match="non-finite features for --train"):
        evaluate(encoder, *sets, workers=0)


def test_attributes_refuse_a_tiny_test_set_and_name_what_they_skip(probe_data, tmp_path, capsys):
    """One usable test image (its 100% means nothing) is refused in one line naming
    --min-test; allowed with --min-test 1. Rows naming no image, a bomb over --max-pixels and
    the test's own bad files are counted and listed."""
    d, _, _ = probe_data
    train, _ = _attribute_faces(tmp_path / "train", 24, 1)
    test, _ = _attribute_faces(tmp_path / "test", 1, 2)
    (test / "bomb.png").write_bytes(png_of_zeros(2000, 2000, rows=False))
    with open(test / "attrs.csv", "a") as f:
        f.write("ghost.png,1,1,1\nbomb.png,1,-1,1\n")
    args = ("eval-attributes", d / "encoder.safetensors", "labels", train, train / "attrs.csv", test,
            test / "attrs.csv", tmp_path / "attributes.json", "--max-pixels", "1000000")
    rc, err, _, _ = _probe(capsys, *args)
    assert rc == 2 and len(err) == 1, err
    assert f"--test '{test}': 1 usable test image(s), fewer than --min-test 20" in err[0], err
    rc, err, result, rows = _probe(capsys, *args, "--min-test", "1")
    assert rc == 0 and result["test_images"] == 1, err
    assert result["skipped_test"] == {"no_image": 1, "too_large": 1, "no_labels": 1, "labels_invalid": 1,
                                      "not_an_image": 1}
    assert {(Path(p).name, r) for p, r, s in rows if s == "test"} == {
        ("ghost.png", "no_image"), ("bomb.png", "too_large"), ("unlabelled.png", "no_labels"),
        ("odd.png", "labels_invalid"), ("broken.png", "not_an_image")}


def test_parsing_names_label_maps_without_an_image(probe_data, tmp_path, capsys):
    d, _, _ = probe_data
    train, test = _parsing_faces(tmp_path / "train", 24, 1), _parsing_faces(tmp_path / "test", 20, 2)
    (test / "labels" / "sub").mkdir()
    for name in ("ghost.png", "sub/ghost2.png"):
        Image.fromarray(np.zeros((96, 96), np.uint8)).save(test / "labels" / name)
    rc, err, result, rows = _probe(capsys, "eval-parsing", d / "encoder.safetensors", "labels", train / "images",
                                   train / "labels", test / "images", test / "labels", tmp_path / "parsing.json",
                                   "--classes", "6")
    assert rc == 0, err
    assert result["skipped_test"]["no_image"] == 2 and result["skipped_train"].get("no_image") is None
    assert {(p, r) for p, r, s in rows if r == "no_image"} == {
        (str(test / "labels" / "ghost.png"), "no_image"), (str(test / "labels" / "sub" / "ghost2.png"), "no_image")}
