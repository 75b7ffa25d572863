"""pacofr.eval.verification and pacofr.eval.ijb: the 10-fold metric against a float64 brute
force on planted embeddings, TAR@FAR against a brute-force ROC, .bin files written byte for
byte as Python 2 and Python 3 pickle them (and a hostile one refused without running), LFW's
pairs.txt tree, an IJB folder with planted templates, and `pacofr eval-verification` end to end
on a tiny encoder."""

import json
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pacofr.cli import main
from pacofr.config import load_config
from pacofr.data.align import ARCFACE_112
from pacofr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pacofr.eval import ijb
from pacofr.eval.verification import (_normalized, embed, evaluate_pairs, load_bin, read_lfw_pairs, tar_at_far,
                                      verification_metrics)
from test_data import encode


# -- the metric ------------------------------------------------------------------------------------
def _brute_metrics(emb: np.ndarray, same: np.ndarray, folds: int = 10) -> dict:
    """insightface's protocol written out with loops: folds, thresholds, pairs."""
    n = len(same)
    dist = np.array([float(np.sum((emb[2 * i] - emb[2 * i + 1]) ** 2)) for i in range(n)])
    sizes = [n // folds + (1 if k < n % folds else 0) for k in range(folds)]
    starts = [sum(sizes[:k]) for k in range(folds)]
    test_sets = [list(range(starts[k], starts[k] + sizes[k])) for k in range(folds)]
    acc_t = [k * 0.01 for k in range(400)]
    val_t = [k * 0.001 for k in range(4000)]
    acc, val, far = [], [], []
    for k in range(folds):
        train = np.array([i for j in range(folds) if j != k for i in test_sets[j]])
        test = np.array(test_sets[k])
        best, best_acc = None, -1.0
        for t in acc_t:
            a = np.mean((dist[train] < t) == same[train])
            if a > best_acc:
                best, best_acc = t, a
        acc.append(np.mean((dist[test] < best) == same[test]))
        neg = train[~same[train]]
        fars = [np.sum(dist[neg] < t) / len(neg) for t in val_t]
        threshold = 0.0
        if max(fars) >= 1e-3:
            for i in range(len(val_t) - 1):
                if fars[i] <= 1e-3 < fars[i + 1]:
                    threshold = val_t[i] + (1e-3 - fars[i]) / (fars[i + 1] - fars[i]) * (val_t[i + 1] - val_t[i])
                    break
            else:
                threshold = val_t[max(i for i in range(len(val_t)) if fars[i] <= 1e-3)]
        accept = dist[test] < threshold
        val.append(np.sum(accept & same[test]) / np.sum(same[test]))
        far.append(np.sum(accept & ~same[test]) / np.sum(~same[test]))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    std = lambda v: (sum((x - mean(v)) ** 2 for x in v) / len(v)) ** 0.5  # noqa: E731
    return {"accuracy": mean(acc), "accuracy_std": std(acc), "val": mean(val), "val_std": std(val), "far": mean(far)}


def _planted(pairs: int, noise: float, seed: int, antipodal_negatives: bool = False):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(pairs, 16))
    same = rng.random(pairs) < 0.5
    b = np.where(same[:, None], a + rng.normal(scale=noise, size=a.shape),
                 -a if antipodal_negatives else rng.normal(size=a.shape))
    emb = np.empty((2 * pairs, 16))
    emb[0::2], emb[1::2] = a, b
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), same


