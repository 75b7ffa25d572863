"""The pretraining loop: data -> masks -> model -> losses -> optimizer, with checkpoints,
resume, a non-finite loss guard, and logs."""

import math
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch.utils.data import IterableDataset
from tqdm import tqdm

from ..config import Config, ConfigError, to_dict
from ..data import REASONS, Batches, MaskingCollate, build_dataset, micro_batches, sample_seed
from ..model import PaCoFR
from . import checkpoint, distributed, zero
from .monitor import Monitor


class NonFiniteLossError(RuntimeError):
    pass


def _check_batch_sizes(cfg: Config, world: int) -> int:
    t = cfg.train
    if t.batch_size % (world * t.accum_steps):
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by ranks ({world}) x "
                          f"train.accum_steps ({t.accum_steps})")
    return t.batch_size // (world * t.accum_steps)


CODES_GROUP = 2  # the code table's param group (see zero.restart_moments)
CODEBOOK_STREAM = 0xC0DE  # keys the code table's random stream (see _train_step)


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return p.ndim <= 1 or name.endswith(("cls_token", "mask_token")) or name.startswith("codebook.")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, tokens and code tables (1-d or embedding-like). The
    code table (no gradient during incubation) has a group of its own."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and p is not model.codebook.codes:
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            {"params": [model.codebook.codes], "weight_decay": 0.0}]


