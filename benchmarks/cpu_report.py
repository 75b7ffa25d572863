"""CPU time of every backend each op can run here, through the public op (dispatch and checks
included), with the backend forced by PACOFR_OPS: the measurements behind the CPU rows of the
dispatch table. Medians of a few calls in one process, at the thread count given.

    python benchmarks/cpu_report.py [--threads 2] [--repeats 5] [--out benchmarks/results]

Writes cpu_report.json (rows as gpu_report.py writes them: op, shape, impl, dtype, ms) and
prints a table; `python benchmarks/dispatch_table.py benchmarks/results/cpu_report.json`
turns it into the table's CPU rows.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import pacofr.ops as ops  # noqa: E402
from common import cpu_name  # noqa: E402
from pacofr.ops import codebook_topk, masked_attention, patch_pixel_loss  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _backward(out):
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()


def _cases(gen):
    """(op, pass, shape text, dtype, fn making fresh inputs and running the op once)."""
    def topk(n, kc, d, k):
        x, c = torch.randn(n, d, generator=gen), torch.randn(kc, d, generator=gen)
        return lambda: codebook_topk(x, c, k)

    def attention(b, h, n, d, backward):
        q, k, v = (torch.randn(b, h, n, d, generator=gen, requires_grad=backward) for _ in range(3))
        seqlens = torch.randint(n // 2, n + 1, (b,), generator=gen)

        def run():
            out = masked_attention(q, k, v, seqlens=seqlens)
            if backward:
                _backward(out)
        return run

    def loss(b, size, p):
        pred = torch.randn(b, (size // p) ** 2, p * p * 3, generator=gen, requires_grad=True)
        images = torch.randn(b, 3, size, size, generator=gen)
        weight = (torch.rand(b, (size // p) ** 2, generator=gen) < 0.6).float()
        return lambda: _backward(patch_pixel_loss(pred, images, weight, p, boundary_weight=0.1))

    yield "codebook_topk", "fwd (l2)", "N=256 K=8192 D=64 k=8", topk(256, 8192, 64, 8)
    yield "codebook_topk", "fwd (l2)", "N=20000 K=8192 D=64 k=8", topk(20000, 8192, 64, 8)
    for n, b in ((197, 16), (1024, 2)):
        for backward in (False, True):
            yield ("masked_attention", "fwd+bwd" if backward else "fwd", f"B={b} H=12 N={n} d=64",
                   attention(b, 12, n, 64, backward))
    yield "patch_pixel_loss", "fwd+bwd", "B=32 224px p=16", loss(32, 224, 16)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter is a test mode, not a CPU backend
    gen = torch.Generator().manual_seed(0)
    rows = []
    for op, pass_, shape, run in _cases(gen):
        for backend in ops.backends(op):
            if backend == "triton":
                continue
            os.environ["PACOFR_OPS"] = backend
            try:
                ms = _median_ms(run, args.repeats)
            finally:
                del os.environ["PACOFR_OPS"]
            rows.append({"op": f"{op} {pass_}", "shape": shape, "impl": backend, "dtype": "float32", "ms": ms})
            print(f"{op} {pass_:9s} {shape:26s} {backend:10s} {ms:10.2f} ms", flush=True)
    device = f"{cpu_name()}, {os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}"
    out = Path(args.out) / "cpu_report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "device_type": "cpu", "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
