from pathlib import Path

import pytest

from pacofr.config import ConfigError, load_config, to_dict

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
    ],
)
def test_bad_keys_fail_naming_them(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert fragment in str(err.value)


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("masking:\n  ratio_mx: 0.5\n")
    with pytest.raises(ConfigError, match="masking.ratio_mx"):
        load_config(path)
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(tmp_path / "missing.yaml")
