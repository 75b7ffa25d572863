"""Identity-labelled data: an insightface RecordIO pair as a training source (built here byte for
byte by the writer of test_prepare, from the format: a header record, labels of several floats,
a corrupt record), split over ranks and loader workers as a single process reads it, shuffled
by seed and epoch, trained on; identity folders and `path label` lists; the 5-point ArcFace
alignment against a brute-force least squares and a planted similarity, in the readers and in
`pacofr data prepare --align`."""

import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pacofr.cli import main
from pacofr.config import ConfigError, DataConfig, load_config
from pacofr.data import Batches, build_dataset, collate, collate_encoded
from pacofr.data.align import ARCFACE_112, align, similarity, template, transform_points
from pacofr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from test_prepare import _frame, _jpeg, _pack
from test_train import BASE

S = 32
N_IMAGES = 16
BAD = 7  # the corrupt record: its magic overwritten
IDENTITIES = {i: (i * 5) % 17 + 3 for i in range(1, N_IMAGES + 1)}  # every record its own identity


def _write_pair(folder, records: dict[int, bytes], corrupt: tuple[int, ...] = ()):
    """train.rec / train.idx from {index: payload}, the records in `corrupt` without their magic."""
    rec, offsets = bytearray(), {}
    for i, payload in records.items():
        offsets[i] = len(rec)
        rec += _frame(payload)
    for i in corrupt:
        rec[offsets[i]:offsets[i] + 4] = b"\0\0\0\0"
    folder.mkdir(exist_ok=True)
    (folder / "train.rec").write_bytes(bytes(rec))
    (folder / "train.idx").write_text("".join(f"{i}\t{o}\n" for i, o in offsets.items()))
    return folder / "train.rec"


@pytest.fixture
def rec(tmp_path):
    """Header record 0 naming images 1..16 and identity records 17..; odd records labelled with
    three floats (the identity first), record 7 corrupt; a `property` file of 20 classes."""
    first_identity = N_IMAGES + 1
    records = {0: _pack((float(first_identity), float(first_identity + 2)))}
    for i, ident in IDENTITIES.items():
        label = (float(ident), 0.25, 7.0) if i % 2 else float(ident)
        records[i] = _pack(label, _jpeg(i, size=(40, 44)), id_=i)
    records[first_identity] = _pack((1.0, 9.0))
    records[first_identity + 1] = _pack((9.0, 17.0))
    path = _write_pair(tmp_path / "emore", records, corrupt=(BAD,))
    (path.parent / "property").write_text("20,112,112\n")
    return path


def _epoch(ds, rank: int, world: int, epoch: int, workers: int, global_batch: int = 8, seed: int = 5):
    """What rank `rank` of `world` reads in `epoch`, as pretraining batches it: (the labels of
    each batch, skipped (name, reason))."""
    ds.set_epoch(epoch)
    batches = Batches(len(ds), global_batch, 1, rank, world, seed)
    batches.epoch = epoch
    labels, skipped = [], []
    for batch in DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=workers):
        labels.append(batch.labels.tolist())
        skipped += batch.skipped
    return labels, skipped


