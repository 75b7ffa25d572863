"""Images per second of the two decoders (data.decoder: pil | dali) on a folder of face JPEGs,
read through the same DataLoader: PIL decodes, crops and normalizes in the workers; DALI gets
the encoded bytes and decodes each batch in this process (on the GPU with --device mixed).

    python benchmarks/data_decode.py                              # writes its JPEGs to a temp folder
    python benchmarks/data_decode.py --source /data/faces --device mixed --workers 8

Both rows read the same files in the same order; the first batches are a warm-up.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pacofr.config import DataConfig  # noqa: E402
from pacofr.data import build_dataset, collate, collate_encoded  # noqa: E402


def _face_jpegs(folder: str, n: int, size: int) -> None:
    """`n` JPEGs of `size` px: crops of the astronaut's face at shifted boxes (real texture)."""
    from PIL import Image
    from skimage import data

    astro = Image.fromarray(data.astronaut())
    for i in range(n):
        dx, dy = (i * 7) % 60, (i * 13) % 60
        astro.crop((120 + dx, 10 + dy, 330 + dx, 220 + dy)).resize((size, size), Image.BICUBIC).save(
            os.path.join(folder, f"face{i:05d}.jpg"), quality=90)


def _rate(batches, warmup: int, sync) -> float:
    seen, start = 0, None
    for i, batch in enumerate(batches):
        if i == warmup:
            sync()
            start, seen = time.perf_counter(), 0
        seen += batch.images.shape[0]
    sync()
    return seen / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="", help="an image folder (default: generated JPEGs)")
    ap.add_argument("--images", type=int, default=512, help="generated JPEGs")
    ap.add_argument("--jpeg-size", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto", help="DALI decode device: auto | mixed | cpu")
    ap.add_argument("--threads", type=int, default=4, help="DALI CPU threads")
    args = ap.parse_args()

    from pacofr.data.dali import DaliDecoder, resolve_device

    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device == "mixed" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source or tmp
        if not args.source:
            _face_jpegs(tmp, args.images, args.jpeg_size)
        rows = []
        for decoder in ("pil", "dali"):
            ds = build_dataset(DataConfig(source=source, decoder=decoder), args.img_size)
            loader = DataLoader(ds, batch_size=args.batch, num_workers=args.workers, drop_last=True,
                                collate_fn=collate if decoder == "pil" else collate_encoded)
            batches = iter(loader)
            if decoder == "dali":
                batches = map(DaliDecoder(args.img_size, args.batch, device, args.threads), batches)
            rows.append((decoder if decoder == "pil" else f"dali ({device})", _rate(batches, 2, sync)))
    cpu = os.cpu_count()
    print(f"{len(ds)} images -> {args.img_size} px, batch {args.batch}, {args.workers} workers, {cpu} CPUs"
          + (f", {torch.cuda.get_device_name()}" if device == "mixed" else ""))
    print(f"{'decoder':<14}{'images/s':>10}{'vs pil':>9}")
    for name, rate in rows:
        print(f"{name:<14}{rate:>10.0f}{rate / rows[0][1]:>8.2f}x")


if __name__ == "__main__":
    main()
