"""pacofr.eval.alignment: the NME metric against a hand computation, the ridge against the
primal closed form in float64, and the probe end to end (`pacofr eval-alignment`) on faces
whose landmarks are drawn dots at known, varying positions."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pacofr.cli import main
from pacofr.config import load_config
from pacofr.data.landmarks import load_landmarks_file
from pacofr.eval import alignment
from pacofr.eval.alignment import AlignmentImages, face_scale, fit_ridge, nme
from test_data import COLOURS, POINTS


def test_nme_by_hand():
    rng = np.random.default_rng(0)
    for k, (i, j) in ((68, (36, 45)), (98, (60, 72)), (5, (0, 1))):
        gt = rng.uniform(0, 100, (3, k, 2))
        pred = gt + rng.normal(0, 2, gt.shape)
        for n in range(3):
            err = np.mean([np.hypot(*(pred[n, p] - gt[n, p])) for p in range(k)])
            ocular = np.hypot(*(gt[n, i] - gt[n, j]))
            box = gt[n].max(0) - gt[n].min(0)
            got = nme(torch.from_numpy(pred), torch.from_numpy(gt))
            assert abs(float(got[n]) - err / ocular) < 1e-12
            got = nme(torch.from_numpy(pred), torch.from_numpy(gt), "diag")
            assert abs(float(got[n]) - err / np.hypot(*box)) < 1e-12
    with pytest.raises(ValueError, match="use norm 'diag'"):
        face_scale(torch.zeros(1, 19, 2), "inter_ocular")
    with pytest.raises(ValueError, match="norm must be"):
        face_scale(torch.zeros(1, 5, 2), "box")


def test_ridge_matches_the_primal_closed_form():
    """The dual solve (one eigendecomposition, any penalty) gives the primal ridge's
    predictions: w = (Xc'Xc + p I)^-1 Xc'Yc, b = mean(y) - mean(x) w."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(37, 11)) + 3.0
    y = x @ rng.normal(size=(11, 4)) + rng.normal(0, 0.1, (37, 4))
    x_new = rng.normal(size=(9, 11))
    for p in (1e-3, 1.0, 50.0):
        (model,), _ = alignment._fit(torch.from_numpy(x), torch.from_numpy(y), p, alignment.LAMBDAS)
        xc, yc = x - x.mean(0), y - y.mean(0)
        w = np.linalg.solve(xc.T @ xc + p * np.eye(11), xc.T @ yc)
        ref = (x_new - x.mean(0)) @ w + y.mean(0)
        assert np.allclose(model.predict(torch.from_numpy(x_new)).numpy(), ref, rtol=1e-9, atol=1e-9)


def test_ridge_penalty_is_the_best_on_the_held_out_faces():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(60, 30)))
    y = (x @ torch.from_numpy(rng.normal(size=(30, 10)))).view(60, 5, 2) + 100.0
    model, search = fit_ridge(x, y, "inter_ocular")
    assert len(search["val_nme"]) == len(alignment.LAMBDAS)
    assert search["penalty"] == search["penalties"][int(np.argmin(search["val_nme"]))]
    assert model.penalty == search["penalty"]
    with pytest.raises(ValueError, match="at least 2"):
        fit_ridge(x[:1], y[:1], "inter_ocular")


def _dots_face(points, size=(96, 96)):
    w, h = size
    yy, xx = np.mgrid[:h, :w] + 0.5
    a = np.full((h, w, 3), 40, np.uint8)
    for (x, y), c in zip(points, COLOURS):
        a[(xx - x) ** 2 + (yy - y) ** 2 <= 3.5 ** 2] = np.array(c, np.uint8) * 255
    return Image.fromarray(a)


