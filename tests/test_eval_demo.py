"""The eval demo: the head-pose fit, the landmark cache, its inputs and table on a tiny run."""

import importlib.util
import math

import numpy as np
import pytest

from pacofr import eval_demo as demo


def _rx(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _ry(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rz(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _planted(yaw, pitch, roll, t=(10.0, -20.0, 900.0), size=150):
    """The generic face's points seen by a pinhole camera (focal = width, centred) at a pose,
    computed by hand: R = Rx(pitch) Ry(yaw) Rz(roll) in the camera's axes."""
    r = _rx(math.radians(pitch)) @ _ry(math.radians(yaw)) @ _rz(math.radians(roll))
    model = demo.GENERIC_FACE_3D * np.array([1.0, -1.0, -1.0])  # y down, z away from the camera
    cam = model @ r.T + np.asarray(t)
    return size * cam[:, :2] / cam[:, 2:3] + size / 2.0


@pytest.mark.parametrize("yaw,pitch,roll", [(0, 0, 0), (35, -10, 5), (-50, 20, -15), (10, 30, 25)])
def test_pose_fit_recovers_a_planted_rotation(yaw, pitch, roll):
    angles, t = demo.fit_pose(_planted(yaw, pitch, roll), (150, 150))
    np.testing.assert_allclose(angles, [yaw, pitch, roll], atol=1e-3)
    np.testing.assert_allclose(t, [10.0, -20.0, 900.0], rtol=1e-4)


def test_landmark_cache_is_keyed_by_image_and_model(tmp_path):
    calls = []

    def predict(image):
        calls.append(image.copy())
        return np.full((68, 2), float(image.mean()))

    model = tmp_path / "model.dat"
    model.write_bytes(b"one")
    images = [np.full((8, 8, 3), v, np.uint8) for v in (10, 20, 30)]
    first = demo.cached_landmarks(images, predict, model, tmp_path / "cache")
    assert len(calls) == 3
    again = demo.cached_landmarks(images, predict, model, tmp_path / "cache")
    assert len(calls) == 3  # all from the cache
    for a, b, im in zip(first, again, images):
        np.testing.assert_array_equal(a, b)
        assert a[0, 0] == im.mean()
    changed = [images[0], np.full((8, 8, 3), 99, np.uint8), images[2]]
    out = demo.cached_landmarks(changed, predict, model, tmp_path / "cache")
    assert len(calls) == 4 and out[1][0, 0] == 99  # only the new image
    model.write_bytes(b"two")  # another predictor: nothing is reused
    demo.cached_landmarks(images, predict, model, tmp_path / "cache")
    assert len(calls) == 7


def test_missing_dlib_is_one_line(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dlib" else real(name, *a))
    enc = tmp_path / "encoder.safetensors"
    enc.write_bytes(b"x")
    assert demo.main(["--encoder", str(enc), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "demo-labels" in err and "Traceback" not in err


def _tiny_encoder(path):
    from pacofr.config import load_config
    from pacofr.model import ViTEncoder, save_encoder

    cfg = load_config("tiny")
    save_encoder(ViTEncoder.from_config(cfg.model).state_dict(), path, cfg.model)
    return path


def test_inputs_and_table_on_a_tiny_run(tmp_path):
    from pacofr.eval.pose import read_pose

    rng = np.random.default_rng(0)
    size, n = 64, 24
    faces, landmarks, poses = [], [], []
    for i in range(n):
        yaw, pitch, roll = rng.uniform(-30, 30), rng.uniform(-15, 15), rng.uniform(-10, 10)
        points = rng.uniform(12, 52, (68, 2))
        points[list(demo.GENERIC_FACE_POINTS)] = _planted(yaw, pitch, roll, (0.0, 0.0, 1200.0), size)
        faces.append((f"f{i:02d}", rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
        landmarks.append(points)
        poses.append((yaw, pitch, roll))
    labelled = [(f"x{i:02d}", rng.integers(0, 256, (size, size, 3), dtype=np.uint8), i % 3 == 0) for i in range(n)]
    inputs = tmp_path / "inputs"
    demo.write_inputs(inputs, faces, labelled, landmarks)

    # the .mat files, read by the pose probe's reader, give the planted angles and the points' box
    face = read_pose(str(inputs / "faces" / "test" / "f03.mat"))
    assert face.problem is None
    np.testing.assert_allclose(face.extra["pose"], poses[3], atol=1e-3)
    np.testing.assert_allclose(face.points, landmarks[3], atol=1e-9)

    pretrained = _tiny_encoder(tmp_path / "pretrained.safetensors")
    rand = demo.random_encoder(pretrained, tmp_path / "random.safetensors", seed=1)
    a = demo.run_probes(inputs, pretrained, tmp_path / "probes" / "p", min_test=5)
    b = demo.run_probes(inputs, rand, tmp_path / "probes" / "r", min_test=5)
    rows = demo.table_rows(a, b)
    assert [r["probe"] for r in rows] == ["alignment", "pose", "pose", "attributes"]
    assert rows[0]["pretrained"] == a["alignment"]["nme"] and rows[0]["random_init"] == b["alignment"]["nme"]
    assert rows[1]["random_init"] == b["pose"]["mae"]["mean"] and rows[2]["floor"] == a["pose"]["mean_pose_mae"]["yaw"]
    assert rows[3]["pretrained"] == a["attributes"]["mean_accuracy"]
    assert all((r["n_train"], r["n_test"]) == (12, 12) for r in rows)
    assert rows[0]["pretrained"] != rows[0]["random_init"]  # two different encoders were probed
    text = demo.format_table(rows)
    assert text.splitlines()[0].split()[:4] == ["probe", "metric", "pretrained", "random-init"]
    assert len(text.splitlines()) == 2 + len(rows) and "12/12" in text and "pseudo" in text


@pytest.mark.skipif(importlib.util.find_spec("dlib") is None
                    or importlib.util.find_spec("face_recognition_models") is None,
                    reason="dlib's shape predictor is the demo-labels extra (pip install -e '.[demo-labels]')")
def test_dlib_points_land_on_the_astronaut():
    faces, _ = demo.demo_images()
    name, image = faces[-1]
    points = demo.dlib_predictor(demo.predictor_file())(image)
    assert name == "astronaut" and points.shape == (68, 2)
    assert image.shape == (demo.UPSCALE + 2 * demo.PAD,) * 2 + (3,)
    assert ((points >= 0) & (points < image.shape[0])).all()
    eyes, mouth, chin = points[36:48, 1].mean(), points[48:68, 1].mean(), points[8, 1]
    assert eyes < points[30, 1] < mouth < chin  # eyes above the nose tip above the mouth above the chin
