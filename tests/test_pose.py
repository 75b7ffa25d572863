"""`pacofr eval-pose`: pose .mat files written with scipy.io.savemat as 300W-LP and AFLW2000-3D
hold them (Pose_Para 1 x 7, pt2d, pt3d_68), read back (radians to degrees, the face box); the
test faces beyond +-99 degrees dropped and counted, bad and missing labels counted; the mean
pose's MAE against a hand computation and the probe end to end on faces whose dots move with
the angles."""

import json
import math

import numpy as np
import pytest
import scipy.io
import torch

from pacofr.cli import main
from pacofr.config import load_config
from pacofr.eval.overlay import axes
from pacofr.eval.pose import mae, read_pose
from test_data import POINTS
from test_eval import _dots_face


def _pose_para(yaw, pitch, roll):
    return np.array([[math.radians(pitch), math.radians(yaw), math.radians(roll), 1.0, 0.0, 0.0, 0.0]])


def test_read_pose_mat(tmp_path):
    pts = np.array([[10.0, 50.0, 30.0], [20.0, 25.0, 60.0]])  # 2 x 3: x row, y row
    pt2d = np.concatenate([pts, [[-1.0], [-1.0]]], 1)  # a missing point, as AFLW2000's pt2d marks it
    scipy.io.savemat(tmp_path / "a.mat", {"Pose_Para": _pose_para(30, -10, 5), "pt2d": pt2d})
    face = read_pose(str(tmp_path / "a.mat"))
    np.testing.assert_allclose(face.extra["pose"], [30, -10, 5])
    w, h = 40.0, 40.0  # x 10..50, y 20..60: Hopenet's k = 0.2 enlargement
    assert face.box == pytest.approx((10 - 0.4 * w, 20 - 0.4 * h, 50 + 0.4 * w, 60 + 0.12 * h))
    pt3d = np.vstack([np.linspace(100, 200, 68), np.linspace(50, 90, 68), np.zeros(68)])
    scipy.io.savemat(tmp_path / "b.mat", {"Pose_Para": _pose_para(0, 0, 0), "pt2d": pt2d, "pt3d_68": pt3d})
    assert read_pose(str(tmp_path / "b.mat")).box[0] == pytest.approx(100 - 0.4 * 100)  # pt3d_68 first
    scipy.io.savemat(tmp_path / "c.mat", {"pt2d": pt2d})
    assert read_pose(str(tmp_path / "c.mat")).problem == "labels_invalid"
    scipy.io.savemat(tmp_path / "d.mat", {"Pose_Para": _pose_para(0, 0, 0), "pt2d": -np.ones((2, 5))})
    assert read_pose(str(tmp_path / "d.mat")).problem == "no_face_box"
    (tmp_path / "e.mat").write_bytes(b"not a mat file")
    assert read_pose(str(tmp_path / "e.mat")).problem == "labels_invalid"


def test_mae_and_axes_by_hand():
    pred, truth = torch.tensor([[10.0, 0.0, -5.0], [0.0, 4.0, 5.0]]), torch.tensor([[0.0, 2.0, -5.0], [2.0, 0.0, 0.0]])
    assert mae(pred, truth) == pytest.approx({"yaw": 6.0, "pitch": 3.0, "roll": 2.5, "mean": 11.5 / 3})
    np.testing.assert_allclose(axes(0, 0, 0), [[1, 0], [0, 1], [0, 0]], atol=1e-12)  # z points at the viewer
    np.testing.assert_allclose(axes(0, 0, 90), [[0, 1], [-1, 0], [0, 0]], atol=1e-12)  # roll turns x onto y