def _with_codes_group(saved: dict, model: torch.nn.Module) -> dict:
    """An optimizer state saved before the code table had a group of its own (two groups, the
    table among the second's parameters) in the present layout."""
    if len(saved["param_groups"]) != 2:
        return saved
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad and _no_decay(n, p)]
    at = next(i for i, (_, p) in enumerate(trained) if p is model.codebook.codes)
    groups = [dict(g) for g in saved["param_groups"]]
    ids = list(groups[1]["params"])
    groups.append({**groups[1], "params": [ids.pop(at)]})
    groups[1]["params"] = ids
    return {**saved, "param_groups": groups}


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warmup, then cosine decay to `min_ratio` of the base lr."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def pretrain(cfg: Config, output: str | Path, resume: str | None = None, dataset=None) -> dict:
    """Runs pretraining; returns the summary it also prints and writes to summary.yaml.
    `dataset` replaces the one `cfg.data` describes (for tests and custom pipelines)."""
    d = distributed.init()
    t = cfg.train
    output = Path(output)
    per_rank = _check_batch_sizes(cfg, d.world)
    ds_config = zero.config(t.deepspeed, cfg, per_rank) if t.deepspeed else None
    dataset = dataset if dataset is not None else build_dataset(cfg.data, cfg.model.img_size, seed=t.seed,
                                                                 rank=d.rank, world_size=d.world)
    iterable = isinstance(dataset, IterableDataset)
    batches = None if iterable else Batches(len(dataset), t.batch_size, t.accum_steps, d.rank, d.world, t.seed)
    if batches is not None and batches.steps() == 0:
        raise ConfigError(f"the dataset has {len(dataset)} samples, fewer than one batch of train.batch_size={t.batch_size}")
    if iterable and not t.max_steps:
        raise ConfigError("a streamed (.tar shard) dataset has no length: set train.max_steps")
    # The schedule spans all epochs; max_steps stops early without changing it (streams, whose
    # epochs have no known length, are scheduled over max_steps).
    steps_per_epoch = batches.steps() if batches is not None else max(1, t.max_steps // t.epochs)
    schedule_steps = t.epochs * steps_per_epoch if batches is not None else t.max_steps
    total_steps = min(schedule_steps, t.max_steps) if t.max_steps else schedule_steps
    warmup = round(t.warmup_epochs * steps_per_epoch)

    torch.manual_seed(t.seed)
    model = PaCoFR(cfg).to(d.device)
    lr = t.blr * t.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=lr, betas=(t.beta1, t.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule_steps, warmup, t.min_lr / lr))
    state = {"step": 0, "epoch": 0, "epoch_step": 0, "skipped_steps": 0, "issues": {}}

    ckpt_dir = output / "checkpoints"
    found = checkpoint.resolve(resume, output)
    if found is not None:  # (the weights before ZeRO copies them into its partitions)
        saved = checkpoint.load(found, model, d.device)
        if "optimizer" in saved:  # (under ZeRO, loaded once the engine holds the optimizer)
            saved["optimizer"] = _with_codes_group(saved["optimizer"], model)
            if ds_config is None:
                optimizer.load_state_dict(saved["optimizer"])
        elif ds_config is None:
            raise ConfigError(f"{found}: a ZeRO checkpoint with optimizer partitions per rank: resume it with "
                              f"train.deepspeed and {saved.get('zero_world')} ranks")
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state = saved["state"]
    if d.main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    monitor = Monitor(output, state["step"] if found is not None else None) if d.main else None

    groups = [list(g["params"]) for g in optimizer.param_groups]  # (before ZeRO flattens them)
    engine = zero.initialize(model, optimizer, ds_config, d.device) if ds_config is not None else None
    if engine is not None and found is not None:
        if "optimizer" in saved:  # a state as one process keeps it: any rank count
            zero.load_optimizer_state(engine, optimizer, groups, saved["optimizer"], found)
        else:  # the earlier layout, a partition per rank
            zero.load_partition(engine, found, d.rank, d.world, saved.get("zero_world"))
    net = model if engine is None else engine
    if engine is None and d.world > 1:  # unused parameters: codes get no gradient during incubation
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else nullcontext()
    masking_collate = MaskingCollate(cfg)
    decoder = None
    if cfg.data.decoder == "dali":
        from ..data.dali import DaliDecoder

        decoder = DaliDecoder(cfg.model.img_size, per_rank, cfg.data.dali_device, cfg.data.dali_threads,
                              d.device.index if d.device.type == "cuda" else None)
    issues = Counter()
    nonfinite_run = 0
    last_ckpt = found
    progress = tqdm(total=total_steps, initial=state["step"], disable=not d.main, dynamic_ncols=True)
    tick, seen = time.time(), 0

    while state["step"] < total_steps:
        epoch = state["epoch"]
        dataset.set_epoch(epoch)
        masking_collate.epoch = epoch
        model.set_incubation(epoch < t.incubation_epochs)
        if epoch == t.incubation_epochs and state["epoch_step"] == 0:  # the code table's optimizer starts now
            if engine is not None:
                zero.restart_moments(engine, CODES_GROUP)
            else:  # (only a state resumed from a ZeRO run has one for it yet)
                optimizer.state.pop(model.codebook.codes, None)
        loader = micro_batches(cfg, dataset, batches, masking_collate, per_rank, state["epoch_step"], d.device,
                               decoder)
        epoch_done = False
        while state["step"] < total_steps:
            group = [b for _, b in zip(range(t.accum_steps), loader)]
            short = len(group) < t.accum_steps
            if iterable and d.world > 1:  # shards split unevenly: the epoch ends on every rank at once
                short = bool(distributed.all_sum(torch.tensor([float(short)])).item())
            if short:
                epoch_done = True
                break
            metrics = _train_step(cfg, net, model, group, amp, d, state["step"], issues, engine)
            images = metrics.pop("images")
            if engine is None:
                applied = images and math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
                if applied:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:  # DeepSpeed stepped already, unless the gradients were not finite
                applied = images and metrics.pop("applied") and math.isfinite(metrics["loss"])
            if applied:
                nonfinite_run = 0
            else:  # skipped and counted; a step without a usable sample is no sign of divergence
                state["skipped_steps"] += 1
                nonfinite_run += bool(images)
            scheduler.step()
            state["step"] += 1
            state["epoch_step"] += 1
            seen += images
            if nonfinite_run >= t.max_nonfinite:
                raise NonFiniteLossError(
                    f"stopping at step {state['step']}: {nonfinite_run} non-finite losses in a row; "
                    f"last good checkpoint: {last_ckpt or 'none'}")
            progress.update(1)
            if d.main and images and (state["step"] % t.log_every == 0 or state["step"] == total_steps):
                rate = seen / max(time.time() - tick, 1e-9)
                tick, seen = time.time(), 0
                row = {"step": state["step"], "epoch": epoch, "lr": scheduler.get_last_lr()[0], "images_per_s": rate,
                       "perplexity": model.codebook.perplexity(), "incubating": int(model.incubating),
                       "skipped_steps": state["skipped_steps"], **metrics}
                monitor.log(row)
                progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{rate:.1f}")
            # (under ZeRO-3 every rank runs the forward: it gathers the parameters collectively)
            if t.image_every and state["step"] % t.image_every == 0 and len(group[0].images) and (
                    d.main or zero.partitions_parameters(engine)):
                _grid(cfg, model, group[0], d, monitor, state["step"])
            # No checkpoint right after a skipped step: the last one stays the last good one.
            if (state["step"] % t.ckpt_every == 0 or state["step"] == total_steps) and nonfinite_run == 0:
                _merge_issues(state, issues, d)
                last_ckpt = _save(ckpt_dir, model, optimizer, scheduler, state, t.keep_last, d, engine, groups)
        if epoch_done:
            state["epoch"] += 1
            state["epoch_step"] = 0
    progress.close()
    _merge_issues(state, issues, d)

    summary = {"steps": state["step"], "epochs_started": state["epoch"] + 1, "skipped_steps": state["skipped_steps"],
               "skipped_or_repaired_samples": dict(sorted(state["issues"].items())),
               "output": str(output), "last_checkpoint": str(last_ckpt)}
    with zero.gathered(engine, model):
        if d.main:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()},
                      str(output / "encoder.safetensors"))
    if d.main:
        summary.update(encoder=str(output / "encoder.safetensors"), metrics=str(output / "metrics.csv"),
                       images=str(output / "images"), tensorboard=str(output / "tensorboard"))
        (output / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
        monitor.close()
        _print_summary(summary)
    if engine is not None:
        zero.shutdown()
    else:
        distributed.shutdown()
    return summary


def _train_step(cfg, net, model, group, amp, d, step, issues, engine=None) -> dict:
    """One optimizer step's forward and backward over `accum` micro-batches. Each loss term
    is a mean over the global batch (all micro-batches of all ranks): a micro-batch's term is
    weighed by its share of the global normalizer (mask weights, border pairs, rows), known
    from the masks before any forward, and times the world size, since DDP averages gradients.
    Under DeepSpeed (`engine`) each micro-batch's backward goes through it (not rescaled for
    accumulation: the shares do that) and so does the step."""
    t = cfg.train
    totals, images = Counter(), 0
    usable = []
    for i, batch in enumerate(group):
        issues.update(batch.issues)
        if batch.images.shape[0] == 0:  # every sample of this micro-batch was unusable
            if d.world > 1:  # the other ranks would wait for this one's gradients forever
                raise RuntimeError(f"rank {d.rank}: a micro-batch with no usable sample at step {step}; "
                                   f"clean the data or raise the per-rank batch size")
            continue
        usable.append((i, batch))
    if engine is not None and usable:  # DeepSpeed steps after accum micro-steps: the empty ones are zeros
        for _ in range(len(group) - len(usable)):
            with zero.gathered(engine, model):  # (outside a forward, ZeRO-3 parameters are empty slices)
                engine.backward(sum(p.sum() for p in model.parameters()) * 0.0, scale_wrt_gas=False)
            engine.step()
    masks = [b.masks.to(d.device, non_blocking=True) for _, b in usable]
    names = list(model.loss_weights())  # loss terms, in a fixed order
    norms = [torch.stack([n[name].float() for name in names]) for n in map(model.loss_norms, masks)]
    incubating = bool(norms) and model.incubating
    if norms:
        total = distributed.all_sum(torch.stack(norms).sum(0))
    if incubating:
        # The code table's draws (initialization, restarts) have a generator of their own, seeded
        # by the step alone: the same on every rank and for any accumulation, apart from the forwards'.
        codebook_gen = torch.Generator(device=d.device).manual_seed(sample_seed(t.seed, step, CODEBOOK_STREAM))
        _codebook_step(model, engine, lambda: model.start_step([b.images for _, b in usable], masks, codebook_gen))
    for (i, batch), m, norm in zip(usable, masks, norms):
        images += batch.images.shape[0]
        gen = torch.Generator(device=d.device).manual_seed(t.seed * 1_000_003 + step * t.accum_steps + i)
        sync = i == usable[-1][0] or d.world == 1 or engine is not None
        with (nullcontext() if sync else net.no_sync()), amp:
            out = net(batch.images.to(d.device, non_blocking=True), masks=m, generator=gen)
        share = norm * d.world / total
        share = torch.where(torch.isfinite(share), share, torch.zeros_like(share))
        loss = sum(out["weights"][n] * out[n].float() * share[j] for j, n in enumerate(names))
        if engine is None:
            loss.backward()
        else:
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()  # the optimizer step at the last micro-batch, with clipping
        terms = torch.stack([out[n].detach().float() * share[j] for j, n in enumerate(names)] + [loss.detach()])
        for j, v in enumerate((distributed.all_sum(terms) / d.world).tolist()):
            totals[(names + ["loss"])[j]] += v
    if incubating:
        _codebook_step(model, engine, lambda: model.finish_step(codebook_gen))
    if not images:  # (one process) no usable sample in the whole step
        return {"images": 0}
    if engine is not None:
        norm = engine.get_global_grad_norm()
        return {**totals, "grad_norm": float(norm) if norm is not None else math.nan, "images": images,
                "applied": engine.was_step_applied()}
    params = [p for p in model.parameters() if p.grad is not None]
    if t.clip_grad > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.clip_grad))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
    return {**totals, "grad_norm": grad_norm, "images": images}


