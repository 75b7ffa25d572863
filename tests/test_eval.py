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
from test_data import COLOURS, POINTS, encode


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


def _primal(x, y, penalty):
    """Ridge in its primal closed form (float64 numpy): w = (Xc'Xc + p I)^-1 Xc'Yc."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    w = np.linalg.solve(xc.T @ xc + penalty * np.eye(x.shape[1]), xc.T @ yc)
    return lambda z: (z - x.mean(0)) @ w + y.mean(0)


def test_ridge_against_the_primal_closed_form():
    """Every validation score is the NME of the primal ridge fitted on the other faces only,
    the chosen penalty is the best of them, and the returned model is the primal ridge refitted
    on all faces with it, scaled to their count (dual solve from the Gram matrix, float32
    features)."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(80, 23)) + 3.0).astype(np.float32)
    y = (x.astype(np.float64) @ rng.normal(size=(23, 10)) + rng.normal(0, 2.0, (80, 10)) + 100).reshape(80, 5, 2)
    model, search = fit_ridge(torch.from_numpy(x), torch.from_numpy(y), "inter_ocular", holdout=0.25)
    x64 = x.astype(np.float64)
    val = np.array(search["holdout"])
    fit = np.setdiff1d(np.arange(80), val)
    assert len(val) == 20 and len(set(val)) == 20
    for penalty, score in zip(search["penalties"], search["val_nme"]):
        pred = _primal(x64[fit], y[fit].reshape(len(fit), -1), penalty)(x64[val]).reshape(-1, 5, 2)
        ref = float(nme(torch.from_numpy(pred), torch.from_numpy(y[val])).mean())
        assert abs(score - ref) <= 1e-9 * ref, (penalty, score, ref)
    assert len(set(search["val_nme"])) > 3  # the penalties matter here
    assert search["penalty"] == search["penalties"][int(np.argmin(search["val_nme"]))]
    assert abs(model.penalty - search["penalty"] * 80 / 60) <= 1e-12 * model.penalty  # as strong per face
    x_new = rng.normal(size=(9, 23)).astype(np.float32)
    ref = _primal(x64, y.reshape(80, -1), model.penalty)(x_new.astype(np.float64))
    assert np.allclose(model.predict(torch.from_numpy(x_new)).numpy(), ref, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="at least 2"):
        fit_ridge(torch.from_numpy(x[:1]), torch.from_numpy(y[:1]), "inter_ocular")


def test_gram_in_blocks():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(11, 5)).astype(np.float32)
    got = alignment.gram(torch.from_numpy(a), torch.from_numpy(b), chunk=3)
    assert got.dtype == torch.float64 and np.allclose(got.numpy(), a.astype(np.float64) @ b.astype(np.float64).T)


def test_scores_by_hand():
    """NME 5%, 20% and a NaN prediction: the mean is NaN (not hidden), 2 of 3 faces fail."""
    gt = torch.zeros(3, 5, 2, dtype=torch.float64)
    gt[:, 1, 0] = 10.0  # eye centres 10 px apart
    pred = gt.clone()
    pred[0, :, 1] += 0.5
    pred[1, :, 1] += 2.0
    pred[2, 0, 0] = float("nan")
    got = alignment.scores(pred, gt, "inter_ocular")
    assert np.isnan(got["nme"]) and got["failed_predictions"] == 1
    assert abs(got["failure_rate_10"] - 200 / 3) < 1e-9
    assert abs(alignment.scores(pred[:2], gt[:2], "inter_ocular")["nme"] - 12.5) < 1e-9
    assert alignment.scores(pred[:1], gt[:1], "inter_ocular")["failure_rate_10"] == 0.0


def _dots_face(points, size=(96, 96)):
    w, h = size
    yy, xx = np.mgrid[:h, :w] + 0.5
    a = np.full((h, w, 3), 40, np.uint8)
    for (x, y), c in zip(points, COLOURS):
        a[(xx - x) ** 2 + (yy - y) ** 2 <= 3.5 ** 2] = np.array(c, np.uint8) * 255
    return Image.fromarray(a)


# 68 points as fixed mixtures of the 5 dots, the outer eye corners (36, 45) on the eye dots
MIX68 = np.random.default_rng(7).dirichlet(np.ones(5), 68)
MIX68[36], MIX68[45] = np.eye(5)[0], np.eye(5)[1]


