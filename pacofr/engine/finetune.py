"""Recognition fine-tuning: a pretrained encoder, insightface's embedding head and a margin
softmax over class centres sharded over the ranks (partial_fc.py), in the trainer's loop.

The run is set up as pretraining's is (its output folder claim, loader, schedule, resume,
banner, summary; finetune.epochs, blr, warmup_epochs and weight_decay in place of train's),
with three differences:
- the encoder's lr decays layer by layer (BEiT's layer decay): block i of depth D gets
  lr * layer_decay ** (D - i), the patch embedding, class token and positions
  lr * layer_decay ** (D + 1), the final norm and the head lr;
- the class centres are this rank's shard only and stay outside the data-parallel wrapper
  (`WithCentres`): their own AdamW at the head's lr, stepped when the model's step applies,
  not clipped (as insightface clips the backbone alone);
- checkpoints hold the centres whole (gathered from every rank on the main rank's CPU, with
  their AdamW moments) beside the model, so a run resumes on any rank count, with ZeRO or
  without, as pretraining's do.
Verification sets (insightface .bin) are scored every finetune.eval_every steps and at the end.
"""

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch
import yaml

from ..config import Config, ConfigError, check_output_path, to_dict
from ..data import build_dataset, collate, collate_encoded
from ..data.skips import SkipLog
from ..model.recognition import FaceRecognizer, build_recognizer, save_recognizer
from ..model.weights import load_encoder_weights
from . import checkpoint, distributed, resume as resuming, strategies, zero
from .monitor import Monitor
from .partial_fc import PartialFC, gather_rows
from .pretrain import _banner, _finish, _loader, _resume_point, _say_resume, _schedule, lr_lambda, new_state
from .trainer import Trainer

__all__ = ["finetune", "FinetuneTask", "WithCentres", "layer_decay_groups"]

log = logging.getLogger("pacofr.train")
MODEL_FILE = "recognizer.safetensors"
FIELDS = ["step", "epoch", "loss", "l_cls", "lr", "grad_norm", "centres_grad_norm", "images_per_s", "skipped_steps"]
MOMENTS = ("exp_avg", "exp_avg_sq")


