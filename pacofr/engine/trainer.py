"""The training loop, for any task and any strategy (one process, DDP, ZeRO).

A task (pretrain.PretrainTask; a fine-tuning task alike) says what a batch's loss is and what
happens around the steps; a strategy (strategies.py, zero.py) how gradients, steps and state
are handled across ranks. The loop itself knows neither.

Every loss term is a mean over the global batch: each micro-batch's term is weighed by its
share of the step's normalizer over all micro-batches and ranks (`Task.normalizers`, known
before any forward), times the world size, since data parallelism averages gradients.
"""

import logging
import math
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from ..config import ConfigError, to_dict
from ..data import REASONS, micro_batches
from . import checkpoint, distributed, health


log = logging.getLogger("pacofr.train")


class NonFiniteLossError(RuntimeError):
    pass


class Task(Protocol):
    names: tuple[str, ...]  # the loss terms, in the order of `normalizers`

    def start_epoch(self, epoch: int, epoch_step: int, strategy) -> None: ...
    def normalizers(self, batch) -> torch.Tensor: ...  # [len(names)]: what each term averages over
    def start_step(self, batches: list, step: int, strategy) -> None: ...
    def loss(self, net, batch, share: torch.Tensor, generator: torch.Generator) -> dict: ...  # names + "loss"
    def finish_step(self, strategy) -> None: ...
    def log_values(self) -> dict: ...
    def after_step(self, step: int, group: list, strategy, monitor) -> None: ...


@dataclass
class Loader:
    """This rank's micro-batches of an epoch, from a step on (`batches` None for streams)."""
    cfg: object
    dataset: object
    batches: object
    collate: object
    per_rank: int
    decoder: object = None

    def epoch(self, epoch: int, epoch_step: int, device: torch.device):
        self.dataset.set_epoch(epoch)
        self.collate.epoch = epoch
        return micro_batches(self.cfg, self.dataset, self.batches, self.collate, self.per_rank, epoch_step, device,
                             self.decoder)

    def no_batch(self) -> ConfigError:
        """The error for an epoch that gave no step: a stream with fewer samples (per loader
        worker: each batches its own share) than one micro-batch."""
        workers = max(1, self.cfg.data.num_workers)
        # this rank's share, read once more: few, or they would have made a batch
        usable, issues = 0, Counter()
        for sample in self.dataset:
            if getattr(sample, "image", 0) is None:  # (a skipped sample counts its reason alone)
                issues.update(sample.issues)
            else:
                usable += 1
        skipped = sum(issues.values())
        found = f"{skipped} skipped ({', '.join(f'{k}={v}' for k, v in sorted(issues.items()))})" if skipped else ""
        return ConfigError(f"{self.cfg.data.source}: an epoch gave no batch: this rank's share of the stream holds "
                           f"{usable} usable samples{', ' + found if found else ''}, and none of its {workers} loader worker(s) got the {self.per_rank} "
                           f"a micro-batch needs (train.batch_size / ranks / train.accum_steps): add data or "
                           f"lower train.batch_size or data.num_workers")


