"""Atomic checkpoints: a directory written under a temporary name, then renamed.

    ckpt-00000020/model.safetensors   model weights and buffers (no pickle)
    ckpt-00000020/state.pt            optimizer, scheduler, RNG, step and data position
                                      (tensors and plain values only: loaded with weights_only;
                                      under ZeRO too the optimizer state is whole, as one
                                      process keeps it, so any rank count resumes it)
"""

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError
from ..model.weights import check_fits

PREFIX = "ckpt-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: Path, step: int, model: torch.nn.Module, state: dict, keep_last: int) -> Path:
    """Writes ckpt-<step> atomically and keeps the newest `keep_last` checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:08d}"
    tmp = directory / f".{PREFIX}{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in all_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


# What a run writes into its folder: a folder holding any of these holds a run.
RUN_FILES = ("checkpoints", "metrics.csv", "config.yaml", "summary.yaml", "encoder.safetensors", "tensorboard",
             "images")


def claim_output(output: Path, resume: str | None, overwrite: bool, main: bool) -> None:
    """A run folder that holds a run is used only to resume it, or cleared of the run's files
    (`overwrite`, by the main rank): a new run would mix its metrics and checkpoints with the
    old run's, and rotation or a later resume would pick the old ones."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a folder: give a folder for the run")
    held = [name for name in RUN_FILES if (output / name).exists()]
    if not held or resume:
        return
    if not overwrite:
        newest = all_checkpoints(output / "checkpoints")
        what = f"checkpoints up to {newest[-1].name}" if newest else ", ".join(held)
        raise ConfigError(f"--output {output} holds a run ({what}): continue it with --resume auto, give a new "
                          f"--output, or clear it with --overwrite")
    for name in held if main else []:
        target = output / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()


def resolve(resume: str | None, output: Path) -> Path | None:
    """`auto` = the newest checkpoint in the output directory (None when there is none)."""
    if not resume:
        return None
    if resume == "auto":
        found = all_checkpoints(output / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "model.safetensors").is_file() or not (path / "state.pt").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (model.safetensors + state.pt)")
    return path


def load(path: Path, model: torch.nn.Module, device: torch.device) -> dict:
    weights = load_file(str(path / "model.safetensors"), device=str(device))
    check_fits(weights, model, path / "model.safetensors", "the model")  # (another model: one line, not torch's)
    model.load_state_dict(weights, strict=True)
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