@pytest.mark.parametrize("pairs,noise,antipodal", [(2603, 0.8, False), (437, 1.2, False), (300, 0.5, True)])
def test_metric_against_the_brute_force(pairs, noise, antipodal):
    """Uneven folds; with 2603 pairs the training FAR steps below 1e-3 (interpolation between two
    non-zero FARs), with 437 from 0 to its first step; antipodal negatives (distance 4) never
    reach FAR 1e-3 below threshold 3.999: VAL 0."""
    emb, same = _planted(pairs, noise, pairs)
    if antipodal:
        emb, same = _planted(pairs, noise, pairs, antipodal_negatives=True)
    got = verification_metrics(torch.from_numpy(emb).float().double(), torch.from_numpy(same))
    want = _brute_metrics(emb, same)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert 0.6 < got["accuracy"] < 1.0
    assert (got["val"] == 0.0) == antipodal
    with pytest.raises(ValueError, match="do not hold"):
        verification_metrics(torch.from_numpy(emb[:-1]), torch.from_numpy(same))
    emb[5, 2] = np.nan
    with pytest.raises(ValueError, match="not all finite"):
        verification_metrics(torch.from_numpy(emb), torch.from_numpy(same))


def test_metric_when_the_training_far_is_1e3_exactly():
    """2 folds of 1000 mismatched pairs: one false accept is a FAR of exactly 1e-3, whose
    threshold is the largest at it (no interpolation)."""
    rng = np.random.default_rng(7)
    emb, _ = _planted(2400, 0.0, 7)
    emb += rng.normal(scale=0.3, size=emb.shape)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    same = np.concatenate([rng.permutation([True] * 200 + [False] * 1000) for _ in range(2)])
    got = verification_metrics(torch.from_numpy(emb), torch.from_numpy(same), folds=2)
    want = _brute_metrics(emb, same, folds=2)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


def _brute_roc(scores, labels):
    """ROC points by counting at every distinct score, the origin first; a point whose step in
    equals its step out is left out."""
    pts = [(0, 0)] + [(int(np.sum(labels & (scores >= t))), int(np.sum(~labels & (scores >= t))))
                      for t in sorted(set(scores.tolist()), reverse=True)]
    inner = pts[1:]
    kept = [pts[0]] + [inner[i] for i in range(len(inner)) if i in (0, len(inner) - 1) or
                       (inner[i][0] - inner[i - 1][0], inner[i][1] - inner[i - 1][1])
                       != (inner[i + 1][0] - inner[i][0], inner[i + 1][1] - inner[i][1])]
    return [(fp / np.sum(~labels), tp / np.sum(labels)) for tp, fp in kept]


def _brute_tar(scores, labels, fars):
    pts = _brute_roc(scores, labels)
    out = {}
    for far in fars:
        best = min(range(len(pts)), key=lambda i: (abs(pts[i][0] - far), i))
        out[far] = pts[best][1]
    return out


def test_tar_at_far_by_hand_and_against_the_brute_force():
    neg, pos = np.arange(10) / 10, np.array([0.95, 0.85, 0.75, 0.65, 0.55])
    scores, labels = np.r_[neg, pos], np.r_[np.zeros(10, bool), np.ones(5, bool)]
    # (TP, FP): (0,0) (1,0) (1,1) (2,1) ... (4,4) (5,4) (5,10): FAR 0.1 and 0.3 read the first of their
    # two points; 0.6 falls where (5,5)..(5,9) were left out: the nearest kept points are at FP 4
    assert tar_at_far(scores, labels, (1e-6, 0.1, 0.3, 0.6)) == {1e-6: 0.0, 0.1: 0.2, 0.3: 0.6, 0.6: 0.8}
    rng = np.random.default_rng(3)
    fars = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.3)
    for n, levels in ((3000, 40), (500, 1000)):  # many ties, then few
        labels = rng.random(n) < 0.3
        scores = np.round(rng.normal(size=n) + 1.5 * labels, int(np.log10(levels)))
        assert tar_at_far(scores, labels, fars) == pytest.approx(_brute_tar(scores, labels, fars), abs=1e-12)


