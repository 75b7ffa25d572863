"""pacofr.eval.occlusion: the occluder's area counted in pixels against the level, its seeding,
its placement over the eyes and mouth (landmarks, else the template), and the `--occlude`
sweep end to end: level 0 is the probe's clean score, occluding the dots a probe reads hurts
it, and the JSON table and the PNGs are written."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pacofr.cli import main
from pacofr.data.align import template
from pacofr.eval.formats import BoxedFaces, Face
from pacofr.eval.occlusion import Occluded, nice_ticks, parse_levels, rectangle
from test_data import POINTS
from test_eval import _attribute_faces, _dots_face, _probe, probe_data  # noqa: F401 (a fixture)

SENTINEL = 1e6  # no occluder's normalized fill is this far out


class _Faces:
    """A test set's stand-in: blank [3, S, S] images at the sentinel, with landmarks or none."""

    def __init__(self, n: int, size: int, points=None):
        self.paths = [f"/faces/f{i}.png" for i in range(n)]
        self.size, self.points = size, points

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return (torch.full((3, self.size, self.size), SENTINEL), torch.zeros(1)), None


class _Landmarked(_Faces):
    def crop_points(self, index, item):
        return self.points


def _covered(image: torch.Tensor) -> torch.Tensor:
    return (image != SENTINEL).any(0)