class Trainer:
    def __init__(self, cfg, task: Task, strategy, loader: Loader, scheduler, state: dict, total_steps: int,
                 d: distributed.Dist, monitor, ckpt_dir: Path, last_ckpt: Path | None):
        self.cfg, self.task, self.strategy, self.loader, self.scheduler = cfg, task, strategy, loader, scheduler
        self.state, self.total_steps, self.d, self.monitor = state, total_steps, d, monitor
        self.ckpt_dir, self.last_ckpt = ckpt_dir, last_ckpt
        # the newest good checkpoint, and one saved good whose next step is still to be judged
        self.last_good = None
        self.pending = last_ckpt if last_ckpt is not None and checkpoint.is_good(last_ckpt) else None
        self.window_start = state.get("step", 0) + 1  # the first step the next checkpoint's health covers
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else nullcontext()
        self.issues = Counter()  # this rank's sample issues since the last merge

    def fit(self) -> None:
        try:
            self._loop()
        finally:  # (a failed run's last metrics reach the disk too: a rank may end by os._exit)
            if self.monitor is not None:
                self.monitor.flush()

    def _loop(self) -> None:
        s, t = self.state, self.cfg.train
        nonfinite_run = 0
        # a progress bar on a terminal; in a batch job's log, plain lines every train.log_every steps
        bar = self.d.main and sys.stderr.isatty()
        progress = tqdm(total=self.total_steps, initial=s["step"], disable=not bar, dynamic_ncols=True)
        tick, seen = time.time(), 0
        while s["step"] < self.total_steps:
            epoch = s["epoch"]
            self.task.start_epoch(epoch, s["epoch_step"], self.strategy)
            batches = self.loader.epoch(epoch, s["epoch_step"], self.d.device)
            while s["step"] < self.total_steps:
                group = [b for _, b in zip(range(t.accum_steps), batches)]
                if self._epoch_ended(group):
                    if s["epoch_step"] == 0:  # (else a stream shorter than a batch would loop for ever)
                        raise self.loader.no_batch()
                    s["epoch"], s["epoch_step"] = epoch + 1, 0
                    break
                metrics = self.train_step(group, s["step"])
                images, applied = metrics.pop("images"), metrics.pop("applied")
                # skipped and counted; a step without a usable sample is no sign of divergence
                nonfinite_run = 0 if applied else nonfinite_run + bool(images)
                s["skipped_steps"] += not applied
                self.scheduler.step()
                s["step"] += 1
                s["epoch_step"] += 1
                seen += images
                if images:
                    self.judge(s["step"], metrics.get("loss", math.nan), applied)
                if nonfinite_run >= t.max_nonfinite:
                    raise NonFiniteLossError(f"stopping at step {s['step']}: {nonfinite_run} non-finite losses in a "
                                             f"row; newest good checkpoint: {self.newest_good or 'none'}")
                progress.update(1)
                if self.d.main and images and (s["step"] % t.log_every == 0 or s["step"] == self.total_steps):
                    rate, tick, seen = seen / max(time.time() - tick, 1e-9), time.time(), 0
                    row = {"step": s["step"], "epoch": epoch, "lr": self.scheduler.get_last_lr()[0],
                           "images_per_s": rate, **self.task.log_values(), "skipped_steps": s["skipped_steps"],
                           **metrics}
                    self.monitor.log(row)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{rate:.1f}")
                    if not bar:
                        log.info("step %d/%d epoch %d loss %.4f lr %.2e %.1f img/s", s["step"], self.total_steps, epoch,
                                 metrics["loss"], row["lr"], rate)
                self.task.after_step(s["step"], group, self.strategy, self.monitor)
                # no checkpoint right after a skipped step: the last one stays the last good one
                if (s["step"] % t.ckpt_every == 0 or s["step"] == self.total_steps) and nonfinite_run == 0:
                    self.save()
        progress.close()
        self.merge_issues()

    @property
    def newest_good(self) -> Path | None:
        return self.pending or self.last_good

    def judge(self, step: int, loss: float, applied: bool) -> None:
        """A step with usable samples judged (health.py); the first after a checkpoint saved
        good confirms it, or marks it bad (its weights gave this step's loss)."""
        problem = health.judge(self.state["health"], step, loss, applied)
        if self.pending is None:
            return
        if problem is None:
            self.last_good = self.pending
        elif self.d.main and self.pending.resolve().parent == self.ckpt_dir.resolve():
            checkpoint.mark_bad(self.pending, f"the step after it, {problem}")
            log.info("%s is not good: the step after it, %s", self.pending, problem)
        self.pending = None

    def _epoch_ended(self, group: list) -> bool:
        short = len(group) < self.cfg.train.accum_steps
        if self.loader.batches is None and self.d.world > 1:  # streams split unevenly: every rank ends at once
            short = bool(distributed.all_sum(torch.tensor([float(short)])).item())
        return short

    def _usable(self, group: list, step: int) -> list[tuple[int, object]]:
        """(index, micro-batch) of the micro-batches holding a usable sample; counts issues."""
        usable = []
        for i, batch in enumerate(group):
            self.issues.update(batch.issues)
            if batch.images.shape[0]:
                usable.append((i, batch))
            elif self.d.world > 1:  # the other ranks would wait for this one's gradients forever
                raise RuntimeError(f"rank {self.d.rank}: a micro-batch with no usable sample at step {step}; "
                                   f"clean the data or raise the per-rank batch size")
        return usable

    def train_step(self, group: list, step: int) -> dict:
        """One optimizer step over the step's micro-batches: the logged terms (each a mean over
        the global batch), the gradient norm, the usable images and whether the step applied."""
        t, d, strategy = self.cfg.train, self.d, self.strategy
        usable = self._usable(group, step)
        if usable:
            strategy.pad_micro_steps(len(group) - len(usable))
        norms = [self.task.normalizers(batch) for _, batch in usable]
        total = distributed.all_sum(torch.stack(norms).sum(0)) if norms else None
        self.task.start_step([batch for _, batch in usable], step, strategy)
        names = [*self.task.names, "loss"]
        totals, images = Counter(), 0
        for k, ((i, batch), norm) in enumerate(zip(usable, norms)):
            images += batch.images.shape[0]
            generator = torch.Generator(device=d.device).manual_seed(t.seed * 1_000_003 + step * t.accum_steps + i)
            share = norm * d.world / total
            share = torch.where(torch.isfinite(share), share, torch.zeros_like(share))
            with strategy.sync(last=k == len(usable) - 1), self.amp:
                out = self.task.loss(strategy.net, batch, share, generator)
            strategy.backward(out["loss"])
            terms = torch.stack([out[n].detach().float() * share[j] for j, n in enumerate(self.task.names)]
                                + [out["loss"].detach()])
            for j, v in enumerate((distributed.all_sum(terms) / d.world).tolist()):
                totals[names[j]] += v
        self.task.finish_step(strategy)
        if not images:  # (one process) no usable sample in the whole step
            strategy.discard_step()
            return {"images": 0, "applied": False}
        applied, grad_norm = strategy.step(math.isfinite(totals["loss"]))
        return {**totals, "grad_norm": grad_norm, "images": images, "applied": applied}

    def merge_issues(self) -> None:
        """Adds this rank's new sample issue counts, summed over ranks, to the run's totals."""
        counts = distributed.all_sum(torch.tensor([float(self.issues.get(r, 0)) for r in REASONS]))
        total = Counter(self.state["issues"]) + Counter({r: int(c) for r, c in zip(REASONS, counts.tolist()) if c})
        self.state["issues"] = dict(total)
        self.issues.clear()

    def save(self) -> None:
        """A checkpoint of the model, the optimizer (gathered whole under ZeRO: every rank takes
        part, and in stage 3 in gathering the weights), the schedule, the RNG and the run state,
        with its health (every rank starts the next window)."""
        self.merge_issues()
        step = self.state["step"]
        optim = self.strategy.optimizer_state(self.d.main)
        with self.strategy.gathered():
            if self.d.main:
                model = self.strategy.model
                finite = all(bool(torch.isfinite(v).all()) for v in model.state_dict().values()
                             if v.is_floating_point())
                verdict = health.verdict(self.state["health"], self.window_start, step, finite)
                saved = {"optimizer": optim, "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(),
                         "state": dict(self.state)}
                self.last_ckpt = checkpoint.save(self.ckpt_dir, step, model, saved, self.cfg.train.keep_last,
                                                 verdict, to_dict(self.cfg))
            else:
                verdict = health.verdict(self.state["health"], self.window_start, step, True)
                self.last_ckpt = self.ckpt_dir / f"{checkpoint.PREFIX}{step:08d}"
        self.pending = self.last_ckpt if verdict["good"] else None
        self.window_start = step + 1
        if self.d.world > 1:
            torch.distributed.barrier()
