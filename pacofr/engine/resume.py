"""What a resumed run may change from its checkpoint's config.

The keys the checkpoint is tied to (FIXED) are refused, naming them. Every other change is
applied from the resume step on: the optimizer's hyperparameters are the current config's (the
checkpoint's AdamW state keeps its moments and step counts only) and the lr schedule is rebuilt
from the current train.blr, epochs, warmup_epochs and min_lr at the checkpoint's step; the rest
(run length, checkpointing, logging, data, masking, loss weights, the engine) is read from the
config as the run goes.
"""

import torch

from ..config import Config, ConfigError, flat_keys, to_dict

# Keys a checkpoint is tied to (a key or a section, by prefix), and why.
FIXED = {
    "model.": "the weights have the checkpoint's model",
    "train.batch_size": "the data position is counted in batches of the checkpoint's size",
    "train.seed": "the order of the samples, their augmentations and masks are drawn from it",
    "train.incubation_epochs": "the code table's phase and its optimizer's restart follow it",
}
# What the optimizer's param groups take from the config rather than from the checkpoint.
HYPERPARAMETERS = ("initial_lr", "weight_decay", "betas")


def changes(saved: dict, cfg: Config, where) -> list[str]:
    """'key old -> new' of each key the current config changes from the checkpoint's `saved`
    config; a ConfigError naming the FIXED keys it changes. (A key one of the two configs lacks,
    from another pacofr version, is no change.)"""
    old, new = flat_keys(saved), flat_keys(to_dict(cfg))
    changed = [key for key in new if key in old and old[key] != new[key]]
    fixed = [(key, why) for key in changed for prefix, why in FIXED.items() if key.startswith(prefix)]
    if fixed:
        named = "; ".join(f"{key} is {old[key]!r} there, {new[key]!r} now ({why})" for key, why in fixed)
        raise ConfigError(f"--resume {where}: {named}: drop the change, or start a new run in another --output")
    return [f"{key} {old[key]!r} -> {new[key]!r}" for key in changed]


def current_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The param groups' hyperparameters as the current config sets them (before a checkpoint's load)."""
    return [{key: group[key] for key in HYPERPARAMETERS} for group in optimizer.param_groups]


def apply(scheduler: torch.optim.lr_scheduler.LambdaLR, current: list[dict]) -> None:
    """After a checkpoint's optimizer and schedule are loaded: the current hyperparameters, and
    each group's lr as the current schedule gives it at the checkpoint's step (what LambdaLR
    computes: unchanged settings give the checkpoint's lr exactly)."""
    scheduler.base_lrs = [mine["initial_lr"] for mine in current]
    for group, mine, factor in zip(scheduler.optimizer.param_groups, current, scheduler.lr_lambdas):
        group.update(mine)
        group["lr"] = mine["initial_lr"] * factor(scheduler.last_epoch)