def _codebook_step(model, engine, write) -> None:
    """`write` (start_step / finish_step) changes the code table outside a forward: under
    ZeRO-3 with the table gathered, and under ZeRO into the optimizer's copies."""
    with zero.gathered(engine, model, [model.codebook.codes]):
        write()
    if engine is not None:
        zero.take_over(engine, model.updated_in_place())


@torch.no_grad()
def _grid(cfg, model, batch, d, monitor, step):
    was_training = model.training
    model.eval()
    out = model(batch.images.to(d.device), masks=batch.masks.to(d.device))
    model.train(was_training)
    if monitor is not None:
        monitor.reconstruction_grid(step, batch.images.to(d.device), out, cfg.model.patch_size,
                                    cfg.loss.norm_pix, cfg.loss.eps)


def _merge_issues(state: dict, issues: Counter, d) -> None:
    """Adds this rank's new sample issue counts, summed over ranks, to the run's totals."""
    counts = distributed.all_sum(torch.tensor([float(issues.get(r, 0)) for r in REASONS]))
    total = Counter(state["issues"]) + Counter({r: int(c) for r, c in zip(REASONS, counts.tolist()) if c})
    state["issues"] = dict(total)
    issues.clear()


def _save(ckpt_dir, model, optimizer, scheduler, state, keep_last, d, engine=None, groups=None):
    path = ckpt_dir / f"{checkpoint.PREFIX}{state['step']:08d}"
    # under ZeRO every rank takes part in gathering the optimizer state, and in stage 3 the weights
    optim = optimizer.state_dict() if engine is None else zero.optimizer_state(engine, optimizer, groups, d.main)
    with zero.gathered(engine, model):
        if d.main:
            saved = {"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                     "state": dict(state)}
            path = checkpoint.save(ckpt_dir, state["step"], model, saved, keep_last)
    if d.world > 1:
        torch.distributed.barrier()
    return path


def _print_summary(summary: dict) -> None:
    print("\npretraining finished")
    for key in ("steps", "skipped_steps", "output", "last_checkpoint", "encoder", "metrics", "images", "tensorboard"):
        print(f"  {key:<16} {summary[key]}")
    counts = summary["skipped_or_repaired_samples"]
    print("  samples skipped or repaired: " + (", ".join(f"{k}={v}" for k, v in counts.items()) if counts else "none"))
