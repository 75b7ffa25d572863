"""Pretraining: the run set up (data, model, optimizer, schedule, resume, strategy), then the
trainer's loop with the pretraining task plugged in (incubation, code table steps, image grids),
then the encoder written and the summary."""

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.utils.data import IterableDataset

from ..config import Config, ConfigError, check_output_path, to_dict
from ..data import Batches, MaskingCollate, build_dataset, sample_seed
from ..data.skips import SkipLog
from ..losses import TERMS, PaCoFRLoss
from ..masking import sample_masks
from ..model import PaCoFR, save_encoder
from . import checkpoint, distributed, health, resume as resuming, strategies, zero
from .monitor import Monitor
from .trainer import Loader, NonFiniteLossError, Trainer

__all__ = ["pretrain", "PretrainTask", "NonFiniteLossError"]

log = logging.getLogger("pacofr.train")
CODES_GROUP = 2  # the code table's param group: no gradient during incubation, its AdamW restarts after
CODEBOOK_STREAM = 0xC0DE  # keys the code table's random stream (see PretrainTask.start_step)
SKIPPED = "skipped.csv"  # the files skipped (path, reason), beside summary.yaml


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-d parameters and on those the model names (timm's convention);
    the code table has a group of its own."""
    skip, codes = model.no_weight_decay(), model.codebook.codes
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and p is not codes:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            {"params": [codes], "weight_decay": 0.0}]


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warmup, then cosine decay to `min_ratio` of the base lr."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


class PretrainTask:
    """PaCo-FR pretraining as the trainer's task: the losses of pacofr.losses over the masks the
    data brings, incubation for the first train.incubation_epochs, and the code table's own
    steps, which it takes outside the optimizer during incubation."""

    names = TERMS

    def __init__(self, cfg: Config, model: PaCoFR, device: torch.device):
        self.cfg, self.model, self.device = cfg, model, device
        self.losses = PaCoFRLoss(cfg)
        self.codebook_gen = None

    def direct_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters read outside their own module's forward: the code tables, which the
        fused ops take as tensors (ZeRO-3 gathers these with the model's)."""
        return [self.model.codebook.codes, self.model.codebook.keys]

    def start_epoch(self, epoch: int, epoch_step: int, strategy) -> None:
        incubation = self.cfg.train.incubation_epochs
        self.model.set_incubation(epoch < incubation)
        if epoch == incubation and epoch_step == 0:  # the code table's optimizer starts now
            strategy.restart_group(CODES_GROUP)

    def normalizers(self, batch) -> torch.Tensor:
        batch.masks = batch.masks.to(self.device, non_blocking=True)  # (once: the step's forwards read them)
        return self.losses.normalizers(batch.masks, self.model.search_rows(batch.masks))

    def start_step(self, batches: list, step: int, strategy) -> None:
        """During incubation the code table is initialized from all of the step's patches and
        makes one EMA step over all of them (finish_step). Its draws (initialization, restarts)
        have a generator of their own, seeded by the step alone: the same on every rank and for
        any accumulation."""
        self.codebook_gen = None
        if not (batches and self.model.incubating):
            return
        self.codebook_gen = torch.Generator(device=self.device).manual_seed(
            sample_seed(self.cfg.train.seed, step, CODEBOOK_STREAM))
        self._codebook_step(strategy, lambda: self.model.start_step([b.images for b in batches],
                                                                    [b.masks for b in batches],
                                                                    self.codebook_gen))

    def loss(self, net, batch, share: torch.Tensor, generator: torch.Generator) -> dict:
        images = batch.images.to(self.device, non_blocking=True)
        out = net(images, masks=batch.masks, generator=generator)
        return self.losses(out, images, share)

    def finish_step(self, strategy) -> None:
        if self.codebook_gen is not None:
            self._codebook_step(strategy, lambda: self.model.finish_step(self.codebook_gen))

    def _codebook_step(self, strategy, write) -> None:
        """`write` changes the code table outside a forward: under ZeRO-3 with the table
        gathered, and under ZeRO into the optimizer's copies."""
        with strategy.gathered([self.model.codebook.codes]):
            write()
        written = self.model.codebook.take_written()
        strategy.take_over([] if written is None else [(self.model.codebook.codes, written)])

    def log_values(self) -> dict:
        return {"perplexity": self.model.codebook.perplexity(), "incubating": int(self.model.incubating)}

    @torch.no_grad()
    def after_step(self, step: int, group: list, strategy, monitor) -> None:
        """A reconstruction grid every train.image_every steps (under ZeRO-3 every rank runs the
        forward: it gathers the parameters collectively)."""
        every, batch = self.cfg.train.image_every, group[0]
        if not (every and step % every == 0 and len(batch.images)):
            return
        if monitor is None and not strategy.partitions_parameters:
            return
        images = batch.images.to(self.device)
        was_training = self.model.training
        self.model.eval()
        out = self.model(images, masks=batch.masks.to(self.device))
        self.model.train(was_training)
        if monitor is not None:
            monitor.reconstruction_grid(step, images, out, self.cfg.model.patch_size, self.cfg.loss.norm_pix,
                                        self.cfg.loss.eps)


def _schedule(cfg: Config, batches: Batches | None) -> tuple[int, int, int]:
    """(schedule steps, steps to run, warmup steps). The schedule spans all epochs; max_steps
    stops early without changing it (streams, whose epochs have no known length, are
    scheduled over max_steps)."""
    t = cfg.train
    steps_per_epoch = batches.steps() if batches is not None else max(1, t.max_steps // t.epochs)
    schedule_steps = t.epochs * steps_per_epoch if batches is not None else t.max_steps
    total_steps = min(schedule_steps, t.max_steps) if t.max_steps else schedule_steps
    return schedule_steps, total_steps, round(t.warmup_epochs * steps_per_epoch)


@dataclass
class _LoggedLoader(Loader):
    """The loader, its batches logged as they reach the loop (`log`: the files skipped, for
    skipped.csv) and checked: a run that has used no sample by the time it would write a
    checkpoint (or the end of an epoch read from its start) stops, rather than save an
    untrained model. `state` (the run's) and `total_steps` are set once known."""
    log: SkipLog | None = None
    state: dict | None = None
    total_steps: int = 0

    def epoch(self, epoch: int, epoch_step: int, device: torch.device):
        return self._checked(super().epoch(epoch, epoch_step, device), epoch_step == 0)

    def _checked(self, batches, whole: bool):
        t, n = self.cfg.train, 0
        for n, batch in enumerate(batches, 1):
            self.log.record(batch)
            step = self.state["step"] + 1  # (the step this micro-batch belongs to, once taken)
            saves = n % t.accum_steps == 0 and (step % t.ckpt_every == 0 or step >= self.total_steps)
            if saves and not self.log.usable:
                raise self.log.nothing_usable(self.cfg.data.source)
            yield batch
        if whole and n and not self.log.usable:
            raise self.log.nothing_usable(self.cfg.data.source)


def _loader(cfg: Config, dataset, d: distributed.Dist, collate=None) -> Loader:
    """The run's loader; `collate` (an object with an `epoch`) in place of the masking one."""
    t = cfg.train
    if t.batch_size % (d.world * t.accum_steps):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by ranks ({d.world}) x "
                          f"train.accum_steps ({t.accum_steps})")
    per_rank = t.batch_size // (d.world * t.accum_steps)
    batches = None
    if not isinstance(dataset, IterableDataset):
        batches = Batches(len(dataset), t.batch_size, t.accum_steps, d.rank, d.world, t.seed)
        if batches.steps() == 0:
            raise ConfigError(f"the dataset has {len(dataset)} samples, fewer than one batch of "
                              f"train.batch_size={t.batch_size}")
    elif not t.max_steps:
        raise ConfigError("a streamed (.tar shard) dataset has no length: set train.max_steps")
    decoder = None
    if cfg.data.decoder == "dali":
        from ..data.dali import DaliDecoder

        decoder = DaliDecoder(cfg.model.img_size, per_rank, cfg.data.dali_device, cfg.data.dali_threads,
                              d.device.index if d.device.type == "cuda" else None)
    return _LoggedLoader(cfg, dataset, batches, collate or MaskingCollate(cfg, sample_masks), per_rank, decoder)


def pretrain(cfg: Config, output: str | Path, resume: str | None = None, dataset=None, overwrite: bool = False) -> dict:
    """Runs pretraining; returns the summary it also prints and writes to summary.yaml.
    `dataset` replaces the one `cfg.data` describes (for tests and custom pipelines). A folder
    holding a run is refused unless `resume` continues it or `overwrite` clears it. Everything
    is set up (and a user's mistake found) before the run folder is made or written."""
    d = distributed.init()
    t, output = cfg.train, Path(output)
    check_output_path(output, "--output", folder=True)
    checkpoint.claim_output(output, resume, overwrite, d.main)
    found, changed, say = _resume_point(cfg, resume, output, d)
    if dataset is None:
        dataset = build_dataset(cfg.data, cfg.model.img_size, seed=t.seed, rank=d.rank, world_size=d.world)
    loader = _loader(cfg, dataset, d)
    ds_config = zero.config(t.deepspeed, cfg, loader.per_rank) if t.deepspeed else None
    schedule_steps, total_steps, warmup = _schedule(cfg, loader.batches)

    torch.manual_seed(t.seed)
    model = PaCoFR(cfg).to(d.device)
    lr = t.blr * t.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=lr, betas=(t.beta1, t.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule_steps, warmup, t.min_lr / lr))
    hyperparameters = resuming.current_hyperparameters(optimizer)
    state = new_state()
    if found is not None:  # (the weights before ZeRO copies them into its partitions)
        saved = checkpoint.load(found, model, d.device)
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
    loader.log = SkipLog(output / SKIPPED if d.main else None, keep=found is not None)
    loader.state, loader.total_steps = state, total_steps

    task = PretrainTask(cfg, model, d.device)
    strategy = strategies.make(model, optimizer, t.clip_grad, d.world, ds_config, d.device, task.direct_parameters())
    if found is not None:  # a state as one process keeps it: any rank count, with ZeRO or without
        strategy.load_optimizer_state(saved["optimizer"], found)
        resuming.apply(scheduler, hyperparameters)
    if resume:
        _say_resume(say, resume, found, state, output, changed, d)
    if d.main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    monitor = Monitor(output, state["step"] if found is not None else None) if d.main else None
    if d.main:
        _banner(cfg, model, loader, strategy, d, state, found, total_steps)
    trainer = Trainer(cfg, task, strategy, loader, scheduler, state, total_steps, d, monitor,
                      output / "checkpoints", found)
    trainer.fit()
    encoder = output / "encoder.safetensors"
    summary = _finish(trainer, output, list(model.parameters()), {"encoder": encoder}, lambda: save_encoder(
        model.encoder.state_dict(), encoder, cfg.model, output.resolve(), state["step"]))
    strategy.shutdown()
    return summary


