"""The native (C++) codebook_topk on CPU beside the torch reference, faiss's exact search
(`faiss.knn`, the `bench` extra) and torch cdist + topk (mm + topk for ip), at N=20000 K=8192
D=64 k=8 fp32 on 1 and 2 threads. Run it as a script:

    python benchmarks/native_topk_cpu.py [--repeats 5] [--metric l2|ip] [--shape N K D k]

Times are medians of interleaved runs in one process (each repeat calls every implementation
once, so a noisy neighbour slows them alike): compare the ratios. Extra memory is the peak RSS
of one call above the RSS before it (Linux's peak reset), in a fresh process per implementation
with one thread and glibc's mmap threshold fixed (freed buffers leave the heap). Indices are
checked against a float64 brute force at every position whose score is apart from its
neighbours' by more than twice fp32 rounding.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from cases import faiss_knn, torch_mm_topk  # noqa: E402
from common import forced_backend  # noqa: E402
from pacofr.ops import backends, codebook_topk, native, reference  # noqa: E402

TORCH = {"l2": "torch cdist+topk", "ip": "torch mm+topk"}


def implementations(k: int, metric: str) -> dict:
    """{name: fn(x, c) -> indices [N, k]} of what is installed, native first."""
    impls = {}
    if "native" in backends("codebook_topk"):
        def native(x, c):
            with forced_backend("native"):
                return codebook_topk(x, c, k, metric)[1]

        impls["native"] = native
    impls["reference"] = lambda x, c: reference.codebook_topk(x, c, k, metric)[1]
    if (knn := faiss_knn(k, metric)) is not None:
        impls["faiss"] = lambda x, c: torch.from_numpy(knn(x, c)[1])
    if metric == "l2":
        impls[TORCH[metric]] = lambda x, c: torch.cdist(x, c).topk(k, dim=1, largest=False).indices
    else:
        impls[TORCH[metric]] = lambda x, c: torch_mm_topk(x, c, k, metric).indices
    return impls


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        import faiss
        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def inputs(n, kc, d):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=gen), torch.randn(kc, d, generator=gen)


def interleaved_medians(impls: dict, x, c, repeats: int) -> dict:
    for fn in impls.values():
        fn(x, c)  # warm-up
    times = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn(x, c)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def extra_bytes(impl: str, args) -> int:
    """Peak RSS over one call of `impl`, measured in a fresh process (this script, --memory-of)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", impl, "--metric", args.metric,
           "--shape", *map(str, args.shape)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return int(out.split()[-1])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_memory(impl: str, args) -> None:
    set_threads(1)
    n, kc, d, k = args.shape
    fn = implementations(k, args.metric)[impl]
    x, c = inputs(n, kc, d)
    fn(x[:4].clone(), c[:64].clone())  # one-time initialisation is not what is measured
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS starts again from the current RSS (Linux)
    before = _status_kb("VmRSS")
    fn(x, c)
    print((_status_kb("VmHWM") - before) * 1024)


def index_check(idx, x, c, k, metric, rows=1000) -> tuple[int, int]:
    """(wrong, compared): positions whose index differs from the float64 brute force's, among
    those whose float64 score is more than twice fp32 rounding away from its neighbours'."""
    c64 = c.double()
    c_sq = (c64 * c64).sum(1)
    wrong = compared = 0
    for r0 in range(0, x.shape[0], rows):
        x64 = x[r0 : r0 + rows].double()
        x_sq = (x64 * x64).sum(1, keepdim=True)
        prod = x64 @ c64.T
        key = x_sq - 2 * prod + c_sq if metric == "l2" else -prod  # ascending: best first
        vals, want = key.topk(k + 1, dim=1, largest=False)
        tol = 8 * torch.finfo(torch.float32).eps * (x_sq + c_sq.max())
        gaps = vals[:, 1:] - vals[:, :-1]
        before = torch.cat([torch.full_like(gaps[:, :1], float("inf")), gaps[:, : k - 1]], 1)
        apart = (before > 2 * tol) & (gaps > 2 * tol)
        wrong += int(((idx[r0 : r0 + rows] != want[:, :k]) & apart).sum())
        compared += int(apart.sum())
    return wrong, compared


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--metric", choices=("l2", "ip"), default="l2")
    parser.add_argument("--shape", type=int, nargs=4, default=(20000, 8192, 64, 8), metavar=("N", "K", "D", "k"))
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # the child process of extra_bytes
    args = parser.parse_args()
    if args.memory_of:
        return measure_memory(args.memory_of, args)
    n, kc, d, k = args.shape
    x, c = inputs(n, kc, d)
    impls = implementations(k, args.metric)
    if "native" not in impls:
        sys.exit(f"native_topk_cpu.py: the native backend cannot run: {native.unavailable()}")
    names = list(impls)
    print(f"codebook_topk {args.metric} fp32 N={n} K={kc} D={d} k={k}: seconds, medians of {args.repeats} "
          f"interleaved runs in one process; ratios: that time / native's")
    print("| threads | " + " | ".join(names) + " | " + " | ".join(f"{m} / native" for m in names[1:]) + " |")
    print("|---" * (2 * len(names)) + "|")
    for threads in (1, 2):
        set_threads(threads)
        t = interleaved_medians(impls, x, c, args.repeats)
        cells = [f"{t[m]:.3f}" for m in names] + [f"{t[m] / t['native']:.2f}x" for m in names[1:]]
        print(f"| {threads} | " + " | ".join(cells) + " |")
    mem = {m: extra_bytes(m, args) for m in names}
    print("extra memory (peak RSS over one call, fresh process, 1 thread): "
          + ", ".join(f"{m} {b / 1e6:.1f} MB" for m, b in mem.items()))
    if "faiss" in mem:
        bound = 2 * mem["faiss"] + n * k * 12  # the outputs: fp32 scores and int64 indices
        print(f"native <= 2 x faiss + N*k outputs ({bound / 1e6:.1f} MB): {'holds' if mem['native'] <= bound else 'MISSED'}")
    set_threads(2)
    for m in names:
        wrong, compared = index_check(impls[m](x, c), x, c, k, args.metric)
        print(f"indices against float64: {m} {wrong} wrong of {compared} positions apart by more than rounding")


if __name__ == "__main__":
    main()
