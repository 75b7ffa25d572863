"""Encoder weights from any pacofr weights file, the way timm's checkpoint filters adapt one.

Accepted: an exported `encoder.safetensors` (the encoder's own names), a checkpoint's
`model.safetensors` (the whole PaCoFR state dict: `encoder.`, `decoder.`, `codebook.`, `belief.`),
a checkpoint directory (`ckpt-*/`) or a run directory (its encoder.safetensors, else its newest
checkpoint). Only safetensors are read: nothing is unpickled. The result loads strict into
`ViTEncoder` and into timm's VisionTransformer of the same size (num_classes=0, class token).

An encoder file (`save_encoder`: `pacofr export`, and the one a run writes at its end) carries
the encoder's config in its safetensors metadata, all values strings:

    pacofr.config   {"model": {"img_size", "patch_size", "in_chans", "encoder": {...}}} as JSON
    timm.kwargs     VisionTransformer's keyword arguments for it, as JSON
    pacofr.version, pacofr.source (the checkpoint or run it came from), pacofr.step (its step)

so the encoder is built without a --config (`weights_config`, `create_timm_model`). A checkpoint
takes its config from its run's config.yaml.
"""

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import __version__
from ..config import Config, ConfigError, flat_keys, load_config
from .vit import timm_kwargs

ENCODER_PREFIX = "encoder."  # the encoder's entries in PaCoFR's state dict
CHECKPOINT_GLOB = "checkpoints/ckpt-*/model.safetensors"  # a run's checkpoints (pacofr.engine.checkpoint)
RUN_CONFIG = "config.yaml"  # the config a run folder holds (pacofr.engine.pretrain writes it)
CONFIG_KEY = "pacofr.config"  # the metadata entry holding the encoder's config
# The model keys that make the encoder (attn_impl chooses a kernel, not weights).
ENCODER_KEYS = ("img_size", "patch_size", "in_chans", "encoder.embed_dim", "encoder.depth", "encoder.num_heads",
                "encoder.mlp_ratio")
