"""The C++ backend: csrc/, built by setup.py into pacofr._C, optional. Its ops are
torch.ops.pacofr_native.<op>; this module loads them once and says why they cannot run."""

import functools
import importlib
import os

import torch

BUILD = "pip install --no-build-isolation -e . with torch installed (make install does)"


@functools.cache
def unavailable() -> str | None:
    """Why the native ops cannot run here, or None."""
    if os.environ.get("PACOFR_NATIVE") == "0":
        return "switched off (PACOFR_NATIVE=0)"
    try:
        importlib.import_module("pacofr._C")
    except ModuleNotFoundError:
        return f"the C++ extension is not built ({BUILD})"
    except ImportError as e:  # built against another torch or compiler runtime
        return f"the C++ extension does not load ({str(e).splitlines()[0]}); rebuild it: {BUILD}"
    return None


def op(name: str):
    """torch.ops.pacofr_native.<name> (call only when unavailable() is None)."""
    return getattr(torch.ops.pacofr_native, name)