def _faces(folder, n, seed):
    """n faces with the 5 dots moved per face (a shift of the whole face and of each point),
    their 5 points in lm.json and 68 in lm68.csv; also a non-square face, a broken file, one
    without landmarks, one with a NaN landmark, one with both eyes on one spot (no
    inter-ocular scale), one with a landmark outside the image (skipped) and one with a
    landmark inside the image but outside the centre crop (kept: a target)."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    table = {}
    for i in range(n):
        pts = POINTS + rng.uniform(-12, 12, (1, 2)) + rng.uniform(-4, 4, (5, 2))
        _dots_face(pts).save(folder / f"f{i:03d}.png")
        table[f"f{i:03d}.png"] = pts.tolist()
    _dots_face(POINTS + [20, 0], (136, 96)).save(folder / "wide.png")  # centre crop: x - 20
    table["wide.png"] = (POINTS + [20, 0]).tolist()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    table["broken.png"] = POINTS.tolist()
    for name in ("unlabelled", "nan", "one_eye", "outside"):
        _dots_face(POINTS).save(folder / f"{name}.png")
    table["nan.png"] = [[float("nan"), 1.0]] + POINTS[1:].tolist()
    table["one_eye.png"] = [POINTS[0].tolist()] * 2 + POINTS[2:].tolist()
    table["outside.png"] = POINTS.tolist()[:4] + [[50.0, 120.0]]
    _dots_face(POINTS + [20, 0], (136, 96)).save(folder / "offcrop.png")  # the crop spans x 20-116
    table["offcrop.png"] = (POINTS + [20, 0]).tolist()[:4] + [[8.0, 60.0]]
    (folder / "lm.json").write_text(json.dumps(table).replace("NaN", "null"))
    rows = [f"{k}," + ",".join(f"{v:.5f}" for v in (MIX68 @ np.array(p, dtype=np.float64)).ravel())
            for k, p in table.items() if k != "nan.png"]
    (folder / "lm68.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    from pacofr.model import PaCoFR

    model = PaCoFR(load_config("tiny"))
    save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, str(d / "encoder.safetensors"))
    ckpt = d / "run" / "checkpoints" / "ckpt-00000004"  # the whole model's weights, as a checkpoint has them
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    return d, _faces(d / "train", 120, 1), _faces(d / "test", 30, 2)


def test_alignment_images_follow_the_crop_and_skip(probe_data):
    _, train, _ = probe_data
    ds = AlignmentImages(str(train), str(train / "lm.json"), 64)
    assert ds.num_points == 5
    items = {p.split("/")[-1]: ds[i] for i, p in enumerate(ds.paths)}
    assert items["broken.png"] == (None, "not_an_image")
    assert items["unlabelled.png"] == (None, "no_landmarks")
    assert items["nan.png"] == (None, "landmarks_invalid")  # (null in JSON)
    assert items["one_eye.png"] == (None, "degenerate_scale")
    assert items["outside.png"] == (None, "landmarks_outside")
    assert items["offcrop.png"][1] is None and items["offcrop.png"][0][1][4, 0] < 0
    assert AlignmentImages(str(train), str(train / "lm.json"), 64, "diag")[ds.paths.index(
        str(train / "one_eye.png"))][1] is None  # a box diagonal it has
    (image, lm), reason = items["wide.png"]
    assert reason is None and image.shape == (3, 64, 64)
    assert torch.allclose(lm, torch.from_numpy(POINTS) * (64 / 96), atol=1e-4)  # the 136-px face cropped to 96


def test_feature_batches_show_progress_on_a_terminal_only(probe_data, monkeypatch, capsys):
    """The probes' feature passes draw a progress bar on a terminal, and nothing in a batch job's
    log; the batches and the skips are the same either way."""
    import sys

    from pacofr.eval.common import Skipped, batches

    _, train, _ = probe_data
    ds = AlignmentImages(str(train), str(train / "lm.json"), 64, what="--train")
    runs = {}
    for tty in (False, True):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
        skipped = Skipped(ds)
        runs[tty] = ([b.shape for _, b in batches(ds, 4, 0, skipped)], sorted(skipped.rows))
        runs[tty, "err"] = capsys.readouterr().err
    assert runs[True] == runs[False] and runs[False][1]
    assert runs[False, "err"] == "" and "--train features" in runs[True, "err"]


def _probe(command, encoder, kind, train, train_targets, test, test_targets, out, *extra):
    """Runs `pacofr <command>` on the tiny config; returns its JSON result."""
    rc = main([command, "--config", "tiny", "--encoder", str(encoder), "--train", str(train),
               f"--train-{kind}", str(train_targets), "--test", str(test), f"--test-{kind}", str(test_targets),
               "--workers", "0", "--output", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_probe_end_to_end(probe_data, tmp_path, capsys):
    """A random tiny encoder's pooled patch tokens locate the dots well beyond the mean shape."""
    d, train, test = probe_data
    result = _probe("eval-alignment", d / "encoder.safetensors", "landmarks", train, train / "lm.json", test,
                    test / "lm.json", tmp_path / "probe.json")
    assert result["train_faces"] == 122 and result["test_faces"] == 32
    assert result["skipped_train"] == result["skipped_test"] == {
        "no_landmarks": 1, "landmarks_invalid": 1, "landmarks_outside": 1, "degenerate_scale": 1, "not_an_image": 1}
    assert result["test_faces_with_points_outside_the_crop"] == 1
    assert result["nme"] < 0.5 * result["mean_shape_nme"], result
    assert result["features"] == 7 * 7 * 96 and result["points"] == 5 and result["failed_predictions"] == 0
    assert "NME (inter_ocular, 5 points)" in capsys.readouterr().out


