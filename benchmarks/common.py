"""Helpers shared by the benchmark cases, the suites and the scripts: the device, forcing a
backend, naming a launch configuration, gradients without accumulation, the CPU's name."""

import os
import platform
from contextlib import contextmanager

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def forced_backend(name: str):
    """PACOFR_OPS=name for the calls inside (the fused op's public entry, dispatch included)."""
    old = os.environ.get("PACOFR_OPS")
    os.environ["PACOFR_OPS"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PACOFR_OPS")
        else:
            os.environ["PACOFR_OPS"] = old


# Launch options and their words in config_name: flags, then options with a value.
_FLAGS = {"FLAT": "flat", "FUSED_BWD": "fused", "ATOMIC_DQ": "atomic", "PACKED": "packed", "PRELOAD": "preload"}
_VALUES = {"maxnreg": "r", "DKDV_MAXNREG": "dkdv-r"}
# the words of the options that change only the backward (a forward-only timing repeats the default's)
BACKWARD_ONLY = (f" {_FLAGS['FUSED_BWD']}", f" {_FLAGS['ATOMIC_DQ']}", f" {_VALUES['DKDV_MAXNREG']}")


def config_name(config: dict) -> str:
    """A kernel launch configuration in a few characters: BLOCK_M x BLOCK_N (or the elements
    per program), warps, stages."""
    flags = "".join(f" {word}" for key, word in _FLAGS.items() if config.get(key))
    if "BLOCK" in config:
        return f"{config['BLOCK']} w{config['num_warps']}{flags}"
    flags += "".join(f" {word}{config[key]}" for key, word in _VALUES.items() if config.get(key))
    return f"{config['BLOCK_M']}x{config['BLOCK_N']} w{config['num_warps']} s{config.get('num_stages', 3)}{flags}"


_ONES: dict = {}


def grads_of(out: torch.Tensor, inputs) -> tuple:
    """The gradients of `out` w.r.t. `inputs` for an upstream gradient of ones, returned, not
    accumulated into .grad: accumulating would add a read-modify-write of every gradient to
    each timed call, the same for every implementation, and hide their differences."""
    key = (tuple(out.shape), out.dtype, out.device)
    if key not in _ONES:
        _ONES[key] = torch.ones_like(out)
    return torch.autograd.grad(out, inputs, _ONES[key])


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
