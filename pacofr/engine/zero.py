"""DeepSpeed ZeRO for the pretraining loop (`train.deepspeed`: a DeepSpeed JSON config, e.g.
configs/zero2.json).

DeepSpeed partitions the optimizer states (stage 1), the gradients (stage 2) and the parameters
(stage 3) over the ranks and averages gradients as DDP does. Everything else stays pacofr's,
so a ZeRO run gives the losses of a DDP or single-process run: the batch sizes, accumulation
and clipping (train.*, written into the DeepSpeed config), the AdamW groups and their
schedule, bf16 autocast on CUDA with fp32 weights, the loss normalization, and the
checkpoints (the optimizer state gathered whole, as one process keeps it: optimizer_state,
load_optimizer_state). A step whose gradients are not finite is skipped by DeepSpeed and
counted by the loop.

What the model does outside the optimizer goes through here: during incubation it writes the
code table in place (PaCoFR.updated_in_place), which ZeRO's own copies take over; under stage 3
the parameters it reads outside their module's forward (PaCoFR.direct_parameters: the code
tables the fused ops take) are gathered with the model's, and the full weights are gathered
for checkpoints and reconstruction grids.
"""

import contextlib
import json
import os
from pathlib import Path

import torch

from ..config import Config, ConfigError

_PRECISION = "precision is pacofr's: bf16 autocast on CUDA with fp32 weights, gradients and their sums"
# Sections of a DeepSpeed config that pacofr sets itself, and why.
_REFUSED = {
    "optimizer": "the optimizer is pacofr's AdamW (train.blr, beta1, beta2, weight_decay)",
    "scheduler": "the schedule is pacofr's warmup + cosine (train.warmup_epochs, min_lr)",
    "fp16": _PRECISION, "bf16": _PRECISION, "torch_autocast": _PRECISION, "data_types": _PRECISION,
    "communication_data_type": _PRECISION,
}
# Settings the loop relies on: (section or None for the top level, key, the value it needs, why).
_REQUIRED = [
    (None, "managed_gradient_accumulation", True, "DeepSpeed steps once per train.accum_steps micro-batches"),
    ("zero_optimization", "compute_grad_norm", True, "a step with non-finite gradients is found by their norm"),
]


def _partition_file(directory: Path, rank: int) -> Path:
    return Path(directory) / f"zero-rank{rank:05d}.pt"


def config(path: str, cfg: Config, per_rank: int) -> dict:
    """The DeepSpeed config at `path` with pacofr's batch sizes, accumulation and clipping
    written in; values that disagree with them (other than "auto") and sections pacofr sets
    itself fail with the key's name."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"train.deepspeed: no such file: {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed: {path} is not JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"train.deepspeed: {path} must hold a JSON object")
    t = cfg.train
    ours = {"train_batch_size": t.batch_size, "train_micro_batch_size_per_gpu": per_rank,
            "gradient_accumulation_steps": t.accum_steps, "gradient_clipping": float(t.clip_grad)}
    for key, value in ours.items():
        if raw.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"{path}: {key}={raw[key]!r} disagrees with pacofr's config ({value}); "
                              f"set it through train.* or write \"auto\"")
    for key, why in _REFUSED.items():
        section = raw.get(key)
        if section is not None and (not isinstance(section, dict) or section.get("enabled", True)):
            raise ConfigError(f"{path}: remove \"{key}\": {why}")
    for section, key, value, why in _REQUIRED:
        where = raw if section is None else raw.get(section, {})
        if where.get(key, value) != value:
            raise ConfigError(f"{path}: {key} must be {json.dumps(value)} ({why})")
    stage = raw.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage={stage} is not supported (1, 2 or 3; stage 0 is "
                          f"plain data parallelism: run without train.deepspeed)")
    return {"steps_per_print": 2**31 - 1, **raw, **ours,
            "zero_allow_untested_optimizer": True}  # a torch AdamW: its state partitions as DeepSpeed's own


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, device: torch.device):
    """The DeepSpeed engine around the model and pacofr's optimizer (whose param groups, and so
    the lr the scheduler sets, the ZeRO optimizer steps). Joins DeepSpeed's communication to the
    process group (a single process gets a group of one)."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("train.deepspeed needs DeepSpeed: pip install deepspeed") from None
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():  # one process: a group of one on a free local port
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # which DeepSpeed reads (launchers set it)
    deepspeed.init_distributed(dist_backend=backend)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if partitions_parameters(engine):
        for p in model.direct_parameters():
            deepspeed.zero.register_external_parameter(model, p)
    return engine


