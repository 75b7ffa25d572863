"""One strategy per way of running: one process, DDP, DeepSpeed ZeRO (zero.py).

A strategy owns the wrapped model and the optimizer, and gives the trainer what it needs:
`net` (what the forward runs through), `sync(last)` (the context of a micro-batch's forward),
`backward`, `step`, the optimizer's state for a checkpoint and its loading, `gathered` (every
parameter whole on every rank), `take_over` (values written into parameters outside the
optimizer), `restart_group` and `shutdown`. The trainer has no branch on how it runs.
"""

import math
from contextlib import nullcontext
from pathlib import Path

import torch

from . import distributed


class SingleProcess:
    """Plain autograd and torch's optimizer, with gradient-norm clipping."""

    partitions_parameters = False  # (ZeRO-3 holds only a slice of each parameter)

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float):
        self.model, self.optimizer, self.clip_grad = model, optimizer, clip_grad
        self.net = model
        self.groups = [list(g["params"]) for g in optimizer.param_groups]

    def sync(self, last: bool):
        return nullcontext()

    def pad_micro_steps(self, count: int) -> None:
        """`count` micro-batches of the step had no usable sample (only ZeRO counts them)."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, loss_finite: bool) -> tuple[bool, float]:
        """(applied, gradient norm): the optimizer steps when the loss and the gradients are
        finite; the gradients are cleared either way."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip_grad > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_grad))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        applied = loss_finite and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied, grad_norm

    def discard_step(self) -> None:
        """A step without any usable sample."""
        self.optimizer.zero_grad(set_to_none=True)

    def gathered(self, params: list[torch.nn.Parameter] | None = None):
        return nullcontext()

    def take_over(self, updates: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        """The parameters are the optimizer's own: what was written to them stays."""

    def restart_group(self, group: int) -> None:
        """AdamW's state of a param group dropped: its next step starts it again."""
        for p in self.groups[group]:
            self.optimizer.state.pop(p, None)

    def optimizer_state(self, main: bool) -> dict | None:
        return self.optimizer.state_dict() if main else None

    def load_optimizer_state(self, saved: dict, where: Path) -> None:
        self.optimizer.load_state_dict(saved)

    def shutdown(self) -> None:
        distributed.shutdown()


class DataParallel(SingleProcess):
    """DDP over the ranks: gradients averaged at the step's last micro-batch."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float):
        super().__init__(model, optimizer, clip_grad)
        # unused parameters: the code table gets no gradient during incubation
        self.net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    def sync(self, last: bool):
        return nullcontext() if last else self.net.no_sync()


def make(model: torch.nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float, world: int,
         ds_config: dict | None, device: torch.device, direct_parameters: list[torch.nn.Parameter]):
    """The strategy for this run: ZeRO when a DeepSpeed config is given, else DDP over
    several ranks, else one process. `direct_parameters` are read by the forward outside their
    module's own forward (ZeRO-3 gathers them with the model's)."""
    if ds_config is not None:
        from .zero import ZeRO

        return ZeRO(model, optimizer, ds_config, device, direct_parameters)
    if world > 1:
        return DataParallel(model, optimizer, clip_grad)
    return SingleProcess(model, optimizer, clip_grad)
