"""pacofr.data: decoding with skip/repair reasons, augmentation and landmarks, determinism,
file lists, landmark files, WebDataset shards, the embedded faces."""

import io
import json
import math
import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pacofr.config import DataConfig
from pacofr.data import (ASTRONAUT_FACE_BOX, IMAGENET_MEAN, IMAGENET_STD, REASONS, build_dataset, collate,
                         denormalize, embedded_faces)
from pacofr.data.items import Sample, make_item
from pacofr.data.transforms import FLIP_PERM, FaceTransform
from pacofr.data.landmarks import five_points

S = 64


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def face_rgb(i: int, size: int = 96) -> Image.Image:
    """A real face (LFW subset, gray) tinted to colour, as an RGB image of `size` px."""
    from skimage import data

    a = data.lfw_subset()[i][:, :, None] * np.array([1.0, 0.8, 0.6])
    a = np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB").resize((size, size), Image.BICUBIC)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def collect(ds, workers=0, batch_size=4):
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=workers)
    batches = list(loader)
    issues: dict[str, int] = {}
    for b in batches:
        for k, v in b.issues.items():
            issues[k] = issues.get(k, 0) + v
    return batches, issues


# -- a folder with good, repairable and broken files ------------------------------------------
GOOD = 5  # 4 faces (jpg, png, JPG in a subfolder, jpeg) + a colour-palette PNG
EXPECTED = {"truncated": 1, "empty": 1, "not_an_image": 1, "too_small": 1, "unreadable": 1,
            "cmyk_converted": 1, "gray_converted": 2, "rgba_converted": 1}
