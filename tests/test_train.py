"""Training runs end to end on CPU: resume after SIGKILL, bad inputs, non-finite losses,
and data parallelism matching a single process."""

import csv
import importlib.util
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


def _train(*args, timeout=600, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *BASE, *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout, **kw)


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
        if i in self.bad and item.image is not None:
            item.image = torch.full_like(item.image, math.nan)
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
    good_steps = 3  # (a non-finite step right after a checkpoint would make it not good)

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
    """Two ranks with two micro-batches each give one process's losses and code table for the
    same global batch, during incubation too (the code table's initialization, EMA steps and
    restarts, forced at every step here, cover the whole step)."""
    args = ["--set", "train.batch_size=8", "--max-steps", "4", "--set", "train.ckpt_every=100",
            "--set", "model.codebook.ema_decay=0.5", "--set", "model.codebook.dead_code_threshold=0.9"]
    single = _train("--output", str(tmp_path / "one"), *args)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29731", str(ROOT / "train.py"), *BASE,
                          "--output", str(tmp_path / "two"), *args, "--set", "train.accum_steps=2"],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one, dp = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in dp] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(one, dp):
        assert abs(a - b) < 1e-5, (one, dp)
    codes = [load_file(str(tmp_path / run / "checkpoints" / "ckpt-00000004" / "model.safetensors"))["codebook.codes"]
             for run in ("one", "two")]
    assert torch.allclose(codes[0], codes[1], atol=1e-5)


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
def test_torchrun_shards_split_unevenly_end_each_epoch_on_every_rank_at_once(tmp_path):
    """Shards of 8, 8 and 2 faces on 2 ranks: one rank's stream holds a micro-batch more than
    the other's. Every rank ends the epoch when the first runs out, so the ranks stay in one
    epoch (an epoch of incubation, then training: their collectives differ)."""
    import io

    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    for s, n in enumerate((8, 8, 2)):
        with wds.TarWriter(str(tmp_path / f"train-{s}.tar")) as w:
            for k in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
                w.write({"__key__": f"s{s}-{k}", "jpg": buf.getvalue()})
    run = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                          "29736", str(ROOT / "train.py"), *BASE, "--set", f"data.source={tmp_path}/train-{{0..2}}.tar",
                          "--set", "train.batch_size=4", "--set", "train.epochs=2", "--max-steps", "8",
                          "--output", str(tmp_path / "run")], capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        epochs = [(int(r["step"]), int(r["epoch"])) for r in csv.DictReader(f)]
    assert epochs == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1), (7, 1), (8, 1)], epochs


@pytest.mark.parametrize("incubating", [False, True])
def test_gradient_accumulation_equals_the_whole_batch(faces64, incubating):
    """Two micro-batches of 4 give the losses and gradients of one batch of 8: every term is a
    mean over the step's whole batch, weighed by each micro-batch's share of its normalizer
    (their masked areas differ), not a mean of the micro-batches' means. During incubation
    also the code table: initialized from the whole step's patches, one EMA step per step with
    its dead-code restarts, over two steps (the second starts from the first's table)."""
    from pacofr.data import Batch
    from pacofr.masking import Masks, sample_masks
    from pacofr.model import PaCoFR

    restarts = {"model.codebook.ema_decay": 0.5, "model.codebook.dead_code_threshold": 0.9} if incubating else {}
    cfg = _cfg(**{"train.clip_grad": 0, **restarts})  # (incubating: codes restart at every step)
    masks = sample_masks(list(range(100, 108)), (64, 64), cfg.model.patch_size, cfg.masking)

    def batch(part):
        return Batch(faces64[part], masks=Masks(masks.mask[part], masks.replace[part], masks.regions[part]))

    sums = [float(masks.mask[part].sum()) for part in (slice(0, 4), slice(4, 8))]
    assert sums[0] != sums[1]  # the halves weigh differently: a mean of means would be off
    runs, tables = [], []
    for group in ([batch(slice(0, 8))], [batch(slice(0, 4)), batch(slice(4, 8))]):
        cfg.train.accum_steps = len(group)
        torch.manual_seed(0)
        model = PaCoFR(cfg)
        model.set_incubation(incubating)
        trainer = _one_process_trainer(cfg, model)
        for step in range(2 if incubating else 1):
            grads = {}  # (the trainer's step clears them: kept as the optimizer sees them)
            hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.clone()))
                     for n, p in model.named_parameters() if p.requires_grad]
            metrics = trainer.train_step(group, step)
            for h in hooks:
                h.remove()
        runs.append((metrics, grads))
        tables.append({n: b.clone() for n, b in model.codebook.state_dict().items()})
    for name, value in tables[0].items():
        assert torch.allclose(tables[1][name].float(), value.float(), rtol=1e-5, atol=1e-6), name
    if incubating:
        assert not torch.equal(tables[0]["codes"], PaCoFR(cfg).codebook.codes.detach())  # they did change
        assert (tables[0]["ema_count"] == 1.0).sum() > 10  # (restarted codes count 1)
    (whole, g_whole), (accum, g_accum) = runs
    for name in ("l_pix", "l_sc", "l_belief", "l_commit", "loss"):
        assert abs(whole[name] - accum[name]) <= 1e-5 * abs(whole[name]) + 1e-7, (name, whole[name], accum[name])
    assert g_whole.keys() == g_accum.keys()
    for name, g in g_whole.items():
        assert torch.allclose(g_accum[name], g, rtol=1e-4, atol=1e-6 * g.abs().max()), name


