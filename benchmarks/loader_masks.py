"""Images per second of the training loader with its masks drawn in the workers
(MaskingCollate, as pretraining runs it) against the same loader without masks (plain
collate): what drawing masks costs the input pipeline. PIL decode, the same files in the same
order; the two loaders alternate, and each one's median over the rounds is reported. The
first batch of each worker is a warm-up (it fills the worker's caches, such as the template
region map).

    python benchmarks/loader_masks.py [--images 256] [--workers 2] [--rounds 5]
"""

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torch.utils.data import DataLoader  # noqa: E402

from data_decode import _face_jpegs, _rate  # noqa: E402
from pacofr.config import load_config  # noqa: E402
from pacofr.data import build_dataset, collate  # noqa: E402
from pacofr.data.loader import MaskingCollate  # noqa: E402
from pacofr.masking import sample_masks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="generated JPEGs")
    ap.add_argument("--jpeg-size", type=int, default=250)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cfg = load_config("vit_base_patch16_224")  # 224 px, patch 16, the default masking
    with tempfile.TemporaryDirectory() as tmp:
        _face_jpegs(tmp, args.images, args.jpeg_size)
        cfg.data.source = tmp
        ds = build_dataset(cfg.data, cfg.model.img_size)
        collates = {"without masks": collate, "with masks": MaskingCollate(cfg, sample_masks)}
        rates = {name: [] for name in collates}
        for _ in range(args.rounds):
            for name, fn in collates.items():
                loader = DataLoader(ds, batch_size=args.batch, num_workers=args.workers, drop_last=True,
                                    collate_fn=fn, persistent_workers=False)
                rates[name].append(_rate(iter(loader), args.workers, lambda: None))
    base = statistics.median(rates["without masks"])
    print(f"{len(ds)} images {args.jpeg_size} px -> {cfg.model.img_size} px, batch {args.batch}, "
          f"{args.workers} workers, {os.cpu_count()} CPUs, medians of {args.rounds} rounds")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:<14}{rate:>8.0f} images/s {rate / base:>6.3f}x")


if __name__ == "__main__":
    main()