class _WhoRead(torch.utils.data.Dataset):
    """Reads a sample of `ds`, gives (this process, the process that opened the handle read)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return 4

    def __getitem__(self, i):
        self.ds[i]
        return os.getpid(), self.ds.records._pid


def test_recordio_source_every_record_once_per_epoch_over_ranks_and_workers(rec):
    ds = build_dataset(DataConfig(source=str(rec), min_size=16), S, seed=5)
    assert len(ds) == N_IMAGES and ds.num_classes == 20
    assert ds.records._file is None  # (each worker opens the file itself)
    ds[0]  # the main process opens it too: forked workers must not share its position
    read_by = list(DataLoader(_WhoRead(ds), batch_size=None, num_workers=2))
    assert all(worker == opener != os.getpid() for worker, opener in read_by)
    expected = Counter(v for i, v in IDENTITIES.items() if i != BAD)
    orders = {}
    for epoch in (0, 1):
        labels, skipped = [], []
        for rank in (0, 1):
            got, bad = _epoch(ds, rank, 2, epoch, workers=2)
            labels += sum(got, [])
            skipped += bad
            orders[epoch, rank] = got
        assert Counter(labels) == expected  # every good record once, none twice
        assert skipped == [(f"{rec}#{BAD}", "bad_record")]
    single = _epoch(ds, 0, 1, 0, workers=0)[0]  # one process: each batch the two ranks' parts
    assert single == [a + b for a, b in zip(orders[0, 0], orders[0, 1])]
    assert _epoch(ds, 0, 2, 0, workers=0)[0] == orders[0, 0]  # the seeded shuffle, reproduced
    assert orders[1, 0] + orders[1, 1] != orders[0, 0] + orders[0, 1]  # and another one per epoch


def test_recordio_samples_decode_as_their_images_with_labels(rec):
    ds = build_dataset(DataConfig(source=str(rec), min_size=16), S, augment=False)
    files = build_dataset(DataConfig(source=str(_as_folder(rec)), min_size=16), S, augment=False)
    for k in (0, 2, 5):  # records 1, 3 (three floats), 6
        a, b = ds[k], files[k]
        assert a.label == IDENTITIES[k + 1] and a.name == f"{rec}#{k + 1}"
        assert torch.equal(a.image, b.image)
    bad = ds[BAD - 1]
    assert bad.image is None and bad.issues == ("bad_record",) and bad.label is None


def _as_folder(rec):
    """The image records as files 01.jpg .. 16.jpg, read from the fixture's writer input."""
    folder = rec.parent / "files"
    folder.mkdir(exist_ok=True)
    for i in range(1, N_IMAGES + 1):
        (folder / f"{i:02d}.jpg").write_bytes(_jpeg(i, size=(40, 44)))
    return folder


def test_pretraining_on_train_rec(rec, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", *BASE, "--set", f"data.source={rec}", "--set", "train.batch_size=8", "--max-steps", "2",
               "--output", str(run)])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    assert (run / "encoder.safetensors").is_file()
    rows = list(csv.DictReader(open(run / "skipped.csv", newline="")))
    assert rows == [{"path": f"{rec}#{BAD}", "reason": "bad_record"}]
    assert "bad_record: 1" in (run / "summary.yaml").read_text()

    rec.with_suffix(".idx").unlink()
    assert main(["train", *BASE, "--set", f"data.source={rec}", "--output", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pacofr train: error: data.source '{rec}': its index '{rec.with_suffix('.idx')}' does not exist "
                   "(a RecordIO pair is .rec + .idx)"], err


@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="NVIDIA DALI is not installed")
def test_recordio_through_dali_matches_pil(rec):
    from pacofr.data.dali import DaliDecoder

    cfg = DataConfig(source=str(rec), min_size=16)
    pil = build_dataset(cfg, S, seed=3)
    enc = build_dataset(dataclasses.replace(cfg, decoder="dali", dali_reader="python"), S, seed=3)
    a = collate([pil[i] for i in range(len(pil))])
    b = DaliDecoder(S, N_IMAGES, "cpu", threads=2)(collate_encoded([enc[i] for i in range(len(enc))]))
    assert b.issues == a.issues == Counter(bad_record=1) and b.skipped == a.skipped
    assert torch.equal(b.labels, a.labels) and torch.allclose(b.landmarks.nan_to_num(), a.landmarks.nan_to_num())
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert ((b.images - a.images) * std * 255).abs().mean() < 1.0