def _one_process_trainer(cfg, model):
    """A trainer of the pretraining task in one process on CPU, without data or schedule,
    whose optimizer never moves the weights (lr 0)."""
    from pacofr.engine.distributed import Dist
    from pacofr.engine.pretrain import PretrainTask, param_groups
    from pacofr.engine.strategies import SingleProcess
    from pacofr.engine.trainer import Trainer

    optimizer = torch.optim.SGD(param_groups(model, 0.0), lr=0.0)
    strategy = SingleProcess(model, optimizer, cfg.train.clip_grad)
    return Trainer(cfg, PretrainTask(cfg, model, torch.device("cpu")), strategy, None, None, {}, 0,
                   Dist(0, 1, torch.device("cpu")), None, Path("unused"), None)


def test_codebook_draws_from_micro_batches_as_from_their_batch():
    """Restart and initialization draws over a step's micro-batches pick the patches one
    process picks from the concatenated batch with the same generator."""
    from pacofr.model.codebook import PixelCodebook

    cb = PixelCodebook(16, 6, 4)
    chunks = [torch.randn(5, 6), torch.randn(0, 6), torch.randn(9, 6)]
    one = cb._sample([torch.cat(chunks)], 40, torch.Generator().manual_seed(3))
    parts = cb._sample(chunks, 40, torch.Generator().manual_seed(3))
    assert torch.equal(one, parts) and (one.abs().sum(1) > 0).all()


@pytest.mark.parametrize("empty", ["step", "micro-batch"])
def test_unusable_micro_batches_are_skipped(tmp_path, empty):
    """One process: a step whose micro-batches are all unusable is skipped and counted; one
    unusable micro-batch leaves the step to the others. The same under ZeRO-2 and ZeRO-3 (one
    process): their micro-step count stays aligned and the losses are the plain run's."""
    from pacofr.data import skipped

    last = 8 if empty == "step" else 6  # the second step's calls 5-8 (loaded in order), or its first half

    class Unusable(_NaNAt):
        def __getitem__(self, i):
            self.calls = getattr(self, "calls", 0) + 1
            item = super().__getitem__(i)
            return skipped("too_small") if 4 < self.calls <= last else item

    import json

    runs = {}
    engines = ["plain"] + (["zero2", "zero3"] if importlib.util.find_spec("deepspeed") else [])
    for engine in engines:
        extra = {}
        if engine != "plain":  # (ZeRO-3 with every parameter partitioned)
            ds = {"zero_optimization": {"stage": int(engine[-1]), "stage3_param_persistence_threshold": 0}}
            (tmp_path / f"{engine}.json").write_text(json.dumps(ds))
            extra = {"train.deepspeed": str(tmp_path / f"{engine}.json")}
        cfg = _cfg(**{"train.max_steps": 3, "train.batch_size": 4, "train.accum_steps": 2, **extra})
        summary = pretrain(cfg, tmp_path / engine, dataset=Unusable(cfg, bad=[]))
        assert summary["steps"] == 3 and summary["skipped_steps"] == (empty == "step")
        assert summary["skipped_or_repaired_samples"] == {"too_small": last - 4}
        runs[engine] = _losses(tmp_path / engine)
        assert [step for step, _ in runs[engine]] == ([1, 3] if empty == "step" else [1, 2, 3])
    for engine in engines:
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(runs["plain"], runs[engine])), runs


def test_gradient_accumulation_runs_micro_batches(tmp_path):
    cfg = _cfg(**{"train.max_steps": 3, "train.accum_steps": 2})
    summary = pretrain(cfg, tmp_path / "run")
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv", newline="")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) and float(r["grad_norm"]) > 0 for r in rows)
    with pytest.raises(Exception, match="divisible"):
        pretrain(_cfg(**{"train.batch_size": 15, "train.accum_steps": 2}), tmp_path / "bad")