REPAIRED = 4


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    d = tmp_path_factory.mktemp("messy")
    (d / "sub").mkdir()
    face_rgb(0).save(d / "face0.jpg", quality=92)
    face_rgb(1).save(d / "face1.png")
    face_rgb(2).save(d / "sub" / "face2.JPG", "JPEG")
    face_rgb(3).save(d / "face3.jpeg", "JPEG")
    face_rgb(4).quantize(64).save(d / "palette.png")  # colour palette: converted, not reported
    jpg = encode(face_rgb(5), "JPEG")
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n" * 20)
    face_rgb(6).convert("CMYK").save(d / "cmyk.jpg", "JPEG")
    face_rgb(7).convert("L").save(d / "gray.png")
    Image.fromarray((np.arange(96 * 96).reshape(96, 96) * 7).astype(np.uint16)).save(d / "gray16.png")
    rgba = face_rgb(8).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    face_rgb(9, size=10).save(d / "tiny.png")
    os.symlink(d / "does_not_exist.jpg", d / "gone.jpg")  # a broken link: unreadable
    (d / "notes.txt").write_text("ignored: not an image extension")
    return d


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_named_like_an_image_is_unreadable_not_a_hang(tmp_path):
    import threading

    from pacofr.data.decode import read_bytes

    Image.new("RGB", (64, 64), (120, 90, 70)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    ds = build_dataset(cfg(source=str(tmp_path)), S)
    result = []
    reader = threading.Thread(target=lambda: result.append(collect(ds)[1]), daemon=True)
    reader.start()
    reader.join(30)  # (opening a FIFO for reading blocks until a writer comes)
    assert result == [{"unreadable": 1}], "the loader hung on the FIFO"
    assert read_bytes(tmp_path / "a.png")[1] is None


def test_reasons_tuple():
    assert REASONS == ("empty", "not_an_image", "truncated", "too_small", "too_large", "unreadable",
                       "bad_record", "gray_converted", "cmyk_converted", "rgba_converted", "landmarks_invalid",
                       "landmarks_missing")
    assert set(EXPECTED) <= set(REASONS)


def test_messy_folder_counts_with_workers(messy):
    ds = build_dataset(cfg(source=str(messy)), S)
    assert len(ds) == GOOD + sum(EXPECTED.values())  # notes.txt is not listed
    batches, issues = collect(ds, workers=2)
    assert issues == EXPECTED
    n = 0
    for b in batches:
        if b.images.shape[0] == 0:  # every item of this batch was skipped
            assert sum(b.issues.values()) > 0
            continue
        assert b.images.dtype == torch.float32 and b.images.shape[1:] == (3, S, S)
        assert torch.isfinite(b.images).all()
        assert b.landmarks.shape == (b.images.shape[0], 5, 2) and b.landmarks.isnan().all()
        n += b.images.shape[0]
    assert n == GOOD + REPAIRED


def test_repairs_are_right(messy):
    t = FaceTransform(S, augment=False)
    # 16-bit gray is scaled to 8 bits (PIL's plain convert would saturate it to white)
    flat16 = encode(Image.fromarray(np.full((40, 40), 128 * 257, np.uint16)), "PNG")
    item = make_item(flat16, None, t, 32, 0)
    assert item.issues == ("gray_converted",)
    assert torch.allclose(denormalize(item.image), torch.full((3, S, S), 128 / 255), atol=1e-3)
    # alpha is composited on black: a transparent half turns black, the opaque half keeps its colour
    rgba = Image.new("RGBA", (40, 40), (200, 100, 50, 255))
    rgba.paste((200, 100, 50, 0), (0, 0, 20, 40))
    item = make_item(encode(rgba, "PNG"), None, t, 32, 0)
    assert item.issues == ("rgba_converted",)
    img = denormalize(item.image) * 255
    assert img[:, :, :28].max() < 1.0
    assert torch.allclose(img[:, :, 36:].mean((1, 2)), torch.tensor([200.0, 100.0, 50.0]), atol=1.0)
    # CMYK JPEG comes back with its colours
    red = encode(Image.new("RGB", (40, 40), (220, 30, 30)).convert("CMYK"), "JPEG", quality=95)
    item = make_item(red, None, t, 32, 0)
    assert item.issues == ("cmyk_converted",)
    assert torch.allclose(denormalize(item.image).mean((1, 2)) * 255, torch.tensor([220.0, 30.0, 30.0]), atol=6)
    # a gray palette counts as gray; a colour palette is not a repair
    gray_p = Image.new("L", (40, 40), 90).convert("P")
    assert make_item(encode(gray_p, "PNG"), None, t, 32, 0).issues == ("gray_converted",)
    assert make_item((messy / "palette.png").read_bytes(), None, t, 32, 0).issues == ()


def test_skip_reasons_and_min_size(messy):
    t = FaceTransform(S)
    assert make_item(b"", None, t, 32, 0).issues == ("empty",)
    assert make_item(b"GIF89a garbage" * 3, None, t, 32, 0).issues in (("not_an_image",), ("truncated",))
    assert make_item((messy / "text.jpg").read_bytes(), None, t, 32, 0) == Sample(None, None, ("not_an_image",))
    assert make_item((messy / "truncated.jpg").read_bytes(), None, t, 32, 0).issues == ("truncated",)
    tiny = (messy / "tiny.png").read_bytes()
    assert make_item(tiny, None, t, 32, 0).issues == ("too_small",)
    assert make_item(tiny, None, t, 8, 0).issues == ()  # min_size is the only limit


def test_collate():
    img = torch.zeros(3, S, S)
    items = [Sample(None, None, ("empty",)),
             Sample(img, torch.full((5, 2), math.nan), ("gray_converted", "landmarks_invalid")),
             Sample(img + 1, torch.ones(5, 2)),
             Sample(None, None, ("empty",))]
    out = collate(items)
    assert out.images.shape == (2, 3, S, S) and out.landmarks.shape == (2, 5, 2)
    assert torch.equal(out.images[1], img + 1)
    assert out.issues == {"empty": 2, "gray_converted": 1, "landmarks_invalid": 1}
    none = collate([items[0], items[3]])
    assert none.images.shape[0] == 0 and none.landmarks.shape == (0, 5, 2)
    assert none.issues == {"empty": 2}
    with pytest.raises(TypeError, match="must be a pacofr.data Sample"):  # (a plain dict is not an item)
        collate([dict(image=img, landmarks=torch.ones(5, 2), issue=None)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_the_loader_pins_a_batch():
    ds = build_dataset(cfg(), S)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate, pin_memory=True)))
    assert batch.images.is_pinned() and batch.landmarks.is_pinned()


