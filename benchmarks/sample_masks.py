"""Milliseconds per sample of the loader's masking (pacofr.masking.sample_masks) against the
per-sample implementation it replaced (the frozen reference in tests/test_masking_per_sample.py),
timed in one process on the same seeds; both must give the same masks bit for bit.

    python benchmarks/sample_masks.py                       # 224 px, patch 16, batch 64, 1 thread
    python benchmarks/sample_masks.py --landmarks --repeats 31

Each row is the median over --repeats calls after a warm-up.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

from pacofr.config import MaskingConfig  # noqa: E402
from pacofr.masking import TEMPLATE_5, sample_masks  # noqa: E402
from test_masking_per_sample import reference_sample_masks  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--landmarks", action="store_true", help="5 given points per image (default: the template)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    size, cfg, seeds = (args.img_size, args.img_size), MaskingConfig(), list(range(args.batch))
    landmarks = None
    if args.landmarks:  # the template moved by up to 5% of the crop, so every image has its own map
        jitter = (torch.rand(args.batch, 5, 2, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.1
        landmarks = (TEMPLATE_5 + jitter) * args.img_size
    calls = {
        "per sample (before)": lambda: reference_sample_masks(seeds, size, args.patch_size, cfg, landmarks),
        "batched": lambda: sample_masks(seeds, size, args.patch_size, cfg, landmarks),
    }
    ref, new = (fn() for fn in calls.values())
    assert all(torch.equal(getattr(ref, f), getattr(new, f)) for f in ("mask", "replace", "regions")), "masks differ"
    rows = [(name, _median_ms(fn, args.repeats) / args.batch) for name, fn in calls.items()]
    print(f"sample_masks {args.img_size} px / {args.patch_size}, batch {args.batch}, {args.threads} thread(s), "
          f"{'given' if args.landmarks else 'template'} landmarks, median of {args.repeats}")
    print(f"{'implementation':<22}{'ms/sample':>10}{'speed-up':>10}")
    for name, ms in rows:
        print(f"{name:<22}{ms:>10.3f}{rows[0][1] / ms:>9.1f}x")


if __name__ == "__main__":
    main()
