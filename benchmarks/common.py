import os
from contextlib import contextmanager

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def skip_unless_gpu(impl: str, big: bool) -> None:
    """Triton timings only mean something on a GPU (the interpreter runs on CPU), and the
    paper-scale shapes take minutes and gigabytes on CPU."""
    if DEVICE == "cpu" and impl.startswith("triton"):
        pytest.skip("Triton kernels are timed on a CUDA GPU only (the CPU interpreter's times mean nothing)")
    if DEVICE == "cpu" and big:
        pytest.skip("paper-scale shape: GPU only")


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


def rotated(tensors, copies: int = 2) -> list:
    """`copies` sets of the same values at different addresses (the first is `tensors`), so
    consecutive timed calls do not find their inputs in L2."""
    def clone(t):
        return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
    return [tuple(tensors)] + [tuple(clone(t) for t in tensors) for _ in range(copies - 1)]
