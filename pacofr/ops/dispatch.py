"""Which implementation runs a fused op.

Each op has backends that declare what they support (xformers style): `available()` says why a
backend cannot run on this machine at all (None when it can), `supports(**inputs)` lists every
reason it cannot take these inputs (empty when it can). The choice: `PACOFR_OPS=reference|triton`
forces one (for the ops that have it); otherwise CUDA tensors (or CPU tensors under
`TRITON_INTERPRET=1`) prefer Triton, everything else the torch reference. `explain()` tells which
backend an op would use and every reason the others were rejected.
"""

import functools
import importlib
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..kernels import interpreting as triton_interpreting

from .checks import autocasting


def triton_available() -> str | None:
    """Why Triton kernels cannot run here, or None. (Set TRITON_INTERPRET=1 before the first
    import of triton to run them on CPU.)"""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and not triton_interpreting():
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU)"
    return None


@functools.cache  # (fixed once triton is imported)
def _interpreter_on() -> bool:
    """Whether triton's own helpers (tl.cdiv, ...) were built for its interpreter: it reads
    TRITON_INTERPRET as it is first imported, and kernels built later call them."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.cdiv, InterpretedFunction)


def _always() -> str | None:
    return None


def _anything(**_inputs) -> list[str]:
    return []


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    available: Callable[[], str | None] = _always
    supports: Callable[..., list[str]] = _anything
    extra: dict[str, Callable] = field(default_factory=dict)  # further entry points (fast paths), by name


_BACKENDS: dict[str, dict[str, Backend]] = {}
KNOWN = ("reference", "native", "triton")


def _outside_autocast(fn: Callable) -> Callable:
    """An implementation sets its own precision (fp32 accumulation): torch ops inside it, the
    reference's matmuls included, must not be autocast. Inputs were cast before the call."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if not autocasting(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return call


def register(op: str, backend: Backend) -> None:
    backend = replace(backend, forward=_outside_autocast(backend.forward), backward=_outside_autocast(backend.backward),
                      extra={name: _outside_autocast(fn) for name, fn in backend.extra.items()})
    _BACKENDS.setdefault(op, {})[backend.name] = backend
    _order.cache_clear()


def register_triton(op: str, supports: Callable[..., list[str]], extra: tuple[str, ...] = ()) -> None:
    """The Triton backend of `op`: `<op>_forward`, `<op>_backward` and `<op>_<name>` for each
    name of `extra` in pacofr.kernels.<op>, imported on first call (triton stays optional).
    `supports` adds the op's own limits to the device rule shared by all kernels."""
    def kernel(name: str) -> Callable:
        def call(*args, **kwargs):
            return getattr(importlib.import_module(f"pacofr.kernels.{op}"), f"{op}_{name}")(*args, **kwargs)
        return call

    def check(**inputs) -> list[str]:
        device = next(t.device for t in inputs.values() if isinstance(t, torch.Tensor))
        reasons = []
        if device.type == "cpu" and not triton_interpreting():
            reasons.append("CPU tensors need TRITON_INTERPRET=1")
        elif device.type == "cpu" and not _interpreter_on():
            reasons.append("TRITON_INTERPRET=1 was set after triton was imported (it reads it once): set it before")
        return reasons + supports(**inputs)

    register(op, Backend("triton", kernel("forward"), kernel("backward"), triton_available, check,
                         {name: kernel(name) for name in extra}))


def backends(op: str) -> list[str]:
    """Names of the backends of `op` that can run on this machine."""
    return [name for name, b in _BACKENDS[op].items() if b.available() is None]


@functools.cache
def _order(op: str, device_type: str, forced: str | None, interpreting: bool) -> tuple:
    """(name, backend or None, why it cannot run here or None) for the backends of `op` in
    order of preference. Cached: it depends only on the arguments and on what is installed,
    and a call per op call would cost host time on every step."""
    table = _BACKENDS[op]
    if forced and forced not in KNOWN:
        raise ValueError(f"PACOFR_OPS={forced!r}: known backends are {', '.join(KNOWN)}")
    if forced in table:
        names = [forced]
    else:  # not forced, or forced to a backend this op does not have yet
        first = "triton" if device_type == "cuda" or interpreting else "reference"
        names = [first] + [name for name in table if name != first]
    return tuple((name, table.get(name), "not built yet" if name not in table else table[name].available())
                 for name in names)


def _choose(op: str, device: torch.device, inputs: dict) -> tuple[Backend | None, list[str]]:
    rejected = []
    for name, backend, unavailable in _order(op, device.type, os.environ.get("PACOFR_OPS"), triton_interpreting()):
        reasons = [unavailable] if unavailable else backend.supports(**inputs) if inputs else []
        if not reasons:
            return backend, rejected
        rejected.append(f"{name}: {', '.join(reasons)}")
    return None, rejected


def choose(op: str, device: torch.device, **inputs) -> Backend:
    backend, rejected = _choose(op, device, inputs)
    if backend is None:
        raise RuntimeError(f"no backend of {op} can run these inputs ({'; '.join(rejected)})")
    return backend


def explain(op: str, device: torch.device | str = "cpu", **inputs) -> str:
    """One line: the backend `op` would use for these inputs (the op's own keyword arguments:
    q, k, v, ... as its backends' checks take them), and every reason each other one was not."""
    if op not in _BACKENDS:
        raise ValueError(f"explain: unknown op {op!r} (known: {', '.join(sorted(_BACKENDS))})")
    backend, rejected = _choose(op, torch.device(device), inputs)
    chosen = backend.name if backend is not None else "none"
    return f"{op}: {chosen}" + (f" (rejected {'; '.join(rejected)})" if rejected else "")
