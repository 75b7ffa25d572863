"""`eval-parsing --format lapa|celebamask` and `eval-attributes --format celeba`: a LaPa tree,
CelebAMask-HQ part masks and CelebA's txt files written as the releases ship them; the warp
into the crop and back against per-pixel computations, the part merge against the release's
order, F1 against loops, the attribute floor against a hand count, skips counted."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pacofr.cli import main
from pacofr.eval import celeba
from pacofr.eval.parsing import confusion_scores
from pacofr.eval.parsing_formats import LAPA_FIVE, CelebAMaskFaces, LapaFaces, head_template

S = 64  # the tiny config's input size
# the release's conversion script's order (class k + 1 for the k-th), written out independently
SCRIPT_ORDER = ["skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear", "mouth", "u_lip",
                "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth"]


def _shapes(h, w, rng):
    """A label map of known shapes: background, a skin disk, hair above, eyes, nose, lips."""
    yy, xx = np.mgrid[:h, :w]
    ids = np.zeros((h, w), np.uint8)
    cx, cy = w / 2 + rng.uniform(-2, 2), h / 2 + rng.uniform(-2, 2)
    ids[(xx - cx) ** 2 + (yy - cy) ** 2 < (0.4 * w) ** 2] = 1
    ids[(yy < cy - 0.3 * h) & (ids == 0)] = 10
    for cls, (dx, dy) in {4: (-0.15, -0.1), 5: (0.15, -0.1), 6: (0, 0.05), 7: (0, 0.18), 9: (0, 0.25)}.items():
        ids[(abs(xx - cx - dx * w) < 0.06 * w) & (abs(yy - cy - dy * h) < 0.03 * h)] = cls
    return ids


def _lapa_face(split, name, ids, five, rng, landmarks=True):
    """Writes images/NAME.jpg (coloured by class), labels/NAME.png, landmarks/NAME.txt (106
    points, the five of LAPA_FIVE at `five`)."""
    for sub in ("images", "labels", "landmarks"):
        (split / sub).mkdir(parents=True, exist_ok=True)
    palette = rng.integers(0, 256, (11, 3)).astype(np.uint8)
    Image.fromarray(palette[ids]).save(split / "images" / f"{name}.jpg", quality=95)
    Image.fromarray(ids, "L").save(split / "labels" / f"{name}.png")
    if landmarks:
        points = rng.uniform(0, ids.shape[1], (106, 2))
        points[list(LAPA_FIVE)] = five
        text = "106\n" + "".join(f"{x:.6f} {y:.6f}\n" for x, y in points)
        (split / "landmarks" / f"{name}.txt").write_text(text)


def _loop_f1(pred, truth, c):
    """Per-class F1 (%) by counting pixels one by one (None: a class absent from the truth)."""
    out = []
    for k in range(c):
        tp = fp = fn = 0
        for p, t in zip(pred.ravel().tolist(), truth.ravel().tolist()):
            if t == 255:
                continue
            tp += p == k and t == k
            fp += p == k and t != k
            fn += p != k and t == k
        out.append(None if tp + fn == 0 else 100 * 2 * tp / (2 * tp + fp + fn))
    return out


def test_lapa_warp_into_the_crop_and_back_scores_the_truth_itself_at_f1_100(tmp_path):
    rng = np.random.default_rng(0)
    ids = _shapes(32, 32, rng)
    _lapa_face(tmp_path / "test", "a", ids, head_template(S) / 2, rng)  # the similarity: x 2, no shift
    train, test = LapaFaces(str(tmp_path / "test"), S, "--train"), LapaFaces(str(tmp_path / "test"), S, "--test")
    (x, crop), reason = train[0]
    assert reason is None and x.shape == (3, S, S)
    assert (crop.numpy() == np.kron(ids, np.ones((2, 2), np.int64))).all()  # nearest neighbour, by hand
    (_, index), _ = test[0]
    [conf] = test.confusions([crop[None]], index[None])
    scores = confusion_scores(conf)
    present = sorted(set(ids.ravel().tolist()))
    assert [k for k, v in enumerate(scores["f1"]) if v is not None] == present
    assert all(scores["f1"][k] == pytest.approx(100.0) for k in present)
    assert int(conf.sum()) == ids.size  # scored at the original 32 x 32, not at the crop's 64 x 64


def test_warp_back_against_a_per_pixel_computation_and_f1_against_loops(tmp_path):
    rng = np.random.default_rng(1)
    ids = _shapes(37, 45, rng)
    angle, scale, shift = 0.3, 1.4, np.array([5.0, -3.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    five = (head_template(S) - shift) @ np.linalg.inv(rot).T  # the points the similarity takes to the template
    _lapa_face(tmp_path / "test", "a", ids, five, rng)
    test = LapaFaces(str(tmp_path / "test"), S, "--test")
    pred = torch.from_numpy(rng.integers(0, 11, (1, S, S)))
    [conf] = test.confusions([pred], torch.tensor([[0]]))
    expected = np.zeros_like(ids, dtype=np.int64)  # each label pixel's centre through the similarity, by hand
    for y in range(ids.shape[0]):
        for x in range(ids.shape[1]):
            u, v = rot @ np.array([x + 0.5, y + 0.5]) + shift
            if 0 <= u < S and 0 <= v < S:
                expected[y, x] = int(pred[0, int(v), int(u)])
    for got, want in zip(confusion_scores(conf)["f1"], _loop_f1(expected, ids.astype(np.int64), 11)):
        assert (got is None and want is None) or got == pytest.approx(want)


# LaPa's 106-point markup (0-based), written out independently of the code: the points the
# five-point warp must take; 46, the nose tip of another common 106-point markup, is not one
JD106 = {"left_eye_centre": 104, "right_eye_centre": 105, "nose_tip": 54, "left_mouth_corner": 84,
         "right_mouth_corner": 90}
OTHER_MARKUPS_NOSE_TIP = 46


def test_lapa_warp_takes_the_markups_eye_centres_nose_tip_and_mouth_corners_to_the_template(tmp_path):
    """A 106-point face whose markup points sit where a similarity of the template puts them, the
    other points elsewhere: the warp must land those five exactly."""
    rng = np.random.default_rng(7)
    angle, scale, shift = -0.2, 1.7, np.array([3.0, 9.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    five = (head_template(S) - shift) @ np.linalg.inv(rot).T
    points = rng.uniform(0, 40, (106, 2))
    for k, index in enumerate(JD106.values()):  # (the template's order: image-left eye first)
        points[index] = five[k]
    points[OTHER_MARKUPS_NOSE_TIP] = five[2] + [0.0, -6.0]  # (near the nose, not on its tip)
    split = tmp_path / "test"
    for sub in ("images", "labels", "landmarks"):
        (split / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(split / "images" / "a.jpg")
    Image.fromarray(np.zeros((40, 40), np.uint8), "L").save(split / "labels" / "a.png")
    (split / "landmarks" / "a.txt").write_text("106\n" + "".join(f"{x:.6f} {y:.6f}\n" for x, y in points))
    matrix, reason = LapaFaces(str(split), S, "--test").matrix(0, 40, 40)
    assert reason is None
    landed = points[list(JD106.values())] @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(landed, head_template(S), atol=1e-6)


def _celebamask(root, n, rng, parts_of):
    """CelebAMask-HQ's folder: n images (128 px, masks 64 px), part masks from `parts_of(i)`
    ({part: bool [64, 64]}), the mapping, CelebA's partition (HQ image i is CelebA's 'orig_i')."""
    (root / "CelebA-HQ-img").mkdir(parents=True)
    lines, part_lines = ["idx orig_idx orig_file"], []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3)).astype(np.uint8)).save(root / "CelebA-HQ-img" / f"{i}.jpg")
        folder = root / "CelebAMask-HQ-mask-anno" / str(i // 2000)
        folder.mkdir(parents=True, exist_ok=True)
        for k, (part, on) in enumerate(parts_of(i).items()):
            mask = (on * 255).astype(np.uint8)
            # the release's masks come as 3-channel and as grey PNGs: both read
            Image.fromarray(np.stack([mask] * 3, -1) if k % 2 else mask).save(folder / f"{i:05d}_{part}.png")
        lines.append(f"{i} {1000 + i} {100001 + i:06d}.jpg")
        part_lines.append(f"{100001 + i:06d}.jpg {[0, 0, 1, 2][i % 4]}")
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(part_lines) + "\n")


def test_celebamask_parts_merge_in_the_release_order_and_split_by_celeba_partition(tmp_path):
    rng = np.random.default_rng(2)
    masks = {i: {p: rng.uniform(size=(64, 64)) < 0.3 for p in rng.permutation(SCRIPT_ORDER)[:6]} for i in range(8)}
    _celebamask(tmp_path, 8, rng, lambda i: masks[i])
    train = CelebAMaskFaces(str(tmp_path), None, S, "--train")
    test = CelebAMaskFaces(str(tmp_path), None, S, "--test")
    assert train.keys == ["0.jpg", "1.jpg", "4.jpg", "5.jpg"] and test.keys == ["3.jpg", "7.jpg"]
    for dataset in (train, test):
        for index, key in enumerate(dataset.keys):
            want = np.zeros((64, 64), np.int64)
            for k, part in enumerate(SCRIPT_ORDER):
                if part in masks[int(key[:-4])]:
                    want[masks[int(key[:-4])][part]] = k + 1  # a later part over an earlier one
            got, reason = dataset.ids(index)
            assert reason is None and (got == want).all()
    (_, crop), _ = train[0]
    assert (crop.numpy() == train.ids(0)[0]).all()  # 64 px masks, 64 px crop: one to one
    (_, index), _ = test[0]
    [conf] = test.confusions([torch.from_numpy(test.ids(0)[0])[None]], index[None])
    assert int(conf.sum()) == 64 * 64 and int(conf.trace()) == 64 * 64


def test_lapa_end_to_end(encoder, tmp_path, capsys):
    rng = np.random.default_rng(3)
    for split, n in (("train", 10), ("test", 7)):
        for i in range(n):
            _lapa_face(tmp_path / split, f"{i:03d}", _shapes(40, 40, rng), head_template(S) * 40 / S
                       + rng.uniform(-1, 1, (5, 2)), rng, landmarks=(split, i) != ("test", 6))
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "test" / "labels" / "stray.png")
    out = tmp_path / "lapa.json"
    rc = main(["eval-parsing", "--config", "tiny", "--encoder", str(encoder), "--format", "lapa",
               "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--workers", "0",
               "--min-test", "5", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert result["protocol"] == "lapa" and "crop" in result["conventions"] and result["classes"] == 11
    assert list(result["f1_by_class"]) == ["background", "skin", "left_eyebrow", "right_eyebrow", "left_eye",
                                           "right_eye", "nose", "upper_lip", "inner_mouth", "lower_lip", "hair"]
    assert result["test_images"] == 6 and result["skipped_test"] == {"no_image": 1, "no_landmarks": 1}
    present = [v for k, v in result["f1_by_class"].items() if k != "background" and v is not None]
    assert result["mean_f1"] == pytest.approx(sum(present) / len(present))
    with open(tmp_path / "lapa.skipped.csv") as f:
        rows = sorted((r["reason"], r["path"].rsplit("/", 1)[-1]) for r in csv.DictReader(f))
    assert rows == [("no_image", "stray.png"), ("no_landmarks", "006.jpg")]
    assert Image.open(tmp_path / "lapa.preview.png").size[0] > 0


def test_parsing_format_options_refused_in_one_line(encoder, tmp_path, capsys):
    base = ["eval-parsing", "--config", "tiny", "--encoder", str(encoder), "--train", str(tmp_path), "--test",
            str(tmp_path)]
    for extra, says in ((["--format", "pngs", "--classes", "3"], "--format pngs needs --train-labels"),
                        (["--format", "lapa", "--train-labels", "x"], "--train-labels is for --format pngs"),
                        (["--format", "lapa", "--classes", "5"], "LaPa has 11"),
                        (["--format", "lapa"], "give a LaPa split folder")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


# -- CelebA attributes -----------------------------------------------------------------------------
NAMES = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive"] + [f"Attr_{k}" for k in range(37)]


def _celeba(root, n, rng):
    """img_align_celeba/ (178 x 218 images), list_attr_celeba.txt and list_eval_partition.txt as
    the release writes them (space-aligned values, a trailing space after the names)."""
    (root / "img_align_celeba").mkdir(parents=True)
    values = np.where(rng.uniform(size=(n, 40)) < 0.35, 1, -1)
    split = rng.permutation(np.array([0] * (n // 2) + [1] * (n // 6) + [2] * (n - n // 2 - n // 6)))
    lines = [f"{n}", " ".join(NAMES) + " "]
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (218, 178, 3)).astype(np.uint8)).save(root / "img_align_celeba" / name)
        lines.append(name + "".join(f" {v:2d}" for v in values[i]))
    with open(root / "list_attr_celeba.txt", "wb") as f:
        f.write(("\r\n".join(lines) + "\r\n").encode())
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {s}\n" for i, s in enumerate(split)))
    return values, split


def test_celeba_files_read_back(tmp_path):
    rng = np.random.default_rng(4)
    values, split = _celeba(tmp_path, 12, rng)
    names, table = celeba.read_attributes(str(tmp_path / "list_attr_celeba.txt"), "--train")
    assert names == NAMES and len(table) == 12
    assert (table["000003.jpg"] == (values[2] > 0)).all()
    names, train = celeba.attribute_split(str(tmp_path / "list_attr_celeba.txt"),
                                          str(tmp_path / "list_eval_partition.txt"), "train", "--train", limit=4)
    assert list(train) == [f"{i + 1:06d}.jpg" for i in np.flatnonzero(split == 0)[:4]]
    (tmp_path / "bad.txt").write_text("3\nA B\n000001.jpg 1 -1\n")
    with pytest.raises(ValueError, match="counts 3 images, it lists 1"):
        celeba.read_attributes(str(tmp_path / "bad.txt"), "--train")


def test_celeba_attributes_end_to_end_floor_against_a_hand_count(encoder, tmp_path, capsys):
    rng = np.random.default_rng(5)
    values, split = _celeba(tmp_path, 48, rng)
    test_rows = np.flatnonzero(split == 2)
    (tmp_path / "img_align_celeba" / f"{test_rows[0] + 1:06d}.jpg").unlink()  # a test row without its image
    out = tmp_path / "celeba.json"
    rc = main(["eval-attributes", "--config", "tiny", "--encoder", str(encoder), "--format", "celeba",
               "--train", str(tmp_path / "img_align_celeba"), "--train-labels", str(tmp_path / "list_attr_celeba.txt"),
               "--test", str(tmp_path / "img_align_celeba"), "--test-labels", str(tmp_path / "list_attr_celeba.txt"),
               "--max-train", "20", "--workers", "0", "--min-test", "5", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    train_rows = np.flatnonzero(split == 0)[:20]
    assert result["protocol"] == "celeba" and result["conventions"]["max_train"] == 20
    assert result["train_images"] == 20 and result["test_images"] == len(test_rows) - 1
    assert result["skipped_test"] == {"no_image": 1}
    kept = test_rows[1:]
    for a, name in enumerate(NAMES):  # the floor: each attribute's train majority, counted on the test rows
        majority = 1 if (values[train_rows, a] > 0).sum() * 2 > len(train_rows) else -1
        hits = sum(1 for r in kept if values[r, a] == majority)
        assert result["majority"][name] == pytest.approx(100 * hits / len(kept))
    assert result["mean_accuracy"] == pytest.approx(sum(result["accuracy"].values()) / 40)
    assert Image.open(tmp_path / "celeba.preview.png").size[0] > 0


def test_celebamask_end_to_end(encoder, tmp_path, capsys):
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[:64, :64]

    def parts(i):
        if i == 7:  # a test image without any part mask
            return {}
        cx = 32 + rng.uniform(-4, 4)
        return {"skin": (xx - cx) ** 2 + (yy - 32) ** 2 < 400, "hair": yy < 14, "nose": abs(xx - cx) + abs(yy - 34) < 4}

    _celebamask(tmp_path, 32, rng, parts)
    out = tmp_path / "celebamask.json"
    rc = main(["eval-parsing", "--config", "tiny", "--encoder", str(encoder), "--format", "celebamask",
               "--train", str(tmp_path), "--test", str(tmp_path), "--workers", "0", "--min-test", "5",
               "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert result["protocol"] == "celebamask" and result["classes"] == 19
    assert list(result["f1_by_class"])[:3] == ["background", "skin", "nose"]
    assert result["train_images"] == 16 and result["test_images"] == 7 and result["skipped_test"] == {"no_labels": 1}
    present = [k for k, v in result["f1_by_class"].items() if v is not None]
    assert present == ["background", "skin", "nose", "hair"]
