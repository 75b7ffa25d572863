"""Checkpoints a run can trust: verified against their manifest, judged good only after healthy
steps, resumed with the settings the run then uses, and a full disk that loses nothing.

Runs are tiny (a few steps of the tiny model on CPU) and go through the CLI in this process,
as a user's would; the disk-full run on a real small file system goes through a subprocess."""

import csv
import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import BASE, _losses, _train

from pacofr.cli import main as cli
from pacofr.engine import checkpoint, health

EVERY_STEP = ["--set", "train.ckpt_every=1", "--set", "train.image_every=0"]


def _run(capsys, output: Path, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli(["train", *BASE, *EVERY_STEP, "--output", str(output), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"ckpt-{step:08d}"


def _weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def _max_abs(path: Path) -> float:
    return max(float(v.abs().max()) for v in _weights(path).values() if v.is_floating_point())


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-step run with a checkpoint at every step, and the same run straight to 4 steps: what
    a run resumed from the first one's step 2 or 3 must reach, bit for bit."""
    root = tmp_path_factory.mktemp("runs")
    for name, steps in (("three", "3"), ("four", "4")):
        assert cli(["train", *BASE, *EVERY_STEP, "--output", str(root / name), "--max-steps", steps]) == 0
    return root


def _copy(runs: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs / "three", run)
    return run


def _same_as_straight_run(runs: Path, run: Path) -> None:
    a, b = _weights(_ckpt(runs / "four", 4)), _weights(_ckpt(run, 4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(run) == _losses(runs / "four")


def test_a_checkpoint_carries_a_manifest_of_its_files(runs):
    for step in (1, 2, 3):
        ckpt = _ckpt(runs / "three", step)
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "model.safetensors", "state.pt"]
        for name in ("model.safetensors", "state.pt"):
            data = (ckpt / name).read_bytes()
            assert manifest["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert manifest["step"] == step and manifest["config"]["train"]["ckpt_every"] == 1
        assert manifest["health"] == {"good": True, "steps": [step, step], "problems": []}
        assert checkpoint.verify(ckpt) == manifest
    assert not [p for p in (runs / "three" / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left


def _corrupt(ckpt: Path, kind: str) -> tuple[Path, str]:
    """Damages a checkpoint; (the file to be named, what is wrong with it)."""
    weights, state, manifest = ckpt / "model.safetensors", ckpt / "state.pt", ckpt / "manifest.json"
    if kind in ("truncated state.pt", "truncated weights"):
        file = state if kind == "truncated state.pt" else weights
        size = file.stat().st_size
        os.truncate(file, size // 2)
        return file, f"truncated ({size // 2} of {size} bytes)"
    if kind == "bit flip":  # a bit of a weight: safetensors would load it without a word
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x10
        weights.write_bytes(bytes(data))
        return weights, "checksum mismatch"
    if kind == "missing file":
        state.unlink()
        return state, "missing"
    if kind == "no manifest":
        manifest.unlink()
        return ckpt, "no manifest.json: a checkpoint written before pacofr checksummed them cannot be verified"
    if kind == "damaged manifest":
        manifest.write_bytes(b"\x00\x17garbage")
        return manifest, "not valid JSON"
    raise AssertionError(kind)


KINDS = ["truncated state.pt", "truncated weights", "bit flip", "missing file", "no manifest", "damaged manifest"]


@pytest.mark.parametrize("kind", KINDS)
def test_resume_auto_skips_a_damaged_newest_checkpoint(runs, tmp_path, capsys, kind):
    run = _copy(runs, tmp_path)
    file, fault = _corrupt(_ckpt(run, 3), kind)
    rc, out, err = _run(capsys, run, "--resume", "auto", "--max-steps", "4")
    assert rc == 0, err
    lines = out.splitlines()
    assert f"--resume auto: skipping a damaged checkpoint: {file}: {fault}" in "\n".join(lines), out
    assert f"resuming {_ckpt(run, 2)} at step 2, the newest good checkpoint" in lines
    assert (run / "checkpoints" / "superseded" / "ckpt-00000003").is_dir()  # set aside, not lost
    _same_as_straight_run(runs, run)


def test_a_bit_flip_loads_silently_without_the_manifest(runs, tmp_path):
    """(What the checksum is for: safetensors reads the flipped file without a word.)"""
    run = _copy(runs, tmp_path)
    before = {k: v.clone() for k, v in _weights(_ckpt(run, 3)).items()}
    _corrupt(_ckpt(run, 3), "bit flip")
    after = _weights(_ckpt(run, 3))
    assert sum(not torch.equal(before[k], after[k]) for k in before) == 1
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        checkpoint.verify(_ckpt(run, 3))


@pytest.mark.parametrize("kind", KINDS)
def test_resume_of_a_damaged_checkpoint_fails_naming_the_file(runs, tmp_path, capsys, kind):
    ckpt = _copy(runs, tmp_path) / "checkpoints" / "ckpt-00000003"
    file, fault = _corrupt(ckpt, kind)
    rc, out, err = _run(capsys, tmp_path / "new", "--resume", str(ckpt), "--max-steps", "4")
    assert rc == 2
    assert _one_line(err).startswith(f"pacofr train: error: --resume {ckpt}: {file}: {fault}")
    assert not (tmp_path / "new").exists()  # nothing made


def test_resume_of_a_folder_that_is_no_checkpoint_fails(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    for target, fault in ((tmp_path / "folder", "not a checkpoint (no manifest.json"),
                          (tmp_path / "nowhere", "no such folder"), (tmp_path / "a_file", "not a folder")):
        rc, _, err = _run(capsys, tmp_path / "new", "--resume", str(target))
        assert rc == 2 and f"--resume {target}: {target}: {fault}" in _one_line(err)


def test_resume_auto_with_no_good_checkpoint_fails_rather_than_starting_fresh(runs, tmp_path, capsys):
    run = _copy(runs, tmp_path)
    for step, kind in ((1, "missing file"), (2, "bit flip"), (3, "truncated state.pt")):
        _corrupt(_ckpt(run, step), kind)
    before = {name: (run / name).read_bytes() for name in ("metrics.csv", "config.yaml", "encoder.safetensors")}
    rc, out, err = _run(capsys, run, "--resume", "auto", "--max-steps", "4")
    assert rc == 2
    assert _one_line(err).startswith(f"pacofr train: error: --resume auto: none of the 3 checkpoints in "
                                     f"{run / 'checkpoints'} is good")
    assert sum(line.startswith("--resume auto: skipping a damaged checkpoint") for line in out.splitlines()) == 3
    assert {name: (run / name).read_bytes() for name in before} == before
    assert [p.name for p in checkpoint.all_checkpoints(run / "checkpoints")] == [f"ckpt-{s:08d}" for s in (1, 2, 3)]


def test_health_rule():
    """Non-finite steps and losses over 10x the median of the recent healthy ones are problems;
    a blown-up loss does not join the reference, so the run is judged against its healthy past."""
    record = health.new_record()
    for step, loss in enumerate([3.0, 2.0, 2.5, 24.0], 1):  # 24: within 10x the median of 3, 2, 2.5
        assert health.judge(record, step, loss, True) is None
    assert health.verdict(record, 1, 4, True) == {"good": True, "steps": [1, 4], "problems": []}
    assert health.judge(record, 5, 40.0, True) == "step 5: loss 40, over 10x the recent median 2.75"
    assert health.judge(record, 6, 2.0, False) == "step 6: non-finite loss or gradient (skipped)"
    for step in range(7, 11):
        assert health.judge(record, step, 1e6, True) == f"step {step}: loss 1e+06, over 10x the recent median 2.75"
    assert health.judge(record, 11, 2.9, True) is None  # back in range
    assert health.verdict(record, 5, 11, True) == {
        "good": False, "steps": [5, 11],
        "problems": ["step 5: loss 40, over 10x the recent median 2.75",
                     "step 6: non-finite loss or gradient (skipped)",
                     "step 7: loss 1e+06, over 10x the recent median 2.75", "3 more"]}
    assert health.verdict(record, 12, 12, False) == {"good": False, "steps": [12, 12],
                                                     "problems": ["non-finite parameters"]}
    record = health.new_record()
    for step in range(1, 60):
        health.judge(record, step, float(step), True)
    assert len(record["recent"]) == health.RECENT and record["recent"][0] == 10.0


def test_divergence_names_and_resumes_the_newest_good_checkpoint(runs, tmp_path, capsys):
    """A huge lr blows the weights up in one update: the checkpoint right after it holds finite
    but exploded weights and steps that were all finite, yet is not good (the step after it is
    not finite); the stop names the one before it, which rotation kept, and --resume auto
    resumes it and reaches the uninterrupted run's weights."""
    run = _copy(runs, tmp_path)
    rc, out, err = _run(capsys, run, "--resume", "auto", "--max-steps", "9", "--set", "train.blr=1e12",
                        "--set", "train.max_nonfinite=2", "--set", "train.keep_last=1")
    assert rc == 2
    assert _one_line(err) == (f"pacofr train: error: stopping at step 6: 2 non-finite losses in a row; newest good "
                              f"checkpoint: {_ckpt(run, 3)}")
    assert [p.name for p in checkpoint.all_checkpoints(run / "checkpoints")] == ["ckpt-00000003", "ckpt-00000004"]
    exploded = json.loads((_ckpt(run, 4) / "manifest.json").read_text())["health"]
    assert exploded["good"] is False and exploded["problems"] == [
        "the step after it, step 5: non-finite loss or gradient (skipped)"]
    assert _max_abs(_ckpt(run, 4)) > 1e6 and torch.isfinite(torch.tensor(_max_abs(_ckpt(run, 4))))
    assert _max_abs(_ckpt(run, 3)) < 10  # the step-3 weights, as the run before the change left them
    assert _weights(_ckpt(run, 3)).keys() == _weights(_ckpt(runs / "three", 3)).keys()
    assert all(torch.equal(a, b) for a, b in zip(_weights(_ckpt(run, 3)).values(),
                                                 _weights(_ckpt(runs / "three", 3)).values()))

    rc, out, err = _run(capsys, run, "--resume", "auto", "--max-steps", "4")
    assert rc == 0, err
    assert (f"--resume auto: skipping {_ckpt(run, 4)}, not good: the step after it, step 5: non-finite loss or "
            f"gradient (skipped)") in out.splitlines()
    assert f"resuming {_ckpt(run, 3)} at step 3, the newest good checkpoint" in out.splitlines()
    _same_as_straight_run(runs, run)


def test_a_loss_blowup_makes_checkpoints_not_good(runs, tmp_path, capsys):
    """A large lr whose losses stay finite but blow up: every checkpoint from the one before the
    blow-up on is not good; the run says so at its end, --resume PATH resumes one as asked, and
    --resume auto goes back to the newest good one."""
    run = _copy(runs, tmp_path)
    rc, out, err = _run(capsys, run, "--resume", "auto", "--max-steps", "6", "--set", "train.blr=100")
    assert rc == 0, err
    losses = dict(_losses(run))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()) and losses[5] > 100 * losses[3]
    for step in (4, 5, 6):
        manifest = checkpoint.verify(_ckpt(run, step))
        assert manifest["health"]["good"] is False and "over 10x the recent median" in checkpoint.problems(manifest)
    assert checkpoint.verify(_ckpt(run, 3))["health"]["good"] is True
    summary = yaml.safe_load((run / "summary.yaml").read_text())
    assert summary["last_good_checkpoint"] == str(_ckpt(run, 3)) and summary["last_checkpoint"] == str(_ckpt(run, 6))
    assert "warning: the last checkpoint is not good" in out

    rc, out, err = _run(capsys, run, "--resume", str(_ckpt(run, 6)), "--max-steps", "7")  # asked for: resumed
    assert rc == 0, err
    assert f"--resume {_ckpt(run, 6)}: resuming a checkpoint that is not good (step 6: loss" in out
    rc, out, err = _run(capsys, run, "--resume", "auto", "--max-steps", "4")
    assert rc == 0, err
    assert sum(line.startswith("--resume auto: skipping") for line in out.splitlines()) == 3
    assert f"resuming {_ckpt(run, 3)} at step 3, the newest good checkpoint" in out.splitlines()
    _same_as_straight_run(runs, run)


@pytest.mark.parametrize("key, value, old", [("model.encoder.depth", "2", "4"), ("train.batch_size", "32", "16"),
                                             ("train.seed", "7", "0")])
def test_resume_refuses_a_change_the_checkpoint_is_tied_to(runs, tmp_path, capsys, key, value, old):
    run = _copy(runs, tmp_path)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    rc, _, err = _run(capsys, run, "--resume", "auto", "--max-steps", "4", "--set", f"{key}={value}")
    assert rc == 2
    assert f"--resume {_ckpt(run, 3)}: {key} is {old} there, {value} now (" in _one_line(err)
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before  # untouched


def test_resume_applies_changed_optimizer_settings(runs, tmp_path, capsys):
    """New blr, warmup, weight decay and beta2: the optimizer that steps has them, the logged lr
    follows the rebuilt schedule (warmup over 6 steps now: 101 faces are 6 batches of 16), and
    config.yaml records them."""
    run = _copy(runs, tmp_path)
    changes = {"train.blr": 0.0128, "train.warmup_epochs": 1.0, "train.weight_decay": 0.1, "train.beta2": 0.9}
    rc, out, err = _run(capsys, run, "--resume", "auto", "--max-steps", "4",
                        *[arg for key, value in changes.items() for arg in ("--set", f"{key}={value}")])
    assert rc == 0, err
    line = next(line for line in out.splitlines() if line.startswith("resuming with changed settings"))
    for key, old, new in (("train.blr", 0.0064, 0.0128), ("train.warmup_epochs", 2.0, 1.0),
                          ("train.weight_decay", 0.05, 0.1), ("train.beta2", 0.95, 0.9)):
        assert f"{key} {old} -> {new}" in line, line
    lr = 0.0128 * 16 / 256
    groups = torch.load(_ckpt(run, 4) / "state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.9) and g["initial_lr"] == lr for g in groups)
    assert dict(_losses(run)).keys() == {1, 2, 3, 4}
    with open(run / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}
    assert logged[4] == pytest.approx(lr * 5 / 6, rel=1e-6)  # (after step 4 the schedule is at step 5 of 6)
    assert logged[3] == pytest.approx(0.0064 * 16 / 256 * 4 / 12, rel=1e-6)  # the old run's row, kept
    recorded = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert {f"train.{k}": recorded[k] for k in ("blr", "warmup_epochs", "weight_decay", "beta2")} == changes


def _full_at(target: str, real_write):
    """A checkpoint writer that fills the disk while writing `target` (after 4 KB of it)."""
    def write(path, fill):
        if path.name != target or "ckpt-00000002" not in path.parent.name:
            return real_write(path, fill)
        with open(path, "wb") as fh:
            fh.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write


def _after_disk_full(run: Path, err: str) -> None:
    assert _one_line(err).startswith(f"pacofr train: error: no space left on device writing {_ckpt(run, 2)} (")
    listed = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert listed == ["ckpt-00000001"], listed  # no temporary folder, no half checkpoint
    assert checkpoint.verify(_ckpt(run, 1))["health"]["good"] is True


@pytest.mark.parametrize("target", ["model.safetensors", "state.pt", "manifest.json"])
def test_disk_full_while_saving_loses_nothing(tmp_path, capsys, monkeypatch, target):
    monkeypatch.setattr(checkpoint, "_write", _full_at(target, checkpoint._write))
    run = tmp_path / "run"
    rc, _, err = _run(capsys, run, "--max-steps", "3")
    assert rc == 2
    _after_disk_full(run, err)
    assert not (run / "encoder.safetensors").exists()


def test_disk_full_on_a_real_small_file_system(tmp_path):
    """A 12 MB tmpfs holds one checkpoint of the tiny model (7.7 MB) and not a second."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(small)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"this sandbox does not allow mounting a tmpfs: {mounted.stderr.strip()}")
    try:
        run = _train("--output", str(small / "run"), *EVERY_STEP, "--max-steps", "3", timeout=300)
        assert run.returncode == 2, run.stderr[-2000:]
        _after_disk_full(small / "run", run.stderr)
    finally:
        subprocess.run(["umount", str(small)], check=True)