def _split(folder, n, seed):
    """n images with a .mat each; the dots move with yaw and pitch (the nose) and roll (all
    of them turn). Returns [(yaw, pitch, roll)] of the usable faces in file order; adds a face
    at yaw 120, an image without .mat, one whose .mat has no Pose_Para, an unreadable image."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    angles = []
    for i in range(n):
        yaw, pitch, roll = rng.uniform(-60, 60), rng.uniform(-40, 40), rng.uniform(-30, 30)
        angles.append((yaw, pitch, roll))
        centre = POINTS.mean(0)
        p = POINTS.astype(np.float64) - centre
        p[2] += [yaw / 5, pitch / 5]
        c, s = math.cos(math.radians(roll)), math.sin(math.radians(roll))
        p = p @ np.array([[c, s], [-s, c]]) + rng.uniform(50, 110, 2)
        _dots_face(p, (160, 160)).save(folder / f"img{i:03d}.png")
        labels = {"Pose_Para": _pose_para(yaw, pitch, roll)}
        if i % 2:
            labels["pt2d"] = p.T
        else:
            labels["pt3d_68"] = np.vstack([p.T[:, np.arange(68) % 5], np.zeros((1, 68))])
        scipy.io.savemat(folder / f"img{i:03d}.mat", labels)
    _dots_face(POINTS, (160, 160)).save(folder / "wild.png")
    scipy.io.savemat(folder / "wild.mat", {"Pose_Para": _pose_para(120, 0, 0), "pt2d": POINTS.T.astype(float)})
    _dots_face(POINTS, (160, 160)).save(folder / "nomat.png")
    _dots_face(POINTS, (160, 160)).save(folder / "nopose.png")
    scipy.io.savemat(folder / "nopose.mat", {"pt2d": POINTS.T.astype(float)})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    scipy.io.savemat(folder / "broken.mat", {"Pose_Para": _pose_para(0, 0, 0), "pt2d": POINTS.T.astype(float)})
    return angles


def _encoder(path):
    """A random tiny encoder written with its config (no --config needed)."""
    torch.manual_seed(0)
    from pacofr.model import PaCoFR
    from pacofr.model.weights import save_encoder

    cfg = load_config("tiny")
    save_encoder({k: v.contiguous() for k, v in PaCoFR(cfg).encoder.state_dict().items()}, path, cfg.model)


def test_pose_probe_end_to_end(tmp_path):
    _encoder(tmp_path / "encoder.safetensors")
    train, test = _split(tmp_path / "train", 150, 1), _split(tmp_path / "test", 24, 2)
    out = tmp_path / "out" / "pose.json"
    rc = main(["eval-pose", "--encoder", str(tmp_path / "encoder.safetensors"), "--train", str(tmp_path / "train"),
               "--test", str(tmp_path / "test"), "--workers", "0", "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert result["train_images"] == 151 and result["test_images"] == 24  # (train keeps its yaw-120 face)
    assert result["skipped_test"] == {"pose_out_of_range": 1, "no_pose": 1, "labels_invalid": 1,
                                      "not_an_image": 1}
    assert result["skipped_train"] == {"no_pose": 1, "labels_invalid": 1, "not_an_image": 1}
    train_all = np.array(train + [(120.0, 0.0, 0.0)])
    floor = np.abs(np.array(test) - train_all.mean(0)).mean(0)
    got = result["mean_pose_mae"]
    assert [got["yaw"], got["pitch"], got["roll"]] == pytest.approx(floor.tolist(), rel=1e-6)
    assert result["mae"]["mean"] < 0.8 * got["mean"], result["mae"]
    assert "pose_out_of_range" in (tmp_path / "out" / "pose.skipped.csv").read_text()
    assert (tmp_path / "out" / "pose.preview.png").stat().st_size > 0


def test_a_folder_without_pose_files_is_one_line(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    _dots_face(POINTS).save(tmp_path / "imgs" / "a.png")
    _encoder(tmp_path / "encoder.safetensors")
    rc = main(["eval-pose", "--encoder", str(tmp_path / "encoder.safetensors"),
               "--train", str(tmp_path / "imgs"), "--test", str(tmp_path / "imgs")])
    err = capsys.readouterr().err
    assert rc == 2 and "no image has its pose .mat beside it" in err and len(err.strip().splitlines()) == 1, err


# -- BIWI ----------------------------------------------------------------------------------------------
def _biwi_rotation(yaw, pitch, roll):
    """The rotation a BIWI _pose.txt holds for these angles: its transpose is Rz(-roll) Ry(-yaw)
    Rx(pitch) (scipy's extrinsic x-y-z)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", [pitch, -yaw, -roll], degrees=True).as_matrix().T


def _pose_txt(path, rotation, centre):
    """A _pose.txt as the release writes it: three rows, a blank line, the centre (trailing spaces)."""
    rows = [" ".join(f"{v:g}" for v in row) + " " for row in rotation]
    path.write_text("\n".join(rows) + "\n\n" + " ".join(f"{v:g}" for v in centre) + " \n")


def _rgb_cal(path, f, cx, cy, rotation=np.eye(3), translation=(0.0, 0.0, 0.0), size=(640, 480)):
    """An rgb.cal as the release writes it: intrinsics, distortion, rotation, translation, size."""
    block = lambda rows: "".join(" ".join(f"{v:g}" for v in row) + " \n" for row in rows)  # noqa: E731
    path.write_text(block([[f, 0, cx], [0, f, cy], [0, 0, 1]]) + "\n" + block([[0, 0, 0, 0]]) + "\n"
                    + block(rotation) + "\n" + block([translation]) + "\n" + f"{size[0]} {size[1]}\n")


def test_biwi_files_read_back_angles_against_scipy_and_the_crop_by_hand(tmp_path):
    from pacofr.eval.pose import BiwiFaces, biwi_angles, biwi_box, read_biwi_pose, read_calibration

    rng = np.random.default_rng(0)
    for yaw, pitch, roll in rng.uniform([-80, -60, -70], [80, 60, 70], (20, 3)):
        _pose_txt(tmp_path / "p.txt", _biwi_rotation(yaw, pitch, roll), (10.0, -5.0, 900.0))
        rotation, centre = read_biwi_pose(str(tmp_path / "p.txt"))
        np.testing.assert_allclose(biwi_angles(rotation), [yaw, pitch, roll], atol=1e-3)  # (%g keeps 6 digits)
        np.testing.assert_allclose(centre, [10, -5, 900])
    t = math.radians(25)  # a pure yaw by hand: the file holds Ry(t)
    yaw_only = np.array([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]])
    np.testing.assert_allclose(biwi_angles(yaw_only), [25, 0, 0], atol=1e-9)

    _rgb_cal(tmp_path / "rgb.cal", 500, 320, 240.5, translation=(-25, 5, 100))
    cal = read_calibration(str(tmp_path / "rgb.cal"))
    # centre (50, -20, 900) + t = (25, -15, 1000): u = 500 * 25 / 1000 + 320, v = 500 * -15 / 1000 + 240.5,
    # side = 250 mm * 500 / 1000
    assert biwi_box(np.array([50.0, -20.0, 900.0]), cal) == pytest.approx((270.0, 170.5, 395.0, 295.5))
    _rgb_cal(tmp_path / "rgb.cal", 500, 320, 240.5, rotation=[[0, -1, 0], [1, 0, 0], [0, 0, 1]])
    cal = read_calibration(str(tmp_path / "rgb.cal"))  # R c = (20, 50, 900)
    u, v, half = 500 * 20 / 900 + 320, 500 * 50 / 900 + 240.5, 250 * 500 / 900 / 2
    assert biwi_box(np.array([50.0, -20.0, 900.0]), cal) == pytest.approx((u - half, v - half, u + half, v + half))
    assert biwi_box(np.array([0.0, 0.0, -900.0]), cal) is None  # behind the camera
    (tmp_path / "bad.cal").write_text("500 0 320\n0 500 240\n0 0 1\n\n0 0 0 0\n\n1 0 0\n0 1 0\n0 0 1\n")
    assert read_calibration(str(tmp_path / "bad.cal")) is None  # no translation
    (tmp_path / "bad.txt").write_text("1 0 0\n0 1 0\n\n1 2 3\n")
    assert read_biwi_pose(str(tmp_path / "bad.txt")) is None

    (tmp_path / "01").mkdir()  # the crop a frame's item takes: that box, in the frame's pixels
    _rgb_cal(tmp_path / "01" / "rgb.cal", 500, 320, 240.5, translation=(-25, 5, 100))
    _dots_face(POINTS, (640, 480)).save(tmp_path / "01" / "frame_00004_rgb.png")
    _pose_txt(tmp_path / "01" / "frame_00004_pose.txt", _biwi_rotation(10, 0, 0), (50.0, -20.0, 900.0))
    (item, meta), reason = BiwiFaces(str(tmp_path / "01"), 64)[0]
    assert reason is None and meta[1:5].tolist() == pytest.approx([270.0, 170.5, 125.0, 125.0])
    assert meta[5:].tolist() == pytest.approx([10.0, 0.0, 0.0], abs=1e-3)