def _faces(folder, n, seed, extra=True):
    """n faces with the 5 dots moved per face (a shift of the whole face and of each point);
    with `extra`, also a non-square face, a broken file, one without landmarks and one whose
    landmarks leave the image."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    table = {}
    for i in range(n):
        pts = POINTS + rng.uniform(-12, 12, (1, 2)) + rng.uniform(-4, 4, (5, 2))
        _dots_face(pts).save(folder / f"f{i:03d}.png")
        table[f"f{i:03d}.png"] = pts.tolist()
    if extra:
        _dots_face(POINTS + [20, 0], (136, 96)).save(folder / "wide.png")  # centre crop: x - 20
        table["wide.png"] = (POINTS + [20, 0]).tolist()
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
        table["broken.png"] = POINTS.tolist()
        _dots_face(POINTS).save(folder / "unlabelled.png")
        _dots_face(POINTS).save(folder / "outside.png")
        table["outside.png"] = (POINTS + [0, 500]).tolist()
    (folder / "lm.json").write_text(json.dumps(table))
    return folder


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    from pacofr.model import PaCoFR

    model = PaCoFR(load_config("tiny"))
    save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, str(d / "encoder.safetensors"))
    return d, _faces(d / "train", 120, 1), _faces(d / "test", 30, 2)


def test_alignment_images_follow_the_crop_and_skip(probe_data):
    _, train, _ = probe_data
    ds = AlignmentImages(str(train), str(train / "lm.json"), 64)
    assert ds.num_points == 5
    items = {p.split("/")[-1]: ds[i] for i, p in enumerate(ds.paths)}
    assert items["broken.png"] == (None, "not_an_image")
    assert items["unlabelled.png"] == (None, "no_landmarks")
    assert items["outside.png"] == (None, "landmarks_invalid")
    (image, lm), reason = items["wide.png"]
    assert reason is None and image.shape == (3, 64, 64)
    assert torch.allclose(lm, torch.from_numpy(POINTS) * (64 / 96), atol=1e-4)  # the 136-px face cropped to 96


def test_probe_end_to_end(probe_data, tmp_path, capsys):
    """A random tiny encoder's pooled patch tokens locate the dots well beyond the mean shape."""
    d, train, test = probe_data
    out = tmp_path / "probe.json"
    rc = main(["eval-alignment", "--config", "tiny", "--encoder", str(d / "encoder.safetensors"),
               "--train", str(train), "--train-landmarks", str(train / "lm.json"), "--test", str(test),
               "--test-landmarks", str(test / "lm.json"), "--workers", "0", "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["train_faces"] == 121 and result["test_faces"] == 31
    assert result["skipped_train"] == result["skipped_test"] == {"no_landmarks": 1, "landmarks_invalid": 1,
                                                                 "not_an_image": 1}
    assert result["nme"] < 0.5 * result["mean_shape_nme"], result
    assert result["features"] == 7 * 7 * 96 and result["points"] == 5
    assert "NME (inter_ocular, 5 points)" in capsys.readouterr().out


def test_probe_errors_name_the_problem(probe_data, tmp_path, capsys):
    d, train, test = probe_data
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({"f000.png": POINTS.tolist(), "f001.png": POINTS[:3].tolist()}))
    with pytest.raises(ValueError, match=r"mixes point counts \[3, 5\]"):
        AlignmentImages(str(train), str(mixed), 64)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"elsewhere/x.png": POINTS.tolist()}))
    with pytest.raises(ValueError, match="none of its paths names a file"):
        AlignmentImages(str(train), str(other), 64)
    rc = main(["eval-alignment", "--config", "tiny", "--encoder", str(d / "encoder.safetensors"),
               "--train", str(tmp_path / "missing"), "--train-landmarks", str(train / "lm.json"),
               "--test", str(test), "--test-landmarks", str(test / "lm.json")])
    assert rc == 2 and "--train" in capsys.readouterr().err


def test_landmark_files_keep_every_point(tmp_path):
    pts68 = np.random.default_rng(3).uniform(0, 90, (68, 2))
    f = tmp_path / "lm.csv"
    f.write_text("path,coords\n" + "a.png," + ",".join(f"{v:.4f}" for v in pts68.ravel()) + "\n"
                 + "b.png,1,2,3,4,5,6\nc.png,1,2,x\n")
    kept = load_landmarks_file(str(f), keep_all=True)
    assert kept["a.png"].shape == (68, 2) and np.allclose(kept["a.png"], pts68, atol=1e-4)
    assert kept["b.png"].shape == (3, 2) and kept["c.png"] is None
    assert load_landmarks_file(str(f))["a.png"].shape == (5, 2)  # pretraining reduces to 5
