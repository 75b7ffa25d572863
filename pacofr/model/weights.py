"""Encoder weights from any pacofr weights file, the way timm's checkpoint filters adapt one.

Accepted: an exported `encoder.safetensors` (the encoder's own names), a checkpoint's
`model.safetensors` (the whole PaCoFR state dict: `encoder.`, `decoder.`, `codebook.`, `belief.`),
a checkpoint directory (`ckpt-*/`) or a run directory (its encoder.safetensors, else its newest
checkpoint). Only safetensors are read: nothing is unpickled. The result loads strict into
`ViTEncoder` and into timm's VisionTransformer of the same size (num_classes=0, class token).
"""

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

ENCODER_PREFIX = "encoder."  # the encoder's entries in PaCoFR's state dict
CHECKPOINT_GLOB = "checkpoints/ckpt-*/model.safetensors"  # a run's checkpoints (pacofr.engine.checkpoint)
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
    model.safetensors (a checkpoint), else its newest checkpoint's (a run)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"'{path}': no such file or directory")
    for name in ("encoder.safetensors", "model.safetensors"):
        if (p / name).is_file():
            return p / name
    checkpoints = sorted(p.glob(CHECKPOINT_GLOB))  # (ckpt-<step, 8 digits>: by name is by step)
    if checkpoints:
        return checkpoints[-1]
    raise FileNotFoundError(f"'{path}': a directory without encoder.safetensors, model.safetensors "
                            f"or {CHECKPOINT_GLOB}")


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
    open(file, "rb").close()  # (the OS's own error first: safetensors says "no such file" of one it may not read)
    try:
        state = load_file(str(file))
    except SafetensorError as e:
        raise ValueError(f"'{file}' is not a safetensors file ({e}); pacofr's weights are safetensors, "
                         "pickled ones are not read") from None
    weights = checkpoint_filter_fn(state, model)
    if model is not None:
        _check_encoder(weights, model, file)
    elif PATCH_EMBED not in weights:
        raise ValueError(f"'{file}' holds no encoder weights (no {PATCH_EMBED} nor {ENCODER_PREFIX}{PATCH_EMBED})")
    return weights


__all__ = ["checkpoint_filter_fn", "load_encoder_weights", "check_fits", "WeightsMismatch"]
