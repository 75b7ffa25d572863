"""`eval-alignment --format wflw|300w|cofw|aflw19`: the benchmarks' annotation files written in
their exact formats (WFLW list lines, .pts files, COFW's and AFLW-19's .mat), read back; the
metrics (NME scales, FR, AUC, the occluded / visible split) against brute-force computations;
the crop from the box checked through the mean shape's NME computed by hand; bad and missing
labels counted."""

import json

import numpy as np
import pytest
import scipy.io
import torch

from pacofr.cli import main
from pacofr.eval import benchmarks, formats
from pacofr.eval.alignment import auc, benchmark_scale, failure_rate
from test_data import POINTS
from test_eval import _dots_face

S = 64  # the tiny config's input size


def _layout(k: int, anchors: dict, seed: int) -> np.ndarray:
    """[k, 5] mixtures of the 5 dots: point i of `anchors` sits on dot anchors[i]."""
    mix = np.random.default_rng(seed).dirichlet(np.ones(5), k)
    for i, dot in anchors.items():
        mix[i] = np.eye(5)[dot]
    return mix


MIX = {98: _layout(98, {60: 0, 72: 1, 96: 0, 97: 1}, 1), 68: _layout(68, {36: 0, 45: 1}, 2),
       29: _layout(29, {8: 0, 9: 1}, 3), 19: _layout(19, {}, 4)}


def _face5(rng, centre):
    return (POINTS - POINTS.mean(0)) * rng.uniform(0.8, 1.1) + centre + rng.uniform(-3, 3, (5, 2))


def _scene(path, faces5, size=(160, 160)):
    """An image of the dot faces `faces5` (each [5, 2]) on a size[0] x size[1] background."""
    img = np.asarray(_dots_face(faces5[0], size)).copy()
    for f in faces5[1:]:
        other = np.asarray(_dots_face(f, size))
        drawn = (other != 40).any(-1)
        img[drawn] = other[drawn]
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _box(points, pad=8.0):
    return (*(points.min(0) - pad), *(points.max(0) + pad))


def _run(encoder, fmt, train, train_lm, test, test_lm, out):
    rc = main(["eval-alignment", "--config", "tiny", "--encoder", str(encoder), "--format", fmt, "--train", str(train),
               "--train-landmarks", str(train_lm), "--test", str(test), "--test-landmarks", str(test_lm),
               "--workers", "0", "--min-test", "5", "--output", str(out)])
    assert rc == 0
    return json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))


# -- metrics against brute force -------------------------------------------------------------------
def test_fr_and_auc_against_a_ced_curve_integrated_numerically():
    errors = torch.tensor([0.01, 0.03, 0.05, 0.05, 0.09, 0.12, 0.5, float("nan")], dtype=torch.float64)
    for t in (0.07, 0.08, 0.1):
        fails = sum(1 for e in errors.tolist() if not (e <= t))  # (NaN fails)
        assert failure_rate(errors, t) == pytest.approx(100 * fails / len(errors))
        steps = 200000  # midpoint rule on the CED curve, the fraction of faces at or below each e
        area = 0.0
        for j in range(steps):
            e = (j + 0.5) * t / steps
            area += sum(1 for v in errors.tolist() if v <= e) / len(errors)
        assert auc(errors, t) == pytest.approx(100 * area / steps, abs=1e-3)


def test_scales_by_hand():
    rng = np.random.default_rng(0)
    p68 = torch.from_numpy(rng.uniform(0, 100, (3, 68, 2)))
    for i in range(3):
        left, right = p68[i, 36:42].numpy().mean(0), p68[i, 42:48].numpy().mean(0)
        assert float(benchmark_scale(p68, "inter_pupil")[i]) == pytest.approx(np.hypot(*(left - right)))
        corners = (p68[i, 36] - p68[i, 45]).numpy()
        assert float(benchmark_scale(p68, "inter_ocular")[i]) == pytest.approx(np.hypot(*corners))
    p29 = torch.from_numpy(rng.uniform(0, 100, (1, 29, 2)))
    assert float(benchmark_scale(p29, "inter_ocular")[0]) == pytest.approx(float((p29[0, 8] - p29[0, 9]).norm()))
    # COFW's pupils are its points 17 and 18 counted from 1
    assert float(benchmark_scale(p29, "inter_pupil")[0]) == pytest.approx(np.hypot(*(p29[0, 16] - p29[0, 17]).numpy()))
    boxes = torch.tensor([[10.0, 20.0, 40.0, 100.0]], dtype=torch.float64)  # w 30, h 80
    assert float(benchmark_scale(p29, "box", boxes)[0]) == pytest.approx(np.sqrt(30 * 80))
    assert float(benchmark_scale(p29, "box_diag", boxes)[0]) == pytest.approx(np.hypot(30, 80))