def _layer(name: str, depth: int) -> int:
    """BEiT's layer id: 0 below the blocks, i + 1 for block i, depth + 1 above them."""
    if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def layer_decay_groups(model: FaceRecognizer, lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW param groups by layer and by weight decay (none on 1-d parameters and those the
    model names), each at lr * its layer's scale (`lr_scale`), the head's groups first (the
    trainer logs the first group's lr)."""
    depth, skip, groups = len(model.encoder.blocks), model.no_weight_decay(), {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer, decay = _layer(name, depth), not (p.ndim <= 1 or name in skip)
        scale = layer_decay ** (depth + 1 - layer)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr": lr * scale, "lr_scale": scale})
        group["params"].append(p)
    return [groups[key] for key in sorted(groups, reverse=True)]


class _Checkpoint(torch.nn.Module):
    """What a checkpoint's model.safetensors holds: the model's entries (encoder., head.) and
    the class centres whole (`centres`, filled while gathered)."""

    def __init__(self, model: FaceRecognizer):
        super().__init__()
        self.encoder, self.head = model.encoder, model.head
        self.register_buffer("centres", torch.zeros(0))


class WithCentres:
    """A strategy (strategies.py, zero.py) with this rank's class centres beside it: the
    strategy steps, clips and averages the model; the centres have their own optimizer, whose
    state (and the centres themselves, in `gathered()` with no argument: a checkpoint) is
    gathered whole on the main rank."""

    def __init__(self, inner, fc: PartialFC, optimizer: torch.optim.Optimizer):
        self.inner, self.fc, self.fc_optimizer = inner, fc, optimizer
        self.model = _Checkpoint(inner.model)

    def __getattr__(self, name):  # net, sync, backward, pad_micro_steps, take_over, restart_group, shutdown, ...
        return getattr(self.inner, name)

    def step(self, loss_finite: bool) -> tuple[bool, float]:
        applied, grad_norm = self.inner.step(loss_finite)
        if applied:  # at the schedule's lr without layer decay (the model's groups, as a resume replaces them)
            head = self.inner.optimizer.param_groups[0]
            self.fc_optimizer.param_groups[0]["lr"] = head["lr"] / head["lr_scale"]
            self.fc_optimizer.step()
        self.fc_optimizer.zero_grad(set_to_none=True)
        return applied, grad_norm

    def discard_step(self) -> None:
        self.inner.discard_step()
        self.fc_optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def gathered(self, params: list | None = None):
        with self.inner.gathered(params):
            if params is None:
                whole = gather_rows(self.fc.weight, self.fc.num_classes)
                self.model.centres = whole if whole is not None else torch.zeros(0)
            try:
                yield
            finally:
                self.model.centres = torch.zeros(0)

    def optimizer_state(self, main: bool) -> dict | None:
        """The model's optimizer state (the strategy's) and the centres' AdamW state, its moments
        whole. Collective."""
        model_state = self.inner.optimizer_state(main)
        state = self.fc_optimizer.state.get(self.fc.weight)  # (stepped alike on every rank)
        centres = {k: gather_rows(state[k], self.fc.num_classes) for k in MOMENTS} if state else {}
        if not main:
            return None
        if state:
            centres["step"] = state["step"].detach().clone().cpu()
        return {"model": model_state, "centres": centres}

    def load_optimizer_state(self, saved: dict, where: Path) -> None:
        self.inner.load_optimizer_state(saved["model"], where)
        if saved["centres"]:
            w, (start, end) = self.fc.weight, (self.fc.start, self.fc.end)
            self.fc_optimizer.state[w] = {"step": saved["centres"]["step"],
                                          **{k: saved["centres"][k][start:end].to(w.device) for k in MOMENTS}}


class _LabelCollate:
    """The loader's collate for fine-tuning: the samples and their labels, no masks."""

    def __init__(self, cfg: Config):
        self.fn, self.epoch = collate_encoded if cfg.data.decoder == "dali" else collate, 0

    def __call__(self, samples: list):
        return self.fn(samples)


class FinetuneTask:
    """The margin softmax over the sharded centres as the trainer's task; verification every
    finetune.eval_every steps and at the end."""

    names = ("l_cls",)

    def __init__(self, cfg: Config, model: FaceRecognizer, fc: PartialFC, device: torch.device, world: int,
                 total_steps: int, evaluate=None):
        self.cfg, self.model, self.fc, self.device, self.world = cfg, model, fc, device, world
        self.total_steps, self.evaluate, self.verification = total_steps, evaluate, {}
        self.centres_grad_norm = 0.0
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def start_epoch(self, epoch: int, epoch_step: int, strategy) -> None:
        pass

    def normalizers(self, batch) -> torch.Tensor:
        if batch.labels is None:
            raise ConfigError(f"{self.cfg.data.source}: its samples carry no identity label; fine-tuning needs "
                              f"labelled data (insightface RecordIO, a folder per identity, a list with labels)")
        return torch.tensor([float(batch.images.shape[0])], device=self.device)

    def start_step(self, batches: list, step: int, strategy) -> None:
        pass

    def loss(self, net, batch, share: torch.Tensor, generator: torch.Generator) -> dict:
        """This rank's loss for the trainer: its value is this rank's part of the global batch's
        mean cross-entropy (what the trainer sums over ranks); its gradient is that of the whole
        gathered micro-batch for the centres (1 / all samples of the step), and the embeddings'
        times the rank count, which the data-parallel average of the model's gradients undoes."""
        labels = batch.labels.to(self.device, non_blocking=True)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.fc.num_classes):
            raise ConfigError(f"{self.cfg.data.source}: a label outside [0, {self.fc.num_classes}): set "
                              f"finetune.num_classes to the number of identities")
        embeddings = net(batch.images.to(self.device, non_blocking=True))
        ce, own = self.fc(embeddings, labels, embedding_grad_scale=float(self.world))
        per_sample = share[0] / labels.shape[0]  # (world / the step's samples: the same on every rank)
        whole = per_sample / self.world * ce.sum()
        mine = per_sample * ce[own].sum()
        return {"l_cls": ce[own].mean(), "loss": whole + (mine - whole).detach()}

    def finish_step(self, strategy) -> None:
        """The norm of the step's gradient of all the centres (over every rank's shard)."""
        grad = self.fc.weight.grad
        square = grad.detach().float().square().sum() if grad is not None else torch.zeros((), device=self.device)
        self.centres_grad_norm = float(distributed.all_sum(square)) ** 0.5

    def log_values(self) -> dict:
        return {"centres_grad_norm": self.centres_grad_norm}

    def after_step(self, step: int, group: list, strategy, monitor) -> None:
        every = self.cfg.finetune.eval_every
        if self.evaluate is not None and ((every and step % every == 0) or step == self.total_steps):
            self.verify(step, strategy, monitor)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        with self.amp:
            return self.model(images.to(self.device)).float()

    def verify(self, step: int, strategy, monitor) -> None:
        """Each verification set scored; on the main rank (and under ZeRO-3 on every rank, whose
        forwards gather the parameters together), logged as a row of its own."""
        if monitor is None and not strategy.partitions_parameters:
            return
        f, was_training = self.cfg.finetune, self.model.training
        self.model.eval()
        try:
            self.verification = {Path(p).stem: self.evaluate(self.embed, p, self.cfg.model.img_size, f.eval_batch_size)
                                 for p in _bins(f)}
        finally:
            self.model.train(was_training)
        if monitor is not None:
            row = {"step": step, **{f"{name}_{k}": float(r[k]) for name, r in self.verification.items()
                                    for k in ("accuracy", "accuracy_std") if k in r}}
            monitor.log(row)
            log.info("verification at step %d: %s", step, ", ".join(
                f"{name} accuracy {r.get('accuracy', float('nan')):.4f}" for name, r in self.verification.items()))


def _bins(f) -> list[str]:
    return [p.strip() for p in f.eval_bins.split(",") if p.strip()]


def _verifier(f):
    """pacofr.eval.verification.evaluate_bin for finetune.eval_bins (checked now), or None."""
    bins = _bins(f)
    if not bins:
        return None
    try:
        from ..eval.verification import evaluate_bin
    except ImportError:
        raise ConfigError("--eval-bin: this pacofr has no verification module (pacofr.eval.verification): "
                          "leave --eval-bin out") from None
    for path in bins:
        if not Path(path).is_file():
            raise ConfigError(f"--eval-bin {path}: no such file")
    return evaluate_bin


def run_config(cfg: Config) -> Config:
    """`cfg` with finetune's epochs, blr, warmup and weight decay as train's."""
    f = cfg.finetune
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, epochs=f.epochs, blr=f.blr, warmup_epochs=f.warmup_epochs, weight_decay=f.weight_decay))