def new_state() -> dict:
    """A run's state before its first step."""
    return {"step": 0, "epoch": 0, "epoch_step": 0, "skipped_steps": 0, "issues": {}, "health": health.new_record()}


def _resume_point(cfg: Config, resume: str | None, output: Path, d):
    """(the checkpoint `resume` names, verified (None: a fresh start), the settings `cfg`
    changes from its run's (a changed fixed one refused), the main rank's printer)."""
    say = (lambda line: print(line, flush=True)) if d.main else (lambda line: None)
    found, manifest = checkpoint.resolve(resume, output, say) or (None, None)
    changed = resuming.changes(manifest.get("config", {}), cfg, found) if found is not None else []
    return found, changed, say


def _say_resume(say, resume: str, found: Path | None, state: dict, output: Path, changed: list[str], d) -> None:
    """What a resume continues, and what it changes; checkpoints of later steps in the run's
    folder are set aside (the resumed run redoes those steps)."""
    if found is None:
        say(f"--resume {resume}: no checkpoint in {output / 'checkpoints'}: starting fresh")
        return
    say(f"resuming {found} at step {state['step']}" + (", the newest good checkpoint" if resume == "auto" else ""))
    if changed:
        say(f"resuming with changed settings, applied from step {state['step']} (the optimizer and the lr schedule "
            f"follow the new values): {', '.join(changed)}")
    if d.world > 1:  # (every rank has read its checkpoints)
        torch.distributed.barrier()
    moved = checkpoint.set_aside_newer(output / "checkpoints", state["step"]) if d.main else []
    if moved:
        say(f"set aside {len(moved)} checkpoint(s) of later steps, which this run redoes, into "
            f"{moved[0].parent}: {', '.join(p.name for p in moved)}")