def test_occluded_and_visible_point_nme_against_a_loop():
    rng = np.random.default_rng(1)
    dist, scale = torch.from_numpy(rng.uniform(0, 5, (4, 29))), torch.from_numpy(rng.uniform(20, 40, 4))
    occluded = torch.from_numpy(rng.uniform(size=(4, 29)) < 0.3)
    got = benchmarks.split_nme(dist, scale, occluded)
    for flag, key in ((True, "occluded_points_nme"), (False, "visible_points_nme")):
        vals = [dist[i, k] / scale[i] for i in range(4) for k in range(29) if bool(occluded[i, k]) == flag]
        assert got[key] == pytest.approx(100 * float(sum(vals) / len(vals)))
    assert got["occluded_points"] == int(occluded.sum())


# -- readers ----------------------------------------------------------------------------------------
def test_pts_file_and_300w_subsets(tmp_path):
    pts = np.random.default_rng(0).uniform(0, 100, (68, 2))
    text = "version: 1\nn_points:  68\n{\n" + "".join(f"{x:.3f} {y:.3f}\n" for x, y in pts) + "}\n"
    (tmp_path / "ibug").mkdir()
    (tmp_path / "helen").mkdir()
    (tmp_path / "ibug" / "a.pts").write_text(text)
    (tmp_path / "helen" / "b.pts").write_text(text.replace("n_points:  68", "n_points: 5"))
    np.testing.assert_allclose(formats.read_pts(str(tmp_path / "ibug" / "a.pts")), pts, atol=1e-3)
    faces = formats.read_300w(["ibug/a.jpg", "helen/b.jpg", "helen/c.jpg"], str(tmp_path), "--test")
    assert [(f.subsets, f.problem) for f in faces] == [
        (("challenging",), None), (("common",), "labels_invalid"), (("common",), "no_landmarks")]


def test_aflw19_mat(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "AFLW_TRAIN", 2)
    names = np.empty((3, 1), dtype=object)
    for i, n in enumerate(["0/a.jpg", "0/b.jpg", "2/c.jpg"]):
        names[i, 0] = np.array([n])
    data = np.arange(3 * 38, dtype=np.float64).reshape(3, 38)
    bbox = np.array([[1.0, 50, 2, 60], [3, 40, 4, 70], [5, 30, 6, 80]])  # left, right, top, bottom
    mask = np.ones((3, 19))
    mask[2, 4] = 0
    scipy.io.savemat(tmp_path / "AFLWinfo_release.mat",
                     {"nameList": names, "data": data, "bbox": bbox, "mask_new": mask, "ra": np.array([[3, 1, 2]])})
    path = str(tmp_path / "AFLWinfo_release.mat")
    train, test = formats.read_aflw19(path, "train", "x"), formats.read_aflw19(path, "test", "x")
    assert [f.key for f in train] == ["2/c.jpg", "0/a.jpg"] and [f.key for f in test] == ["0/b.jpg"]
    assert train[0].box == (5, 6, 30, 80) and train[0].subsets == () and train[1].subsets == ("frontal",)
    np.testing.assert_array_equal(train[1].points[:, 0], data[0, :19])
    np.testing.assert_array_equal(train[1].points[:, 1], data[0, 19:])
    scipy.io.savemat(tmp_path / "bad.mat", {"data": data})
    with pytest.raises(ValueError, match="has no variable nameList"):
        formats.read_aflw19(str(tmp_path / "bad.mat"), "test", "--test-landmarks")


