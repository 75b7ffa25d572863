"""pacofr.model.vit and pacofr.model.weights against timm's VisionTransformer: the encoder's
outputs (all tokens, visible subsets, the pooled class token), its weight-decay names, and the
weights of every pacofr file form (an encoder file, a checkpoint, a run) loaded strict into both;
every other file refused in one line that names it."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from pacofr.config import load_config
from pacofr.model import (
    Decoder, PaCoFR, ViTEncoder, checkpoint_filter_fn, load_encoder_weights, timm_kwargs, visible_index)

timm_vit = pytest.importorskip("timm.models.vision_transformer")


def _ragged_keep(batch, num_patches, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, num_patches, generator=gen) < torch.linspace(0.2, 0.7, batch)[:, None]
    mask[0] = False  # one image fully visible
    return mask


def test_encoder_matches_timm_on_visible_tokens():
    torch.manual_seed(0)
    ours = ViTEncoder(img_size=64, patch_size=8, in_chans=3, embed_dim=96, depth=3, num_heads=3).eval()
    ref = timm_vit.VisionTransformer(img_size=64, patch_size=8, embed_dim=96, depth=3, num_heads=3,
                                     num_classes=0, global_pool="token").eval()
    missing = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        # all tokens: the same as timm's forward_features
        assert (ours.forward_features(images) - ref.forward_features(images)).abs().max() < 1e-5
        # ragged visible subsets, padded in one batch, against timm on each image's own tokens
        mask = _ragged_keep(4, 64, seed=1)
        keep, seqlens = visible_index(mask)
        out = ours.forward_features(images, keep, seqlens)
        empty = visible_index(mask[:0])  # (an empty batch: nothing to pack)
        assert empty[0].shape == (0, 0) and empty[1].shape == (0,)
        for b in range(4):
            tokens = ref._pos_embed(ref.patch_embed(images[b : b + 1]))
            idx = torch.cat([torch.zeros(1, dtype=torch.long), 1 + keep[b, : seqlens[b]]])
            x = tokens[:, idx]
            for block in ref.blocks:
                x = block(x)
            expected = ref.norm(x)[0]
            got = out[b, : 1 + seqlens[b]]
            assert (got - expected).abs().max() < 1e-5, b


@pytest.fixture(scope="module")
def tiny():
    """(config, a tiny PaCoFR with random weights)."""
    cfg = load_config("tiny")
    torch.manual_seed(0)
    return cfg, PaCoFR(cfg)


def _assert_encoder_weights(got, model):
    want = model.encoder.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_filtered_full_state_dict_loads_strict_into_timm_and_gives_its_outputs(tiny):
    """The whole PaCoFR state dict, filtered, loads strict into timm's VisionTransformer (built
    from timm_kwargs, directly and by create_model) and into ViTEncoder.from_config: the same
    tokens, pooled features and pre-logits as timm at an odd image count."""
    cfg, model = tiny
    full = model.state_dict()
    assert {k.split(".")[0] for k in full} == {"encoder", "decoder", "codebook", "belief"}
    weights = checkpoint_filter_fn(full)
    _assert_encoder_weights(weights, model)
    assert checkpoint_filter_fn(weights).keys() == weights.keys()  # an encoder's own state dict as it is
    ours = ViTEncoder.from_config(cfg.model).eval()
    ours.load_state_dict(weights, strict=True)
    timm = pytest.importorskip("timm")
    refs = [timm_vit.VisionTransformer(**timm_kwargs(cfg.model)).eval(),
            timm.create_model("vit_base_patch16_224", pretrained=False, **timm_kwargs(cfg.model)).eval()]
    images = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        tokens = ours.forward_features(images)
        assert tokens.shape == (5, 1 + 64, 96)
        for ref in refs:
            ref.load_state_dict(weights, strict=True)
            # timm's own filter (its pretrained-weights path) keeps them as they are
            assert {k: v.shape for k, v in timm_vit.checkpoint_filter_fn(weights, ref).items()} == {
                k: v.shape for k, v in weights.items()}
            ref_tokens = ref.forward_features(images)
            assert (tokens - ref_tokens).abs().max() < 1e-5
            pooled = ours(images)
            assert pooled.shape == (5, 96) and ours.num_features == ref.num_features == 96
            assert (pooled - ref(images)).abs().max() < 1e-5
            assert (ours.forward_head(tokens, pre_logits=True) - ref.forward_head(ref_tokens, pre_logits=True)).abs().max() < 1e-5
            assert torch.equal(pooled, tokens[:, 0])


def test_from_config_builds_the_models_encoder_and_decoder(tiny):
    """from_config gives PaCoFR's encoder and decoder: their weights load strict and the same
    inputs give the same outputs (head counts and widths included, which the names do not show)."""
    cfg, model = tiny
    encoder, decoder = ViTEncoder.from_config(cfg.model).eval(), Decoder.from_config(cfg.model).eval()
    encoder.load_state_dict(model.encoder.state_dict(), strict=True)
    decoder.load_state_dict(model.decoder.state_dict(), strict=True)
    keep, seqlens = visible_index(_ragged_keep(3, 64, seed=2))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        latent = model.encoder.eval().forward_features(images, keep, seqlens)
        assert torch.equal(encoder.forward_features(images, keep, seqlens), latent)
        assert torch.equal(decoder(latent, keep, seqlens), model.decoder.eval()(latent, keep, seqlens))


def test_no_weight_decay_names_timms_groups(tiny):
    """no_weight_decay names parameters that exist, and timm's param groups built with it are
    timm's own VisionTransformer's (by name; pos_embed is fixed here, so in no group)."""
    from timm.optim._param_groups import param_groups_weight_decay

    cfg, model = tiny
    for module in (model.encoder, model.decoder):
        names = dict(module.named_parameters())
        assert module.no_weight_decay() <= names.keys()
        assert all(names[n].ndim > 1 for n in module.no_weight_decay())  # (names the 1-d rule would miss)

    def groups(module):
        names = {id(p): n for n, p in module.named_parameters()}
        got = param_groups_weight_decay(module, 0.05, no_weight_decay_list=module.no_weight_decay())
        return {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in got}

    ref = timm_vit.VisionTransformer(**timm_kwargs(cfg.model))
    ref.pos_embed.requires_grad_(False)
    assert groups(model.encoder) == groups(ref)
    assert "cls_token" in groups(model.encoder)[0.0] and "mask_token" in groups(model.decoder)[0.0]


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """A run directory as pretraining writes it (its exported encoder and two checkpoints, one
    being written), and a run cut short (checkpoints only); three models' weights among them."""
    from pacofr.engine import checkpoint

    cfg, model = tiny
    d = tmp_path_factory.mktemp("weights")
    models = {}
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        models[seed] = PaCoFR(cfg)
    for run in ("run", "cut"):
        checkpoint.save(d / run / "checkpoints", 2, models[1], {}, 3)
        checkpoint.save(d / run / "checkpoints", 10, models[2], {}, 3)
        tmp = d / run / "checkpoints" / ".ckpt-00000012.tmp"  # (a checkpoint being written: never read)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in models[3].state_dict().items()}, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, str(d / "run" / "encoder.safetensors"))
    return d, model, models


