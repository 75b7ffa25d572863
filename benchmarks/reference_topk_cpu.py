"""CPU time of the reference codebook_topk beside what a user would call instead: torch cdist +
topk and torch mm + topk (both over the full N x K matrix), at N=20000 K=8192 D=64 k=8 fp32 on
1 and 2 threads, medians of a few runs in one process (ratios are what to compare). Run it as
a script:

    python benchmarks/reference_topk_cpu.py [--baseline OTHER/reference.py] [--repeats 5]

--baseline also times the codebook_topk of another reference.py (e.g. an older revision's,
written out with `git show REV:pacofr/ops/reference.py`), checking it returns the same result.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from cases import torch_mm_topk  # noqa: E402
from pacofr.ops import reference  # noqa: E402


def _load(path):
    spec = importlib.util.spec_from_file_location("baseline_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _median_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", help="another reference.py whose codebook_topk is timed too")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=4, default=(20000, 8192, 64, 8), metavar=("N", "K", "D", "k"))
    args = parser.parse_args()
    n, kc, d, k = args.shape
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(n, d, generator=gen), torch.randn(kc, d, generator=gen)
    impls = {"reference": lambda: reference.codebook_topk(x, c, k, "l2"),
             "torch cdist+topk": lambda: torch.cdist(x, c).topk(k, dim=1, largest=False),
             "torch mm+topk": lambda: torch_mm_topk(x, c, k, "l2")}
    if args.baseline:
        base = _load(args.baseline)
        impls["baseline reference"] = lambda: base.codebook_topk(x, c, k, "l2")
        got, want = reference.codebook_topk(x, c, k, "l2"), base.codebook_topk(x, c, k, "l2")
        print("baseline gives the same result:", torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
    print(f"codebook_topk l2 fp32 N={n} K={kc} D={d} k={k}, medians of {args.repeats}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times = {name: _median_seconds(fn, args.repeats) for name, fn in impls.items()}
        cells = ", ".join(f"{name} {t:.3f} s" for name, t in times.items())
        ratio = times["torch cdist+topk"] / times["reference"]
        print(f"{threads} thread(s): {cells}; reference speed / cdist+topk {ratio:.2f}x")


if __name__ == "__main__":
    main()
