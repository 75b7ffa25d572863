"""Process-group setup for `torchrun` / `deepspeed` launches (gloo on CPU, nccl on GPU)."""

import os
import sys
from dataclasses import dataclass

import torch
from torch import distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    """Joins the process group when launched with WORLD_SIZE > 1, else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank() if world > 1 else 0, world, device)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy on the input's device; the input is untouched). Identity in a
    single process. NCCL reduces CUDA tensors only: a CPU tensor makes the trip through the GPU."""
    out = t.detach().clone()
    if dist.is_initialized():
        work = out.cuda() if dist.get_backend() == "nccl" and not out.is_cuda else out
        dist.all_reduce(work)
        out = work.to(t.device)
    return out


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def end_rank(code: int) -> None:
    """In a rank of a launched multi-process run (WORLD_SIZE > 1), exits now with `code`, output
    flushed, past the interpreter's teardown: there gloo's threads, still joinable after
    destroy_process_group, can abort a run that succeeded ("terminate called without an active
    exception", exit -6). Elsewhere (one process, a caller in Python) it returns."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
