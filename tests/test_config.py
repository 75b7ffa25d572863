from pathlib import Path

import pytest

from pacofr.config import ConfigError, config_names, deepspeed_presets, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "tiny"])
def test_yaml_files_match_presets(name):
    assert to_dict(load_config(CONFIGS / f"{name}.yaml")) == to_dict(load_config(name))


def test_presets_hold_design_defaults():
    cfg = load_config("vit_base_patch16_224")
    assert (cfg.model.img_size, cfg.model.patch_size) == (224, 16)
    assert (cfg.model.encoder.embed_dim, cfg.model.encoder.depth, cfg.model.encoder.num_heads) == (768, 12, 12)
    assert (cfg.model.decoder.embed_dim, cfg.model.decoder.depth) == (512, 8)
    assert (cfg.model.codebook.num_codes, cfg.model.codebook.topk) == (8192, 4)
    assert (cfg.masking.ratio_min, cfg.masking.ratio_max, cfg.masking.replace_ratio) == (0.4, 0.6, 0.15)
    assert (cfg.loss.w_sc, cfg.loss.w_commit) == (0.1, 0.25)
    tiny = load_config("tiny")
    assert (tiny.model.img_size, tiny.model.patch_size) == (64, 8)


def test_dotted_overrides_and_preset_files(tmp_path):
    cfg = load_config("tiny", ["model.codebook.num_codes=64", "masking.region_prob=1", "loss.norm_pix=false"])
    assert cfg.model.codebook.num_codes == 64
    assert cfg.masking.region_prob == 1.0 and isinstance(cfg.masking.region_prob, float)
    assert cfg.loss.norm_pix is False
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nmodel:\n  encoder:\n    depth: 2\n")
    cfg = load_config(path)
    assert cfg.model.encoder.depth == 2 and cfg.model.img_size == 64


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.encoder.dpeth=3", "unknown config key 'model.encoder.dpeth' (did you mean 'model.encoder.depth'?)"),
        ("modle.img_size=32", "unknown config key 'modle'"),
        ("model.encoder.depth=three", "'model.encoder.depth' must be int"),
        ("loss.norm_pix=3", "'loss.norm_pix' must be bool"),
        ("model.img_size=65", "divisible by model.patch_size"),
        ("model.codebook.mixing=hard", "mixing must be 'soft' or 'gumbel'"),
        ("model.encoder=4", "'model.encoder' must be a mapping"),
        ("train.blr=1e-4x", "'train.blr' must be float"),
        # ranges: each bound, open or closed, and values that are not finite
        ("train.ckpt_every=0", "'train.ckpt_every' must be in [1, inf), got 0"),
        ("train.log_every=0", "'train.log_every' must be in [1, inf), got 0"),
        ("train.accum_steps=0", "'train.accum_steps' must be in [1, inf)"),
        ("model.patch_size=0", "'model.patch_size' must be in [1, inf)"),
        ("data.min_size=-5", "'data.min_size' must be in [1, inf), got -5"),
        ("masking.region_prob=1.5", "'masking.region_prob' must be in [0, 1], got 1.5"),
        ("masking.replace_ratio=-0.1", "'masking.replace_ratio' must be in [0, 1]"),
        ("data.scale_min=0", "'data.scale_min' must be in (0, 1], got 0.0"),
        ("train.beta2=1", "'train.beta2' must be in [0, 1), got 1.0"),
        ("loss.eps=.nan", "'loss.eps' must be in (0, inf), got nan"),
        ("train.blr=.inf", "'train.blr' must be in (0, inf), got inf"),
        ("data.num_workers=-1", "'data.num_workers' must be in [0, inf)"),
    ],
)
def test_bad_keys_fail_naming_them(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert fragment in str(err.value)


def test_bounds_themselves_pass_and_floats_may_be_written_with_an_exponent():
    cfg = load_config("tiny", ["train.blr=1e-4", "train.min_lr=0", "masking.region_prob=1", "data.scale_min=1",
                               "train.beta1=0", "data.num_workers=0", "train.image_every=0", "train.keep_last=0"])
    assert cfg.train.blr == 1e-4 and isinstance(cfg.train.blr, float) and cfg.masking.region_prob == 1.0


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("masking:\n  ratio_mx: 0.5\n")
    with pytest.raises(ConfigError, match="masking.ratio_mx"):
        load_config(path)
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_are_found_by_name():
    assert config_names() == ["demo", "tiny", "vit_base_patch16_224"]
    demo = to_dict(load_config(CONFIGS / "demo.yaml"))
    assert to_dict(load_config("demo")) == to_dict(load_config("demo.yaml")) == demo
    assert demo["train"]["epochs"] == 50 and demo["model"]["img_size"] == 64  # demo.yaml's own, on tiny
    with pytest.raises(ConfigError) as err:
        load_config("demoo")
    assert str(err.value) == "config 'demoo' is neither a preset (demo, tiny, vit_base_patch16_224) nor a file"


def test_deepspeed_presets_resolve_to_the_shipped_json_and_files_win(tmp_path):
    assert deepspeed_presets() == ["zero1", "zero2", "zero3"]
    for stage in (1, 2, 3):
        path = Path(load_config("tiny", [f"train.deepspeed=zero{stage}"]).train.deepspeed)
        assert path.is_absolute() and path.read_bytes() == (CONFIGS / f"zero{stage}.json").read_bytes()
    assert load_config("tiny", ["train.deepspeed=zero2.json"]).train.deepspeed == str(CONFIGS / "zero2.json")
    own = tmp_path / "zero2"  # a file of that name is the user's, not the preset
    own.write_text("{}")
    assert load_config("tiny", [f"train.deepspeed={own}"]).train.deepspeed == str(own)
    assert load_config("tiny").train.deepspeed == ""
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\ntrain:\n  deepspeed: zero3\n")
    assert load_config(path).train.deepspeed == str(CONFIGS / "zero3.json")
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["train.deepspeed=zero4"])
    assert str(err.value) == "train.deepspeed 'zero4' is neither a file nor a preset (zero1, zero2, zero3)"
