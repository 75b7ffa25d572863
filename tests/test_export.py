"""`pacofr export` and the encoder file's stored config: a short run's checkpoints exported, their
tensors against the checkpoints' own, the metadata read back, the probes without --config (a
mismatching one refused naming the key), timm's model built from the file alone against timm
built by hand, and every bad input refused in one line."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pacofr import __version__
from pacofr.cli import main
from pacofr.config import load_config
from pacofr.engine import pretrain
from pacofr.model import ViTEncoder, create_timm_model, read_metadata, weights_config

ENCODER = {"img_size": 64, "patch_size": 8, "in_chans": 3,
           "encoder": {"embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0}}  # the tiny preset's


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step tiny run with a checkpoint at every step (the newest two kept)."""
    out = tmp_path_factory.mktemp("export") / "run"
    cfg = load_config("tiny", ["train.batch_size=16", "train.max_steps=3", "train.ckpt_every=1",
                               "train.keep_last=2", "train.image_every=0", "data.num_workers=0"])
    pretrain(cfg, out)
    return out


def _encoder_of(ckpt):
    """The encoder's tensors of a checkpoint, read here: the `encoder.` entries without the prefix."""
    full = load_file(str(ckpt / "model.safetensors"))
    return {k[len("encoder."):]: v for k, v in full.items() if k.startswith("encoder.")}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _export(capsys, *args):
    rc = main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_export_of_a_run_and_of_a_checkpoint(run, tmp_path, capsys):
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["ckpt-00000002", "ckpt-00000003"]
    for source, ckpt, step in ((run, ckpts[-1], 3), (ckpts[0], ckpts[0], 2)):
        out = tmp_path / f"from-{source.name}.safetensors"
        rc, printed, _ = _export(capsys, "--checkpoint", source, "--out", out)
        assert rc == 0 and f"wrote {out}: the encoder of {ckpt} (step {step}), 54 tensors" in printed
        _assert_same(load_file(str(out)), _encoder_of(ckpt))
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["pacofr.config"]) == {"model": ENCODER}
        assert meta["pacofr.step"] == str(step) and meta["pacofr.source"] == str(ckpt.resolve())
        assert meta["pacofr.version"] == __version__
        assert json.loads(meta["timm.kwargs"]) == dict(img_size=64, patch_size=8, in_chans=3, embed_dim=96, depth=4,
                                                       num_heads=3, mlp_ratio=4.0, num_classes=0, global_pool="token")
    # the run's own encoder file: the same writer, the final weights (those of the last checkpoint)
    _assert_same(load_file(str(run / "encoder.safetensors")), _encoder_of(ckpts[-1]))
    meta = read_metadata(run / "encoder.safetensors")
    assert json.loads(meta["pacofr.config"]) == {"model": ENCODER} and meta["pacofr.step"] == "3"
    assert not list(tmp_path.glob(".*"))  # (no temporary file left)


def test_the_stored_config_round_trips(run, tmp_path, capsys):
    """weights_config of an exported file, of a checkpoint (its run's config.yaml) and of the
    run: the config that made the weights, the encoder keys at least."""
    out = tmp_path / "e.safetensors"
    assert _export(capsys, "--checkpoint", run, "--out", out)[0] == 0
    tiny = load_config("tiny").model
    for path in (out, run, sorted((run / "checkpoints").iterdir())[0]):
        m = weights_config(path).model
        assert (m.img_size, m.patch_size, m.in_chans, m.encoder) == (tiny.img_size, tiny.patch_size, tiny.in_chans,
                                                                     tiny.encoder), path
        encoder = ViTEncoder.from_config(m)
        encoder.load_state_dict(load_file(str(out)), strict=True)
    # a given config must agree with the stored one; overrides of other keys apply
    assert weights_config(out, "tiny", ["model.attn_impl=sdpa"]).model.attn_impl == "sdpa"
    with pytest.raises(ValueError, match=r"^--config vit_base_patch16_224 gives model.img_size=224, but the weights "
                                         r"were trained with model.img_size=64 \(the metadata of '"):
        weights_config(out, "vit_base_patch16_224")
    with pytest.raises(ValueError, match=r"^--set gives model.encoder.num_heads=6, but the weights were trained with "
                                         r"model.encoder.num_heads=3"):
        weights_config(out, None, ["model.encoder.num_heads=6"])  # (a size the shapes do not show)


