"""PaCo-FR pretraining steps (forward, backward, AdamW) with the fused ops on their Triton
kernels against the same steps on the torch reference ops: step time, images/s, peak memory
and MFU (the design target: fused ops >= 1.3x reference ops at ViT-B/16 224, B=256).

    python benchmarks/train_step.py                                   # ViT-B/16 224, B=256
    python benchmarks/train_step.py --config tiny --batch 8 --steps 2 # a smoke run on CPU
    python benchmarks/train_step.py --profile                         # also where a step's time goes

Both runs start from the same weights, images and masks (PACOFR_OPS picks the backend of
every fused op), under bf16 autocast on a GPU as train.py runs. The step time is the median
over the timed steps, synchronized. FLOPs per step are counted once by torch's
FlopCounterMode over a reference step (its matmuls and convolutions, attention over the
padded rows included, as a dense implementation computes it); MFU is those FLOPs per second
over the bf16 matmul ceiling measured in the same run. On a machine without CUDA the Triton
kernels run in the interpreter (TRITON_INTERPRET=1), which checks the script, not the speed.
With --profile, one more step per backend runs under torch.profiler and the ops and kernels
that took the most device time (CPU time without CUDA) are printed.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the kernels run in the interpreter; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from common import forced_backend  # noqa: E402
from timing import ceilings  # noqa: E402

from pacofr.config import load_config  # noqa: E402
from pacofr.masking import structured_masks  # noqa: E402
from pacofr.losses import PaCoFRLoss  # noqa: E402
from pacofr.model import PaCoFR  # noqa: E402
from pacofr.ops import backends  # noqa: E402

FUSED_OPS = ("codebook_topk", "masked_attention", "patch_pixel_loss")


def build(cfg, state, device, incubation):
    """The model from `state` in the given phase, and the autocast that train.py uses."""
    model = PaCoFR(cfg).to(device)
    model.load_state_dict(state)
    model.set_incubation(incubation)
    return model, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def make_step(cfg, state, images, masks, incubation):
    model, amp = build(cfg, state, images.device, incubation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with amp:
            loss = PaCoFRLoss(cfg)(model(images, masks=masks, generator=torch.Generator(device=images.device).manual_seed(0)),
                                   images)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def measure(cfg, state, images, masks, device, backend, warmup, steps, incubation) -> dict:
    step = make_step(cfg, state, images, masks, incubation)
    with forced_backend(backend):
        losses = [step().item() for _ in range(warmup)]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(step().item())  # .item() synchronizes
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None  # None: not measured
    return {"ms": 1e3 * statistics.median(times), "losses": losses, "peak_mb": peak}


def profile_table(cfg, state, images, masks, device, backend, incubation, rows: int = 15) -> str:
    """The ops and kernels with the most self time on the device (on CPU: the host) in one
    step after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step(cfg, state, images, masks, incubation)
    cuda = device.type == "cuda"
    with forced_backend(backend):
        step()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=rows)


def count_flops(cfg, state, images, masks, device, incubation) -> int:
    model, amp = build(cfg, state, device, incubation)
    counter = FlopCounterMode(display=False)
    with forced_backend("reference"), counter:
        with amp:
            loss = PaCoFRLoss(cfg)(model(images, masks=masks, generator=torch.Generator(device=device).manual_seed(0)),
                                   images)["loss"]
        loss.backward()
    return counter.get_total_flops()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vit_base_patch16_224", help="preset name or YAML file")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--incubation", action="store_true", help="time incubation steps (default: the main phase)")
    parser.add_argument("--profile", action="store_true", help="print where one more step's time goes")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    cfg = load_config(args.config)
    m = cfg.model
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, m.in_chans, m.img_size, m.img_size, generator=gen).to(device)
    masks = structured_masks(args.batch, (m.img_size, m.img_size), m.patch_size, cfg.masking, generator=gen).to(device)
    torch.manual_seed(0)
    state = PaCoFR(cfg).state_dict()

    missing = [op for op in FUSED_OPS if "triton" not in backends(op)]
    impls = ["reference"] + (["triton"] if not missing else [])
    ceiling = ceilings(quick=device.type != "cuda")["matmul_tflops"]
    flops = count_flops(cfg, state, images, masks, device, args.incubation)
    print(f"device: {card}; {args.config}, B={args.batch}, {'incubation' if args.incubation else 'main phase'}; "
          f"{flops / 1e9:.1f} GFLOP per step (reference ops, counted); matmul ceiling {ceiling:.1f} TFLOP/s")
    if missing:
        print(f"triton: skipped, no Triton backend can run here for {', '.join(missing)}")

    rows = {}
    for backend in impls:
        r = measure(cfg, state, images, masks, device, backend, args.warmup, args.steps, args.incubation)
        r.update(images_per_s=1e3 * args.batch / r["ms"], mfu_pct=100 * flops / (r["ms"] / 1e3) / 1e12 / ceiling)
        rows[backend] = r
    print(f"{'ops':<12}{'ms/step':>10}{'images/s':>10}{'MFU %':>8}{'peak MB':>9}{'speedup':>9}  first/last loss")
    for backend, r in rows.items():
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(f"{backend:<12}{r['ms']:>10.1f}{r['images_per_s']:>10.1f}{r['mfu_pct']:>8.1f}{peak:>9}"
              f"{rows['reference']['ms'] / r['ms']:>9.2f}  {r['losses'][0]:.4f} / {r['losses'][-1]:.4f}")
    if "triton" in rows:
        ratio = rows["reference"]["ms"] / rows["triton"]["ms"]
        print(f"design target, fused ops >= 1.3x the reference ops' step: {ratio:.2f}x, "
              f"{'holds' if ratio >= 1.3 else 'MISSED'} (MFU {rows['triton']['mfu_pct']:.1f}%)"
              + ("" if device.type == "cuda" else "; on CPU the kernels are interpreted: not a measurement"))
    sys.stdout.flush()  # the figures stay if the profile below runs past a time limit
    for backend in rows if args.profile else ():  # after the table, which must not wait for it
        rows[backend]["profile"] = profile_table(cfg, state, images, masks, device, backend, args.incubation)
        print(f"\none profiled step, {backend} ops:\n{rows[backend]['profile']}")
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": card, "config": args.config, "batch": args.batch,
                                    "incubation": args.incubation, "flops_per_step": flops,
                                    "matmul_tflops": ceiling, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