# -- .bin files ------------------------------------------------------------------------------------
def _py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """(images, issame) as Python 2's pickle.dump(..., protocol=2) writes it: str as
    SHORT_BINSTRING / BINSTRING, bools as NEWTRUE / NEWFALSE, memo entries numbered as made."""
    memo = iter(range(256))
    put = lambda: b"q" + bytes([next(memo)])  # noqa: E731 (BINPUT)
    out = [b"\x80\x02"]  # PROTO 2

    def save_list(items, save_item):
        out.append(b"]" + put())  # EMPTY_LIST
        if len(items) > 1:
            out.append(b"(")  # MARK
        for item in items:
            save_item(item)
        out.append(b"e" if len(items) > 1 else b"a")  # APPENDS / APPEND

    def save_str(s):
        out.append((b"U" + bytes([len(s)]) if len(s) < 256 else b"T" + struct.pack("<i", len(s))) + s + put())

    save_list(images, save_str)
    save_list(issame, lambda b: out.append(b"\x88" if b else b"\x89"))
    out.append(b"\x86" + put() + b".")  # TUPLE2, STOP
    return b"".join(out)


def _bin_images(n: int, size: int = 112, seed: int = 0):
    """n smooth RGB images as uint8 arrays, and as PNG bytes (some under 256 bytes)."""
    rng = np.random.default_rng(seed)
    arrays, encoded = [], []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        if i % 3 == 0:  # flat: a PNG under 256 bytes (SHORT_BINSTRING)
            a = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (size, size, 3)).copy()
        else:
            c = rng.uniform(0, 1, (3, 3))
            ramp = c[:, 0] * xx[..., None] + c[:, 1] * yy[..., None] + 0.5 * c[:, 2]
            a = (255 * np.clip(ramp, 0, 1)).astype(np.uint8)
        arrays.append(a)
        encoded.append(encode(Image.fromarray(a), "PNG", optimize=True))
    return arrays, encoded