def test_probe_of_a_checkpoint_directory(probe_data, tmp_path):
    """--encoder a checkpoint directory (the whole model's weights): the probe of its encoder,
    the same result as of the exported encoder file."""
    d, train, test = probe_data
    args = ("landmarks", train, train / "lm.json", test, test / "lm.json")
    got = _probe("eval-alignment", d / "run" / "checkpoints" / "ckpt-00000004", *args, tmp_path / "ckpt.json")
    assert got == _probe("eval-alignment", d / "encoder.safetensors", *args, tmp_path / "export.json")
    assert got["nme"] < 0.5 * got["mean_shape_nme"], got


def test_probe_with_68_points(probe_data):
    """68 points (iBUG layout: inter-ocular scale from points 36 and 45) through the same probe."""
    from pacofr.eval import load_encoder
    from pacofr.eval.alignment import evaluate

    d, train, test = probe_data
    cfg = load_config("tiny")
    sets = [AlignmentImages(str(f), str(f / "lm68.csv"), 64) for f in (train, test)]
    assert sets[0].num_points == 68
    result = evaluate(load_encoder(cfg, str(d / "encoder.safetensors"), torch.device("cpu")), *sets, workers=0)
    assert result["points"] == 68 and result["train_faces"] == 123  # (outside.png's 68 mixed points are inside)
    assert result["skipped_train"] == {"no_landmarks": 2, "degenerate_scale": 1, "not_an_image": 1}
    assert result["nme"] < 0.5 * result["mean_shape_nme"], result


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
    args = ["eval-alignment", "--encoder", str(d / "encoder.safetensors"), "--train", str(train),
            "--train-landmarks", str(train / "lm.json"), "--test", str(test), "--test-landmarks", str(test / "lm.json")]
    pickled = tmp_path / "encoder.pt"
    torch.save({}, pickled)
    degenerate = tmp_path / "degenerate.json"  # every test face with both eyes on one spot
    degenerate.write_text(json.dumps({f"f{i:03d}.png": [POINTS[0].tolist()] * 5 for i in range(30)}))
    for change, message in (({"--train": str(tmp_path / "missing")}, "--train '"),
                            ({"--test-landmarks": str(tmp_path / "none.csv")}, "--test-landmarks '"),
                            ({"--test-landmarks": str(degenerate)},
                             f"--test '{test}': no usable face (every file was skipped: {{\"no_landmarks\": 7, \"degenerate_scale\": 30}})"),
                            ({"--config": "vit_base_patch16_224"}, "does not fit the encoder of this config"),
                            ({"--encoder": str(pickled)}, f"'{pickled}' is not a safetensors file")):
        argv = list(args) + ["--config", "tiny"]
        for key, value in change.items():
            argv[argv.index(key) + 1] = value
        assert main(argv) == 2
        assert message in capsys.readouterr().err, message


