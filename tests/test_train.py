"""Training runs end to end on CPU: resume after SIGKILL, bad inputs, non-finite losses,
and data parallelism matching a single process."""

import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pacofr.config import load_config
from pacofr.engine import NonFiniteLossError, pretrain

ROOT = Path(__file__).resolve().parents[1]
# A small, fast run: tiny model, 16 faces a step, checkpoints every 10 steps.
BASE = ["--config", "tiny", "--set", "train.batch_size=16", "--set", "train.ckpt_every=10",
        "--set", "train.log_every=1", "--set", "train.image_every=10", "--set", "data.num_workers=0"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _train(*args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *BASE, *args], capture_output=True, text=True,
                          env=_env(), timeout=600, **kw)


def _losses(run: Path) -> list[tuple[int, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    straight = _train("--output", str(tmp_path / "a"), "--max-steps", "30")
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *BASE, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 300
    while not (out / "checkpoints" / "ckpt-00000020").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-20 checkpoint"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "encoder.safetensors").exists()  # it really was cut short

    resumed = _train("--output", str(out), "--resume", "auto", "--max-steps", "30")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "a" / "checkpoints" / "ckpt-00000030" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / "ckpt-00000030" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "a") == _losses(out)  # one row per step, the same values
    # what a finished run leaves behind
    for name in ("encoder.safetensors", "metrics.csv", "config.yaml", "summary.yaml"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000010", "ckpt-00000020", "ckpt-00000030"]
    assert list((out / "images").glob("recon_*.png"))
    assert list((out / "tensorboard").iterdir())


def _write_bad_folder(folder: Path, good: int):
    from PIL import Image
    from skimage import data

    folder.mkdir()
    faces = data.lfw_subset()[:good]
    for i, f in enumerate(faces):
        Image.fromarray((f * 255).astype("uint8")).convert("RGB").resize((64, 64)).save(folder / f"face{i:02d}.jpg", quality=95)
    jpg = (folder / "face00.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    face = Image.open(folder / "face01.jpg")
    face.convert("CMYK").save(folder / "cmyk.jpg")
    face.convert("L").save(folder / "gray.png")
    face.convert("RGBA").save(folder / "rgba.png")
    face.resize((10, 10)).save(folder / "tiny.png")


def test_bad_inputs_are_counted_and_training_completes(tmp_path):
    folder = tmp_path / "faces"
    _write_bad_folder(folder, good=20)
    # 27 files, one step of 27: every file is read exactly once
    run = _train("--output", str(tmp_path / "run"), "--set", f"data.source={folder}", "--set", "train.batch_size=27",
                 "--max-steps", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    for reason in ("truncated=1", "empty=1", "not_an_image=1", "cmyk_converted=1", "gray_converted=1",
                   "rgba_converted=1", "too_small=1"):
        assert reason in run.stdout, (reason, run.stdout[-1500:])
    summary = (tmp_path / "run" / "summary.yaml").read_text()
    assert "too_small: 1" in summary and "truncated: 1" in summary


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_folder_fails_naming_the_path(tmp_path, kind):
    folder = tmp_path / "nothing_here"
    if kind == "empty":
        folder.mkdir()
    run = _train("--output", str(tmp_path / "run"), "--set", f"data.source={folder}", "--max-steps", "1")
    assert run.returncode != 0
    assert str(folder) in run.stderr


class _NaNAt(torch.utils.data.Dataset):
    """The embedded faces with NaN pixels in the chosen samples."""

    def __init__(self, cfg, bad):
        from pacofr.data import build_dataset

        self.inner, self.bad = build_dataset(cfg.data, cfg.model.img_size, seed=0), set(bad)

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        item = self.inner[i]
        if i in self.bad and item["image"] is not None:
            item["image"] = torch.full_like(item["image"], math.nan)
        return item


def _cfg(**overrides):
    base = {"train.batch_size": 16, "train.log_every": 1, "train.image_every": 0, "train.ckpt_every": 100,
            "data.num_workers": 0}
    base.update(overrides)
    return load_config("tiny", [f"{k}={v}" for k, v in base.items()])


def test_nan_batch_is_skipped_and_counted(tmp_path):
    cfg = _cfg(**{"train.max_steps": 6})  # 101 faces / 16 = 6 steps: one epoch, sample 0 in one step
    summary = pretrain(cfg, tmp_path / "run", dataset=_NaNAt(cfg, bad=[0]))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1
    weights = load_file(str(tmp_path / "run" / "encoder.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    losses = [loss for _, loss in _losses(tmp_path / "run")]
    assert sum(not math.isfinite(v) for v in losses) == 1 and len(losses) == 6


def test_a_run_of_nonfinite_losses_stops_with_a_message(tmp_path):
    cfg = _cfg(**{"train.max_steps": 12, "train.ckpt_every": 2, "train.max_nonfinite": 3})
    bad = set(range(101))
    good_steps = 2

    class LateNaN(_NaNAt):  # fine for two steps, then every sample is NaN
        def __getitem__(self, i):
            self.calls = getattr(self, "calls", 0) + 1
            self.bad = bad if self.calls > good_steps * 16 else set()
            return super().__getitem__(i)

    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row") as err:
        pretrain(cfg, tmp_path / "run", dataset=LateNaN(cfg, bad=[]))
    assert "ckpt-00000002" in str(err.value)
    good = load_file(str(tmp_path / "run" / "checkpoints" / "ckpt-00000002" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
def test_torchrun_two_ranks_match_one_process(tmp_path):
    args = ["--set", "train.batch_size=8", "--max-steps", "4", "--set", "train.ckpt_every=100"]
    single = _train("--output", str(tmp_path / "one"), *args)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29731", str(ROOT / "train.py"), *BASE,
                          "--output", str(tmp_path / "two"), *args], capture_output=True, text=True, env=_env(),
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one, dp = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in dp] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(one, dp):
        assert abs(a - b) < 1e-5, (one, dp)


def test_gradient_accumulation_runs_micro_batches(tmp_path):
    cfg = _cfg(**{"train.max_steps": 3, "train.accum_steps": 2})
    summary = pretrain(cfg, tmp_path / "run")
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv", newline="")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) and float(r["grad_norm"]) > 0 for r in rows)
    with pytest.raises(Exception, match="divisible"):
        pretrain(_cfg(**{"train.batch_size": 15, "train.accum_steps": 2}), tmp_path / "bad")
