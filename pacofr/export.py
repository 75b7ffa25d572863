"""`pacofr export`: a checkpoint's encoder as an encoder file that carries its config.

    pacofr export --checkpoint runs/vitb --out vitb-encoder.safetensors         # the newest checkpoint
    pacofr export --checkpoint runs/vitb/checkpoints/ckpt-00020000 --out step20k.safetensors

The file has the encoder's weights under timm's names and the encoder's config in its metadata
(pacofr.model.save_encoder), so the probes and `pacofr.model.create_timm_model` need no config.
The config comes from the run's config.yaml; `config` (a preset or YAML file) stands in for a
checkpoint outside its run folder, and is refused where it disagrees with config.yaml.
"""

from pathlib import Path

from .config import ConfigError
from .engine import checkpoint
from .model import ViTEncoder, load_encoder_weights, save_encoder, weights_config


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (ckpt-*/: its model.safetensors), or a run folder's newest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint '{path}': no such file or directory")
    if not p.is_dir():
        raise ConfigError(f"--checkpoint '{path}' is a file: give a run folder or one of its "
                          f"checkpoints/{checkpoint.PREFIX}* folders")
    if (p / "model.safetensors").is_file():
        return p
    found = checkpoint.all_checkpoints(p / "checkpoints")
    if not found:
        raise FileNotFoundError(f"--checkpoint '{path}': no checkpoint in it (neither model.safetensors nor "
                                f"checkpoints/{checkpoint.PREFIX}*/): give a run folder or a checkpoint folder")
    return found[-1]


def _step(ckpt: Path) -> int | None:
    digits = ckpt.name[len(checkpoint.PREFIX):]
    return int(digits) if ckpt.name.startswith(checkpoint.PREFIX) and digits.isdigit() else None


def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a folder: give a file name (e.g. {out / 'encoder.safetensors'})")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out '{out}': its folder '{out.parent}' does not exist")
    return out


def export(source: str | Path, out: str | Path, config: str | Path | None = None) -> dict:
    """Writes the encoder of `source` (a run folder: its newest checkpoint; or a checkpoint
    folder) to `out`; returns what was written (checkpoint, step, out, config, tensors)."""
    out = _check_out(out)
    ckpt = find_checkpoint(source)
    cfg = weights_config(ckpt, config)
    encoder = ViTEncoder.from_config(cfg.model)
    weights = load_encoder_weights(ckpt, encoder)  # (checked against the config: names and shapes)
    step = _step(ckpt)
    save_encoder(weights, out, cfg.model, ckpt.resolve(), step)
    return {"checkpoint": str(ckpt), "step": step, "out": str(out), "tensors": len(weights),
            "model": cfg.model}


__all__ = ["export", "find_checkpoint"]