def _box_of(mask: torch.Tensor) -> tuple:
    ys, xs = mask.nonzero(as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("size", [56, 64, 112, 224])
def test_occluded_area_is_the_level(size):
    """Every kind at many levels covers a rectangle of level x S^2 pixels, give or take the
    rounding of a side (under S/2 pixels), and nothing else."""
    for kind in ("eyes", "mouth", "random"):
        for level in np.linspace(0.0, 1.0, 41):
            image = Occluded(_Faces(3, size), level, kind)[1][0][0]
            covered = _covered(image)
            count = int(covered.sum())
            assert abs(count - level * size * size) <= size / 2 + 1, (kind, level, count)
            if count:
                x0, y0, x1, y1 = _box_of(covered)
                assert count == (x1 - x0) * (y1 - y0)  # one solid rectangle inside the crop


def test_occluders_are_seeded():
    faces = _Faces(40, 64)
    first = [Occluded(faces, 0.3, "random", seed=5)[i][0][0] for i in range(40)]
    again = [Occluded(_Faces(40, 64), 0.3, "random", seed=5)[i][0][0] for i in range(40)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # another run (another encoder): the same pixels
    boxes = {_box_of(_covered(x)) for x in first}
    assert len(boxes) > 30  # each face its own position and shape
    other = [Occluded(faces, 0.3, "random", seed=6)[i][0][0] for i in range(40)]
    assert sum(torch.equal(a, b) for a, b in zip(first, other)) == 0
    fills = [x[:, _covered(x)] for x in first]
    solid = [bool((f == f[:, :1]).all()) for f in fills]
    assert 5 < sum(solid) < 35  # solid colours and noise both drawn
    assert len({tuple(f[:, 0].tolist()) for f in fills}) == 40


def test_eyes_and_mouth_over_their_landmarks():
    """With landmarks (5, 68 points) the rectangle is centred on the region's points and covers
    them; without, on the template's."""
    size = 96
    five = torch.tensor(POINTS, dtype=torch.float64) + torch.tensor([3.0, -6.0])
    mix = np.zeros((68, 5))  # iBUG 68: eyes 36-47 around the eye dots, mouth 48-67 around the mouth dots
    mix[36:42, 0], mix[42:48, 1], mix[48:58, 3], mix[58:68, 4], mix[:36, 2] = 1, 1, 1, 1, 1
    sixty_eight = torch.from_numpy(mix) @ five + torch.linspace(-2, 2, 68)[:, None]
    for points, eyes, mouth in ((five, five[:2], five[3:]), (sixty_eight, sixty_eight[36:48], sixty_eight[48:68])):
        for kind, region in (("eyes", eyes), ("mouth", mouth)):
            covered = _covered(Occluded(_Landmarked(1, size, points), 0.15, kind)[0][0][0])
            x0, y0, x1, y1 = _box_of(covered)
            centre = region.mean(0)
            assert abs((x0 + x1) / 2 - centre[0]) <= 1 and abs((y0 + y1) / 2 - centre[1]) <= 1, (kind, centre)
            assert all(covered[int(y), int(x)] for x, y in region.tolist())
    tpl = template(size)
    for kind, rows in (("eyes", [0, 1]), ("mouth", [3, 4])):
        x0, y0, x1, y1 = _box_of(_covered(Occluded(_Faces(1, size), 0.15, kind)[0][0][0]))
        cx, cy = tpl[rows].mean(0)
        assert abs((x0 + x1) / 2 - cx) <= 1 and abs((y0 + y1) / 2 - cy) <= 1
    # an unknown layout (19 points) falls back to the template too
    odd = Occluded(_Landmarked(1, size, torch.zeros(19, 2)), 0.15, "eyes")[0][0][0]
    assert torch.equal(odd, Occluded(_Faces(1, size), 0.15, "eyes")[0][0][0])


def test_benchmark_faces_occluded_over_their_own_eyes(tmp_path):
    """A benchmark face (cropped from its box): the eye dots of the image, found in the crop,
    are under the eyes occluder and the mouth dots are not."""
    pts = POINTS.astype(np.float64) * 1.5 + [40, 25]
    image = np.asarray(_dots_face(pts, (240, 200)))
    face = Face("0", points=pts, box=(*pts.min(0) - 20, *pts.max(0) + 20))
    faces = BoxedFaces("faces.mat", [face], 64, "--test", arrays=[image])
    item, _ = faces[0]
    points = faces.crop_points(0, item)
    clean = item[0]
    red = clean[0] > clean[1:].max(0).values + 1  # the first eye dot, red, found in the crop's pixels
    ys, xs = red.nonzero(as_tuple=True)
    assert abs(float(xs.float().mean()) + 0.5 - float(points[0, 0])) < 1.0
    assert abs(float(ys.float().mean()) + 0.5 - float(points[0, 1])) < 1.0
    occluded = Occluded(faces, 0.1, "eyes")[0][0][0]
    changed = (occluded != clean).any(0)
    assert changed[red].all()
    assert not changed[int(points[3, 1]), int(points[3, 0])]


def test_rectangle_and_levels_are_checked():
    rng = np.random.default_rng(0)
    assert rectangle("eyes", 1.0, 32, rng) == (0, 0, 32, 32)
    assert parse_levels("0, 0.1,0.5") == [0.0, 0.1, 0.5]
    for bad in ("", "0.1,x", "1.5", "-0.1", "0.1,0.1"):
        with pytest.raises(ValueError, match="--occlude"):
            parse_levels(bad)
    ticks = nice_ticks(3.2, 17.9)
    assert ticks[0] <= 3.2 and ticks[-1] >= 17.9 and 4 <= len(ticks) <= 8


def test_sweep_end_to_end(probe_data, tmp_path, capsys):  # noqa: F811
    """eval-attributes: level 0 is the clean score exactly, a band over the eyes (the red dot,
    an attribute) hurts the score, and the JSON table, the curve and the preview are written;
    eval-alignment's NME grows with the level."""
    d, train_lm, test_lm = probe_data
    (train, _), (test, _) = _attribute_faces(tmp_path / "train", 80, 1), _attribute_faces(tmp_path / "test", 40, 2)
    out = tmp_path / "attributes.json"
    result = _probe("eval-attributes", d / "encoder.safetensors", "labels", train, train / "attrs.csv", test,
                    test / "attrs.csv", out, "--occlude", "0,0.1,0.3", "--occluder", "eyes")
    table = result["robustness"]
    assert table["metric"] == "mean_accuracy" and table["occluder"] == "eyes" and not table["lower_is_better"]
    assert list(table["levels"]) == ["0", "0.1", "0.3"]
    assert table["levels"]["0"] == result["mean_accuracy"]
    assert table["levels"]["0.3"] < result["mean_accuracy"] - 10, table
    printed = capsys.readouterr().out
    assert "mean_accuracy under eyes occluders: 0% " in printed
    plot = Image.open(tmp_path / "attributes.robustness.png")
    a = np.asarray(plot.convert("RGB")).astype(int)
    assert plot.size == (560, 380) and ((a[..., 0] > 150) & (a[..., 1] < 80)).sum() > 50  # the red curve
    sheet = Image.open(tmp_path / "attributes.occluded.png")
    assert sheet.size == (4 * 64, 3 * 64)
    rows = np.asarray(sheet).astype(int).reshape(3, 64, 4 * 64, 3)
    assert (rows[0] != rows[1]).any() and (rows[1] != rows[2]).any()

    out = tmp_path / "alignment.json"
    result = _probe("eval-alignment", d / "encoder.safetensors", "landmarks", train_lm, train_lm / "lm.json", test_lm,
                    test_lm / "lm.json", out, "--occlude", "0,0.4")
    levels = result["robustness"]["levels"]
    assert levels["0"] == result["nme"] and levels["0.4"] > result["nme"], levels
    assert json.loads(out.read_text())["robustness"]["occluder"] == "random"


def test_occluder_without_levels_is_one_line(probe_data, tmp_path, capsys):  # noqa: F811
    d, train, test = probe_data
    for extra, message in ((["--occluder", "eyes"], "--occluder goes with --occlude"),
                           (["--occlude", "0,0.7,2"], "--occlude '0,0.7,2'")):
        rc = main(["eval-alignment", "--config", "tiny", "--encoder", str(d / "encoder.safetensors"), "--train",
                   str(train), "--train-landmarks", str(train / "lm.json"), "--test", str(test), "--test-landmarks",
                   str(test / "lm.json"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_every_probe_sweeps_from_its_clean_score(probe_data, tmp_path):  # noqa: F811
    """WFLW (landmarks from the benchmark's lines), pose and parsing (the template): level 0 is
    each probe's clean headline figure exactly, and a half-covered crop changes it."""
    from test_alignment_formats import _wflw_split
    from test_eval import _parsing_faces
    from test_pose import _split

    d = probe_data[0]
    encoder = str(d / "encoder.safetensors")
    occlude = ["--occlude", "0,0.5", "--occluder", "mouth", "--workers", "0", "--min-test", "5", "--config", "tiny",
               "--encoder", encoder]
    _wflw_split(tmp_path / "wflw_train", 20, 1), _wflw_split(tmp_path / "wflw_test", 8, 2)
    _split(tmp_path / "pose_train", 24, 1), _split(tmp_path / "pose_test", 8, 2)
    _parsing_faces(tmp_path / "parse_train", 14, 1), _parsing_faces(tmp_path / "parse_test", 8, 2)
    at = lambda name: str(tmp_path / name)  # noqa: E731
    runs = {
        "wflw": (["eval-alignment", "--format", "wflw", "--train", at("wflw_train"), "--train-landmarks",
                  at("wflw_train/list.txt"), "--test", at("wflw_test"), "--test-landmarks", at("wflw_test/list.txt")],
                 lambda r: r["nme"]["inter_ocular"]["full"]["nme"], "nme_inter_ocular"),
        "pose": (["eval-pose", "--train", at("pose_train"), "--test", at("pose_test")], lambda r: r["mae"]["mean"],
                 "mae_mean"),
        "parsing": (["eval-parsing", "--classes", "6", "--train", at("parse_train/images"), "--train-labels",
                     at("parse_train/labels"), "--test", at("parse_test/images"), "--test-labels",
                     at("parse_test/labels")], lambda r: r["mean_f1"], "mean_f1"),
    }
    for name, (args, clean, metric) in runs.items():
        out = tmp_path / f"{name}.json"
        assert main([*args, *occlude, "--output", str(out)]) == 0, name
        result = json.loads(out.read_text())
        table = result["robustness"]
        assert table["metric"] == metric and table["levels"]["0"] == clean(result), (name, table)
        assert table["levels"]["0.5"] != table["levels"]["0"], (name, table)
        assert (tmp_path / f"{name}.robustness.png").is_file() and (tmp_path / f"{name}.occluded.png").is_file()
