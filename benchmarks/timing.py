"""The one timer of the benchmarks and the ceilings measured with it.

On a GPU, `triton.testing.do_bench`: CUDA events around each call, L2 flushed before each one
(so no call finds the previous one's data in cache), the median of as many calls as fit its
time budget. It needs a GPU driver; on CPU a plain median of wall times stands in, which
checks a script (train_step.py's smoke run), not a speed.
"""

import statistics
import time

import torch


def median_ms(fn) -> float:
    """Median milliseconds of one call of fn()."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mb(fn) -> float:
    """The most memory one call of fn() allocates on the GPU beyond what was allocated before
    it (NaN without CUDA: not measured)."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def ceilings(quick: bool) -> dict:
    """This machine's bf16 matmul TFLOP/s (a square matmul) and device copy GB/s (read plus
    write), measured in the same run as the figures they bound (fp32 and smaller on CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 2048 if quick or device != "cuda" else 8192
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    tflops = 2 * n**3 / median_ms(lambda: torch.mm(a, b)) / 1e9
    size = (256 if quick or device != "cuda" else 1024) * 2**20
    src, dst = torch.empty(size, dtype=torch.uint8, device=device), torch.empty(size, dtype=torch.uint8, device=device)
    return {"matmul_tflops": tflops, "copy_gbps": 2 * size / median_ms(lambda: dst.copy_(src)) / 1e6}
