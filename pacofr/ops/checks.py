"""Input checks and autocast shared by the fused ops: what every op does to its inputs before
the dispatch sees them."""

import operator

import torch

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


def autocasting(device_type: str) -> bool:
    """Autocast is on for this device type (never for types it does not know, such as meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_inputs(device_type: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the floating inputs in autocast's dtype, as torch.mm would take them:
    a bf16 activation against fp32 parameters then runs the bf16 kernel, not the fp32 one.
    The cast is differentiable, so gradients reach fp32 parameters in fp32."""
    if not autocasting(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)  # float64 is left alone, as autocast does
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)
