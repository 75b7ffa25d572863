"""The pytest-benchmark side of the cases: each suite (test_<op>.py) parametrizes over
`params(case)` and times one case per test with `time_case`."""

import pytest
import torch

from cases import Case, call, dtypes, implementations, sweep
from common import DEVICE
from timing import median_ms


def params(case: Case) -> list:
    """(dtype, shape, impl, backward) for every timing: the CPU shapes, then the GPU shapes, at
    the target shape with the kernel rows too."""
    found = []
    for dtype in dtypes(case):
        for shape in case.cpu_shapes + case.gpu_shapes:
            names = case.impls + (tuple(sweep(case)) if shape == case.gpu_shapes[0] else ())
            for impl in names:
                for backward in case.passes:
                    words = [case.describe(shape), *map(str, shape[4:]), impl, str(dtype).replace("torch.", ""),
                             "fwd_bwd" if backward else "fwd"]
                    ident = "-".join(w.replace(" ", "_") for w in words)
                    found.append(pytest.param(dtype, shape, impl, backward, id=ident))
    return found


def skip_unless_gpu(impl: str, big: bool) -> None:
    """Triton timings only mean something on a GPU (the interpreter runs on CPU), and the
    paper-scale shapes take minutes and gigabytes on CPU."""
    if DEVICE == "cpu" and impl.startswith("triton"):
        pytest.skip("Triton kernels are timed on a CUDA GPU only (the CPU interpreter's times mean nothing)")
    if DEVICE == "cpu" and big:
        pytest.skip("paper-scale shape: GPU only")


def time_case(benchmark, case: Case, dtype: torch.dtype, shape: tuple, impl: str, backward: bool) -> None:
    """Times one implementation and records its throughput (TFLOP/s or GB/s of the case's work)
    in extra_info. On CPU pytest-benchmark's timer gives the figure; on a GPU do_bench does
    (extra_info["ms"]), and pytest-benchmark's own columns time single synchronized calls."""
    skip_unless_gpu(impl, shape not in case.cpu_shapes)
    impls = implementations(case, shape, with_sweep=impl in sweep(case))
    if impl not in impls:
        pytest.skip(f"{impl} is not installed")
    inputs = case.inputs(shape, dtype)

    def run():
        out = call(case, impls[impl], inputs, backward)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    if DEVICE == "cuda" and not benchmark.disabled:
        benchmark.extra_info["ms"] = median_ms(lambda: call(case, impls[impl], inputs, backward))
        benchmark.pedantic(run, rounds=3)
        seconds = benchmark.extra_info["ms"] / 1e3
    else:
        benchmark(run)
        seconds = benchmark.stats["median"] if benchmark.stats else None  # None: --benchmark-disable
    if seconds:
        work = case.work(impl, shape, inputs, backward)
        benchmark.extra_info["tflops" if case.unit == "flops" else "gbps"] = work / seconds / (
            1e12 if case.unit == "flops" else 1e9)
    benchmark.extra_info["dtype"] = str(dtype).replace("torch.", "")