# -- end to end --------------------------------------------------------------------------------------
def _wflw_split(folder, n, seed):
    """n scenes (one holds two faces) with their list_98pt_rect_attr lines; plus a short line, a
    line with a NaN, a line naming no image and an unreadable image."""
    rng = np.random.default_rng(seed)
    lines, faces = [], []
    for i in range(n):
        centre = rng.uniform(65, 95, 2)
        f5 = _face5(rng, centre)
        name = f"{i % 3}--scene/s{i:03d}.png"
        pair = [f5] + ([_face5(rng, centre + [150, 0])] if i == 0 else [])
        _scene(folder / name, pair, (320, 160) if i == 0 else (160, 160))
        for f in pair:
            pts = MIX[98] @ f
            flags = rng.integers(0, 2, 6)
            lines.append(" ".join(f"{v:.4f}" for v in pts.ravel()) + " " + " ".join(f"{v:.2f}" for v in _box(f))
                         + " " + " ".join(str(v) for v in flags) + " " + name)
            faces.append((pts, _box(f), flags))
    good = lines[1].split()
    lines.append(" ".join(good[1:]))  # 206 values: labels_invalid
    lines.append(" ".join(["nan"] + good[1:]))
    lines.append(" ".join(good[:-1] + ["9--gone/missing.png"]))
    (folder / "0--scene" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    lines.append(" ".join(good[:-1] + ["0--scene/broken.png"]))
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return faces


def _mean_shape_nme(train_faces, test_faces, scale_of, threshold=None):
    """The mean shape's NME computed by hand: each face's crop (1.25 x the box's longer side,
    around its centre), the train landmarks' mean in crop pixels mapped into each test crop;
    with a threshold, also its FR and AUC (the CED curve summed on a fine grid)."""
    def crop(box):
        x0, y0, x1, y1 = box
        side = 1.25 * max(x1 - x0, y1 - y0)
        return np.array([(x0 + x1 - side) / 2, (y0 + y1 - side) / 2]), side

    in_crop = []
    for pts, box, *_ in train_faces:
        origin, side = crop(box)
        in_crop.append((pts - origin) * S / side)
    mean = np.mean(in_crop, 0)
    errors = []
    for pts, box, *rest in test_faces:
        origin, side = crop(box)
        guess = mean * side / S + origin
        errors.append(np.mean(np.hypot(*(guess - pts).T)) / scale_of(pts, box))
    if threshold is None:
        return 100 * np.mean(errors)
    grid = (np.arange(20000) + 0.5) * threshold / 20000
    ced = [np.mean([e <= g for e in errors]) for g in grid]
    return 100 * np.mean(errors), 100 * np.mean([e > threshold for e in errors]), 100 * np.mean(ced)


def test_wflw_end_to_end(encoder, tmp_path):
    train, test = _wflw_split(tmp_path / "train", 40, 1), _wflw_split(tmp_path / "test", 14, 2)
    result = _run(encoder, "wflw", tmp_path / "train", tmp_path / "train" / "list.txt", tmp_path / "test",
                  tmp_path / "test" / "list.txt", tmp_path / "out" / "wflw.json")
    assert result["protocol"] == "wflw" and result["train_faces"] == 41 and result["test_faces"] == 15
    assert result["skipped_test"] == {"no_image": 1, "labels_invalid": 2, "not_an_image": 1}
    inter_ocular = lambda pts, box: np.hypot(*(pts[60] - pts[72]))  # noqa: E731
    assert result["mean_shape_nme"]["inter_ocular"] == pytest.approx(_mean_shape_nme(train, test, inter_ocular),
                                                                      rel=1e-4)
    pose = [face for face in test if face[2][0]]  # (the scores of a subset: the pose flag's faces)
    for name, faces in (("full", test), ("pose", pose)):
        nme, fr, area = _mean_shape_nme(train, faces, inter_ocular, 0.1)
        got = result["mean_shape"]["inter_ocular"][name]
        assert (got["nme"], got["fr"], got["auc"]) == pytest.approx((nme, fr, area), rel=1e-4, abs=1e-3)
    parts = result["nme"]["inter_ocular"]
    for k, name in enumerate(formats.WFLW_SUBSETS):
        assert parts[name]["faces"] == sum(int(flags[k]) for _, _, flags in test)
    assert parts["full"]["faces"] == 15 and parts["full"]["nme"] < result["mean_shape_nme"]["inter_ocular"]
    skipped = (tmp_path / "out" / "wflw.skipped.csv").read_text()
    assert "missing.png,no_image,test" in skipped and "broken.png,not_an_image,test" in skipped
    assert (tmp_path / "out" / "wflw.preview.png").stat().st_size > 0


def _cofw_mat(path, n, seed, train):
    rng = np.random.default_rng(seed)
    images, phis = np.empty((n, 1), dtype=object), np.zeros((n, 87))
    for i in range(n):
        f5 = _face5(rng, rng.uniform(60, 90, 2))
        img = np.asarray(_dots_face(f5, (150, 140)))
        images[i, 0] = img if i % 4 else img.mean(-1).astype(np.uint8)  # some grey, as in the release
        pts = MIX[29] @ f5
        phis[i, :29], phis[i, 29:58], phis[i, 58:] = pts[:, 0], pts[:, 1], rng.uniform(size=29) < 0.25
    phis[1, 3] = np.nan
    key = "Tr" if train else "T"
    scipy.io.savemat(path, {f"Is{key}": images, f"phis{key}": phis, f"bboxes{key}": np.zeros((n, 4))})
    return phis


def test_cofw_end_to_end(encoder, tmp_path):
    train_phis = _cofw_mat(tmp_path / "COFW_train_color.mat", 40, 1, True)
    phis = _cofw_mat(tmp_path / "COFW_test_color.mat", 12, 2, False)
    train, test = tmp_path / "COFW_train_color.mat", tmp_path / "COFW_test_color.mat"
    result = _run(encoder, "cofw", train, train, test, test, tmp_path / "cofw.json")
    assert result["test_faces"] == 11 and result["skipped_test"] == {"labels_invalid": 1}
    usable = [i for i in range(12) if i != 1]
    assert result["occluded_points"] == int(phis[usable, 58:].sum())
    assert result["occluded_points_nme"] > 0 and result["visible_points_nme"] > 0

    def faces(rows):  # (points, the landmarks' box) of the usable rows
        pts = [np.stack([row[:29], row[29:58]], 1) for i, row in enumerate(rows) if i != 1]
        return [(p, (*p.min(0), *p.max(0))) for p in pts]

    pupils = lambda pts, box: np.hypot(*(pts[16] - pts[17]))  # noqa: E731
    for norm, scale_of in (("inter_pupil", pupils), ("inter_ocular", lambda pts, box: np.hypot(*(pts[8] - pts[9])))):
        nme, fr, area = _mean_shape_nme(faces(train_phis), faces(phis), scale_of, 0.1)
        got = result["mean_shape"][norm]["full"]
        assert (got["nme"], got["fr"], got["auc"]) == pytest.approx((nme, fr, area), rel=1e-4, abs=1e-3)


def test_aflw19_and_300w_mean_shape_by_hand(encoder, tmp_path, monkeypatch):
    """The box norms (AFLW-19) and the landmarks' box crop (300W) through the mean shape."""
    monkeypatch.setattr(formats, "AFLW_TRAIN", 30)
    rng = np.random.default_rng(3)
    n, names, data, bbox, faces = 40, np.empty((40, 1), dtype=object), np.zeros((40, 38)), np.zeros((40, 4)), []
    for i in range(n):
        f5 = _face5(rng, rng.uniform(65, 95, 2))
        _scene(tmp_path / "flickr" / f"{i}.png", [f5])
        pts, box = MIX[19] @ f5, _box(f5, 5.0)
        names[i, 0] = np.array([f"{i}.png"])
        data[i] = np.concatenate([pts[:, 0], pts[:, 1]])
        bbox[i] = (box[0], box[2], box[1], box[3])
        faces.append((pts, box))
    scipy.io.savemat(tmp_path / "AFLWinfo_release.mat", {"nameList": names, "data": data, "bbox": bbox,
                                                         "mask_new": np.ones((n, 19)), "ra": np.arange(1, n + 1)[None]})
    mat = str(tmp_path / "AFLWinfo_release.mat")
    result = _run(encoder, "aflw19", tmp_path / "flickr", mat, tmp_path / "flickr", mat, tmp_path / "aflw.json")
    assert result["test_faces"] == 10 and result["nme"]["box"]["frontal"]["faces"] == 10
    wh = lambda box: (box[2] - box[0], box[3] - box[1])  # noqa: E731
    by_box = lambda pts, box: np.sqrt(np.prod(wh(box)))  # noqa: E731
    by_diag = lambda pts, box: np.hypot(*wh(box))  # noqa: E731
    assert result["mean_shape_nme"]["box"] == pytest.approx(_mean_shape_nme(faces[:30], faces[30:], by_box), rel=1e-4)
    assert result["mean_shape_nme"]["box_diag"] == pytest.approx(_mean_shape_nme(faces[:30], faces[30:], by_diag),
                                                                 rel=1e-4)

    pts_faces = {}
    for split, count in (("train", 30), ("test", 10)):
        for i in range(count):
            sub = "ibug" if split == "test" and i < 4 else "lfpw"
            f5 = _face5(rng, rng.uniform(65, 95, 2))
            _scene(tmp_path / split / sub / f"{i}.png", [f5])
            pts = MIX[68] @ f5
            (tmp_path / split / sub / f"{i}.pts").write_text(
                "version: 1\nn_points: 68\n{\n" + "".join(f"{x:.5f} {y:.5f}\n" for x, y in pts) + "}\n")
            pts_faces.setdefault(split, []).append((pts, (*pts.min(0), *pts.max(0))))
    result = _run(encoder, "300w", tmp_path / "train", tmp_path / "train", tmp_path / "test", tmp_path / "test",
                  tmp_path / "300w.json")
    parts = result["nme"]["inter_pupil"]
    assert (parts["challenging"]["faces"], parts["common"]["faces"], parts["full"]["faces"]) == (4, 6, 10)
    pupil = lambda p, box: np.hypot(*(p[36:42].mean(0) - p[42:48].mean(0)))  # noqa: E731
    assert result["mean_shape_nme"]["inter_pupil"] == pytest.approx(
        _mean_shape_nme(pts_faces["train"], pts_faces["test"], pupil), rel=1e-4)


def test_user_mistakes_are_one_line(encoder, tmp_path, capsys):
    """A missing list, a .mat without the release's variables, a 300W landmarks path that is not
    a folder: exit 2 with one line naming the file."""
    _scene(tmp_path / "img" / "a.png", [_face5(np.random.default_rng(0), (80, 80))])
    scipy.io.savemat(tmp_path / "wrong.mat", {"phisT": np.zeros((1, 87))})
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    (tmp_path / "v73.mat").write_bytes(header.ljust(116) + bytes(8) + b"\x00\x02IM" + bytes(400))
    cases = [("wflw", tmp_path / "img", tmp_path / "nope.txt", "nope.txt"),
             ("cofw", tmp_path / "wrong.mat", tmp_path / "wrong.mat", "has no variable IsTr or IsT"),
             ("cofw", tmp_path / "v73.mat", tmp_path / "v73.mat", "is a MATLAB v7.3 (HDF5) file"),
             ("300w", tmp_path / "img", tmp_path / "wrong.mat", "give the folder holding the .pts files"),
             ("300w", tmp_path / "img", tmp_path / "img", "--norm is for --format csv")]
    for fmt, images, landmarks, said in cases:
        rc = main(["eval-alignment", "--config", "tiny", "--encoder", str(encoder), "--format", fmt,
                   "--train", str(images), "--train-landmarks", str(landmarks), "--test", str(images),
                   "--test-landmarks", str(landmarks), "--workers", "0", *(["--norm", "diag"] * ("norm" in said))])
        err = capsys.readouterr().err
        assert rc == 2 and said in err and len(err.strip().splitlines()) == 1, err


def test_crop_box_by_hand(tmp_path):
    """The crop of a face: 1.25 x its box's longer side around its centre (clipped to the image),
    the face's first dot where the hand-computed mapping puts it."""
    from pacofr.data.transforms import denormalize

    f5 = (POINTS - POINTS.mean(0)) + (90, 70)
    _scene(tmp_path / "a.png", [f5], (200, 160))
    edge = (POINTS - POINTS.mean(0)) + (30, 80)  # its enlarged box leaves the image on the left
    _scene(tmp_path / "b.png", [edge], (200, 160))
    corner = (POINTS - POINTS.mean(0)) + (170, 125)  # ... and at the right and the bottom
    _scene(tmp_path / "c.png", [corner], (200, 160))
    faces = [formats.Face(name, MIX[98] @ f, _box(f))
             for name, f in (("a.png", f5), ("b.png", edge), ("c.png", corner))]
    ds = formats.BoxedFaces(str(tmp_path), faces, S, "--test")
    for k, pts in enumerate((f5, edge, corner)):
        (image, meta), reason = ds[k]
        x0, y0, x1, y1 = faces[k].box
        side = 1.25 * max(x1 - x0, y1 - y0)
        left, top = (x0 + x1 - side) / 2, (y0 + y1 - side) / 2
        right, bottom = min(left + side, 200), min(top + side, 160)
        left, top = max(left, 0), max(top, 0)
        assert reason is None and meta[1:].tolist() == pytest.approx([left, top, right - left, bottom - top])
        u, v = ((pts[0] - (left, top)) * S / np.array([right - left, bottom - top])).astype(int)
        assert denormalize(image)[:, v, u].tolist() == pytest.approx([1, 0, 0], abs=0.1)  # the red dot