def test_denormalize_inverts_normalization():
    x = torch.rand(2, 3, 8, 8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(denormalize((x - mean) / std), x, atol=1e-6)
    assert denormalize(torch.full((3, 4, 4), 100.0)).max() == 1.0


# -- build-time errors -------------------------------------------------------------------------
def test_missing_and_empty_sources_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_dataset(cfg(source=str(missing)), S)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        build_dataset(cfg(source=str(empty)), S)
    lst = tmp_path / "list.txt"
    lst.write_text("\n# only a comment\n")
    with pytest.raises(ValueError, match=re.escape(str(lst))):
        build_dataset(cfg(source=str(lst)), S)
    lst.write_text("a.jpg\nb.jpg\n")
    with pytest.raises(FileNotFoundError, match=re.escape(str(lst))):
        build_dataset(cfg(source=str(lst)), S)
    shards = str(tmp_path / "train-{000..001}.tar")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train-000.tar"))):
        build_dataset(cfg(source=shards), S)


def test_file_list(messy, tmp_path):
    lst = messy / "list.txt"
    lst.write_text("face0.jpg\nsub/face2.JPG\n\nempty.jpg\nmissing.jpg\n")
    try:
        ds = build_dataset(cfg(source=str(lst)), S)
        assert ds.keys == ["face0.jpg", "sub/face2.JPG", "empty.jpg", "missing.jpg"]
        _, issues = collect(ds)
        assert issues == {"empty": 1, "unreadable": 1}
    finally:
        lst.unlink()


# -- determinism --------------------------------------------------------------------------------
def test_augmentation_is_a_function_of_seed_epoch_index(messy):
    ds = build_dataset(cfg(source=str(messy)), S, seed=3)
    i = ds.keys.index("face0.jpg")
    ds.set_epoch(5)
    a = ds[i].image
    ds.set_epoch(0)
    ds[i], ds[i + 1]
    ds.set_epoch(5)
    assert torch.equal(ds[i].image, a)  # a resumed run at epoch 5 sees the same sample
    again = build_dataset(cfg(source=str(messy)), S, seed=3)
    again.set_epoch(5)
    assert torch.equal(again[i].image, a)
    ds.set_epoch(6)
    assert not torch.equal(ds[i].image, a)
    other = build_dataset(cfg(source=str(messy)), S, seed=4)
    other.set_epoch(5)
    assert not torch.equal(other[i].image, a)


def test_workers_give_identical_batches(messy):
    ds = build_dataset(cfg(source=str(messy)), S, seed=1)
    ds.set_epoch(2)
    b0, i0 = collect(ds, workers=0)
    b2, i2 = collect(ds, workers=2)
    assert i0 == i2 == EXPECTED
    assert len(b0) == len(b2)
    for x, y in zip(b0, b2):
        assert torch.equal(x.images, y.images) and x.issues == y.issues


# -- landmarks ----------------------------------------------------------------------------------
# Dots in a 96 px image at these landmarks (continuous coordinates: pixel centre = index + 0.5),
# each in its own colour: left eye, right eye, nose, left mouth, right mouth.
POINTS = np.array([[30.5, 36.5], [64.5, 34.5], [48.5, 55.5], [33.5, 74.5], [61.5, 76.5]], np.float32)
COLOURS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1)]