def test_identity_folders_and_lists(tmp_path):
    root = tmp_path / "ids"
    files = {"bob/1.jpg": 1, "alice/a.jpg": 0, "bob/2.jpg": 1, "carol/x/y.jpg": 2, "alice/b.jpg": 0}
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_jpeg(len(rel), size=(40, 40)))
    ds = build_dataset(DataConfig(source=str(root), labels="folders"), S, augment=False)
    assert {k: ds[i].label for i, k in enumerate(ds.keys)} == files and ds.num_classes == 3
    assert build_dataset(DataConfig(source=str(root)), S)[0].label is None  # labels only when asked

    (root / "loose.jpg").write_bytes(_jpeg(9, size=(40, 40)))
    with pytest.raises(ValueError, match="'loose.jpg' is not in an identity folder"):
        build_dataset(DataConfig(source=str(root), labels="folders"), S)

    listing = tmp_path / "list.txt"
    (root / "with space.jpg").write_bytes(_jpeg(8, size=(40, 40)))
    listing.write_text("# path label\nids/bob/1.jpg 7\nids/with space.jpg\t0\n\nids/carol/x/y.jpg 12\n")
    ds = build_dataset(DataConfig(source=str(listing), labels="list"), S, augment=False)
    assert [ds[i].label for i in range(3)] == [7, 0, 12] and ds.num_classes == 13
    assert ds.keys == ["ids/bob/1.jpg", "ids/with space.jpg", "ids/carol/x/y.jpg"]
    batch = collate([ds[i] for i in range(3)])
    assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == [7, 0, 12]

    listing.write_text("ids/bob/1.jpg 7\nids/bob/2.jpg bob\n")
    with pytest.raises(ValueError, match=r"list.txt' line 2: 'ids/bob/2.jpg bob' is not 'path label'"):
        build_dataset(DataConfig(source=str(listing), labels="list"), S)
    with pytest.raises(ValueError, match="data.labels=list reads a .txt list"):
        build_dataset(DataConfig(source=str(root), labels="list"), S)
    with pytest.raises(ValueError, match="data.labels='folders' is for image folders and .txt lists"):
        build_dataset(DataConfig(source=str(root / "train.rec"), labels="folders"), S)
    with pytest.raises(ConfigError, match="data.labels must be 'none', 'folders' or 'list', got 'folder'"):
        load_config("tiny", ["data.labels=folder"])
    with pytest.raises(ConfigError, match="data.align must be 'none' or 'arcface'"):
        load_config("tiny", ["data.align=insightface"])


def _rotation(angle: float) -> np.ndarray:
    return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


def test_similarity_recovers_a_planted_transform_and_matches_least_squares():
    dst = template(112)
    sr, t = 0.6 * _rotation(0.4), np.array([31.0, -7.5])  # template -> face; the face -> template is its inverse
    src = dst @ sr.T + t
    planted = np.linalg.inv(np.vstack([np.hstack([sr, t[:, None]]), [0, 0, 1]]))[:2]
    assert np.allclose(similarity(src, dst), planted, atol=1e-9)

    rng = np.random.default_rng(0)
    for mirror in (1.0, -1.0):  # a mirrored face: the best similarity still has no reflection
        noisy = src * [mirror, 1.0] + rng.normal(0, 2.0, src.shape)
        rows = [[x, -y, 1, 0] for x, y in noisy] + [[y, x, 0, 1] for x, y in noisy]
        (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)
        m = similarity(noisy, dst)
        assert np.allclose(m, [[a, -b, tx], [b, a, ty]], atol=1e-9)
        assert np.linalg.det(m[:, :2]) > 0
    assert np.allclose(template(224), (ARCFACE_112 + 0.5) * 2)


def _dotted_face(points: np.ndarray, size=(170, 180)) -> Image.Image:
    """A gray image with a bright 3 x 3 dot centred on each point (continuous coordinates)."""
    a = np.full((size[1], size[0], 3), 40, dtype=np.uint8)
    for x, y in points:
        a[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2] = 255
    return Image.fromarray(a)