def test_landmark_files_keep_every_point(tmp_path):
    pts68 = np.random.default_rng(3).uniform(0, 90, (68, 2))
    f = tmp_path / "lm.csv"
    f.write_text("path,coords\n" + "a.png," + ",".join(f"{v:.4f}" for v in pts68.ravel()) + "\n"
                 + "b.png,1,2,3,4,5,6\nc.png,1,2,x\n")
    kept = load_landmarks_file(str(f), keep_all=True)
    assert kept["a.png"].shape == (68, 2) and np.allclose(kept["a.png"], pts68, atol=1e-4)
    assert kept["b.png"].shape == (3, 2) and kept["c.png"] is None
    assert load_landmarks_file(str(f))["a.png"].shape == (5, 2)  # pretraining reduces to 5
    j = tmp_path / "lm.json"
    j.write_text(json.dumps({"a.png": pts68.tolist(), "v.png": np.ones((68, 3)).tolist(),
                             "d.png": {"landmarks": [[1, 2], [3, 4]]}}))
    kept = load_landmarks_file(str(j), keep_all=True)
    assert kept["a.png"].shape == (68, 2) and kept["d.png"].shape == (2, 2)
    assert kept["v.png"] is None  # (x, y, visibility) rows are not read as 102 points
    # an image given twice, as written or once normalized, is refused (not one entry kept silently)
    for name, text in (("twice.csv", "a.png,1,2\nb.png,3,4\n./a.png,5,6\n"),
                       ("twice.json", '{"a.png": [[1, 2]], "b.png": [[3, 4]], "a.png": [[5, 6]]}'),
                       ("twice_norm.json", '{"a.png": [[1, 2]], "x/../a.png": [[5, 6]]}')):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"{name}: 'a.png' has more than one entry"):
            load_landmarks_file(str(tmp_path / name), keep_all=True)


# -- the parsing probe -------------------------------------------------------------------------------
def test_stats_ridge_against_the_primal_closed_form():
    """Streamed statistics (added in parts) give the primal ridge with intercept, and their
    squared error on other rows is the direct one."""
    from pacofr.eval.common import Stats

    rng = np.random.default_rng(5)
    x = rng.normal(size=(90, 7)) + 2.0
    y = x @ rng.normal(size=(7, 3)) + rng.normal(0, 0.3, (90, 3))
    stats = Stats(7, 3, torch.device("cpu"))
    for part in (slice(0, 40), slice(40, 90)):
        stats.add(torch.from_numpy(x[part]), torch.from_numpy(y[part]))
    other = Stats(7, 3, torch.device("cpu"))
    x2, y2 = rng.normal(size=(20, 7)), rng.normal(size=(20, 3))
    other.add(torch.from_numpy(x2), torch.from_numpy(y2))
    for p in (1e-3, 5.0):
        (w, b), = stats.solve([p])
        ref = _primal(x, y, p)
        assert np.allclose(x2 @ w.numpy() + b.numpy(), ref(x2), rtol=1e-9, atol=1e-9)
        assert abs(other.squared_error(w, b) - ((y2 - ref(x2)) ** 2).sum()) < 1e-8
        (w2, b2), = (stats + other).solve([p])
        both = _primal(np.vstack([x, x2]), np.vstack([y, y2]), p)
        assert np.allclose(x2 @ w2.numpy() + b2.numpy(), both(x2), rtol=1e-9, atol=1e-9)


