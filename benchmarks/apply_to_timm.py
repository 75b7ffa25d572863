"""Forward + backward of a small timm ViT patched by pacofr.ops.apply_to_timm against the same
model unpatched (timm's SDPA attention), medians in one process, on 1 and 2 threads (CPU) or
the GPU. Two batches: all tokens, and an MAE-style encoder over ragged visible tokens padded to
the longest (patched: `ragged(seqlens=...)`; unpatched: SDPA with the equivalent boolean mask).

    python benchmarks/apply_to_timm.py [--batch 32] [--img 112] [--depth 4] [--dim 192] [--heads 3] [--rounds 3]

The patched model's attention goes through the dispatch (PACOFR_OPS forces a backend).
"""

import argparse
import copy
import os
import statistics
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

_env = dict(os.environ)
from conftest import _stub_torchvision_for_timm  # noqa: E402  (timm imports torchvision, which CPU torch lacks)

os.environ.clear()
os.environ.update(_env)  # (conftest's test settings are not this script's)
_stub_torchvision_for_timm()

from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from common import cpu_name  # noqa: E402
from timing import median_ms  # noqa: E402

from pacofr.ops import apply_to_timm, explain, ragged  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _machine() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs"


def _ragged_batch(model, images, visible):
    """(tokens [B, 1 + max visible, D] of an MAE encoder, seqlens [B] with the class token):
    sample b keeps its first visible[b] patches; the rest of its row is padding."""
    x = model._pos_embed(model.patch_embed(images))
    n = 1 + int(visible.max())
    return x[:, :n], (visible + 1).to(torch.int32)


def _step(model, images, visible, patched):
    def run():
        model.zero_grad(set_to_none=True)
        if visible is None:
            out = model.forward_features(images)
        else:
            tokens, seqlens = _ragged_batch(model, images, visible)
            if patched:
                with ragged(model, seqlens=seqlens):
                    out = model.norm(model.blocks(tokens))
            else:
                valid = torch.arange(tokens.shape[1], device=DEVICE)[None] < seqlens[:, None]
                x = tokens
                for block in model.blocks:
                    x = block(x, attn_mask=valid[:, None, None, :])
                out = model.norm(x)
        out.float().square().mean().backward()
    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img", type=int, default=112)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    ref = VisionTransformer(img_size=args.img, patch_size=16, embed_dim=args.dim, depth=args.depth,
                            num_heads=args.heads, num_classes=0).to(DEVICE)
    model = apply_to_timm(copy.deepcopy(ref))
    images = torch.randn(args.batch, 3, args.img, args.img, device=DEVICE)
    patches = (args.img // 16) ** 2
    # MAE's 75% masking, the visible count varying per sample (15% to 35% of the patches)
    visible = torch.linspace(0.15, 0.35, args.batch, device=DEVICE).mul(patches).round().long().clamp(min=1)
    d = args.dim // args.heads
    q = torch.empty(args.batch, args.heads, 1 + patches, d, device=DEVICE)
    print(f"{_machine()}; torch {torch.__version__}; {explain('masked_attention', DEVICE, q=q, k=q, v=q)}")
    print(f"timm ViT img {args.img} patch 16 dim {args.dim} depth {args.depth} heads {args.heads}, batch {args.batch}, "
          f"fp32, forward + backward; ms: median over {args.rounds} alternating rounds of median_ms "
          "(speed-up = unpatched / patched)")
    cases = {"all tokens": None, f"ragged, {int(visible.min())}-{int(visible.max())} of {patches} visible": visible}
    for threads in ((1, 2) if DEVICE == "cpu" else (torch.get_num_threads(),)):
        torch.set_num_threads(threads)
        for name, vis in cases.items():
            steps = (_step(ref, images, vis, patched=False), _step(model, images, vis, patched=True))
            # rounds alternate the two, so that other jobs' load falls on both alike
            rounds = [[median_ms(step) for step in steps] for _ in range(args.rounds)]
            base, ours = (statistics.median(r[i] for r in rounds) for i in range(2))
            print(f"{threads} thread(s), {name}: unpatched {base:.1f} ms, patched {ours:.1f} ms, "
                  f"speed-up {base / ours:.2f}x")


if __name__ == "__main__":
    main()