def _dot_centres(image: np.ndarray, near: np.ndarray, radius: int = 6) -> np.ndarray:
    """The brightness-weighted centre (continuous coordinates) of the dot near each point."""
    g = image.astype(np.float64)[..., 0] - 40
    out = []
    for x, y in near:
        x0, y0 = int(x) - radius, int(y) - radius
        w = np.clip(g[y0:y0 + 2 * radius, x0:x0 + 2 * radius], 0, None)
        ys, xs = np.mgrid[y0:y0 + 2 * radius, x0:x0 + 2 * radius] + 0.5
        out.append([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])
    return np.array(out)


def _face_points():
    """Five points of a face turned by 0.3 rad, 1.2 x the template, in a 170 x 180 image; on
    pixel centres so that the dots are centred on them."""
    m = np.hstack([1.2 * _rotation(0.3), [[30.0], [10.0]]])
    return np.floor(transform_points(m, template(112))) + 0.5


def test_align_warps_the_landmarks_onto_the_template(tmp_path):
    points = _face_points()
    face, moved = align(_dotted_face(points), points, 112)
    assert face.size == (112, 112) and np.abs(moved - template(112)).max() < 0.5  # (points rounded to pixels)
    assert np.abs(_dot_centres(np.asarray(face), moved) - moved).max() < 0.15  # the pixels moved as the points

    # the reader: data.align=arcface with data.landmarks; no augmentation: the sample is the aligned face
    (tmp_path / "f").mkdir()
    _dotted_face(points).save(tmp_path / "f" / "a.png")
    _dotted_face(points).save(tmp_path / "f" / "b.png")
    (tmp_path / "lm.json").write_text(json.dumps({"a.png": points.tolist()}))
    cfg = DataConfig(source=str(tmp_path / "f"), landmarks=str(tmp_path / "lm.json"), align="arcface")
    ds = build_dataset(cfg, 112, augment=False)
    sample = ds[0]
    assert np.allclose(sample.landmarks.numpy(), moved, atol=1e-4) and sample.issues == ()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = torch.from_numpy(np.array(face)).permute(2, 0, 1).float() / 255
    assert torch.allclose(sample.image * std + mean, expected, atol=1e-5)
    assert ds[1].issues == ("landmarks_missing",) and ds[1].image.shape == (3, 112, 112)  # (not aligned)
    encoded = build_dataset(dataclasses.replace(cfg, decoder="dali"), 112, augment=False)[0]  # (for DALI: a PNG)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encoded.data.tobytes()))), np.asarray(face))
    assert np.allclose(encoded.landmarks.numpy(), moved, atol=1e-4)
    with pytest.raises(ValueError, match="data.align='arcface' warps each face by its landmarks: set data.landmarks"):
        build_dataset(dataclasses.replace(cfg, landmarks=""), 112)


def test_prepare_align_stores_aligned_crops(tmp_path, capsys):
    points = _face_points()
    face, moved = align(_dotted_face(points), points, 112)
    src = tmp_path / "wild"
    src.mkdir()
    for name in ("a.png", "b.png"):
        _dotted_face(points).save(src / name)
    (tmp_path / "lm.csv").write_text("a.png," + ",".join(f"{v:.4f}" for v in points.ravel()) + "\n")
    out = tmp_path / "aligned"
    assert main(["data", "prepare", str(src), str(out), "--landmarks", str(tmp_path / "lm.csv"), "--align"]) == 0
    report = json.loads((out / "prepare.json").read_text())
    assert (report["samples"], report["skips"], report["align"]) == (1, {"landmarks_missing": 1}, 112)
    with tarfile.open(out / "shard-000000.tar") as t:
        image = Image.open(t.extractfile("000000000.png"))
        stored = np.array(json.loads(t.extractfile("000000000.json").read()))
        assert image.size == (112, 112)
        assert np.asarray(image).tobytes() == face.tobytes()
    assert np.allclose(stored, moved, atol=1e-4)
    capsys.readouterr()
    assert main(["data", "prepare", str(src), str(tmp_path / "o2"), "--align"]) == 2
    assert "--align warps each face by its landmarks: give --landmarks FILE" in capsys.readouterr().err
