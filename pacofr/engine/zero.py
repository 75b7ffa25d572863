"""The DeepSpeed ZeRO strategy (`train.deepspeed`: a DeepSpeed JSON config, e.g. zero2).

DeepSpeed partitions the optimizer states (stage 1), the gradients (stage 2) and the parameters
(stage 3) over the ranks and averages gradients as DDP does. Everything else stays pacofr's,
so a ZeRO run gives the losses of a DDP or single-process run: the batch sizes, accumulation
and clipping (train.*, written into the DeepSpeed config), the AdamW groups and their
schedule, bf16 autocast on CUDA with fp32 weights, the loss normalization, and the
checkpoints (the optimizer state gathered whole, as one process keeps it: optimizer_state,
load_optimizer_state). A step whose gradients are not finite is skipped by DeepSpeed and
counted by the loop.

What a task does outside the optimizer goes through here: values it writes into parameters in
place (pretraining's code table during incubation) go into ZeRO's own copies (`take_over`);
under stage 3 the parameters the forward reads outside their module's forward (the code tables
the fused ops take) are gathered with the model's, and the full weights are gathered for
checkpoints and reconstruction grids. DeepSpeed's internals are reached only through
deepspeed_compat.
"""

import contextlib
import json
import math
import os
import socket
from pathlib import Path

import torch

from ..config import Config, ConfigError
from . import deepspeed_compat as compat

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



# AdamW's per-element state; its step count is one per param group under ZeRO.
MOMENTS = ("exp_avg", "exp_avg_sq")


