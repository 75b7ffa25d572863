"""`pacofr data prepare` and the RecordIO reader: insightface .rec/.idx pairs built here byte for
byte from the format (a writer of dmlc-core's framing and mxnet's pack, not pacofr's reader),
image folders and lists with every kind of bad and repairable file, the shards read back through
the training loader (counts, pixels, landmarks), the report per reason and per file, and an
interrupted prepare that leaves only complete shards."""

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pacofr.cli import main
from pacofr.config import DataConfig
from pacofr.data import build_dataset, collate
from pacofr.data.items import make_item
from pacofr.data.prepare import prepare
from pacofr.data.recordio import InsightFaceRecords, RecordIOError, read_record
from pacofr.data.transforms import FaceTransform

ROOT = Path(__file__).resolve().parents[1]
MAGIC = 0xCED7230A
MAGIC_FLOAT = struct.unpack("<f", struct.pack("<I", MAGIC))[0]  # a label whose bytes are the magic


def _frame(payload: bytes) -> bytes:
    """dmlc-core's RecordIOWriter::WriteRecord: the payload cut at every 4-byte aligned copy of
    the magic (which is dropped), parts flagged 1 (first), 2 (middle), 3 (last), 0 (whole),
    each after the magic and its (flag << 29 | length), the record padded with zeros to 4 bytes."""
    magic = struct.pack("<I", MAGIC)
    out, start, cuts = b"", 0, [i for i in range(0, len(payload) // 4 * 4, 4) if payload[i:i + 4] == magic]
    for i in cuts:
        out += magic + struct.pack("<I", (1 if start == 0 else 2) << 29 | (i - start)) + payload[start:i]
        start = i + 4
    out += magic + struct.pack("<I", (3 if cuts else 0) << 29 | (len(payload) - start)) + payload[start:]
    return out + bytes(-len(payload) % 4)


def _pack(label, image: bytes = b"", id_: int = 0) -> bytes:
    """mxnet.recordio.pack: header 'IfQQ' (flag, label, id, id2); a label of several floats is
    flag = their count, label 0, the floats after the header."""
    if isinstance(label, (int, float)):
        return struct.pack("IfQQ", 0, label, id_, 0) + image
    floats = np.asarray(label, dtype=np.float32)
    return struct.pack("IfQQ", floats.size, 0.0, id_, 0) + floats.tobytes() + image


def _jpeg(seed: int, size=(72, 80), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def recordio(tmp_path):
    """An insightface pair: header record 0; 8 image records 1..8 (two per identity; record 3
    labelled with three floats, the second the magic's bytes; record 5 a JPEG cut in half; record
    6 listed in the .idx at an offset inside record 2); identity records 9..12. Returns the
    folder and {record: (label, image bytes)} of the images."""
    images = {i: (float((i - 1) // 2), _jpeg(i)) for i in range(1, 9)}
    images[3] = ((7.0, MAGIC_FLOAT, 0.5), images[3][1])
    images[5] = (2.0, images[5][1][: len(images[5][1]) // 2])
    records = {0: _pack((9.0, 13.0))}
    records.update({i: _pack(label, data, id_=i) for i, (label, data) in images.items()})
    records.update({9 + k: _pack((1.0 + 2 * k, 3.0 + 2 * k)) for k in range(4)})
    rec, offsets = b"", {}
    for i, payload in records.items():
        offsets[i] = len(rec)
        rec += _frame(payload)
    offsets[6] = offsets[2] + 40  # (inside record 2's image)
    folder = tmp_path / "emore"
    folder.mkdir()
    (folder / "train.rec").write_bytes(rec)
    (folder / "train.idx").write_text("".join(f"{i}\t{o}\n" for i, o in offsets.items()))
    return folder, images, records


def test_recordio_reader_against_the_format(recordio):
    folder, images, records = recordio
    with open(folder / "train.rec", "rb") as f:
        assert read_record(f, 0) == records[0]
    with InsightFaceRecords(folder / "train.rec", folder / "train.idx") as r:
        assert r.images == list(range(1, 9)) and r.identity_records == range(9, 13)
        header, image = r.read(3)  # the record cut in two parts at the magic in its label
        assert (header.flag, header.label, header.id) == (3, (7.0, MAGIC_FLOAT, 0.5), 3) and image == images[3][1]
        with open(folder / "train.rec", "rb") as f:
            assert read_record(f, r.offsets[3]) == records[3]
        header, image = r.read(2)
        assert (header.flag, header.label, header.id, image) == (0, 0.0, 2, images[2][1])
        header, _ = r.read(10)
        assert header.label == (3.0, 5.0)
        bad_offset = rf"^'{folder / 'train.rec'}' record 6 at offset \d+: no RecordIO magic"
        with pytest.raises(RecordIOError, match=bad_offset):
            r.read(6)
        with pytest.raises(RecordIOError, match="record 20: not in"):
            r.read(20)
    assert (folder / "train.rec").read_bytes().count(struct.pack("<I", MAGIC)) == len(records) + 1  # (the split)


def _tar_members(shard: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    with tarfile.open(shard) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def _loaded(source, **data) -> list:
    """The samples of `source` as the training loader gives them: no augmentation, in order."""
    cfg = DataConfig(source=str(source), shuffle_buffer=0, num_workers=0, **data)
    return list(build_dataset(cfg, 64, augment=False))


def test_recordio_to_shards(recordio, tmp_path, capsys):
    folder, images, _ = recordio
    out = tmp_path / "shards"
    assert main(["data", "prepare", str(folder), str(out), "--shard-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"prepared 6 of 8 images into 2 shards: data.source={out} (or {out}/shard-{{000000..000001}}.tar)" in printed
    report = json.loads((out / "prepare.json").read_text())
    assert (report["kind"], report["samples"], report["kept"], report["skipped"]) == ("recordio", 6, 6, 2)
    assert report["skips"] == {"bad_record": 1, "truncated": 1}
    rows = (out / "prepare.csv").read_text().splitlines()
    rec = folder / "train.rec"
    assert any(r.startswith(f"{rec}#6,skipped,bad_record,,,,") and "no RecordIO magic" in r for r in rows)
    assert f"{rec}#5,skipped,truncated,,,," in rows
    kept = [i for i in images if i not in (5, 6)]
    # stored as read, with insightface's identity (a label of several floats: its first)
    members = {**_tar_members(out / "shard-000000.tar"), **_tar_members(out / "shard-000001.tar")}
    assert [m["jpg"] for m in members.values()] == [images[i][1] for i in kept]
    assert [m["cls"] for m in members.values()] == [b"0", b"0", b"7", b"1", b"3", b"3"]
    # through the loader: the count, the pixels of each original through the same transform
    samples = _loaded(out)
    transform = FaceTransform(64, augment=False)
    assert len(samples) == 6
    for sample, i in zip(samples, kept):
        assert torch.equal(sample.image, make_item(images[i][1], None, transform, 32, 0).image)
    assert [sample.label for sample in samples] == [0, 0, 7, 1, 3, 3]  # (the .cls members, as identities)
    assert sum(len(b.images) for b in DataLoader(build_dataset(DataConfig(source=str(out), num_workers=2), 64),
                                                 batch_size=4, collate_fn=collate, num_workers=2)) == 6


def _source_folder(folder: Path) -> dict:
    """A folder of every kind of file the loader meets; returns {name: (status, reasons)} as the
    loader decides, with the landmarks file written beside (some valid, some not, some missing)."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    rgb = lambda: rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)  # noqa: E731
    (folder / "a.jpg").write_bytes(_jpeg(1, (90, 70)))
    Image.fromarray(rgb()).save(folder / "sub" / "b.png")
    Image.fromarray(rgb()[..., 0]).save(folder / "gray.png")
    (folder / "gray.jpg").write_bytes(_jpeg(2, (90, 70), "L"))
    Image.fromarray(np.dstack([rgb(), rng.integers(0, 256, (70, 90), dtype=np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb()).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb()).quantize(16).save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 65536, (70, 90), dtype=np.uint16)).save(folder / "deep.png")
    Image.fromarray(rgb()).save(folder / "c.bmp")
    (folder / "cut.jpg").write_bytes(_jpeg(3, (90, 70))[:900])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    Image.fromarray(rgb()[:20, :20]).save(folder / "small.png")
    points = [[30, 30], [60, 30], [45, 45], [32, 58], [58, 58]]
    (folder / "lm.json").write_text(json.dumps({
        "a.jpg": points, "sub/b.png": points[:4] + [[45, 99]], "gray.png": [[None, 1]] + points[1:],
        "rgba.png": points, "cut.jpg": points}))
    return {
        "a.jpg": ("kept", ""), "sub/b.png": ("repaired", "landmarks_invalid"),
        "gray.png": ("repaired", "gray_converted;landmarks_invalid"),
        "gray.jpg": ("repaired", "gray_converted;landmarks_missing"), "rgba.png": ("repaired", "rgba_converted"),
        "cmyk.jpg": ("repaired", "cmyk_converted;landmarks_missing"),
        "palette.png": ("repaired", "landmarks_missing"), "deep.png": ("repaired", "gray_converted;landmarks_missing"),
        "c.bmp": ("repaired", "landmarks_missing"), "cut.jpg": ("skipped", "truncated"),
        "empty.png": ("skipped", "empty"), "text.png": ("skipped", "not_an_image"),
        "small.png": ("skipped", "too_small"),
    }


def _rows(out: Path) -> dict:
    with open(out / "prepare.csv", newline="") as f:
        return {r["source"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_to_shards_as_the_loader_sees_it(tmp_path, workers):
    src, out = tmp_path / "src", tmp_path / "out"
    expected = _source_folder(src)
    report = prepare(src, out, shard_size=3, landmarks=str(src / "lm.json"), workers=workers)
    rows = _rows(out)
    assert {os.path.relpath(k, src): (r["status"], r["reasons"]) for k, r in rows.items()} == expected
    stored = {os.path.relpath(k, src): r["stored"] for k, r in rows.items() if r["status"] != "skipped"}
    assert [k for k, v in stored.items() if v == "as read"] == ["a.jpg", "gray.jpg", "gray.png", "sub/b.png"]
    assert (report["samples"], report["kept"], report["repaired"], report["skipped"]) == (9, 1, 8, 4)
    assert report["skips"] == {"empty": 1, "not_an_image": 1, "too_small": 1, "truncated": 1}
    assert report["repairs"] == {"cmyk_converted": 1, "gray_converted": 3, "landmarks_invalid": 2,
                                 "landmarks_missing": 5, "rgba_converted": 1}
    assert report["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["prepare.csv", "prepare.json"] + report["shards"]
    # the loader, on the shards (the folder or its pattern) and on the source folder: the same
    # samples, pixel for pixel, with the same landmarks
    shards = _loaded(out)
    assert all(torch.equal(a.image, b.image) for a, b in zip(_loaded(report["pattern"]), shards, strict=True))
    direct = [s for s in _loaded(src, landmarks=str(src / "lm.json")) if s.image is not None]
    assert len(shards) == len(direct) == 9
    for a, b in zip(shards, direct):
        assert torch.equal(a.image, b.image)
        assert torch.allclose(a.landmarks, b.landmarks, equal_nan=True)
    assert sum(torch.isfinite(s.landmarks).all() for s in shards) == 2  # a.jpg and rgba.png
    # stored repaired: the loader has no pixels left to repair but those of the gray JPEG and PNG stored as read
    assert Counter(r for s in shards for r in s.issues) == {"gray_converted": 2, "landmarks_invalid": 2,
                                                            "landmarks_missing": 5}
    if workers:
        return
    listed = tmp_path / "list.txt"  # a .txt list of some of them
    listed.write_text("src/a.jpg\nsrc/cut.jpg\nsrc/sub/b.png\n")
    report = prepare(listed, tmp_path / "from-list")
    assert (report["kind"], report["samples"], report["skips"]) == ("list", 2, {"truncated": 1})
    assert len(_loaded(tmp_path / "from-list")) == 2


def test_an_interrupted_prepare_leaves_only_complete_shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(9):
        (src / f"{i}.jpg").write_bytes(_jpeg(i))
    script = ("import os, signal, sys\n"
              "import pacofr.data.prepare as p\n"
              "real, seen = p.check, []\n"
              "def check(*args):\n"
              "    seen.append(1)\n"
              "    if len(seen) == 6:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(*args)\n"
              "p.check = check\n"
              "p.prepare(sys.argv[1], sys.argv[2], shard_size=2)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "out")], cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [".prepare.csv.tmp", ".shard-000002.tar.tmp", "shard-000000.tar", "shard-000001.tar"]
    samples = _loaded(tmp_path / "out")  # the complete shards, nothing unreadable
    assert len(samples) == 4 and all(s.image is not None for s in samples)


def test_an_interrupt_removes_the_shard_being_written(tmp_path, monkeypatch):
    import pacofr.data.prepare as p

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.jpg").write_bytes(_jpeg(i))
    real, seen = p.check, []

    def check(*args):
        seen.append(1)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(p, "check", check)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "out", shard_size=2)
    assert sorted(q.name for q in (tmp_path / "out").iterdir()) == ["shard-000000.tar"]  # no temporary left


def test_bad_input_is_one_line(recordio, tmp_path, capsys):
    folder, _, _ = recordio
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    only_rec = tmp_path / "only.rec"
    only_rec.write_bytes(b"")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"\xff\xd8\xff")
    (bad / "b.png").write_bytes(b"")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "train.rec").write_bytes(bytes(64))
    (garbage / "train.idx").write_text("0\t0\n")
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "o1")], f"SRC '{tmp_path / 'missing'}': no such file or directory"),
        ([str(folder), str(tmp_path / "full")], f"OUT '{tmp_path / 'full'}' is not empty"),
        ([str(folder), str(tmp_path / "full" / "x")], "is a file: give a new or empty folder"),
        ([str(only_rec), str(tmp_path / "o2")], f"its index '{tmp_path / 'only.idx'}' does not exist"),
        ([str(garbage), str(tmp_path / "o3")], "record 0 at offset 0: no RecordIO magic (found 0x00000000)"),
        ([str(folder), str(tmp_path / "o4"), "--shard-size", "0"], "--shard-size must be at least 1, got 0"),
        ([str(folder / "train.idx"), str(tmp_path / "o5")], "is not an image folder, a .txt list or a .rec file"),
        ([str(bad), str(tmp_path / "o6")], f"SRC '{bad}': no usable image (every one was skipped: "
                                           '{"empty": 1, "not_an_image": 1}); per file: '),
        ([str(bad), str(tmp_path / "o7"), "--landmarks", str(tmp_path / "none.json")], "--landmarks '"),
    ]
    for args, message in cases:
        assert main(["data", "prepare", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pacofr data: error: ") and message in err and err.count("\n") == 1, (message, err)
    assert {p.name for p in (tmp_path / "o6").iterdir()} == {"prepare.csv", "prepare.json"}  # the report, no shard
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3, 4, 5, 7))


def test_workers_take_the_jobs_in_order_a_chunk_at_a_time():
    from pacofr.data.prepare import _Mapper

    with _Mapper(2) as map_:
        map_.chunk = 3
        assert list(map_(abs, range(-10, 0))) == list(range(10, 0, -1))


def test_an_image_over_the_pixel_budget_is_skipped_undecoded(tmp_path):
    """--max-pixels: an image larger than the budget is left out as too_large (its header read,
    its pixels never decoded), the others kept."""
    import csv as csv_module

    from PIL import Image

    from pacofr.data.prepare import prepare

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(src / "small.png")
    Image.new("RGB", (200, 100), (10, 20, 30)).save(src / "large.jpg")
    report = prepare(src, tmp_path / "out", max_pixels=64 * 64)
    assert (report["samples"], report["skipped"], report["skips"]) == (1, 1, {"too_large": 1})
    rows = {r["source"].rsplit("/", 1)[-1]: r for r in csv_module.DictReader(open(tmp_path / "out" / "prepare.csv"))}
    assert rows["large.jpg"]["reasons"] == "too_large" and rows["small.png"]["status"] == "kept"


def test_a_shard_label_that_is_no_identity_is_a_bad_record(tmp_path):
    """A .cls member that is not a whole number >= 0 is skipped as bad_record; none means no label."""
    import io
    import tarfile

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(png, "PNG")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, cls in (("a", b"4"), ("b", b"-1"), ("c", b"x"), ("d", None)):
            for ext, data in (("png", png.getvalue()), ("cls", cls)):
                if data is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    samples = _loaded(tmp_path / "s.tar")
    assert [(s.label, s.issues) for s in samples] == [(4, ("landmarks_missing",)), (None, ("bad_record",)),
                                                      (None, ("bad_record",)), (None, ("landmarks_missing",))]