def test_patch_fractions_and_confusion_scores_by_hand():
    from pacofr.eval.parsing import IGNORE, _confusion, confusion_scores, patch_fractions

    labels = torch.tensor([[[0, 1, 2, 2], [1, 1, 2, IGNORE], [0, 0, 0, 0], [0, 0, 0, 1]]])
    frac = patch_fractions(labels, 2, 3)
    assert torch.allclose(frac[0], torch.tensor([[0.25, 0.75, 0], [0, 0, 1], [1, 0, 0], [0.75, 0.25, 0]],
                                                dtype=torch.float64))
    truth = torch.tensor([[0, 0, 1, 1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    conf = _confusion(pred, truth, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    got = confusion_scores(conf)
    # class 1: TP 2, FP 1, FN 0 -> F1 4/5, IoU 2/3; class 2: TP 0, FN 1 -> 0; background excluded
    assert abs(got["f1"][1] - 80.0) < 1e-9 and got["f1"][2] == 0.0 and abs(got["mean_f1"] - 40.0) < 1e-9
    assert abs(got["mean_iou"] - 100 / 3) < 1e-9 and abs(got["pixel_accuracy"] - 60.0) < 1e-9


RADIUS = 12.0


def _parsing_faces(folder, n, seed):
    """Images with 5 coloured disks (radius 12) at moving positions, label maps with class j + 1
    on disk j and the top 12 rows ignored (255); also an image without a label map, one whose
    label map has another shape, one whose label map is cut short, and one whose label map has
    twice its resolution (kept: scaled)."""
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:96, :96] + 0.5
    for i in range(n):
        pts = POINTS + rng.uniform(-10, 10, (1, 2)) + rng.uniform(-3, 3, (5, 2))
        a = np.full((96, 96, 3), 40, np.uint8)
        lab = np.zeros((96, 96), np.uint8)
        for j, ((x, y), c) in enumerate(zip(pts, COLOURS)):
            disk = (xx - x) ** 2 + (yy - y) ** 2 <= RADIUS ** 2
            a[disk], lab[disk] = np.array(c, np.uint8) * 255, j + 1
        lab[:12] = 255
        Image.fromarray(a).save(folder / "images" / f"f{i:03d}.jpg", quality=95)
        Image.fromarray(lab).save(folder / "labels" / f"f{i:03d}.png")
    for name in ("unlabelled", "mismatch", "cut", "double"):
        Image.fromarray(a).save(folder / "images" / f"{name}.jpg", quality=95)
    Image.fromarray(lab[:50]).save(folder / "labels" / "mismatch.png")
    png = encode(Image.fromarray(lab), "PNG")
    (folder / "labels" / "cut.png").write_bytes(png[: len(png) // 2])
    Image.fromarray(lab).resize((192, 192), Image.NEAREST).save(folder / "labels" / "double.png")
    return folder


def test_parsing_probe_end_to_end(probe_data, tmp_path):
    d, _, _ = probe_data
    train, test = _parsing_faces(tmp_path / "train", 60, 1), _parsing_faces(tmp_path / "test", 20, 2)
    result = _probe("eval-parsing", d / "encoder.safetensors", "labels", train / "images", train / "labels",
                    test / "images", test / "labels", tmp_path / "parsing.json", "--classes", "6")
    assert result["train_images"] == 61 and result["test_images"] == 21
    assert result["skipped_train"] == result["skipped_test"] == {"no_labels": 1, "labels_size_mismatch": 1,
                                                                 "truncated": 1}
    # every train image's patches that hold a labelled pixel (rows 0-7 of 64 are ignored), in the refit
    assert result["train_patches"] == 61 * (64 - 8)
    assert len(result["f1"]) == 6 and all(v is not None for v in result["f1"])
    assert result["mean_f1"] > result["prior_mean_f1"] + 20, result  # the probe finds the moving disks
    assert result["penalty"] == result["penalties"][int(np.argmin(result["val_mse"]))]
    assert len(set(result["val_mse"])) > 3


def test_upsampled_scores_keep_patch_boundaries():
    """Bilinear between patch centres: a patch column scored above the rest predicts exactly
    its own pixel columns."""
    from pacofr.eval.parsing import upsample_scores

    scores = torch.zeros(1, 4, 4, 2)
    scores[..., 0] = 0.75
    scores[..., 1] = 0.5
    scores[0, :, 0, 1] = 1.0  # patch column 0
    pred = upsample_scores(scores.view(1, 16, 2), (4, 4), 16)[0]
    assert (pred[:, :4] == 1).all() and (pred[:, 4:] == 0).all()


def test_confusion_scores_skip_classes_absent_from_the_truth():
    from pacofr.eval.parsing import confusion_scores

    got = confusion_scores(torch.tensor([[5, 0, 1], [0, 3, 0], [0, 0, 0]]))  # class 2: predicted, never true
    assert got["f1"][2] is None and got["mean_f1"] == 100.0
    assert confusion_scores(torch.tensor([[4, 0], [0, 0]]))["mean_f1"] is None


def test_parsing_labels_follow_the_crop_and_are_checked(tmp_path):
    from pacofr.eval.parsing import ParsingImages

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    lab = np.zeros((64, 96), np.uint8)
    lab[:, 16:24] = 1  # a band 8 px wide, 16 px right of the centre square's left edge
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(lab).save(tmp_path / "labels" / "a.png")
    ds = ParsingImages(str(tmp_path / "images"), str(tmp_path / "labels"), 32, 2)
    (_, ids), reason = ds[0]
    assert reason is None and ids.shape == (32, 32)
    assert (ids[:, :4] == 1).all() and ids[:, 4:].sum() == 0  # x 16-24 of the 96-px image -> 0-4 of 32
    lab[0, 0] = 7  # (outside the crop, and a single pixel: checked before the resize)
    Image.fromarray(lab).save(tmp_path / "labels" / "a.png")
    with pytest.raises(ValueError, match=r"class id 7 outside \[0, --classes 2\)"):
        ds[0]
    lab[0, 0] = 1
    Image.fromarray(np.stack([lab] * 3, -1)).save(tmp_path / "labels" / "a.png")  # ids as gray RGB: read
    assert torch.equal(ds[0][0][1], ids)
    colour = np.stack([lab, lab * 0, lab], -1)
    Image.fromarray(colour).save(tmp_path / "labels" / "a.png")  # a colour rendering: refused
    assert ds[0] == (None, "labels_not_ids")
    with pytest.raises(FileNotFoundError, match="--train-labels"):
        ParsingImages(str(tmp_path / "images"), str(tmp_path / "nowhere"), 32, 2)
    # a .txt list: label maps by the path relative to the list's folder; absolute paths refused
    Image.fromarray(lab).save(tmp_path / "labels" / "a.png")
    (tmp_path / "list.txt").write_text("images/a.png\n")
    (tmp_path / "labels" / "images").mkdir()
    Image.fromarray(lab).save(tmp_path / "labels" / "images" / "a.png")
    listed = ParsingImages(str(tmp_path / "list.txt"), str(tmp_path / "labels"), 32, 2)
    assert listed.labels == [str(tmp_path / "labels" / "images" / "a.png")] and torch.equal(listed[0][0][1], ids)
    for entry in (str(tmp_path / "images" / "a.png"), f"../{tmp_path.name}/images/a.png"):  # (both exist)
        (tmp_path / "bad.txt").write_text(entry + "\n")
        with pytest.raises(ValueError, match="label maps are found by the image's path relative to the list"):
            ParsingImages(str(tmp_path / "bad.txt"), str(tmp_path / "labels"), 32, 2)


def test_probe_cli_prints_a_worker_error_in_one_line_and_writes_strict_json(probe_data, tmp_path, capsys):
    """A label map with a class id beyond --classes, read in a DataLoader worker: the CLI prints
    the message alone (no worker traceback). A result with a non-finite score is written with
    null, as strict JSON."""
    from pacofr.cli import _report

    d, train, _ = probe_data
    (tmp_path / "labels").mkdir()
    for f in sorted(train.glob("f*.png"))[:4]:
        Image.fromarray(np.full((96, 96), 5, np.uint8)).save(tmp_path / "labels" / f.name)
    argv = ["eval-parsing", "--config", "tiny", "--encoder", str(d / "encoder.safetensors"), "--classes", "3",
            "--train", str(train), "--train-labels", str(tmp_path / "labels"), "--test", str(train),
            "--test-labels", str(tmp_path / "labels"), "--workers", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class id 5 outside [0, --classes 3)" in err[0] and "Traceback" not in err[0], err
    out = tmp_path / "r.json"
    _report(type("Args", (), {"output": str(out)}), {"skipped_train": {}, "skipped_test": {}, "nme": float("nan"),
                                                     "val": [1.0, float("inf")]})
    assert json.loads(out.read_text()) == {"skipped_train": {}, "skipped_test": {}, "nme": None, "val": [1.0, None]}


# -- the attribute probe -----------------------------------------------------------------------------
def _attribute_faces(folder, n, seed):
    """Dot faces with three attributes: the red dot is there, the blue dot is there, the
    background is bright; -1/1 values as CelebA's. Also an unlabelled image, a row with a
    value that is not -1/0/1, and a broken file. Returns the folder and the targets written."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:96, :96] + 0.5
    rows, truth = ["path,Red,Blue,Bright"], {}
    for i in range(n):
        attrs = rng.random(3) < (0.5, 0.3, 0.6)
        pts = POINTS + rng.uniform(-10, 10, (1, 2))
        a = np.full((96, 96, 3), 90 if attrs[2] else 40, np.uint8)
        for j, ((x, y), c) in enumerate(zip(pts, COLOURS)):
            if (j == 0 and not attrs[0]) or (j == 2 and not attrs[1]):
                continue
            a[(xx - x) ** 2 + (yy - y) ** 2 <= 6.0 ** 2] = np.array(c, np.uint8) * 255
        Image.fromarray(a).save(folder / f"f{i:03d}.png")
        rows.append(f"f{i:03d}.png," + ",".join("1" if v else "-1" for v in attrs))
        truth[f"f{i:03d}.png"] = attrs
    Image.fromarray(a).save(folder / "unlabelled.png")
    Image.fromarray(a).save(folder / "odd.png")
    rows.append("odd.png,1,2,1")
    (folder / "broken.png").write_bytes(b"not a png at all")
    rows.append("broken.png,1,1,1")
    (folder / "attrs.csv").write_text("\n".join(rows) + "\n")
    return folder, truth


def test_attribute_file(tmp_path):
    from pacofr.eval.attributes import load_attribute_file

    f = tmp_path / "a.csv"
    f.write_text("path,Smiling,Male\na.jpg,1,-1\nsub\\b.jpg,0,1\nc.jpg,1\nd.jpg,1,x\n")
    names, table = load_attribute_file(str(f), "--train-labels")
    assert names == ["Smiling", "Male"]
    assert table["a.jpg"].tolist() == [1.0, 0.0] and table["sub/b.jpg"].tolist() == [0.0, 1.0]
    assert table["c.jpg"] is None and table["d.jpg"] is None
    f.write_text("path,Smiling,Male,\nc.jpg,1,0,\n")  # trailing commas
    assert load_attribute_file(str(f), "x")[1]["c.jpg"].tolist() == [1.0, 0.0]
    for text, message in (("path\n", "needs a header"), ("a.jpg,1,-1\nb.jpg,1,1\n", "first line is data"),
                          ("path,A,A\na.jpg,1,1\n", "names repeat"), ("path,A\na.jpg,1\na.jpg,0\n", "more than one row")):
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_attribute_file(str(f), "--train-labels")
    with pytest.raises(FileNotFoundError, match="--test-labels"):
        load_attribute_file(str(tmp_path / "none.csv"), "--test-labels")


def test_attribute_probe_end_to_end(probe_data, tmp_path):
    d, _, _ = probe_data
    (train, _), (test, truth) = _attribute_faces(tmp_path / "train", 80, 1), _attribute_faces(tmp_path / "test", 40, 2)
    result = _probe("eval-attributes", d / "encoder.safetensors", "labels", train, train / "attrs.csv", test,
                    test / "attrs.csv", tmp_path / "attributes.json")
    assert result["train_images"] == 80 and result["test_images"] == 40 and result["attributes"] == 3
    assert result["skipped_train"] == result["skipped_test"] == {"no_labels": 1, "labels_invalid": 1,
                                                                 "not_an_image": 1}
    # the floor, from the written targets: each attribute's majority value in train, scored on test
    train_truth = _attribute_faces(tmp_path / "again", 80, 1)[1]
    majority = np.mean(list(train_truth.values()), axis=0) > 0.5
    floor = 100 * (np.array(list(truth.values())) == majority).mean(0)
    assert np.allclose([result["majority"][k] for k in ("Red", "Blue", "Bright")], floor)
    assert result["mean_accuracy"] > result["majority_mean_accuracy"] + 20, result
    assert min(result["accuracy"].values()) > 80, result
    # the test file's columns in another order, read with 2 workers: the same figures
    lines = (test / "attrs.csv").read_text().splitlines()
    (test / "shuffled.csv").write_text("\n".join(",".join(np.array(line.split(","))[[0, 3, 1, 2]])
                                                 for line in lines) + "\n")
    again = _probe("eval-attributes", d / "encoder.safetensors", "labels", train, train / "attrs.csv", test,
                   test / "shuffled.csv", tmp_path / "again.json", "--workers", "2")
    assert again["accuracy"] == result["accuracy"] and again["majority"] == result["majority"]
