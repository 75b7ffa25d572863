"""Atomic, verified checkpoints: a directory written under a temporary name, then renamed.

    ckpt-00000020/model.safetensors   model weights and buffers (no pickle)
    ckpt-00000020/state.pt            optimizer, scheduler, RNG, step and data position
                                      (tensors and plain values only: loaded with weights_only;
                                      under ZeRO too the optimizer state is whole, as one
                                      process keeps it, so any rank count resumes it)
    ckpt-00000020/manifest.json       written last: each file's size and sha256, whether the
                                      checkpoint is good (health.py) and the run's config

A checkpoint is read only once its files match its manifest; one without a manifest cannot be
verified and is refused.
"""

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..config import ConfigError
from ..model.weights import check_fits

PREFIX = "ckpt-"
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "state.pt")
FORMAT = "pacofr checkpoint 1"
SUPERSEDED = "superseded"  # checkpoints a resumed run redoes, moved out of rotation and of --resume auto


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names it and what is wrong."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _File:
    """A file's writer that writes all it is given or raises: a disk that fills mid-write is an
    OSError with its errno (torch's and safetensors' own file writers report it otherwise, or
    not at all, and a plain file object can take a short write for a whole one)."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self.fd, view):]
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


def _write(path: Path, write) -> None:
    """`write(file)` into a new file, on disk before it returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write(_File(fd))
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> dict:
    with open(path, "rb") as fh:
        return {"bytes": os.fstat(fh.fileno()).st_size, "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}


def _os_error(err: BaseException | None) -> OSError | None:
    """The OSError behind an error (torch.save's writer, failing to close its archive after a
    failed write, raises a RuntimeError over it)."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def _write_error(err: OSError, path: Path) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
    else:
        what = (err.strerror or str(err)).lower()
    return f"{what} writing {path}"


# The health of a checkpoint written without a training run's judgement (health.py).
UNJUDGED = {"good": False, "steps": [], "problems": ["not judged: written outside a training run"]}


def save(directory: Path, step: int, model: torch.nn.Module, state: dict, keep_last: int,
         health: dict | None = None, config: dict | None = None) -> Path:
    """Writes ckpt-<step> atomically (the manifest last), then rotates (see `rotate`)."""
    final = directory / f"{PREFIX}{step:08d}"
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = directory / f".{PREFIX}{step:08d}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write(tmp / "model.safetensors", lambda fh: fh.write(safetensors_bytes(weights)))
        _write(tmp / "state.pt", lambda fh: torch.save(state, fh))
        manifest = {"format": FORMAT, "step": step, "files": {name: _digest(tmp / name) for name in FILES},
                    "health": health or UNJUDGED, "config": config or {}}
        _write(tmp / MANIFEST, lambda fh: fh.write(json.dumps(manifest, indent=1).encode()))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = _os_error(err)
        if cause is None:
            raise
        raise CheckpointError(f"{_write_error(cause, final)} (its temporary folder was removed; the earlier "
                              f"checkpoints are intact: continue with --resume auto once it can be written)") from None
    rotate(directory, keep_last)
    return final


def all_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def _manifest(path: Path) -> dict:
    """The manifest as written, unverified."""
    file = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: {'not a folder' if path.exists() else 'no such folder'}: a checkpoint is "
                              f"a folder ({PREFIX}<step>/)")
    if not file.is_file():
        if all((path / name).is_file() for name in FILES):
            raise CheckpointError(f"{path}: no {MANIFEST}: a checkpoint written before pacofr checksummed them "
                                  f"cannot be verified, so it is not resumed (its weights still load as --encoder)")
        raise CheckpointError(f"{path}: not a checkpoint (no {MANIFEST}, {' or '.join(FILES)})")
    try:
        manifest = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: not valid JSON (damaged)") from None
    except OSError as err:
        raise CheckpointError(f"{file}: cannot be read ({err.strerror})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not all(
            isinstance(manifest.get(key), dict) for key in ("files", "health")):
        raise CheckpointError(f"{file}: not a pacofr checkpoint manifest ('{FORMAT}')")
    return manifest


def verify(path: Path) -> dict:
    """The manifest of checkpoint `path` once each of its files has the size and sha256 it lists;
    else a CheckpointError naming the file and what is wrong."""
    manifest = _manifest(path)
    for name in FILES:
        file, expected = path / name, manifest["files"].get(name)
        if not isinstance(expected, dict) or set(expected) != {"bytes", "sha256"}:
            raise CheckpointError(f"{path / MANIFEST}: does not list {name} with its size and sha256")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        try:
            found = _digest(file)
        except OSError as err:
            raise CheckpointError(f"{file}: cannot be read ({err.strerror})") from None
        if found["bytes"] < expected["bytes"]:
            raise CheckpointError(f"{file}: truncated ({found['bytes']} of {expected['bytes']} bytes)")
        if found["bytes"] != expected["bytes"]:
            raise CheckpointError(f"{file}: {found['bytes']} bytes, {expected['bytes']} when written")
        if found["sha256"] != expected["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch (sha256 {found['sha256'][:12]}..., "
                                  f"{expected['sha256'][:12]}... when written): the file changed on disk")
    return manifest


def is_good(path: Path) -> bool:
    """Whether the manifest says the checkpoint is good (health.py); its files are not read."""
    try:
        return _manifest(path)["health"]["good"] is True
    except (CheckpointError, KeyError, TypeError):
        return False


def problems(manifest: dict) -> str:
    return "; ".join(manifest["health"].get("problems") or ["unrecorded"])


def mark_bad(path: Path, problem: str) -> None:
    """Records in the manifest (replaced atomically) that the checkpoint is not good."""
    manifest = _manifest(path)
    manifest["health"] = {**manifest["health"], "good": False,
                          "problems": [*manifest["health"].get("problems", []), problem]}
    tmp = path / f".{MANIFEST}.tmp"
    try:
        _write(tmp, lambda fh: fh.write(json.dumps(manifest, indent=1).encode()))
        os.replace(tmp, path / MANIFEST)
        _fsync_dir(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(_write_error(err, path / MANIFEST)) from None


def rotate(directory: Path, keep_last: int) -> None:
    """Keeps the newest `keep_last` checkpoints (all when 0) and, besides, the newest good one
    before the newest, which the step after the newest may yet prove bad (health.py)."""
    found = all_checkpoints(directory)
    if keep_last <= 0:
        return
    keep = set(found[-keep_last:]) | {next((p for p in reversed(found[:-1]) if is_good(p)), None)}
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


# What a run writes into its folder: a folder holding any of these holds a run.
RUN_FILES = ("checkpoints", "metrics.csv", "config.yaml", "summary.yaml", "encoder.safetensors", "tensorboard",
             "images", "skipped.csv")


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


def resolve(resume: str | None, output: Path, say) -> tuple[Path, dict] | None:
    """The checkpoint to resume and its verified manifest. `auto`: the newest good one in the
    output's checkpoints, each newer one skipped with a line to `say` naming what is wrong
    (None when there is none at all; an error when none is good). A path: that checkpoint,
    intact (one saved after unhealthy steps is resumed as asked, with a line saying so)."""
    if not resume:
        return None
    if resume != "auto":
        try:
            manifest = verify(Path(resume))
        except CheckpointError as err:
            raise CheckpointError(f"--resume {resume}: {err}") from None
        if manifest["health"]["good"] is not True:
            say(f"--resume {resume}: resuming a checkpoint that is not good ({problems(manifest)}), as asked")
        return Path(resume), manifest
    directory = output / "checkpoints"
    found = all_checkpoints(directory)
    for path in reversed(found):
        try:
            manifest = verify(path)
        except CheckpointError as err:
            say(f"--resume auto: skipping a damaged checkpoint: {err}")
            continue
        if manifest["health"]["good"] is True:
            return path, manifest
        say(f"--resume auto: skipping {path}, not good: {problems(manifest)}")
    if found:
        raise CheckpointError(f"--resume auto: none of the {len(found)} checkpoints in {directory} is good (each "
                              f"named above with its fault): resume an intact one with --resume PATH, or start "
                              f"over with --overwrite")
    return None


def set_aside_newer(directory: Path, step: int) -> list[Path]:
    """Moves the checkpoints of steps after `step` (which a run resumed from an older
    checkpoint redoes) into directory/superseded/: rotation and --resume auto would else take
    them for the resumed run's own. Returns where they went."""
    moved = []
    for path in all_checkpoints(directory):
        number = path.name[len(PREFIX):]
        if number.isdigit() and int(number) > step:
            target, n = directory / SUPERSEDED / path.name, 1
            while target.exists():
                target, n = directory / SUPERSEDED / f"{path.name}.{n}", n + 1
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            moved.append(target)
    return moved


def load(path: Path, model: torch.nn.Module, device: torch.device) -> dict:
    """The verified checkpoint's weights into `model`; its state."""
    weights = _read(path / "model.safetensors", lambda f: load_file(str(f), device=str(device)))
    check_fits(weights, model, path / "model.safetensors", "the model")  # (another model: one line, not torch's)
    model.load_state_dict(weights, strict=True)
    return _read(path / "state.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))


def _read(file: Path, read):
    try:
        return read(file)
    except Exception as err:  # (a verified file: what still fails is another torch's or safetensors' format)
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{file}: cannot be read ({type(err).__name__}: {first})") from None