def _num_classes(cfg: Config, dataset) -> int:
    found = cfg.finetune.num_classes or int(getattr(dataset, "num_classes", 0) or 0)
    if not found:
        raise ConfigError(f"{cfg.data.source}: the number of identities is unknown: set finetune.num_classes")
    return found


def finetune(cfg: Config, encoder: str | Path, output: str | Path, resume: str | None = None, dataset=None,
             overwrite: bool = False) -> dict:
    """Fine-tunes the encoder at `encoder` (any pacofr encoder file, checkpoint or run folder)
    for recognition; returns the summary it also prints and writes to summary.yaml. `dataset`
    (Samples with labels) replaces the one `cfg.data` describes."""
    d = distributed.init()
    cfg = run_config(cfg)
    t, f, output = cfg.train, cfg.finetune, Path(output)
    check_output_path(output, "--output", folder=True)
    evaluate = _verifier(f)
    checkpoint.claim_output(output, resume, overwrite, d.main)
    found, changed, say = _resume_point(cfg, resume, output, d)
    if dataset is None:
        dataset = build_dataset(cfg.data, cfg.model.img_size, seed=t.seed, rank=d.rank, world_size=d.world)
    num_classes = _num_classes(cfg, dataset)
    if num_classes < d.world:
        raise ConfigError(f"finetune.num_classes={num_classes} is fewer than the ranks ({d.world})")
    loader = _loader(cfg, dataset, d, _LabelCollate(cfg))
    ds_config = zero.config(t.deepspeed, cfg, loader.per_rank) if t.deepspeed else None
    schedule_steps, total_steps, warmup = _schedule(cfg, loader.batches)

    torch.manual_seed(t.seed)
    model = build_recognizer(cfg, f.embedding_size, f.dropout)
    model.encoder.load_state_dict(load_encoder_weights(encoder, model.encoder), strict=True)
    model.to(d.device)
    fc = PartialFC(num_classes, f.embedding_size, f.margin, f.arcface_m if f.margin == "arcface" else f.cosface_m,
                   f.s, f.easy_margin, seed=t.seed, rank=d.rank, world=d.world).to(d.device)
    lr = t.blr * t.batch_size / 256
    groups = layer_decay_groups(model, lr, t.weight_decay, f.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(t.beta1, t.beta2))
    fc_optimizer = torch.optim.AdamW([fc.weight], lr=lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule_steps, warmup, t.min_lr / lr))
    hyperparameters = resuming.current_hyperparameters(optimizer)
    state = new_state()
    if found is not None:  # (the weights before ZeRO copies them into its partitions)
        held = _Checkpoint(model)
        held.centres = torch.zeros(num_classes, f.embedding_size)
        saved = checkpoint.load(found, held, d.device)
        with torch.no_grad():
            fc.weight.copy_(held.centres[fc.start:fc.end])
        del held
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
    loader.log = SkipLog(output / "skipped.csv" if d.main else None, keep=found is not None)
    loader.state, loader.total_steps = state, total_steps

    task = FinetuneTask(cfg, model, fc, d.device, d.world, total_steps, evaluate)
    inner = strategies.make(model, optimizer, t.clip_grad, d.world, ds_config, d.device, [])
    strategy = WithCentres(inner, fc, fc_optimizer)
    if found is not None:
        strategy.load_optimizer_state(saved["optimizer"], found)
        resuming.apply(scheduler, hyperparameters)
    if resume:
        _say_resume(say, resume, found, state, output, changed, d)
    fields = FIELDS + [f"{Path(p).stem}_{k}" for p in _bins(f) for k in ("accuracy", "accuracy_std")]
    if d.main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        _banner(cfg, model, loader, strategy, d, state, found, total_steps, "recognition fine-tuning",
                ("masked_attention",))
        log.info("class centres: %d identities, %d on this rank (%.1f MiB with AdamW's moments)", num_classes,
                 fc.end - fc.start, (fc.end - fc.start) * f.embedding_size * 4 * 3 / 2**20)
    monitor = Monitor(output, state["step"] if found is not None else None, fields) if d.main else None
    trainer = Trainer(cfg, task, strategy, loader, scheduler, state, total_steps, d, monitor,
                      output / "checkpoints", found)
    trainer.fit()
    path = output / MODEL_FILE
    summary = _finish(trainer, output, list(model.parameters()), {"model": path},
                      lambda: save_recognizer(model, path, cfg.model, output.resolve(), state["step"]),
                      "recognition fine-tuning", {"encoder": str(encoder), "verification": task.verification})
    strategy.shutdown()
    return summary