PATCH_EMBED = "patch_embed.proj.weight"  # the entry every ViT encoder state dict has


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
    """The encoder's entries of a pacofr state dict under the encoder's own (timm's) names: of a
    whole PaCoFR state dict its `encoder.` entries without the prefix (decoder, codebook and
    belief predictor dropped); an encoder's state dict as it is. `model` is there for timm's
    signature (`pretrained_filter_fn`): the names and shapes need no adapting to it."""
    if any(k.startswith(ENCODER_PREFIX) for k in state_dict):
        return {k[len(ENCODER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
    return dict(state_dict)


def _weights_file(path: str | Path) -> Path:
    """The file `path` names: itself; in a directory its encoder.safetensors, else its
    model.safetensors (a checkpoint), else its newest checkpoint's (a run). It is opened once
    here, so that one it may not read gets the OS's own error (safetensors says "no such file")."""
    p = Path(path)
    if p.is_file():
        open(p, "rb").close()
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"'{path}': no such file or directory")
    found = [p / name for name in ("encoder.safetensors", "model.safetensors") if (p / name).is_file()]
    found = found or sorted(p.glob(CHECKPOINT_GLOB))[-1:]  # (ckpt-<step, 8 digits>: by name is by step)
    if found:
        return _weights_file(found[0])
    raise FileNotFoundError(f"'{path}': a directory without encoder.safetensors, model.safetensors "
                            f"or {CHECKPOINT_GLOB}")


def _not_safetensors(file: Path, err: Exception) -> ValueError:
    return ValueError(f"'{file}' is not a safetensors file ({err}); pacofr's weights are safetensors, "
                      "pickled ones are not read")


class WeightsMismatch(ValueError):
    """Weights whose names or shapes are not those of the model they are for."""


def check_fits(weights: dict[str, Tensor], model: nn.Module, file: Path, what: str = "the encoder") -> None:
    """Raises one line naming `file` unless `weights` has `model`'s names and shapes (shapes
    first: another size of model shows in them, its depth also in the names)."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key in weights and weights[key].shape != value.shape:
            raise WeightsMismatch(f"'{file}' does not fit {what} of this config: {key} is "
                                  f"{list(weights[key].shape)} in the file, {list(value.shape)} in the config")
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise WeightsMismatch(f"'{file}' does not fit {what} of this config: {len(missing)} missing keys "
                              f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")


def _check_encoder(weights: dict[str, Tensor], model: nn.Module, file: Path) -> None:
    """`check_fits`, after a first check that `file` holds an encoder at all."""
    if not weights.keys() & model.state_dict().keys():
        found = f"keys such as '{min(weights)}'" if weights else "no tensors"
        raise ValueError(f"'{file}' holds no encoder weights ({found}; an encoder's start with patch_embed., "
                         f"a checkpoint's with {ENCODER_PREFIX})")
    check_fits(weights, model, file)


def load_encoder_weights(path: str | Path, model: nn.Module | None = None) -> dict[str, Tensor]:
    """The encoder state dict (CPU tensors) of an encoder file, a checkpoint's model.safetensors,
    a checkpoint directory or a run directory. With `model` (the encoder of the config), it is
    checked to have the model's names and shapes, so that it loads strict. Anything else raises
    one line that names the file."""
    file = _weights_file(path)
    try:
        state = load_file(str(file))
    except SafetensorError as e:
        raise _not_safetensors(file, e) from None
    weights = checkpoint_filter_fn(state, model)
    if model is not None:
        _check_encoder(weights, model, file)
    elif PATCH_EMBED not in weights:
        raise ValueError(f"'{file}' holds no encoder weights (no {PATCH_EMBED} nor {ENCODER_PREFIX}{PATCH_EMBED})")
    return weights


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def encoder_config(m) -> dict:
    """The encoder's part of a ModelConfig (`cfg.model`), as config.yaml nests it."""
    out: dict = {}
    for key in ENCODER_KEYS:
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = _get(m, key)
    return {"model": out}


def save_encoder(weights: dict[str, Tensor], path: str | Path, m, source: str | Path | None = None,
                 step: int | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Writes an encoder state dict to `path` (safetensors) with the encoder's config of `m`
    (`cfg.model`) and where it came from in the metadata (and `metadata`'s entries);
    atomically (a temporary name, then a rename), so an interrupted write leaves no half file
    under the name."""
    path = Path(path)
    metadata = {"format": "pt", CONFIG_KEY: json.dumps(encoder_config(m)), "timm.kwargs": json.dumps(timm_kwargs(m)),
                "pacofr.version": __version__, **(metadata or {})}
    if source is not None:
        metadata["pacofr.source"] = str(source)
    if step is not None:
        metadata["pacofr.step"] = str(step)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of the weights `path` names (a file, or the one a checkpoint or run
    folder holds, as load_encoder_weights finds it); {} when it has none."""
    file = _weights_file(path)
    try:
        with safe_open(str(file), "pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise _not_safetensors(file, e) from None


def stored_config(path: str | Path) -> tuple[dict, str] | None:
    """The encoder keys the weights at `path` come with, flat ({"model.img_size": 224, ...}),
    and where they were found: an encoder file's metadata, or for a checkpoint in a run folder
    the run's config.yaml. None when there are none."""
    file = _weights_file(path)
    text = read_metadata(file).get(CONFIG_KEY)
    if text is not None:
        where = f"the metadata of '{file}'"
        try:
            tree = json.loads(text)
        except ValueError:
            raise ConfigError(f"{where}: {CONFIG_KEY} is not JSON: export the weights again") from None
    else:
        run_config = file.parent.parent.parent / RUN_CONFIG
        if not (file.name == "model.safetensors" and file.parent.parent.name == "checkpoints"
                and run_config.is_file()):
            return None
        import yaml

        where = f"'{run_config}'"
        try:
            tree = yaml.safe_load(run_config.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{where} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise ConfigError(f"{where} holds no model config")
    flat = flat_keys({"model": tree["model"]})
    return {f"model.{k}": flat[f"model.{k}"] for k in ENCODER_KEYS if f"model.{k}" in flat}, where


def weights_config(path: str | Path, config: str | Path | None = None, overrides=(),
                   what: str = "--config") -> Config:
    """The config to build the encoder of the weights at `path` with. Without `config`: the one
    they come with (stored_config), then `overrides`. With `config` (a preset or YAML file, as
    load_config takes it, then `overrides`): it must agree with the one they come with, if any;
    a key that differs is refused, named. `what` names the config option in messages."""
    stored = stored_config(path)
    if config is None:
        if stored is None:
            raise ConfigError(f"'{_weights_file(path)}' carries no model config (an encoder written before "
                              f"configs were stored, or a checkpoint outside its run folder): give {what}, the "
                              f"config it was trained with, or write one with `pacofr export`")
        try:
            cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in stored[0].items()] + list(overrides))
        except ConfigError as e:
            raise ConfigError(f"{stored[1]}: {e}") from None
    else:
        cfg = load_config(config, overrides)
    for key, value in (stored[0] if stored else {}).items():
        mine = _get(cfg, key)
        if mine != value:
            given = f"{what} {config}" if config is not None else "--set"
            raise ConfigError(f"{given} gives {key}={mine}, but the weights were trained with {key}={value} "
                              f"({stored[1]}): leave {what} out to use theirs, or give the matching config")
    return cfg


def create_timm_model(path: str | Path, config: str | Path | None = None, **kwargs) -> nn.Module:
    """timm's VisionTransformer for the weights at `path`, loaded strict: an encoder file that
    carries its config (`pacofr export`, a run's encoder.safetensors), a checkpoint or a run
    folder; `config` (a preset or YAML file) for weights without one. `kwargs` go to
    VisionTransformer over the stored sizes (drop_path_rate, ...; not ones that change the
    weights: add a classifier afterwards with `model.reset_classifier(n)`). Needs timm
    (`pip install 'pacofr[timm]'`)."""
    cfg = weights_config(path, config, what="config")
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:
        raise ImportError(f"create_timm_model needs timm: pip install 'pacofr[timm]' ({e})") from None
    model = VisionTransformer(**{**timm_kwargs(cfg.model), **kwargs})
    model.load_state_dict(load_encoder_weights(path, model), strict=True)
    return model


__all__ = ["checkpoint_filter_fn", "load_encoder_weights", "check_fits", "WeightsMismatch", "save_encoder",
           "read_metadata", "stored_config", "weights_config", "create_timm_model", "encoder_config"]
