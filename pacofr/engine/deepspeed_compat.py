"""Every use of DeepSpeed's internals, in one place, for the versions it was tested with.

pacofr keeps its checkpoints in the layout of one plain process (pacofr/engine/zero.py), which
needs the ZeRO optimizers' flat fp32 partitions and two repairs of DeepSpeed defects. Those
touch private attributes, which a DeepSpeed release may change without notice: so the installed
version is checked against the tested range before an engine is made.
"""

import os

import torch

from ..config import ConfigError

TESTED = ((0, 19, 8), (0, 20, 0))  # [lowest, first untested)
REQUIREMENT = "deepspeed>=0.19.8,<0.20"
UNTESTED_OK = "PACOFR_UNTESTED_DEEPSPEED"  # =1 runs another version anyway, at the user's risk


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def import_deepspeed():
    """The deepspeed module, or a ConfigError saying what to install."""
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(f"train.deepspeed needs DeepSpeed: pip install '{REQUIREMENT}' "
                          f"(or pip install 'pacofr[deepspeed]')") from None
    check_version(deepspeed.__version__)
    return deepspeed


def check_version(version: str) -> None:
    lo, hi = TESTED
    if not lo <= _version(version) < hi and os.environ.get(UNTESTED_OK) != "1":
        raise ConfigError(f"DeepSpeed {version} is outside the tested range ({REQUIREMENT}), and resuming relies on "
                          f"its internals: pip install '{REQUIREMENT}' (or set {UNTESTED_OK}=1 to try it anyway)")


def partitions_parameters(engine) -> bool:
    """Stage 3: a rank holds only its slice of each parameter outside the forward."""
    return engine.zero_optimization_stage() == 3


def flat_partitions(engine, group: int) -> list[torch.Tensor]:
    """The flat fp32 partitions this rank steps for a param group (stage 3 may split a group
    into several sub-groups)."""
    opt = engine.optimizer
    if partitions_parameters(engine):
        return [f for i, f in enumerate(opt.fp32_partitioned_groups_flat) if opt.sub_group_to_group_id[i] == group]
    return [opt.single_partition_of_fp32_groups[group]]


def partition_states(engine) -> dict:
    """The torch optimizer's per-tensor state, keyed by the flat partitions."""
    return engine.optimizer.optimizer.state


def relink_states(engine) -> None:
    """Stages 1-2: each parameter's views into the optimizer state of its flat partition made
    again. DeepSpeed makes them once, right after its first step of the first param group,
    when the other groups have no state yet: their parameters would never see it."""
    if not partitions_parameters(engine):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def set_stage3_state(engine, p: torch.nn.Parameter, value: torch.Tensor, key: str) -> None:
    """Stage 3: this rank's part of a parameter's optimizer state `key` from its full value,
    the last rank's part cut to the parameter's end: DeepSpeed's own setter reads past it when
    the size does not divide by the rank count (and fails on that rank alone)."""
    opt = engine.optimizer
    part, _ = opt._get_fp32_opt_state_partition(p, False, key)
    start = part.numel() * opt._get_param_partition_rank(p)
    n = max(0, min(part.numel(), p.ds_numel - start))  # (ds_numel: the full size)
    part[:n].copy_(value.flatten()[start:start + n])


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """A parameter's shape (under stage 3, p itself is this rank's slice)."""
    return tuple(getattr(p, "ds_shape", p.shape))