def _zero_config(tmp_path, **entries):
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **entries}))
    return str(path)


def test_deepspeed_config_takes_pacofr_settings_and_refuses_what_it_sets(tmp_path):
    from pacofr.config import ConfigError
    from pacofr.engine import zero

    cfg = _cfg(**{"train.accum_steps": 2, "train.clip_grad": 1.5})
    ds = zero.config(_zero_config(tmp_path, train_batch_size="auto"), cfg, per_rank=4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["gradient_clipping"]) == (16, 4, 2, 1.5)
    refused = [({"train_batch_size": 32}, "train_batch_size=32 disagrees"),
               ({"optimizer": {"type": "Adam"}}, "remove \"optimizer\""),
               ({"bf16": {"enabled": True}}, "remove \"bf16\""),
               ({"zero_optimization": {"stage": 4}}, "stage=4 is not supported"),
               ({"zero_optimization": {"stage": 0}}, "stage=0 is not supported"),
               ({"torch_autocast": {"enabled": True}}, "remove \"torch_autocast\""),
               ({"managed_gradient_accumulation": False}, "managed_gradient_accumulation must be true"),
               ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "compute_grad_norm must be true")]
    for entries, message in refused:
        with pytest.raises(ConfigError, match=message):
            zero.config(_zero_config(tmp_path, **entries), cfg, per_rank=4)
    assert zero.config(_zero_config(tmp_path, bf16={"enabled": False}), cfg, 4)["bf16"] == {"enabled": False}
    with pytest.raises(FileNotFoundError, match="no such file"):
        zero.config(str(tmp_path / "missing.json"), cfg, 4)
    # an optimizer state that ZeRO cannot hold: other groups, or steps that differ inside a group
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([a, b])
    a.grad = torch.ones(2)
    optimizer.step()
    b.grad = torch.ones(3)
    optimizer.step()
    with pytest.raises(ConfigError, match=r"param groups of \[2\] parameters, the model \[1, 1\]"):
        zero.stepped_groups(optimizer.state_dict(), [[a], [b]], tmp_path)
    with pytest.raises(ConfigError, match=r"param group 0 were stepped \[1.0, 2.0\] times \(0 never\)"):
        zero.stepped_groups(optimizer.state_dict(), [[a, b]], tmp_path)
    c = torch.nn.Parameter(torch.ones(1))  # a parameter without a state beside stepped ones
    with pytest.raises(ConfigError, match=r"param group 0 were stepped \[1.0, 2.0\] times \(1 never\)"):
        zero.stepped_groups({**optimizer.state_dict(), "param_groups": [{**optimizer.state_dict()["param_groups"][0],
                                                                         "params": [0, 1, 2]}]}, [[a, b, c]], tmp_path)
    two = torch.optim.AdamW([{"params": [a]}, {"params": [b]}])  # what it can hold: one count a group, or none
    b.grad = None
    two.step()
    assert zero.stepped_groups(two.state_dict(), [[a], [b]], tmp_path) == [1.0, None]


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
@pytest.mark.parametrize("stage, accum", [(1, 1), (2, 1), (3, 2)])
def test_deepspeed_zero_two_ranks_match_one_process_and_resume_exactly(tmp_path, stage, accum):
    """ZeRO-1, ZeRO-2, and ZeRO-3 with every parameter partitioned and two micro-batches a
    step, on 2 ranks (gloo, CPU) over the end of incubation give the losses of one plain
    process, and a run resumed from its step-4 checkpoint ends with the same weights.
    Checkpoints cross rank counts and engines: ZeRO-2's resumes in one process with ZeRO,
    ZeRO-1's and ZeRO-3's in one plain process, one plain process's in ZeRO-3 on 2 ranks, all
    ending with the weights of the uninterrupted runs."""
    pytest.importorskip("deepspeed")
    import json

    args = ["--max-steps", "8", "--set", "train.ckpt_every=4", "--set", "train.image_every=4",  # 6 incubating
            "--set", f"train.accum_steps={accum}"]
    single = _train("--output", str(tmp_path / "one"), *args)
    assert single.returncode == 0, single.stderr[-2000:]
    ds = json.loads((ROOT / "configs" / f"zero{stage}.json").read_text())
    if stage == 3:  # no parameter kept whole: the tiny model's are all below the shipped threshold
        ds["zero_optimization"].update(stage3_param_persistence_threshold=0, sub_group_size=50000)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", "29733",
                str(ROOT / "train.py"), *BASE, "--deepspeed", "--deepspeed_config", str(tmp_path / "ds.json")]

    def zero_run(output, *extra):
        run = subprocess.run([*torchrun, "--output", str(output), *args, *extra], capture_output=True, text=True,
                             env=_env(), timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]

    zero_run(tmp_path / "zero")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "zero")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 9))
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) < 1e-5, (one, two)
    ckpt = tmp_path / "zero" / "checkpoints"
    assert sorted(p.name for p in (ckpt / "ckpt-00000004").iterdir()) == ["manifest.json", "model.safetensors", "state.pt"]
    shutil.copytree(ckpt / "ckpt-00000004", tmp_path / "resumed" / "checkpoints" / "ckpt-00000004")
    zero_run(tmp_path / "resumed", "--resume", "auto")
    assert [s for s, _ in _losses(tmp_path / "resumed")] == [5, 6, 7, 8]  # it went on from step 4

    def final(run):
        return load_file(str(tmp_path / run / "checkpoints" / "ckpt-00000008" / "model.safetensors"))

    a, b, plain = final("zero"), final("resumed"), final("one")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def close(x, y):  # weights as one process's: gradients are summed in another order
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-6) for k in x)

    close(a, plain)
    # the checkpoint is taken during incubation: ZeRO keeps zero moments with a step count for
    # the code table, one plain process no state
    if stage == 2:  # to one process with ZeRO
        runs = {"one-zero": ["--deepspeed", "--deepspeed_config", str(tmp_path / "ds.json")]}
    else:  # to one plain process
        runs = {"one-plain": []}
    if stage == 3:  # and one plain process's checkpoint to 2 ranks
        zero_run(tmp_path / "two-zero", "--resume", str(tmp_path / "one" / "checkpoints" / "ckpt-00000004"))
        assert [s for s, _ in _losses(tmp_path / "two-zero")] == [5, 6, 7, 8]
        close(final("two-zero"), plain)
    for run, extra in runs.items():
        single = _train("--output", str(tmp_path / run), *args, "--resume", str(ckpt / "ckpt-00000004"), *extra)
        assert single.returncode == 0, single.stderr[-2000:]
        assert [s for s, _ in _losses(tmp_path / run)] == [5, 6, 7, 8]
        close(final(run), a)


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
def test_zero3_resumes_on_a_rank_count_that_does_not_divide_the_parameters(tmp_path):
    """One plain process's checkpoint resumed by ZeRO-3 on 3 ranks (the tiny model has
    parameters of 64 and 4096 elements: the last rank's slice is short) ends with the
    uninterrupted run's weights."""
    pytest.importorskip("deepspeed")
    import json

    args = ["--max-steps", "4", "--set", "train.ckpt_every=2", "--set", "train.batch_size=12"]
    single = _train("--output", str(tmp_path / "one"), *args)
    assert single.returncode == 0, single.stderr[-2000:]
    ds = json.loads((ROOT / "configs" / "zero3.json").read_text())
    ds["zero_optimization"].update(stage3_param_persistence_threshold=0)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    run = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "3", "--master_port",
                          "29735", str(ROOT / "train.py"), *BASE, *args, "--deepspeed", "--deepspeed_config",
                          str(tmp_path / "ds.json"), "--output", str(tmp_path / "three"),
                          "--resume", str(tmp_path / "one" / "checkpoints" / "ckpt-00000002")],
                         capture_output=True, text=True, env=_env(), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [s for s, _ in _losses(tmp_path / "three")] == [3, 4]
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "ckpt-00000004" / "model.safetensors")) for r in ("one", "three"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_param_groups_follow_no_weight_decay():
    """Weight decay on every trained parameter of 2 or more dimensions that the model does not
    name in no_weight_decay(); the code table alone in the third group."""
    from pacofr.engine.pretrain import param_groups
    from pacofr.model import PaCoFR

    model = PaCoFR(_cfg())
    skip = model.no_weight_decay()
    named = dict(model.named_parameters())
    assert skip <= named.keys()
    assert {"encoder.cls_token", "decoder.mask_token", "codebook.codes", "codebook.keys"} <= skip
    groups = param_groups(model, 0.05)
    ids = [{id(p) for p in g["params"]} for g in groups]
    for name, p in named.items():
        if not p.requires_grad:
            assert all(id(p) not in g for g in ids), name
        elif name == "codebook.codes":
            assert ids[2] == {id(p)}
        else:
            assert (id(p) in ids[0]) == (p.ndim > 1 and name not in skip), name
            assert (id(p) in ids[1]) != (id(p) in ids[0]), name
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.0]
    assert id(named["encoder.blocks.0.attn.qkv.weight"]) in ids[0]