def test_bin_as_python2_and_python3_pickle_it(tmp_path):
    arrays, encoded = _bin_images(8)
    issame = [True, False, False, True]
    assert any(len(b) < 256 for b in encoded) and any(len(b) >= 256 for b in encoded)
    data = _py2_pickle(encoded, issame)
    assert pickle.loads(data, encoding="bytes") == (encoded, issame)  # (the hand-written opcodes are a pickle)
    py3 = pickle.dumps((encoded, issame), protocol=pickle.HIGHEST_PROTOCOL)
    for name, raw in (("py2.bin", data), ("py3.bin", py3)):
        (tmp_path / name).write_bytes(raw)
        images, same = load_bin(tmp_path / name)
        assert images.dtype == torch.uint8 and images.shape == (8, 3, 112, 112)
        assert torch.equal(images, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
        assert same.dtype == torch.bool and same.tolist() == issame


def test_a_hostile_or_malformed_bin_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "ran"
    command = f"touch {marker}".encode()
    hostile = (b"\x80\x02cos\nsystem\nq\x00X" + struct.pack("<I", len(command)) + command
               + b"q\x01\x85q\x02Rq\x03.")  # GLOBAL os.system, (command,), REDUCE
    # (a plain unpickler calls the global: here a harmless one in its place)
    assert pickle.loads(hostile.replace(b"os\nsystem", b"builtins\nlen")) == len(command)
    arrays, encoded = _bin_images(2)
    cases = {"hostile.bin": (hostile, "global os.system"),
             "truncated.bin": (pickle.dumps((encoded, [True]))[:-40], "not an insightface .bin"),
             "shape.bin": (pickle.dumps((encoded, [True, False])), "2P encoded images"),
             "ints.bin": (pickle.dumps(([1, 2], [True])), "2P encoded images"),
             "broken_image.bin": (pickle.dumps(([encoded[0], b"\x89PNG\r\n\x1a\n" + bytes(30)], [True])), "image 1")}
    enc = tmp_path / "enc.safetensors"
    _tiny_encoder(enc)
    for name, (raw, expected) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=expected):
            load_bin(tmp_path / name)
        assert main(["eval-verification", "--encoder", str(enc), "--bin", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(tmp_path / name) in err and expected in err, err
    assert not marker.exists()
    assert main(["eval-verification", "--encoder", str(enc), "--bin", str(tmp_path / "none.bin")]) == 2
    assert "none.bin" in capsys.readouterr().err


# -- embedding ------------------------------------------------------------------------------------
def test_resize_matches_the_training_path_and_flip_sum():
    arrays, _ = _bin_images(3, size=112, seed=5)
    arrays.append(np.random.default_rng(5).integers(0, 256, (112, 112, 3), dtype=np.uint8))  # (aliasing shows)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for k, a in enumerate(arrays):  # PIL's bilinear resize (the training crops'), within a level
        pil = torch.from_numpy(np.array(Image.fromarray(a).resize((48, 48), Image.BILINEAR))).permute(2, 0, 1)
        assert (_normalized(images[k : k + 1], 48)[0] * std + mean - pil / 255).abs().max() <= 1.01 / 255
    same = _normalized(images, 112)
    assert torch.allclose(same, (images / 255 - mean) / std, atol=1e-6)
    w = torch.randn(3 * 112, 5)
    fn = lambda x: x.mean(2).flatten(1) @ w  # noqa: E731 (column means: a flip reverses them)
    want = F.normalize(fn(same) + fn(same.flip(-1)), dim=1)
    assert torch.allclose(embed(fn, images, 112, batch_size=3), want, atol=1e-6)


# -- LFW pairs.txt ---------------------------------------------------------------------------------
PALETTE = [(r, g, b) for r in (20, 80, 140, 200, 250) for g in (30, 100, 170, 240) for b in (10, 120, 230)]


def _palette_embed(vectors: torch.Tensor):
    """An embed_fn giving image k of the palette (recognized by its mean colour) vectors[k]."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    colours = (torch.tensor(PALETTE, dtype=torch.float32) / 255 - mean) / std

    def fn(x):
        k = torch.cdist(x.mean((2, 3)), colours).argmin(1)
        return vectors[k]
    return fn


def _lfw_tree(root, sets: int = 2, per_set: int = 3):
    names = {"Ann_Lee": 3, "Bo_Chen": 2, "Cy_Dahl": 2, "Di_Eto": 1}
    colour = {}
    for name, n in names.items():
        (root / name).mkdir(parents=True)
        for i in range(1, n + 1):
            colour[(name, i)] = len(colour)
            size = (250, 250) if len(colour) % 2 else (180, 240)
            Image.new("RGB", size, PALETTE[colour[(name, i)]]).save(root / name / f"{name}_{i:04d}.jpg", quality=95)
    matched = [("Ann_Lee", 1, 2), ("Ann_Lee", 2, 3), ("Bo_Chen", 1, 2), ("Cy_Dahl", 2, 1), ("Ann_Lee", 3, 1),
               ("Cy_Dahl", 1, 2)]
    mismatched = [("Ann_Lee", 1, "Bo_Chen", 1), ("Di_Eto", 1, "Cy_Dahl", 2), ("Bo_Chen", 2, "Cy_Dahl", 1),
                  ("Ann_Lee", 3, "Di_Eto", 1), ("Bo_Chen", 1, "Cy_Dahl", 2), ("Ann_Lee", 2, "Di_Eto", 1)]
    lines = [f"{sets} {per_set}"]
    for s in range(sets):
        lines += [" ".join(map(str, p)) for p in matched[s * per_set : (s + 1) * per_set]]
        lines += ["\t".join(map(str, p)) for p in mismatched[s * per_set : (s + 1) * per_set]]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    keys = []
    for s in range(sets):
        keys += [((n, a), (n, b)) for n, a, b in matched[s * per_set : (s + 1) * per_set]]
        keys += [((n1, a), (n2, b)) for n1, a, n2, b in mismatched[s * per_set : (s + 1) * per_set]]
    return colour, keys, [True] * per_set + [False] * per_set + [True] * per_set + [False] * per_set


def test_lfw_pairs_protocol(tmp_path):
    colour, keys, issame = _lfw_tree(tmp_path / "lfw")
    listed, same, sets = read_lfw_pairs(tmp_path / "lfw" / "pairs.txt", tmp_path / "lfw")
    assert sets == 2 and same == issame
    assert listed[3] == (str(tmp_path / "lfw/Ann_Lee/Ann_Lee_0001.jpg"), str(tmp_path / "lfw/Bo_Chen/Bo_Chen_0001.jpg"))
    vectors = torch.randn(len(PALETTE), 6)
    got = evaluate_pairs(_palette_embed(vectors), tmp_path / "lfw" / "pairs.txt", tmp_path / "lfw", 32)
    rows = F.normalize(vectors + vectors, dim=1)  # (the flip-sum of an image and its flip, same colour)
    emb = torch.stack([rows[colour[k]] for pair in keys for k in pair])
    assert got == {"set": "pairs", "path": str(tmp_path / "lfw" / "pairs.txt"), "pairs": 12,
                   **verification_metrics(emb, torch.tensor(issame), folds=2)}
    text = (tmp_path / "lfw" / "pairs.txt").read_text()
    for bad, expected in ((text.replace("2 3", "2 4", 1), "announces 2 sets of 2 x 4"),
                          (text.replace("Bo_Chen 1 2", "Bo_Chen 1 x"), "line 4"),
                          (text.replace("Bo_Chen 1 2", "Bo_Chen 1 7"), "Bo_Chen_0007.jpg")):
        (tmp_path / "bad.txt").write_text(bad)
        with pytest.raises((ValueError, FileNotFoundError), match=expected):
            evaluate_pairs(_palette_embed(vectors), tmp_path / "bad.txt", tmp_path / "lfw", 32)


# -- IJB -------------------------------------------------------------------------------------------
def _rotation(deg):
    r = np.deg2rad(deg)
    return np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])


def test_alignment_puts_the_landmarks_on_the_template():
    """Gaussian blobs at the landmarks of a face (scaled, rotated, shifted from the template) land,
    after the warp, where the 112 template resized to the output size has its points."""
    rng = np.random.default_rng(0)
    for size, scale in ((112, 2.0), (64, 1.3), (224, 1.0)):
        points = ARCFACE_112 @ (scale * _rotation(rng.uniform(-15, 15))).T + rng.uniform(40, 60, 2)
        yy, xx = np.mgrid[0:300, 0:300]
        blobs = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * (1.5 * scale) ** 2)) for x, y in points)
        im = Image.fromarray(np.repeat((255 * blobs / blobs.max())[..., None], 3, 2).astype(np.uint8))
        out = ijb.align(im, points, size)[..., 0].astype(np.float64)
        oy, ox = np.mgrid[0:size, 0:size]
        for x, y in (ARCFACE_112 + 0.5) * size / 112 - 0.5:  # (pixel centres at integers)
            w = out * ((ox - x) ** 2 + (oy - y) ** 2 < (6 * size / 112) ** 2)
            assert abs((w * ox).sum() / w.sum() - x) < 0.03 and abs((w * oy).sum() / w.sum() - y) < 0.03


def _ijb_tree(root, seed: int = 0):
    """An IJB-C folder of solid-colour faces (each its own palette colour: its planted vector),
    templates of several media, one unreadable face."""
    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    faces, points = [], []
    for k in range(len(PALETTE)):
        template, media = 100 + k // 3, 7 + (k % 3 == 2) + 10 * (k // 3)  # 3 faces, 2 media per template
        name = f"{k + 1}.jpg"
        Image.new("RGB", (230, 250), PALETTE[k]).save(root / "loose_crop" / name, quality=95)
        lmk = ARCFACE_112 @ (1.2 * _rotation(rng.uniform(-10, 10))).T + rng.uniform(50, 60, 2)
        faces.append(f"{name} {template} {media}")
        points.append(name + " " + " ".join(f"{v:.3f}" for v in lmk.ravel()) + f" {rng.uniform(0.5, 1):.4f}")
    (root / "loose_crop" / "5.jpg").write_bytes(b"\xff\xd8\xff" + bytes(20))
    points[9] = "10.jpg " + " ".join(["50.0"] * 10) + " 0.9"  # (all five at one point)
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(points) + "\n")
    t = len(PALETTE) // 3
    pairs = [(100 + a, 100 + b, int(a // 2 == b // 2)) for a in range(t) for b in range(a + 1, t)]
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in pairs))
    return faces, [float(p.split()[-1]) for p in points], pairs


@pytest.mark.parametrize("detector_score", [False, True])
def test_ijb_templates_and_tar(tmp_path, detector_score):
    faces, scores, pairs = _ijb_tree(tmp_path / "IJBC")
    torch.manual_seed(0)
    vectors = torch.randn(len(PALETTE), 8)
    identity = torch.randn(len(PALETTE) // 6, 8)  # templates 2i and 2i + 1 share an identity
    vectors += 1.5 * identity.repeat_interleave(6, 0)
    got = ijb.evaluate_ijb(_palette_embed(vectors), tmp_path / "IJBC", 32, batch_size=5, workers=0,
                           detector_score=detector_score)
    # the templates by hand: each media's mean face, summed, normalized (face 4: 5.jpg, unreadable;
    # face 9: its landmarks at one point)
    unit = F.normalize(vectors + vectors, dim=1).double()
    weight = torch.tensor(scores if detector_score else [1.0] * len(faces), dtype=torch.float64)
    templates = {}
    for tid in sorted({int(f.split()[1]) for f in faces}):
        media = {}
        for k, f in enumerate(faces):
            if int(f.split()[1]) == tid and k not in (4, 9):
                media.setdefault(f.split()[2], []).append(unit[k] * weight[k])
        templates[tid] = F.normalize(sum(torch.stack(m).mean(0) for m in media.values()), dim=0)
    want = np.array([float(templates[a] @ templates[b]) for a, b, _ in pairs])
    labels = np.array([c == 1 for _, _, c in pairs])
    assert got["pairs"] == len(pairs) and got["templates"] == len(templates) and got["faces"] == len(faces)
    assert got["skipped"] == {"not_an_image": 1, "landmarks_invalid": 1} and got["set"] == "IJBC"
    fars = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    assert got["tar_at_far"] == pytest.approx({f"{f:g}": v for f, v in _brute_tar(want, labels, fars).items()})
    assert want[labels].mean() > want[~labels].mean() + 0.3  # (the planted identities are recognizable)
    assert 0 < got["tar_at_far"]["0.1"] < 1 and got["tar_at_far"]["1e-06"] == 0  # (1e-6: the ROC's origin)
    faces_ds = ijb.IJBFaces(tmp_path / "IJBC", 32)
    ids, feats, _ = ijb.template_features(faces_ds, _palette_embed(vectors), 7, 0, detector_score)
    assert np.allclose(ijb.pair_scores(ids, feats, faces_ds.pairs).numpy(), want, atol=1e-5)


def test_ijb_meta_errors_name_the_file(tmp_path):
    _ijb_tree(tmp_path / "IJBC")
    meta = tmp_path / "IJBC" / "meta"
    text = (meta / "ijbc_template_pair_label.txt").read_text()
    (meta / "ijbc_template_pair_label.txt").write_text(text + "100 999 1\n")
    with pytest.raises(ValueError, match="no face of"):
        ijb.IJBFaces(tmp_path / "IJBC", 32)
    (meta / "ijbc_template_pair_label.txt").write_text(text + "100 101\n")
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label.txt' line \d+: expected 3 fields"):
        ijb.IJBFaces(tmp_path / "IJBC", 32)
    (meta / "ijbc_template_pair_label.txt").write_bytes(text.encode() + b"100 \xff 1\n")
    with pytest.raises(ValueError, match="ijbc_template_pair_label.txt' is not UTF-8"):
        ijb.IJBFaces(tmp_path / "IJBC", 32)
    (meta / "ijbc_template_pair_label.txt").write_text(text + "100 1x1 1\n")
    with pytest.raises(ValueError, match=r"line \d+: expected 3 fields, got '100 1x1 1'"):
        ijb.IJBFaces(tmp_path / "IJBC", 32)
    (meta / "ijbb_face_tid_mid.txt").write_text("")
    with pytest.raises(ValueError, match="found 2"):
        ijb.IJBFaces(tmp_path / "IJBC", 32)


# -- the command -----------------------------------------------------------------------------------
def _tiny_encoder(path):
    from pacofr.model import ViTEncoder, save_encoder

    torch.manual_seed(0)
    cfg = load_config("tiny")
    save_encoder(ViTEncoder.from_config(cfg.model).state_dict(), path, cfg.model)
    return cfg


def test_cli_end_to_end(tmp_path, capsys):
    from pacofr.eval.attributes import features
    from pacofr.eval.common import load_encoder

    cfg = _tiny_encoder(tmp_path / "enc.safetensors")
    arrays, encoded = _bin_images(40, size=64, seed=1)  # the tiny encoder's size: no resize
    issame = [bool(i % 3) for i in range(20)]
    (tmp_path / "lfw.bin").write_bytes(_py2_pickle(encoded, issame))
    _lfw_tree(tmp_path / "lfw")
    _ijb_tree(tmp_path / "IJBC")
    out = tmp_path / "out" / "v.json"
    rc = main(["eval-verification", "--encoder", str(tmp_path / "enc.safetensors"), "--bin", str(tmp_path / "lfw.bin"),
               "--pairs", str(tmp_path / "lfw" / "pairs.txt"), "--images", str(tmp_path / "lfw"),
               "--ijb", str(tmp_path / "IJBC"), "--detector-score", "--workers", "0",
               "--batch-size", "16", "--output", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    lines = printed.out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("lfw: accuracy ") and lines[1].startswith("pairs: accuracy ")
    assert lines[2].startswith("IJBC: TAR@FAR 1e-06 ") and "skipped: {'not_an_image': 1, 'landmarks_invalid': 1}" in lines[2]
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert result["img_size"] == 64 and [s["set"] for s in result["sets"]] == ["lfw", "pairs", "IJBC"]
    ijb_set = result["sets"][2]
    assert ijb_set["detector_score"] is True and list(ijb_set["tar_at_far"]) == ["1e-06", "1e-05", "0.0001", "0.001",
                                                                               "0.01", "0.1"]
    # by hand: normalize, the encoder's class and mean patch tokens of the image and its flip
    encoder = load_encoder(cfg, str(tmp_path / "enc.safetensors"), torch.device("cpu"))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    cpu = torch.device("cpu")
    emb = F.normalize(features(encoder, x, cpu) + features(encoder, x.flip(-1), cpu), dim=1)
    want = verification_metrics(emb, torch.tensor(issame))  # (pairs 4 and 5, a fold, are both matched: FAR NaN)
    assert np.isnan(want["far"])
    for k, v in want.items():
        assert result["sets"][0][k] is None if np.isnan(v) else result["sets"][0][k] == pytest.approx(v, abs=1e-9), k
    assert result["sets"][0]["pairs"] == 20
    for argv, expected in ((["--pairs", "p.txt"], "--pairs and --images go together"), ([], "give a set"),
                           (["--bin", "x.bin", "--batch-size", "0"], "--batch-size must be >= 1"),
                           (["--ijb", str(tmp_path / "nothing")], "nothing")):
        assert main(["eval-verification", "--encoder", str(tmp_path / "enc.safetensors"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