def test_every_file_form_gives_its_encoder(files, tiny):
    d, model, models = files
    cfg, _ = tiny
    ckpt = d / "cut" / "checkpoints" / "ckpt-00000002"
    for path, source in ((d / "run" / "encoder.safetensors", model), (d / "run", model),  # (the export first)
                         (d / "cut", models[2]),  # the newest checkpoint
                         (ckpt, models[1]), (ckpt / "model.safetensors", models[1]), (str(ckpt), models[1])):
        _assert_encoder_weights(load_encoder_weights(path), source)
        encoder = ViTEncoder.from_config(cfg.model)
        encoder.load_state_dict(load_encoder_weights(path, encoder), strict=True)
        _assert_encoder_weights(encoder.state_dict(), source)


def test_every_other_file_is_refused_in_one_line_naming_it(files, tiny, tmp_path):
    d, model, _ = files
    cfg, _ = tiny
    full = {k: v.contiguous() for k, v in model.state_dict().items()}
    marker = tmp_path / "unpickled"
    with open(tmp_path / "encoder.pt", "wb") as f:  # a pickle that would leave a trace when loaded
        pickle.dump(type("Trap", (), {"__reduce__": lambda self: (os.mkdir, (str(marker),))})(), f)
    torch.save(model.encoder.state_dict(), tmp_path / "encoder.pth")
    (tmp_path / "notes.txt").write_text("weights: elsewhere\n")
    save_file({k: v for k, v in full.items() if not k.startswith("encoder.")}, str(tmp_path / "parts.safetensors"))
    save_file({}, str(tmp_path / "empty.safetensors"))
    partial = {k: v for k, v in full.items() if k != "encoder.norm.weight"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    (tmp_path / "nothing").mkdir()

    encoder = ViTEncoder.from_config(cfg.model)
    narrow = ViTEncoder.from_config(load_config("tiny", ["model.encoder.embed_dim=48"]).model)
    shallow = ViTEncoder.from_config(load_config("tiny", ["model.encoder.depth=3"]).model)
    cases = [
        (tmp_path / "missing", encoder, FileNotFoundError, "'{}': no such file or directory"),
        (tmp_path / "nothing", encoder, FileNotFoundError,
         "'{}': a directory without encoder.safetensors, model.safetensors or checkpoints/ckpt-*/model.safetensors"),
        (tmp_path / "encoder.pt", encoder, ValueError, "'{}' is not a safetensors file ("),
        (tmp_path / "encoder.pth", None, ValueError, "'{}' is not a safetensors file ("),
        (tmp_path / "notes.txt", encoder, ValueError, "'{}' is not a safetensors file ("),
        (tmp_path / "parts.safetensors", encoder, ValueError,
         "'{}' holds no encoder weights (keys such as 'belief.fc1.bias'; an encoder's start with patch_embed."),
        (tmp_path / "parts.safetensors", None, ValueError, "'{}' holds no encoder weights (no patch_embed.proj.weight"),
        (tmp_path / "empty.safetensors", encoder, ValueError, "'{}' holds no encoder weights (no tensors;"),
        (tmp_path / "partial.safetensors", encoder, ValueError,
         "'{}' does not fit the encoder of this config: 1 missing keys ['norm.weight'], 0 unexpected keys []"),
        (d / "run" / "encoder.safetensors", narrow, ValueError, "'{}' does not fit the encoder of this config: "
         "cls_token is [1, 1, 96] in the file, [1, 1, 48] in the config"),
        (d / "run" / "encoder.safetensors", shallow, ValueError, "'{}' does not fit the encoder of this config: "
         "0 missing keys [], 12 unexpected keys ['blocks.3.attn.proj.bias', 'blocks.3.attn.proj.weight', "
         "'blocks.3.attn.qkv.bias']"),
    ]
    for path, against, error, message in cases:
        with pytest.raises(error) as caught:
            load_encoder_weights(path, against)
        text = str(caught.value)
        assert text.startswith(message.format(path)) and "\n" not in text, (text, message)
    assert not marker.exists()
    ckpt = d / "run" / "checkpoints" / "ckpt-00000002"
    with pytest.raises(ValueError, match=r"cls_token is \[1, 1, 96\] in the file") as caught:
        load_encoder_weights(ckpt, narrow)  # a directory's error names the file it read
    assert str(caught.value).startswith(f"'{ckpt / 'model.safetensors'}'")