def test_deepspeed_versions_outside_the_tested_range_are_refused(monkeypatch):
    from pacofr.config import ConfigError
    from pacofr.engine import deepspeed_compat as compat

    monkeypatch.delenv(compat.UNTESTED_OK, raising=False)
    for version in ("0.19.8", "0.19.10", "0.19.9+cpu"):
        compat.check_version(version)
    for version in ("0.19.7", "0.20.0", "1.0.0", "0.18.2"):
        with pytest.raises(ConfigError, match=rf"DeepSpeed {re.escape(version)} is outside the tested range"):
            compat.check_version(version)
    monkeypatch.setenv(compat.UNTESTED_OK, "1")
    compat.check_version("0.20.0")
    assert f'"{compat.REQUIREMENT}"' in (ROOT / "setup.py").read_text()  # the extra pins the same range


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    first = _train("--output", str(out), "--max-steps", "2", "--set", "train.ckpt_every=1")
    assert first.returncode == 0, first.stderr[-2000:]
    # outside a terminal: a banner and plain log lines, no progress bar redraws
    assert "pacofr pretraining: cpu x 1 rank(s), SingleProcess" in first.stdout and "fused ops: codebook_topk" in first.stdout
    assert [line.split()[1] for line in first.stdout.splitlines() if line.startswith("step ")] == ["1/2", "2/2"]
    assert "\r" not in first.stderr and "it/s" not in first.stderr
    before = {p.name: p.read_bytes() for p in [out / "metrics.csv", out / "encoder.safetensors"]}
    again = _train("--output", str(out), "--max-steps", "1")
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert f"--output {out} holds a run (checkpoints up to ckpt-00000002)" in again.stderr
    assert "--resume auto" in again.stderr and "--overwrite" in again.stderr
    assert {p.name: p.read_bytes() for p in [out / "metrics.csv", out / "encoder.safetensors"]} == before  # untouched
    resumed = _train("--output", str(out), "--max-steps", "3", "--resume", "auto")
    assert resumed.returncode == 0 and f"resuming {out / 'checkpoints' / 'ckpt-00000002'} at step 2" in resumed.stdout
    assert [s for s, _ in _losses(out)] == [1, 2, 3]
    cleared = _train("--output", str(out), "--max-steps", "1", "--overwrite")
    assert cleared.returncode == 0, cleared.stderr[-2000:]
    assert [s for s, _ in _losses(out)] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000001"]
    fresh = _train("--output", str(tmp_path / "new"), "--max-steps", "1", "--resume", "auto")
    assert fresh.returncode == 0 and "no checkpoint in" in fresh.stdout and "starting fresh" in fresh.stdout
    (tmp_path / "a_file").write_text("x")
    onto_file = _train("--output", str(tmp_path / "a_file"), "--max-steps", "1")
    assert onto_file.returncode == 2 and "is a file, not a folder" in onto_file.stderr
    assert onto_file.stderr.count("\n") == 1 and (tmp_path / "a_file").read_text() == "x"