def _biwi(root, n, seed):
    """BIWI's layout: subject 01 (rgb.cal, n frames with their pose files, the faces drawn at the
    projected head centres), then a frame without its pose file, one rolled 150 degrees, one
    whose pose file does not parse; subject 02 without rgb.cal, 03 with a broken one. Returns
    the usable frames' (yaw, pitch, roll)."""
    rng = np.random.default_rng(seed)
    subject = root / "01"
    subject.mkdir(parents=True)
    f, cx, cy = 224.0, 100.0, 80.0
    _rgb_cal(subject / "rgb.cal", f, cx, cy, size=(200, 160))
    angles = []
    for i in range(n + 3):
        yaw, pitch, roll = (rng.uniform(-60, 60), rng.uniform(-40, 40), rng.uniform(-30, 30)) if i != n + 1 \
            else (0.0, 0.0, 150.0)
        centre = np.array([rng.uniform(-60, 60), rng.uniform(-40, 40), rng.uniform(750, 850)])
        u, v = f * centre[0] / centre[2] + cx, f * centre[1] / centre[2] + cy
        p = POINTS - POINTS.mean(0) + [u, v]
        p[2] += [yaw / 5, pitch / 5]
        _dots_face(p, (200, 160)).save(subject / f"frame_{i:05d}_rgb.png")
        if i == n:
            continue  # no pose file
        _pose_txt(subject / f"frame_{i:05d}_pose.txt", _biwi_rotation(yaw, pitch, roll), centre)
        if i == n + 2:
            (subject / f"frame_{i:05d}_pose.txt").write_text("not a pose\n")
        elif i < n:
            angles.append((yaw, pitch, roll))
    for name, cal in (("02", None), ("03", "500 0 320\n")):
        (root / name).mkdir()
        _dots_face(POINTS, (200, 160)).save(root / name / "frame_00000_rgb.png")
        _pose_txt(root / name / "frame_00000_pose.txt", np.eye(3), (0.0, 0.0, 800.0))
        if cal:
            (root / name / "rgb.cal").write_text(cal)
    return angles