def _banner(cfg: Config, model: torch.nn.Module, loader: Loader, strategy, d, state: dict, found, total_steps: int,
            title: str = "pretraining", fused=("codebook_topk", "masked_attention", "patch_pixel_loss")) -> None:
    """What the run is about to do, in the log: a batch job's log says it without a terminal."""
    from .. import ops

    samples = f"{len(loader.dataset)} samples" if loader.batches is not None else "a stream"
    log.info("pacofr %s: %s x %d rank(s), %s, %.1fM parameters, %s from %s; steps %d to %d%s",
             title, d.device, d.world, type(strategy).__name__, sum(p.numel() for p in model.parameters()) / 1e6,
             samples, cfg.data.source, state["step"], total_steps,
             f", resumed from {found}" if found is not None else "")
    log.info("fused ops: %s", "; ".join(ops.explain(op, d.device) for op in fused))


def _finish(trainer: Trainer, output: Path, params: list, written: dict[str, Path], write, title: str = "pretraining",
            extra: dict | None = None) -> dict:
    """Writes the model (`write()`, on the main rank with `params` gathered: the files
    `written` names), the files skipped by every rank and the summary (with `extra`); prints it."""
    s, d, log = trainer.state, trainer.d, trainer.loader.log
    log.write(set().union(*distributed.gather_objects(log.rows)))
    summary = {"steps": s["step"], "epochs_started": s["epoch"] + 1, "skipped_steps": s["skipped_steps"],
               "skipped_or_repaired_samples": dict(sorted(s["issues"].items())),
               "output": str(output), "last_checkpoint": str(trainer.last_ckpt),
               "last_good_checkpoint": str(trainer.newest_good), **(extra or {})}
    with trainer.strategy.gathered(params):
        if d.main:
            write()
    if not d.main:
        return summary
    summary.update({k: str(v) for k, v in written.items()}, metrics=str(output / "metrics.csv"),
                   images=str(output / "images"), tensorboard=str(output / "tensorboard"),
                   skipped_files=str(output / SKIPPED))
    (output / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    trainer.monitor.close()
    print(f"\n{title} finished")
    for key in ("steps", "skipped_steps", "output", "last_checkpoint", "last_good_checkpoint", *written, "metrics",
                "images", "tensorboard", "skipped_files"):
        print(f"  {key:<21} {summary[key]}")
    if summary["last_good_checkpoint"] != summary["last_checkpoint"]:
        print("  warning: the last checkpoint is not good (see the problems in its manifest.json); --resume auto "
              "continues from the newest good one")
    counts = summary["skipped_or_repaired_samples"]
    print("  samples skipped or repaired: " + (", ".join(f"{k}={v}" for k, v in counts.items()) if counts else "none"))
    return summary