@pytest.mark.parametrize("kind", ["short", "empty", "zero-bytes"])
def test_a_stream_with_less_than_one_batch_fails_at_once(tmp_path, kind):
    import io

    import webdataset as wds
    from PIL import Image

    shard = tmp_path / "train-0.tar"
    if kind == "zero-bytes":
        shard.write_bytes(b"")
    else:
        with wds.TarWriter(str(shard)) as w:
            for k in range(16 if kind == "short" else 0):
                buf = io.BytesIO()
                Image.fromarray(np.full((64, 64, 3), k * 9, dtype=np.uint8)).save(buf, "JPEG")
                w.write({"__key__": f"s{k}", "jpg": buf.getvalue()})
    start = time.time()
    run = _train("--output", str(tmp_path / "run"), "--set", f"data.source={shard}", "--set", "train.batch_size=32",
                 "--max-steps", "4", timeout=120)
    assert run.returncode == 2 and time.time() - start < 120, run.stderr[-2000:]
    assert run.stderr.count("\n") == 1, run.stderr[-2000:]  # one line, no progress bar outside a terminal
    last = run.stderr.strip()
    assert str(shard) in last and "an epoch gave no batch" in last, run.stderr[-2000:]
    assert f"holds {16 if kind == 'short' else 0} usable samples" in last
    assert ("1 skipped (unreadable=1)" in last) == (kind == "zero-bytes"), last