def partitions_parameters(engine) -> bool:
    """Stage 3: a rank holds only its slice of each parameter outside the forward."""
    return engine is not None and engine.zero_optimization_stage() == 3


def gathered(engine, model: torch.nn.Module, params: list[torch.nn.Parameter] | None = None):
    """A context in which every rank holds the model's full parameters (or `params`; under
    stage 3; entered by all ranks), for its state dict or a forward outside the engine. What is
    written to them there is dropped at its end (see take_over)."""
    if not partitions_parameters(engine):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()) if params is None else params,
                                             modifier_rank=None)


def take_over(engine, updates: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """Values the model wrote into parameters in place (see PaCoFR.updated_in_place) into
    ZeRO's fp32 master copy, which the next step would otherwise copy back over them, and under
    stage 3 into each rank's slice (the gathered parameter they were written to is gone)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    for p, value in updates:
        if partitions_parameters(engine):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(value)
        safe_set_full_fp32_param(p, value)


def _flats(engine, group: int) -> list[torch.Tensor]:
    """The flat fp32 partitions this rank steps for a param group (stage 3 may split a group
    into several sub-groups)."""
    opt = engine.optimizer
    if partitions_parameters(engine):
        return [f for i, f in enumerate(opt.fp32_partitioned_groups_flat) if opt.sub_group_to_group_id[i] == group]
    return [opt.single_partition_of_fp32_groups[group]]


def restart_moments(engine, group: int) -> None:
    """AdamW's step count and moments of a param group back to zero, on this rank's
    partition. ZeRO steps every group every step, gradient or not, while torch's AdamW skips a
    parameter without one (the code table during incubation): at the end of incubation the
    code table's moments are zero either way, and its step count now starts again, as in a
    DDP run, so that its first updates are bias-corrected alike."""
    for flat in _flats(engine, group):
        for value in engine.optimizer.optimizer.state.get(flat, {}).values():
            value.zero_()


def shutdown() -> None:
    """Ends the process group through DeepSpeed, which also forgets the groups it cached (a
    later run in the same process would find them dead)."""
    import deepspeed.comm

    torch.distributed.barrier()
    deepspeed.comm.destroy_process_group()


# AdamW's per-element state; its step count is one per param group under ZeRO.
MOMENTS = ("exp_avg", "exp_avg_sq")


def _link_states(engine) -> None:
    """Stages 1-2: each parameter's views into the optimizer state of its flat partition made
    again. DeepSpeed makes them once, right after its first step of the first param group,
    when the other groups have no state yet: their parameters would never see it."""
    if not partitions_parameters(engine):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def optimizer_state(engine, optimizer: torch.optim.Optimizer, groups: list[list[torch.nn.Parameter]],
                    main: bool) -> dict | None:
    """The optimizer's state_dict() as one process without ZeRO would write it (full moments
    per parameter, in `groups` order: the param groups' parameters before ZeRO flattened them),
    assembled from every rank's partition, on the CPU of the `main` rank (None elsewhere).
    Collective: every rank calls it. So a checkpoint resumes with any rank count, with ZeRO or
    without."""
    from deepspeed.utils import safe_get_full_optimizer_state

    _link_states(engine)
    state, param_groups, index = {}, [], 0
    for g, (group, params) in enumerate(zip(optimizer.param_groups, groups)):
        # ZeRO steps every group at every applied step: all groups have a state once a step
        # was applied, none before (the same on every rank)
        step = optimizer.state.get(_flats(engine, g)[0], {}).get("step")
        for j, p in enumerate(params if step is not None else []):
            moments = {key: safe_get_full_optimizer_state(p, key) for key in MOMENTS}  # (all ranks take part)
            if main:
                state[index + j] = {"step": step.detach().clone().cpu(), **{k: v.cpu() for k, v in moments.items()}}
        param_groups.append({**{k: v for k, v in group.items() if k != "params"},
                             "params": list(range(index, index + len(params)))})
        index += len(params)
    return {"state": state, "param_groups": param_groups} if main else None


def load_optimizer_state(engine, optimizer: torch.optim.Optimizer, groups: list[list[torch.nn.Parameter]],
                         saved: dict, where: Path) -> None:
    """A state_dict() of pacofr's AdamW (from optimizer_state, or from a run without ZeRO, any
    rank count) into this rank's partitions. ZeRO keeps one step count per param group: a
    group's parameters have a state with the same count, or none has one (the code table during
    incubation, from a run without ZeRO: it gets one at its next step)."""
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(params) for params in groups]:
        raise ConfigError(f"{where}: its optimizer state has param groups of {sizes} parameters, the model "
                          f"{[len(params) for params in groups]}")
    stepped = []
    for g, (group, kept) in enumerate(zip(optimizer.param_groups, saved["param_groups"])):
        group.update({k: v for k, v in kept.items() if k != "params"})  # lr, betas, ... as torch's loader does
        steps = [float(saved["state"][i]["step"]) for i in kept["params"] if i in saved["state"]]
        if steps and (len(set(steps)) > 1 or len(steps) < len(kept["params"])):
            raise ConfigError(f"{where}: the parameters of param group {g} were stepped {sorted(set(steps))} times "
                              f"({len(kept['params']) - len(steps)} never); ZeRO keeps one count per group")
        stepped.append(bool(steps))
        # AdamW's lazily made state, made now to be written into (the step where torch keeps it)
        on_device = group.get("capturable") or group.get("fused")
        for flat in _flats(engine, g) if steps else []:
            optimizer.state[flat] = {"step": torch.tensor(steps[0], device=flat.device if on_device else "cpu"),
                                     **{key: torch.zeros_like(flat) for key in MOMENTS}}
    _link_states(engine)
    for params, kept, has_state in zip(groups, saved["param_groups"], stepped):
        for p, i in zip(params, kept["params"]) if has_state else []:
            shape = tuple(getattr(p, "ds_shape", p.shape))  # (stage 3: p itself is this rank's slice)
            for key in MOMENTS:
                value = saved["state"][i][key]
                if tuple(value.shape) != shape:
                    raise ConfigError(f"{where}: optimizer state {key} of shape {tuple(value.shape)} for a "
                                      f"parameter of shape {shape}")
                _set_full_state(engine, p, value.to(p.device, torch.float32), key)


def _set_full_state(engine, p: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    """This rank's part of a parameter's optimizer state `key` from its full value. Under stage 3
    the last rank's part is cut to the parameter's end: DeepSpeed's own setter reads past it
    when the size does not divide by the rank count (and fails on that rank alone)."""
    if not partitions_parameters(engine):
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(p, value, key)
        return
    opt = engine.optimizer
    part, _ = opt._get_fp32_opt_state_partition(p, False, key)
    start = part.numel() * opt._get_param_partition_rank(p)
    n = max(0, min(part.numel(), p.ds_numel - start))
    part[:n].copy_(value.flatten()[start:start + n])


def load_partition(engine, directory: Path, rank: int, world: int, saved_world: int | None) -> None:
    """Restores this rank's partition from a checkpoint of an earlier layout (one file of
    optimizer partitions per rank, zero-rank<r>.pt), which resumes only with as many ranks as
    wrote it."""
    if saved_world is None:
        raise ConfigError(f"{directory}: not a ZeRO checkpoint (resume it without train.deepspeed)")
    if saved_world != world:
        raise ConfigError(f"{directory}: written by {saved_world} ZeRO ranks; resume it with {saved_world}, "
                          f"not {world}")
    if partitions_parameters(engine) and engine.optimizer.elastic_checkpoint:  # (stage 3 cannot read it then)
        raise ConfigError(f"{directory}: written with zero_optimization.elastic_checkpoint false: resume it so")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # weights_only, with the three plain records DeepSpeed keeps beside the tensors allowed
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        state = torch.load(_partition_file(directory, rank), map_location="cpu", weights_only=True)
    partitions = [None] * world
    partitions[rank] = state  # a rigid checkpoint: each rank reads only its own
    engine.optimizer.load_state_dict(partitions, load_optimizer_states=True, load_from_fp32_weights=True)
