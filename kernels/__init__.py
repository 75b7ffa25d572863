"""Triton kernels, one module per fused op; imported as `pacofr.kernels` and reached by model
code only through `pacofr.ops`."""

import functools
import os


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU in Triton's interpreter, whose cost is
    per block operation: kernels pick large blocks there)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def deterministic_default() -> bool:
    """Atomic-free (bitwise reproducible) backwards are asked for: torch's deterministic mode
    or PACOFR_DETERMINISTIC=1."""
    import torch

    return torch.are_deterministic_algorithms_enabled() or os.environ.get("PACOFR_DETERMINISTIC") == "1"


def hopper() -> bool:
    """The current CUDA target is sm_90 (H100/H200): the compile target Triton reports (also
    under benchmarks/compile_report.py, which sets it without a GPU)."""
    from triton.runtime import driver

    target = driver.active.get_current_target()
    return target.backend == "cuda" and target.arch == 90


def on_device(launcher):
    """Runs a launcher with the device of its first CUDA tensor argument current: Triton
    launches on the current device and its stream, whatever device the pointers belong to."""
    import torch

    @functools.wraps(launcher)
    def call(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"), None)
        if device is None or device.index == torch.cuda.current_device():
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)
    return call
