"""Which implementation runs a fused op.

Each op has backends that declare what they support (xformers style): `available()` says why a
backend cannot run on this machine at all, `supports(**inputs)` why it cannot take these inputs
(both return None when they can). The choice: `PACOFR_OPS=reference|triton` forces one
(for the ops that have it); otherwise CUDA tensors (or CPU tensors under `TRITON_INTERPRET=1`) prefer Triton, everything
else the torch reference. `explain()` tells which backend an op would use and why the others
were rejected.
"""

import functools
import importlib
import operator
import os
from dataclasses import dataclass, replace
from typing import Callable

import torch


def _autocasting(device_type: str) -> bool:
    """Autocast is on for this device type (never for types it does not know, such as meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_inputs(device_type: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the floating inputs in autocast's dtype, as torch.mm would take them:
    a bf16 activation against fp32 parameters then runs the bf16 kernel, not the fp32 one.
    The cast is differentiable, so gradients reach fp32 parameters in fp32."""
    if not _autocasting(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)  # float64 is left alone, as autocast does
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(op: str, **tensors: torch.Tensor) -> None:
    """The named tensors are floating (fp16, bf16, fp32, fp64) and on one device, or a
    TypeError / ValueError names the one that is not: an integer input would otherwise be
    truncated or read as garbage, a foreign device handed to a kernel as a pointer."""
    for name, t in tensors.items():
        if t.dtype not in FLOATING:
            raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: inputs on different devices: " + ", ".join(f"{k} on {v}" for k, v in devices.items()))


def as_int(op: str, name: str, value) -> int:
    """An integer argument (Python or NumPy int), or a TypeError naming it: a float or a bool
    would be truncated in silence."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {value!r}") from None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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


def _anything(**_inputs) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    available: Callable[[], str | None] = _always
    supports: Callable[..., str | None] = _anything


_BACKENDS: dict[str, dict[str, Backend]] = {}
KNOWN = ("reference", "triton")


def _outside_autocast(fn: Callable) -> Callable:
    """An implementation sets its own precision (fp32 accumulation): torch ops inside it, the
    reference's matmuls included, must not be autocast. Inputs were cast before the call."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if not _autocasting(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return call


def register(op: str, backend: Backend) -> None:
    backend = replace(backend, forward=_outside_autocast(backend.forward), backward=_outside_autocast(backend.backward))
    _BACKENDS.setdefault(op, {})[backend.name] = backend
    _order.cache_clear()


def register_triton(op: str, supports: Callable[..., str | None]) -> None:
    """The Triton backend of `op`: `<op>_forward` / `<op>_backward` of pacofr.kernels.<op>,
    imported on first call (triton stays optional). `supports` adds the op's own limits to
    the device rule shared by all kernels."""
    def kernel(name: str) -> Callable:
        def call(*args, **kwargs):
            return getattr(importlib.import_module(f"pacofr.kernels.{op}"), f"{op}_{name}")(*args, **kwargs)
        return call

    def check(**inputs) -> str | None:
        device = next(t.device for t in inputs.values() if isinstance(t, torch.Tensor))
        if device.type == "cpu" and not triton_interpreting():
            return "CPU tensors need TRITON_INTERPRET=1"
        if device.type == "cpu" and not _interpreter_on():
            return "TRITON_INTERPRET=1 was set after triton was imported (it reads it once): set it before"
        return supports(**inputs)

    register(op, Backend("triton", kernel("forward"), kernel("backward"), triton_available, check))


def first_order(op: str) -> Callable:
    """Decorates an autograd backward to refuse create_graph=True: the kernels' backwards are
    not differentiable, and their gradients would silently leave the op out of a
    second-order gradient."""
    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def call(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"{op}: gradients of gradients (create_graph=True) are not supported")
            return backward(ctx, *grads)
        return call
    return decorate


def with_eager_path(custom_op: Callable, run: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """`custom_op` under torch.compile, which needs it (fake impl, one graph node); otherwise
    the same computation `run` with the same autograd as a plain torch.autograd.Function,
    which skips the custom op's per-call Python dispatch: 0.1-0.2 ms of host time per forward
    and backward on a 2-core CPU (benchmarks/host_overhead.py), which a GPU spends waiting.
    Differentiable once (see `first_order`)."""
    def forward(ctx, *inputs):
        output = run(*inputs)
        setup_context(ctx, inputs, output)
        return output

    # named after the op's module, so that grad_fn reads e.g. MaskedAttentionBackward
    op = run.__module__.rsplit(".", 1)[-1]
    name = "".join(word.title() for word in op.split("_"))
    Eager = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                    "backward": staticmethod(first_order(op)(backward))})

    def call(*inputs):
        return custom_op(*inputs) if torch.compiler.is_compiling() else Eager.apply(*inputs)
    return call


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
    for name, backend, reason in _order(op, device.type, os.environ.get("PACOFR_OPS"), triton_interpreting()):
        if reason is None and inputs:
            reason = backend.supports(**inputs)
        if reason is None:
            return backend, rejected
        rejected.append(f"{name}: {reason}")
    return None, rejected


def choose(op: str, device: torch.device, **inputs) -> Backend:
    backend, rejected = _choose(op, device, inputs)
    if backend is None:
        raise RuntimeError(f"no backend of {op} can run these inputs ({'; '.join(rejected)})")
    return backend


def explain(op: str, device: torch.device | str = "cpu", **inputs) -> str:
    """One line: the backend `op` would use for these inputs (the op's own keyword arguments:
    q, k, v, ... as its backends' checks take them), and why the others were not."""
    if op not in _BACKENDS:
        raise ValueError(f"explain: unknown op {op!r} (known: {', '.join(sorted(_BACKENDS))})")
    backend, rejected = _choose(op, torch.device(device), inputs)
    chosen = backend.name if backend is not None else "none"
    return f"{op}: {chosen}" + (f" (rejected {'; '.join(rejected)})" if rejected else "")