def _join_process_group(backend: str) -> None:
    """DeepSpeed's communication needs a process group: a single process gets a group of one
    on a free local port (launchers make theirs)."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")  # which DeepSpeed reads


def stepped_groups(saved: dict, groups: list[list[torch.nn.Parameter]], where: Path) -> list[float | None]:
    """Each param group's step count in an AdamW state_dict() (None: no state yet), or a
    ConfigError when ZeRO cannot hold it: other groups, or parameters of a group stepped
    unequally (ZeRO keeps one count per group; a group's parameters all have a state with the
    same count, or none has one: the code table during incubation, from a run without ZeRO)."""
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(params) for params in groups]:
        raise ConfigError(f"{where}: its optimizer state has param groups of {sizes} parameters, the model "
                          f"{[len(params) for params in groups]}")
    counts = []
    for g, kept in enumerate(saved["param_groups"]):
        steps = [float(saved["state"][i]["step"]) for i in kept["params"] if i in saved["state"]]
        if steps and (len(set(steps)) > 1 or len(steps) < len(kept["params"])):
            raise ConfigError(f"{where}: the parameters of param group {g} were stepped {sorted(set(steps))} times "
                              f"({len(kept['params']) - len(steps)} never); ZeRO keeps one count per group")
        counts.append(steps[0] if steps else None)
    return counts


class ZeRO:
    """DeepSpeed's engine around the model and pacofr's optimizer (whose param groups, and so
    the lr the scheduler sets, the ZeRO optimizer steps). DeepSpeed steps at every micro-batch's
    backward (managed accumulation: it applies the step at the last), with clipping, and skips
    a step whose gradients are not finite."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict,
                 device: torch.device, direct_parameters: list[torch.nn.Parameter]):
        deepspeed = compat.import_deepspeed()
        backend = "nccl" if device.type == "cuda" else "gloo"
        _join_process_group(backend)
        deepspeed.init_distributed(dist_backend=backend)
        self.model, self.optimizer = model, optimizer
        self.groups = [list(g["params"]) for g in optimizer.param_groups]  # (before ZeRO flattens them)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.net = self.engine
        self.partitions_parameters = compat.partitions_parameters(self.engine)
        for p in direct_parameters if self.partitions_parameters else []:
            deepspeed.zero.register_external_parameter(model, p)

    def sync(self, last: bool):
        return contextlib.nullcontext()

    def pad_micro_steps(self, count: int) -> None:
        """DeepSpeed applies the step after accum micro-steps: empty micro-batches count as zeros."""
        for _ in range(count):
            with self.gathered():  # (outside a forward, ZeRO-3 parameters are empty slices)
                self.engine.backward(sum(p.sum() for p in self.model.parameters()) * 0.0, scale_wrt_gas=False)
            self.engine.step()

    def backward(self, loss: torch.Tensor) -> None:
        # not rescaled for accumulation: the trainer's shares of the global batch do that
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self, loss_finite: bool) -> tuple[bool, float]:
        """DeepSpeed stepped already, unless the gradients were not finite."""
        norm = self.engine.get_global_grad_norm()
        return loss_finite and self.engine.was_step_applied(), float(norm) if norm is not None else math.nan

    def discard_step(self) -> None:
        """A step without any usable sample made no micro-step."""

    def gathered(self, params: list[torch.nn.Parameter] | None = None):
        """A context in which every rank holds the model's full parameters (or `params`; under
        stage 3; entered by all ranks), for its state dict or a forward outside the engine. What
        is written to them there is dropped at its end (see take_over)."""
        if not self.partitions_parameters:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()) if params is None else params,
                                                 modifier_rank=None)

    def take_over(self, updates: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        """Values written into parameters in place into ZeRO's fp32 master copy, which the next
        step would otherwise copy back over them, and under stage 3 into each rank's slice (the
        gathered parameter they were written to is gone)."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        for p, value in updates:
            if self.partitions_parameters:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(value)
            safe_set_full_fp32_param(p, value)

    def restart_group(self, group: int) -> None:
        """AdamW's step count and moments of a param group back to zero, on this rank's
        partition. ZeRO steps every group every step, gradient or not, while torch's AdamW skips a
        parameter without one (the code table during incubation): at the end of incubation the
        code table's moments are zero either way, and its step count now starts again, as in a
        DDP run, so that its first updates are bias-corrected alike."""
        states = compat.partition_states(self.engine)
        for flat in compat.flat_partitions(self.engine, group):
            for value in states.get(flat, {}).values():
                value.zero_()

    def optimizer_state(self, main: bool) -> dict | None:
        """The optimizer's state_dict() as one process without ZeRO would write it (full moments
        per parameter, in the param groups' order before ZeRO flattened them), assembled from
        every rank's partition, on the CPU of the `main` rank (None elsewhere). Collective: every
        rank calls it. So a checkpoint resumes with any rank count, with ZeRO or without."""
        from deepspeed.utils import safe_get_full_optimizer_state

        compat.relink_states(self.engine)
        states = compat.partition_states(self.engine)
        state, param_groups, index = {}, [], 0
        for g, (group, params) in enumerate(zip(self.optimizer.param_groups, self.groups)):
            # ZeRO steps every group at every applied step: all groups have a state once a step
            # was applied, none before (the same on every rank)
            step = states.get(compat.flat_partitions(self.engine, g)[0], {}).get("step")
            for j, p in enumerate(params if step is not None else []):
                moments = {key: safe_get_full_optimizer_state(p, key) for key in MOMENTS}  # (all ranks take part)
                if main:
                    state[index + j] = {"step": step.detach().clone().cpu(), **{k: v.cpu() for k, v in moments.items()}}
            param_groups.append({**{k: v for k, v in group.items() if k != "params"},
                                 "params": list(range(index, index + len(params)))})
            index += len(params)
        return {"state": state, "param_groups": param_groups} if main else None

    def load_optimizer_state(self, saved: dict, where: Path) -> None:
        """A state_dict() of pacofr's AdamW (from optimizer_state, or from a run without ZeRO, any
        rank count) into this rank's partitions."""
        counts = stepped_groups(saved, self.groups, where)
        states = compat.partition_states(self.engine)
        for g, (group, kept, step) in enumerate(zip(self.optimizer.param_groups, saved["param_groups"], counts)):
            group.update({k: v for k, v in kept.items() if k != "params"})  # lr, betas, ... as torch's loader does
            # AdamW's lazily made state, made now to be written into (the step where torch keeps it)
            on_device = group.get("capturable") or group.get("fused")
            for flat in compat.flat_partitions(self.engine, g) if step is not None else []:
                states[flat] = {"step": torch.tensor(step, device=flat.device if on_device else "cpu"),
                                **{key: torch.zeros_like(flat) for key in MOMENTS}}
        compat.relink_states(self.engine)
        for params, kept, step in zip(self.groups, saved["param_groups"], counts):
            for p, i in zip(params, kept["params"]) if step is not None else []:
                shape = compat.full_shape(p)
                for key in MOMENTS:
                    value = saved["state"][i][key]
                    if tuple(value.shape) != shape:
                        raise ConfigError(f"{where}: optimizer state {key} of shape {tuple(value.shape)} for a "
                                          f"parameter of shape {shape}")
                    self._set_full_state(p, value.to(p.device, torch.float32), key)

    def _set_full_state(self, p: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
        if self.partitions_parameters:
            compat.set_stage3_state(self.engine, p, value, key)
        else:
            from deepspeed.utils import safe_set_full_optimizer_state

            safe_set_full_optimizer_state(p, value, key)

    def shutdown(self) -> None:
        """Ends the process group through DeepSpeed, which also forgets the groups it cached (a
        later run in the same process would find them dead)."""
        import deepspeed.comm

        torch.distributed.barrier()
        deepspeed.comm.destroy_process_group()