def _attribute_faces(folder, n, seed):
    """n random 64-px images and a CSV of two random attributes."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    rows = ["path,A,B"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        rows.append(f"{i:03d}.png," + ",".join(rng.choice(["1", "-1"], 2)))
    (folder / "attrs.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_probes_need_no_config(run, tmp_path, capsys):
    """eval-attributes of an exported file without --config gives what it gives with the run's
    config; a config that disagrees with the file is refused, naming the key; a file without a
    stored config needs --config."""
    out = tmp_path / "e.safetensors"
    assert _export(capsys, "--checkpoint", run, "--out", out)[0] == 0
    train, test = _attribute_faces(tmp_path / "train", 24, 1), _attribute_faces(tmp_path / "test", 20, 2)

    def probe(*extra, encoder=out):
        result = tmp_path / "result.json"
        rc = main(["eval-attributes", "--encoder", str(encoder), "--train", str(train), "--train-labels",
                   str(train / "attrs.csv"), "--test", str(test), "--test-labels", str(test / "attrs.csv"),
                   "--workers", "0", "--batch-size", "8", "--output", str(result), *extra])
        return rc, (json.loads(result.read_text()) if rc == 0 else None), capsys.readouterr().err

    rc, without, _ = probe()
    assert rc == 0 and without["train_images"] == 24 and without["test_images"] == 20
    assert probe("--config", "tiny")[:2] == (0, without)
    assert probe(encoder=run)[:2] == (0, without)  # the run folder: its encoder.safetensors
    rc, _, err = probe("--config", "vit_base_patch16_224")
    assert rc == 2 and err.count("\n") == 1 and "gives model.img_size=224" in err and "model.img_size=64" in err
    rc, _, err = probe("--set", "model.encoder.depth=3")
    assert rc == 2 and err.count("\n") == 1 and "--set gives model.encoder.depth=3" in err
    bare = tmp_path / "bare.safetensors"  # the same weights, no metadata
    save_file(load_file(str(out)), str(bare))
    rc, _, err = probe(encoder=bare)
    assert rc == 2 and err == (f"pacofr eval-attributes: error: '{bare}' carries no model config (an encoder written "
                               "before configs were stored, or a checkpoint outside its run folder): give --config, "
                               "the config it was trained with, or write one with `pacofr export`\n")
    assert probe("--config", "tiny", encoder=bare)[:2] == (0, without)


def test_timm_model_from_the_file_alone(run, tmp_path, capsys):
    """create_timm_model(file) is timm's VisionTransformer with the file's weights: the same
    outputs as timm's model built by hand from the tiny sizes and loaded strict, and as pacofr's
    encoder."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    out = tmp_path / "e.safetensors"
    assert _export(capsys, "--checkpoint", run, "--out", out)[0] == 0
    model = create_timm_model(out).eval()
    assert type(model) is timm_vit.VisionTransformer
    by_hand = timm_vit.VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3,
                                         num_classes=0, global_pool="token").eval()
    by_hand.load_state_dict(load_file(str(out)), strict=True)
    ours = ViTEncoder.from_config(load_config("tiny").model).eval()
    ours.load_state_dict(load_file(str(out)), strict=True)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), by_hand.forward_features(images))
        assert torch.equal(model(images), by_hand(images))
        assert (model.forward_features(images) - ours.forward_features(images)).abs().max() < 1e-5
    assert create_timm_model(out, drop_path_rate=0.1).blocks[1].drop_path1.drop_prob == pytest.approx(0.1 / 3)
    ckpt = create_timm_model(sorted((run / "checkpoints").iterdir())[-1]).eval()  # config from the run's config.yaml
    bare = tmp_path / "bare.safetensors"  # weights without a stored config: the config given
    save_file(load_file(str(out)), str(bare))
    with pytest.raises(ValueError, match="carries no model config .*: give config, the config it was trained with"):
        create_timm_model(bare)
    with torch.no_grad():
        assert torch.equal(ckpt(images), model(images))
        assert torch.equal(create_timm_model(bare, "tiny").eval()(images), model(images))


def test_timm_missing_is_one_line(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "timm.models.vision_transformer", None)
    with pytest.raises(ImportError, match=r"^create_timm_model needs timm: pip install 'pacofr\[timm\]' \(") as e:
        create_timm_model(run / "encoder.safetensors")
    assert "\n" not in str(e.value)


def test_bad_input_is_one_line(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    loose = tmp_path / "loose" / "ckpt-00000002"  # a checkpoint outside its run folder: no config.yaml
    shutil.copytree(sorted((run / "checkpoints").iterdir())[0], loose)
    good = tmp_path / "e.safetensors"
    cases = [
        (["--checkpoint", tmp_path / "missing", "--out", good], f"--checkpoint '{tmp_path / 'missing'}': no such file"),
        (["--checkpoint", tmp_path / "empty", "--out", good],
         f"--checkpoint '{tmp_path / 'empty'}': no checkpoint in it"),
        (["--checkpoint", run / "config.yaml", "--out", good], "is a file: give a run folder or one of its"),
        (["--checkpoint", run, "--out", tmp_path / "none" / "e.safetensors"],
         f"--out '{tmp_path / 'none' / 'e.safetensors'}': its folder '{tmp_path / 'none'}' does not exist"),
        (["--checkpoint", run, "--out", tmp_path], f"--out '{tmp_path}' is a folder: give a file name"),
        (["--checkpoint", loose, "--out", good], "carries no model config"),
        (["--checkpoint", run, "--out", good, "--config", "vit_base_patch16_224"],
         "--config vit_base_patch16_224 gives model.img_size=224, but the weights were trained with model.img_size=64"),
    ]
    for args, message in cases:
        rc, _, err = _export(capsys, *args)
        assert rc == 2 and err.startswith("pacofr export: error: ") and message in err and err.count("\n") == 1, err
    assert not good.exists()
    # the loose checkpoint with its config given: exported, with that config stored
    assert _export(capsys, "--checkpoint", loose, "--out", good, "--config", "tiny")[0] == 0
    assert json.loads(read_metadata(good)["pacofr.config"]) == {"model": ENCODER}
    _assert_same(load_file(str(good)), _encoder_of(loose))
