import os
from contextlib import contextmanager

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def skip_unless_gpu(impl: str, big: bool) -> None:
    """Triton timings only mean something on a GPU (the interpreter runs on CPU), and the
    paper-scale shapes take minutes and gigabytes on CPU."""
    if DEVICE == "cpu" and impl == "triton":
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


def config_name(config: dict) -> str:
    """A kernel launch configuration in a few characters: BLOCK_M x BLOCK_N, warps, stages."""
    return f"{config['BLOCK_M']}x{config['BLOCK_N']} w{config['num_warps']} s{config.get('num_stages', 3)}"