def dotted_image(size=96, radius=2.5) -> Image.Image:
    yy, xx = np.mgrid[:size, :size] + 0.5
    a = np.zeros((size, size, 3), np.uint8)
    for (x, y), c in zip(POINTS, COLOURS):
        a[(xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2] = np.array(c, np.uint8) * 255
    return Image.fromarray(a)


def dot_centre(img01: torch.Tensor, colour) -> torch.Tensor:
    """Intensity-weighted centre (continuous coordinates) of the pixels of one dot colour."""
    on = torch.tensor(colour, dtype=torch.bool)
    inside = img01[on].min(0).values
    outside = img01[~on].max(0).values if (~on).any() else torch.zeros_like(inside)
    w = torch.where((inside > 0.15) & (outside < 0.25 * inside), inside, torch.zeros_like(inside))
    assert w.sum() > 0.5, f"dot {colour} not found"
    ys, xs = torch.meshgrid(torch.arange(w.shape[0]) + 0.5, torch.arange(w.shape[1]) + 0.5, indexing="ij")
    return torch.stack([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])


@pytest.fixture(scope="module")
def dotted(tmp_path_factory):
    d = tmp_path_factory.mktemp("dotted")
    dotted_image().save(d / "dots.png")
    Image.new("RGB", (96, 96), (40, 40, 40)).save(d / "plain.png")
    with open(d / "lm.csv", "w") as f:
        f.write("path," + ",".join(f"{a}{i}" for i in range(1, 6) for a in "xy") + "\n")
        f.write("dots.png," + ",".join(str(v) for v in POINTS.flatten()) + "\n")
    return d


@pytest.mark.parametrize("flip", [True, False])
def test_landmarks_follow_resize_and_flip(dotted, flip):
    c = cfg(source=str(dotted), landmarks=str(dotted / "lm.csv"), hflip=1.0 if flip else 0.0,
            scale_min=1.0, ratio_max=1.0, color_jitter=0.0)
    ds = build_dataset(c, S)
    item = ds[ds.keys.index("dots.png")]
    assert item.issues == ()
    lm = item.landmarks
    expected = torch.from_numpy(POINTS) * (S / 96)
    if flip:
        expected = expected[list(FLIP_PERM)]
        expected[:, 0] = S - expected[:, 0]
    assert torch.allclose(lm, expected, atol=1e-4)
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # left stays on the image's left
    img = denormalize(item.image)
    for j in range(5):
        src = FLIP_PERM[j] if flip else j  # after a flip, point j is the dot drawn for point FLIP_PERM[j]
        assert torch.dist(dot_centre(img, COLOURS[src]), lm[j]) < 1.0, (j, dot_centre(img, COLOURS[src]), lm[j])


def test_landmarks_follow_random_crops(dotted):
    c = cfg(source=str(dotted), landmarks=str(dotted / "lm.csv"), hflip=0.5, scale_min=0.6, ratio_max=1.3,
            color_jitter=0.0)
    ds = build_dataset(c, S)
    i = ds.keys.index("dots.png")
    flips, checked = set(), 0
    for epoch in range(8):
        ds.set_epoch(epoch)
        item = ds[i]
        lm, img = item.landmarks, denormalize(item.image)
        flip = ds.transform.params(96, 96, ds.sample_seed(i))["flip"]
        flips.add(flip)
        for j in range(5):
            if 4 <= lm[j, 0] <= S - 4 and 4 <= lm[j, 1] <= S - 4:  # dots the crop kept whole
                src = FLIP_PERM[j] if flip else j
                assert torch.dist(dot_centre(img, COLOURS[src]), lm[j]) < 1.5, (epoch, j)
                checked += 1
    assert checked >= 25
    assert flips == {True, False}  # both flipped and unflipped epochs were seen


def test_csv_header_is_skipped(dotted):
    from pacofr.data.landmarks import load_landmarks_file

    table = load_landmarks_file(str(dotted / "lm.csv"))
    assert list(table) == ["dots.png"]
    assert np.array_equal(table["dots.png"], POINTS)


def test_color_jitter_factors_and_formula():
    im = face_rgb(0, size=S)
    im = Image.fromarray((np.asarray(im) * 0.5 + 60).astype(np.uint8))  # away from 0 and 255: no clamping
    j = 0.3
    t, t0 = FaceTransform(S, color_jitter=j), FaceTransform(S, color_jitter=0.0)
    seen = []
    for seed in range(20):
        p = t.params(S, S, seed)
        b, c, sat = p["jitter"]
        assert all(1 - j <= f <= 1 + j for f in (b, c, sat))
        seen.append((b, c, sat))
        p0 = dict(p, jitter=None)
        x = denormalize(t0.apply(im, p0, torch.zeros(5, 2))[0])
        y = denormalize(t.apply(im, p, torch.zeros(5, 2))[0])
        # torchvision's formulas, step by step (no step saturates here)
        g = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        ref = x * b
        m = (ref * g).sum(0).mean()
        ref = (ref - m) * c + m
        gray = (ref * g).sum(0, keepdim=True)
        ref = (ref - gray) * sat + gray
        assert torch.allclose(y, ref.clamp(0, 1), atol=1e-5)
    spread = torch.tensor(seen)
    assert (spread.max(0).values - spread.min(0).values > 0.3).all()  # the factors really vary


def test_landmark_files_csv_json_68_and_invalid(dotted, tmp_path):
    base = tmp_path / "imgs"
    (base / "a").mkdir(parents=True)
    for name in ("p0.png", "p1.png", "p2.png", "p3.png", "a/p4.png", "p5.png"):
        Image.new("RGB", (96, 96), (120, 90, 70)).save(base / name)
    Image.new("L", (96, 96), 100).save(base / "g.png")
    rng = np.random.default_rng(0)
    pts68 = rng.uniform(10, 86, (68, 2)).astype(np.float32)
    c = cfg(source=str(base), scale_min=1.0, ratio_max=1.0, hflip=0.0, color_jitter=0.0)

    csv_path = tmp_path / "lm.csv"
    rows = ["p0.png," + ",".join(str(v) for v in POINTS.flatten()),          # 5 points, fine
            "a/p4.png," + ",".join(str(v) for v in pts68.flatten()),         # 68 points, fine
            "p1.png," + ",".join(["nan"] + [str(v) for v in POINTS.flatten()[1:]]),  # NaN
            "p2.png," + ",".join(["1000"] + [str(v) for v in POINTS.flatten()[1:]]),  # outside
            "p3.png,1,2,3",                                                   # wrong count
            "g.png," + ",".join(str(v) for v in POINTS.flatten())]            # fine (a gray image)
    csv_path.write_text("\n".join(rows) + "\n")  # no header line this time
    ds = build_dataset(replace(c, landmarks=(str(csv_path))), S)
    items = {k: ds[i] for i, k in enumerate(ds.keys)}
    scale = S / 96
    assert torch.allclose(items["p0.png"].landmarks, torch.from_numpy(POINTS) * scale, atol=1e-4)
    five = five_points(torch.from_numpy(pts68)[None])[0]
    assert torch.allclose(items["a/p4.png"].landmarks, five * scale, atol=1e-4)
    assert torch.allclose(items["a/p4.png"].landmarks[0], torch.from_numpy(pts68[36:42]).mean(0) * scale, atol=1e-4)
    for k in ("p1.png", "p2.png", "p3.png"):
        assert items[k].issues == ("landmarks_invalid",) and items[k].landmarks.isnan().all()
        assert items[k].image is not None
    assert items["p5.png"].issues == ("landmarks_missing",) and items["p5.png"].landmarks.isnan().all()  # unknown
    assert items["g.png"].issues == ("gray_converted",)
    _, issues = collect(ds)
    assert issues == {"landmarks_invalid": 3, "gray_converted": 1, "landmarks_missing": 1}

    json_path = tmp_path / "lm.json"
    json_path.write_text(json.dumps({"p0.png": pts68.tolist(), "a/p4.png": POINTS.tolist(),
                                     "g.png": [[float("nan"), 1.0]] * 5}))
    ds = build_dataset(replace(c, landmarks=(str(json_path))), S)
    items = {k: ds[i] for i, k in enumerate(ds.keys)}
    assert torch.allclose(items["p0.png"].landmarks, five * scale, atol=1e-4)
    assert torch.allclose(items["a/p4.png"].landmarks, torch.from_numpy(POINTS) * scale, atol=1e-4)
    assert items["g.png"].issues == ("gray_converted", "landmarks_invalid")  # both are reported
    _, issues = collect(ds)
    assert issues == {"landmarks_invalid": 1, "gray_converted": 1, "landmarks_missing": 4}  # p1, p2, p3, p5

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"/abs/elsewhere/p0.png": POINTS.tolist()}))
    with pytest.raises(ValueError, match=re.escape(str(wrong))):
        build_dataset(replace(c, landmarks=(str(wrong))), S)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        build_dataset(replace(c, landmarks=(str(tmp_path / "nope.csv"))), S)