def test_biwi_test_set_end_to_end(tmp_path):
    _encoder(tmp_path / "encoder.safetensors")
    train, test = _split(tmp_path / "train", 40, 1), _biwi(tmp_path / "hpdb", 12, 2)
    out = tmp_path / "biwi.json"
    rc = main(["eval-pose", "--encoder", str(tmp_path / "encoder.safetensors"), "--train", str(tmp_path / "train"),
               "--test", str(tmp_path / "hpdb"), "--workers", "0", "--min-test", "5", "--output", str(out)])
    assert rc == 0  # (BIWI found by its rgb.cal files, without --format biwi)
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert "BIWI" in result["protocol"] and "mm" in result["conventions"]["crop"]
    assert result["test_images"] == 12
    assert result["skipped_test"] == {"no_pose": 1, "pose_out_of_range": 1, "labels_invalid": 1,
                                      "no_calibration": 1, "calibration_invalid": 1}
    floor = np.abs(np.array(test) - np.array(train + [(120.0, 0.0, 0.0)]).mean(0)).mean(0)
    got = result["mean_pose_mae"]
    assert [got["yaw"], got["pitch"], got["roll"]] == pytest.approx(floor.tolist(), rel=1e-4)


def test_biwi_options_refused_in_one_line(tmp_path, capsys):
    _encoder(tmp_path / "encoder.safetensors")
    (tmp_path / "imgs").mkdir()
    _dots_face(POINTS).save(tmp_path / "imgs" / "a.png")
    _biwi(tmp_path / "hpdb", 1, 0)
    base = ["eval-pose", "--encoder", str(tmp_path / "encoder.safetensors"), "--train", str(tmp_path / "hpdb")]
    for extra, says in ((["--test", str(tmp_path / "imgs"), "--format", "biwi"], "no BIWI frame here"),
                        (["--test", str(tmp_path / "hpdb"), "--test-labels", str(tmp_path)], "--test-labels is for")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
