"""Which implementation runs a fused op.

Each op has backends that declare what they support (xformers style): `available()` says why a
backend cannot run on this machine at all (None when it can), `supports(**inputs)` lists every
reason it cannot take these inputs (empty when it can). The order they are tried in comes from
the dispatch table (dispatch_table.json beside this file): for each op, device and class of
shapes, the backends fastest first as measured on that device, with the measurement behind
the order; `benchmarks/dispatch_table.py` refreshes it from the benchmark results.
`PACOFR_OPS=reference|native|triton|sdpa|compiled` forces one (for the ops that have it); CPU tensors
under `TRITON_INTERPRET=1` prefer Triton (the kernels' tests). `explain()` tells which backend
an op would use, the measurement that ranked it first, and every reason the others were
rejected.
"""

import functools
import importlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
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
    """`forward` and `backward` run inside the op's custom op. A backend that is a plain
    torch computation autograd differentiates by itself (SDPA) gives `differentiable` instead:
    the op then calls it in place of its custom op (SDPA, the torch.compile'd reference loss)."""
    name: str
    forward: Callable | None
    backward: Callable | None
    available: Callable[[], str | None] = _always
    supports: Callable[..., list[str]] = _anything
    extra: dict[str, Callable] = field(default_factory=dict)  # further entry points (fast paths), by name
    differentiable: Callable | None = None


_BACKENDS: dict[str, dict[str, Backend]] = {}
KNOWN = ("reference", "native", "triton", "sdpa", "compiled")


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
    wrap = lambda fn: fn and _outside_autocast(fn)  # noqa: E731
    backend = replace(backend, forward=wrap(backend.forward), backward=wrap(backend.backward),
                      extra={name: wrap(fn) for name, fn in backend.extra.items()})
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


# The dispatch table's rows: op, device, when (the shape class: `grad`, the inputs need a
# gradient; `n_max`/`n_min`, bounds on the op's size n), order, measured. Read once, at import
# (torch.compile traces the dispatch, not file reads).
TABLE = tuple(json.loads(Path(__file__).with_name("dispatch_table.json").read_text())["rows"])


# n, the size a row's bounds apply to: the codebook search's rows, attention's sequence length
SIZE = {"codebook_topk": lambda i: i["x"].shape[0], "masked_attention": lambda i: i["q"].shape[2]}


def _row(op: str, device_type: str, inputs: dict) -> int | None:
    """Index of the first table row that applies to these inputs, or None."""
    n = SIZE[op](inputs) if op in SIZE and inputs else None
    grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs.values())
    return _row_of(op, device_type, n, grad)


@functools.cache  # (a handful of keys per run: the table scan stays off the per-call path)
def _row_of(op: str, device_type: str, n: int | None, grad: bool) -> int | None:
    for i, row in enumerate(TABLE):
        when = row.get("when", {})
        if row["op"] != op or row["device"] != device_type or ("grad" in when and when["grad"] != grad):
            continue
        if n is not None and not when.get("n_min", 0) <= n <= when.get("n_max", n):
            continue
        return i
    return None


@functools.cache
def _order(op: str, device_type: str, row: int | None, forced: str | None, interpreting: bool) -> tuple:
    """(name, backend or None, why it cannot run here or None) for the backends of `op` in
    order of preference. Cached: it depends only on the arguments and on what is installed,
    and a call per op call would cost host time on every step."""
    backends = _BACKENDS[op]
    if forced and forced not in KNOWN:
        raise ValueError(f"PACOFR_OPS={forced!r}: known backends are {', '.join(KNOWN)}")
    if forced in backends:
        names = [forced]
    else:  # not forced, or forced to a backend this op does not have yet
        names = list(TABLE[row]["order"]) if row is not None else ["reference"]
        if interpreting and device_type != "cuda":
            names = ["triton"] + [name for name in names if name != "triton"]
        names += [name for name in backends if name not in names]
    return tuple((name, backends.get(name), "not built yet" if name not in backends else backends[name].available())
                 for name in names)


def _choose(op: str, device: torch.device, inputs: dict, outside: bool) -> tuple[Backend | None, list[str], int | None]:
    rejected = []
    row = _row(op, device.type, inputs)
    for name, backend, unavailable in _order(op, device.type, row, os.environ.get("PACOFR_OPS"), triton_interpreting()):
        reasons = [unavailable] if unavailable else backend.supports(**inputs) if inputs else []
        if not reasons and not outside and backend.forward is None:
            reasons = ["runs outside the op's custom op only (autograd differentiates it)"]
        if not reasons:
            return backend, rejected, row
        rejected.append(f"{name}: {', '.join(reasons)}")
    return None, rejected, row


def choose(op: str, device: torch.device, outside: bool = False, **inputs) -> Backend:
    """The backend that runs `op` on these inputs. `outside`: the op's public function asks,
    before its custom op, and may take a backend that autograd differentiates by itself."""
    backend, rejected, _ = _choose(op, device, inputs, outside)
    if backend is None:
        raise RuntimeError(f"no backend of {op} can run these inputs ({'; '.join(rejected)})")
    return backend


def explain(op: str, device: torch.device | str = "cpu", **inputs) -> str:
    """One line: the backend `op` would use for these inputs (the op's own keyword arguments:
    q, k, v, ... as its backends' checks take them), and every reason each other one was not."""
    if op not in _BACKENDS:
        raise ValueError(f"explain: unknown op {op!r} (known: {', '.join(sorted(_BACKENDS))})")
    backend, rejected, row = _choose(op, torch.device(device), inputs, outside=True)
    chosen = backend.name if backend is not None else "none"
    why = f" [measured: {TABLE[row]['measured']}]" if row is not None and "PACOFR_OPS" not in os.environ else ""
    return f"{op}: {chosen}{why}" + (f" (rejected {'; '.join(rejected)})" if rejected else "")
