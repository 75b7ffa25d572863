"""CPU time of patch_pixel_loss forward + backward on the native (C++) backend beside the eager
torch reference (plain autograd through `reference.patch_pixel_loss`, what one writes without
the op) and `torch.compile` of it, at B=32 224 px p=16 fp32, norm_pix on, boundary weight 0.1
as the configs train with; on 1 and 2 threads, medians of a few runs in one process (ratios
are what to compare). Run it as a script:

    python benchmarks/native_loss_cpu.py [--repeats 7] [--rounds 3] [--shape B SIZE P]

`native` is the public op told the boundary weight (the forward also computes the gradient),
`native recompute` the terms without it (a forward, then a backward that reads pred and the
image again), `reference op` the public op on the reference backend. Each round times every
implementation in turn, so that a noisy neighbour slows them alike; the table gives the median
over rounds of each round's median, and each ratio's median over rounds.
"""

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from cases import loss_inputs  # noqa: E402
from common import forced_backend, grads_of  # noqa: E402
from pacofr.ops import native, patch_pixel_loss, patch_pixel_loss_terms, reference  # noqa: E402

SC_WEIGHT = 0.1  # loss.w_sc of the configs


def implementations(p: int) -> dict:
    """{name: (fn(pred, images, weight) -> loss, the backend forced for its forward and backward)}"""
    def eager(pred, images, weight):
        l_pix, l_sc = reference.patch_pixel_loss(pred, images, weight, p, True, 1e-6)
        return l_pix + SC_WEIGHT * l_sc

    def told(pred, images, weight):
        return patch_pixel_loss(pred, images, weight, p, boundary_weight=SC_WEIGHT)

    def terms(pred, images, weight):
        l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, p)
        return l_pix + SC_WEIGHT * l_sc

    return {"native": (told, "native"), "native recompute": (terms, "native"), "eager reference": (eager, None),
            "torch.compile(reference)": (torch.compile(eager), None), "reference op": (told, "reference")}


def step(impl, inputs):
    fn, backend = impl
    with forced_backend(backend) if backend else contextlib.nullcontext():  # the backward's choice too
        return grads_of(fn(*inputs), [inputs[0]])[0]


def median_seconds(impl, inputs, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(impl, inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 224, 16), metavar=("B", "SIZE", "P"))
    args = parser.parse_args()
    if native.unavailable():
        sys.exit(f"native_loss_cpu: the native backend cannot run: {native.unavailable()}")
    b, size, p = args.shape
    inputs = loss_inputs((b, size, p), torch.float32)
    impls = implementations(p)
    want = step(impls["eager reference"], inputs)
    for name, impl in impls.items():  # warm-up (torch.compile compiles here) and agreement
        err = ((step(impl, inputs) - want).abs().max() / want.abs().max()).item()
        assert err < 1e-4, f"{name}: gradient differs from the eager reference by {err:.2e} (relative)"
    print(f"patch_pixel_loss forward+backward, B={b} {size}px p={p} fp32, norm_pix, boundary weight {SC_WEIGHT}; "
          f"medians of {args.repeats} calls, median over {args.rounds} rounds")
    print(f"| threads | {' | '.join(impls)} | native / eager | native / compile |")
    print("|---|" + "---|" * (len(impls) + 2))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for impl in impls.values():  # a warm-up at this thread count
            step(impl, inputs)
        rounds = [{name: median_seconds(impl, inputs, args.repeats) for name, impl in impls.items()}
                  for _ in range(args.rounds)]
        ms = {name: 1e3 * statistics.median(r[name] for r in rounds) for name in impls}
        vs_eager = statistics.median(r["eager reference"] / r["native"] for r in rounds)
        vs_compile = statistics.median(r["torch.compile(reference)"] / r["native"] for r in rounds)
        cells = " | ".join(f"{ms[name]:.1f} ms" for name in impls)
        print(f"| {threads} | {cells} | {vs_eager:.2f}x | {vs_compile:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