# -- WebDataset shards ---------------------------------------------------------------------------
N_SHARDS, PER_SHARD = 4, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards of 4 samples; sample n carries landmarks whose first x is n + 1 (in 64 px).
    Shard 1 holds a member that is not an image, shard 2 a truncated JPEG, shard 3 NaN
    landmarks (the image is still good)."""
    import webdataset as wds

    d = tmp_path_factory.mktemp("shards")
    bad = {5: "not_an_image", 10: "truncated", 15: "landmarks_invalid"}
    for s in range(N_SHARDS):
        with wds.TarWriter(str(d / f"train-{s:03d}.tar")) as w:
            for k in range(PER_SHARD):
                n = s * PER_SHARD + k
                jpg = encode(face_rgb(n % 100, size=S), "JPEG")
                pts = POINTS * (S / 96)
                pts[0, 0] = n + 1
                meta = {"landmarks": pts.tolist()}
                if bad.get(n) == "not_an_image":
                    jpg = b"<html>not a jpeg</html>"
                elif bad.get(n) == "truncated":
                    jpg = jpg[: len(jpg) // 2]
                elif bad.get(n) == "landmarks_invalid":
                    meta = {"landmarks": [[float("nan"), 0.0]] * 5}
                w.write({"__key__": f"s{n:04d}", "jpg": jpg, "json": json.dumps(meta).encode()})
    return d, bad


def _ids(batches):
    ids = []
    for b in batches:
        first = b.landmarks[:, 0, 0]
        ids += [int(round(float(v))) - 1 for v in first if not math.isnan(float(v))]
    return ids


def test_shards_split_by_rank(shards):
    d, bad = shards
    src = str(d / "train-{000..003}.tar")
    c = cfg(source=src, shuffle_buffer=3)
    seen, total = [], {}
    for rank in range(2):
        ds = build_dataset(c, S, rank=rank, world_size=2, augment=False)
        assert isinstance(ds, torch.utils.data.IterableDataset)
        batches, issues = collect(ds, workers=2 if rank else 0)
        for k, v in issues.items():
            total[k] = total.get(k, 0) + v
        ids = _ids(batches)
        assert all((i // PER_SHARD) % 2 == rank for i in ids)  # rank r reads shards r, r + 2
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    good = set(range(N_SHARDS * PER_SHARD)) - set(bad)
    assert seen[0] | seen[1] == good
    assert total == {"not_an_image": 1, "truncated": 1, "landmarks_invalid": 1}
    with pytest.raises(ValueError, match="world_size=5"):
        build_dataset(c, S, rank=0, world_size=5)


def test_shards_deterministic_across_workers_and_epochs(shards):
    d, _ = shards
    ds = build_dataset(cfg(source=str(d / "train-{000..003}.tar"), shuffle_buffer=4), S, seed=7)

    def images(workers):
        batches, issues = collect(ds, workers=workers)
        imgs = torch.cat([b.images for b in batches])
        return imgs[torch.argsort(imgs.sum((1, 2, 3)))], issues

    ds.set_epoch(1)
    a, ia = images(0)
    b, ib = images(2)
    assert a.shape == (N_SHARDS * PER_SHARD - 2, 3, S, S) and ia == ib
    assert torch.equal(a, b)  # same samples, same augmentation, whatever the workers
    ds.set_epoch(2)
    c, _ = images(0)
    assert not torch.equal(a, c)


def test_shard_augmentation_differs_between_shards(tmp_path):
    """The same image at the same position of two shards gets two different augmentations
    (the seed includes the shard)."""
    import webdataset as wds

    jpg = encode(face_rgb(0, size=S), "JPEG")
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"x-{s}.tar")) as w:
            w.write({"__key__": "only", "jpg": jpg})
    ds = build_dataset(cfg(source=str(tmp_path / "x-{0..1}.tar"), shuffle_buffer=0), S)
    batches, issues = collect(ds)
    images = batches[0].images
    assert images.shape[0] == 2 and not torch.equal(images[0], images[1])
    assert issues == {"landmarks_missing": 2}  # (no .json member: the template stands in, counted)


def test_broken_tar_is_counted_not_fatal(shards, tmp_path):
    import tarfile

    d, _ = shards
    src = d / "train-000.tar"
    raw = src.read_bytes()
    with tarfile.open(src) as tf:
        members = tf.getmembers()
    assert len(members) == 2 * PER_SHARD  # .jpg + .json per sample
    third = members[2 * 2]  # the jpg of the third sample
    cuts = {"inside a member": third.offset_data + third.size // 2,  # tarfile raises
            "at a member boundary": third.offset}  # tarfile sees a clean end
    for what, cut in cuts.items():
        path = tmp_path / "cut.tar"
        path.write_bytes(raw[:cut])
        ds = build_dataset(cfg(source=str(path), shuffle_buffer=0), S, augment=False)
        batches, issues = collect(ds)
        assert issues == {"unreadable": 1}, what
        assert sum(b.images.shape[0] for b in batches) == 2, what  # the two samples before the cut
    ds = build_dataset(cfg(source=str(src), shuffle_buffer=0), S, augment=False)
    assert collect(ds)[1] == {}  # the complete shard has no issue


# -- embedded faces -------------------------------------------------------------------------------
def test_embedded_faces():
    from skimage import data

    ds = build_dataset(cfg(), S)
    assert len(ds) == 101
    batches, issues = collect(ds, batch_size=64)
    assert issues == {}
    imgs = torch.cat([b.images for b in batches])
    assert imgs.shape == (101, 3, S, S) and torch.isfinite(imgs).all()
    assert torch.cat([b.landmarks for b in batches]).isnan().all()
    # the first 100 are lfw_subset's faces (not its non-faces), at 25 px exactly the originals
    raw = embedded_faces(25)
    assert np.array_equal(raw[:100, :, :, 0], np.rint(data.lfw_subset()[:100] * 255).astype(np.uint8))
    # the astronaut crop: ASTRONAUT_FACE_BOX was chosen by eye on a 32-px grid drawn over
    # data.astronaut(). Its centre is skin (r > g > b with a moderate r - b), unlike the
    # wall beside it or the orange suit below it.
    def skin(a):
        r, g, b = (a[..., i].astype(int) for i in range(3))
        return ((r > g) & (g > b) & (r - b > 30) & (r - b < 110)).mean()

    face = embedded_faces(64)[-1]
    assert skin(face[16:48, 16:48]) > 0.9
    x0, y0, x1, y1 = ASTRONAUT_FACE_BOX
    astro = data.astronaut()
    assert skin(astro[y0:y1, x1:x1 + (x1 - x0)][37:-37, 37:-37]) < 0.2  # the wall to the right
    assert skin(astro[y1:y1 + (y1 - y0), x0:x1][37:-37, 37:-37]) < 0.2  # helmet ring and suit below


def test_every_dataset_has_set_epoch(messy, shards):
    for ds in (build_dataset(cfg(), S), build_dataset(cfg(source=str(messy)), S),
               build_dataset(cfg(source=str(shards[0] / "train-000.tar")), S)):
        ds.set_epoch(3)
        assert ds.epoch == 3


def test_collate_carries_labels_of_the_kept_samples():
    """Batch.labels: the kept samples' labels in order (a skipped sample's left out), None
    when any kept sample has none."""
    from pacofr.data.batch import collate
    from pacofr.data.items import Sample

    img, lm = torch.zeros(3, 4, 4), torch.zeros(5, 2)
    samples = [Sample(img, lm, label=7), Sample(None, None, ("unreadable",), "bad.jpg", label=3),
               Sample(img + 1, lm, label=2)]
    batch = collate(samples)
    assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == [7, 2]
    assert torch.equal(batch.images[1], img + 1)
    assert collate([Sample(img, lm, label=1), Sample(img, lm)]).labels is None
