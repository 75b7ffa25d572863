"""One command for a GPU: check every fused op that has a Triton kernel against its reference
on the device, then time it against its baselines and print a table.

    python benchmarks/gpu_report.py            # sized for under 5 minutes on one H100
    python benchmarks/gpu_report.py --quick    # small shapes, for a smoke run

Timing: CUDA events around each call, median of repeated runs, inputs rotated between calls
so no run hits a warm L2 with the previous one's data. Ceilings are measured in the same run:
a large bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s, read + write). The table and
a JSON file (benchmarks/results/gpu_report_<card>[_<op>...].json, strict JSON, renamed into
place after each op) give time, throughput, % of ceiling,
peak extra memory and the ratio to each baseline. On a machine without CUDA it runs the same
code on CPU with tiny shapes (set TRITON_INTERPRET=1 to include the Triton kernels), which
checks the script, not the speed.
"""

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BACKWARD_ONLY, config_name, forced_backend, grads_of, rotated  # noqa: E402
from test_codebook_topk import torch_mm_topk  # noqa: E402
from test_masked_attention import implementations as attention_impls  # noqa: E402
from test_masked_attention import counted_lengths, ragged_inputs, valid_flops  # noqa: E402
from test_patch_pixel_loss import implementations as loss_impls  # noqa: E402
from test_patch_pixel_loss import loss_inputs, minimal_bytes  # noqa: E402

from pacofr.cli import finite_floats  # noqa: E402
from pacofr.ops import backends  # noqa: E402


def timer(device):
    """Median milliseconds of fn(inputs[i % len]) over `reps` calls after `warmup`."""
    def run(fn, inputs, reps=20, warmup=3):
        for i in range(warmup):
            fn(*inputs[i % len(inputs)])
        times = []
        for i in range(reps):
            args = inputs[i % len(inputs)]
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(*args)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(*args)
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return run


def peak_extra_mb(fn, args, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def add_sweep(impls, candidates, make, result, same, failed_rows, row):
    """impls["triton kernel"]: the kernels called directly with their default configuration
    (the "triton" row goes through the public op, dispatch included), and impls["triton
    <config>"] for each candidate launch configuration (kernels' SWEEP) whose result(fn)
    matches the default's (compared by `same`); a candidate that fails or differs becomes a
    row with its error instead of a timing."""
    impls["triton kernel"] = make(None)  # the default, called the same way as the candidates
    want = result(impls["triton kernel"])
    for config in candidates:
        name = "triton " + config_name(config)
        try:
            fn = make(config)
            if not same(result(fn), want):
                raise AssertionError("result differs from the default configuration's")
            impls[name] = fn
        except Exception as e:
            failed_rows.append({**row, "impl": name, "error": f"{type(e).__name__}: {e}"[:500]})


def ceilings(device, run, quick):
    n = 2048 if quick or device.type != "cuda" else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = run(torch.mm, [(a, b)], reps=10)
    tflops = 2 * n**3 / ms / 1e9
    size = (256 if quick or device.type != "cuda" else 1024) * 2**20
    src, dst = torch.empty(size, dtype=torch.uint8, device=device), torch.empty(size, dtype=torch.uint8, device=device)
    ms = run(lambda s, d: d.copy_(s), [(src, dst)], reps=10)
    return {"matmul_tflops": tflops, "copy_gbps": 2 * size / ms / 1e6}


def check_codebook_topk(device):
    """Triton vs the reference on this device before any timing."""
    from pacofr.kernels.codebook_topk import codebook_topk_backward, codebook_topk_forward
    from pacofr.ops import reference

    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1000, 96, device=device, generator=gen).to(dtype)
        c = torch.randn(3000, 96, device=device, generator=gen).to(dtype)
        for metric in ("l2", "ip"):
            s, i = codebook_topk_forward(x, c, 8, metric)
            rs, ri = reference.codebook_topk(x, c, 8, metric)
            scale = rs.abs().max().item()
            assert (s - rs).abs().max().item() <= 1e-3 * scale, f"codebook_topk {metric} {dtype}: scores differ"
            assert (i == ri).float().mean().item() > 0.99, f"codebook_topk {metric} {dtype}: indices differ"
            g = torch.randn_like(s)
            gx, gc = codebook_topk_backward(g, x, c, i, metric)
            rgx, rgc = reference.codebook_topk_backward(g, x, c, i, metric)
            for a, b in ((gx, rgx), (gc, rgc)):
                err = (a.float() - b.float()).abs().max().item()
                assert err <= 2e-2 * b.float().abs().max().item() + 1e-6, f"codebook_topk backward {metric} {dtype}"


def bench_codebook_topk(device, run, ceil, quick):
    from pacofr.kernels.codebook_topk import SWEEP, codebook_topk_forward
    from pacofr.ops import reference

    if device.type == "cuda":
        shapes = [(4096, 8192, 768, 8), (256, 8192, 768, 4)] if quick else \
                 [(65536, 8192, 768, 8), (16384, 8192, 768, 8), (256, 8192, 768, 4)]
        dtype = torch.bfloat16
    else:
        shapes, dtype = [(256, 512, 32, 4)], torch.float32
    rows = []
    for n, kc, d, k in shapes:
        gen = torch.Generator(device=device).manual_seed(1)
        inputs = [(torch.randn(n, d, device=device, generator=gen).to(dtype),
                   torch.randn(kc, d, device=device, generator=gen).to(dtype)) for _ in range(2)]
        flops = 2 * n * kc * d
        impls = {
            "triton": lambda x, c: _public_codebook_topk(x, c, k),
            "torch mm+topk": lambda x, c: torch_mm_topk(x, c, k, "ip"),
            "reference": lambda x, c: reference.codebook_topk(x, c, k, "ip"),
            "bare GEMM": lambda x, c: x @ c.T,
        }
        failed = []
        if (n, kc, d, k) == shapes[0]:  # the launch configurations, at the first (paper) shape
            add_sweep(impls, SWEEP, lambda cfg: lambda x, c: codebook_topk_forward(x, c, k, "ip", config=cfg),
                      lambda fn: fn(*inputs[0]),
                      lambda a, b: (a[1] == b[1]).float().mean() > 0.999 and torch.allclose(a[0], b[0], 1e-3, 1e-3),
                      failed, {"op": "codebook_topk fwd (ip)", "shape": f"N={n} K={kc} D={d} k={k}"})
            # not a result: the default kernel without its best-k selection, which splits the
            # kernel's time into products and selection
            impls["triton products only"] = lambda x, c: codebook_topk_forward(x, c, k, "ip", config={"SELECT": False})
        times = {}
        for name, fn in impls.items():
            reps = 5 if name == "reference" else 20
            times[name] = run(fn, inputs, reps=reps, warmup=2)
            rows.append({
                "op": "codebook_topk fwd (ip)", "shape": f"N={n} K={kc} D={d} k={k}", "impl": name,
                "dtype": str(dtype).replace("torch.", ""), "ms": times[name],
                "tflops": flops / times[name] / 1e9, "pct_matmul_ceiling": 100 * flops / times[name] / 1e9 / ceil["matmul_tflops"],
                "peak_extra_mb": peak_extra_mb(fn, inputs[0], device),
            })
        for row in rows[-len(impls):]:
            row["triton_speedup"] = row["ms"] / times["triton"]  # > 1: Triton is faster
        rows += failed
    return rows


def _public_codebook_topk(x, codebook, k):
    from pacofr.ops import codebook_topk

    with forced_backend("triton"):
        return codebook_topk(x, codebook, k, "ip")


def check_masked_attention(device):
    from pacofr.kernels.masked_attention import masked_attention_backward, masked_attention_forward
    from pacofr.ops import masked_attention_qkv, reference

    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for d in (64, 80, 128):
            q, k, v, seqlens = (t.detach() if t.is_floating_point() else t for t in ragged_inputs(4, 3, 197, d, dtype))
            key_mask = torch.rand(4, 197, device=device) > 0.1
            out, lse = masked_attention_forward(q, k, v, seqlens, key_mask, d**-0.5)
            ref, ref_lse = reference.masked_attention(q, k, v, seqlens, key_mask, d**-0.5)
            assert (out.float() - ref.float()).abs().max() <= tol * 10, f"masked_attention fwd d={d} {dtype}"
            g = torch.randn_like(out)
            got = masked_attention_backward(g, q, k, v, out, lse, seqlens, key_mask, d**-0.5)
            want = reference.masked_attention_backward(g, q, k, v, ref, ref_lse, seqlens, key_mask, d**-0.5)
            for a, b in zip(got, want):
                assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max(), f"masked_attention bwd d={d}"
            # q, k, v as a ViT block splits them from one qkv projection: read in place, same bits
            packed = torch.stack((q, k, v), 2).transpose(1, 3).contiguous()  # [B, N, 3, H, d]
            views = packed.permute(2, 0, 3, 1, 4)
            out_v, lse_v = masked_attention_forward(*views, seqlens, key_mask, d**-0.5)
            got_v = masked_attention_backward(g, *views, out_v, lse_v, seqlens, key_mask, d**-0.5)
            assert torch.equal(out_v, out) and all(map(torch.equal, got_v, got)), f"masked_attention views d={d}"
            # the packed entry: the same bits, the gradient written into one dqkv buffer
            packed.requires_grad_()
            with forced_backend("triton"):  # the backward too: it picks its backend when it runs
                out_p = masked_attention_qkv(packed, seqlens, key_mask)
                (dqkv,) = torch.autograd.grad(out_p, packed, g.transpose(1, 2))
            assert torch.equal(out_p, out.transpose(1, 2)), f"masked_attention_qkv fwd d={d}"
            assert torch.equal(dqkv, torch.stack(got, 2).transpose(1, 3)), f"masked_attention_qkv bwd d={d}"


def bench_masked_attention(device, run, ceil, quick):
    from pacofr.kernels.masked_attention import SWEEP

    if device.type == "cuda":
        shapes = [(64, 12, 197, 64)] if quick else [(256, 12, 197, 64), (16, 12, 1024, 64)]
        dtype = torch.bfloat16
    else:
        shapes, dtype = [(2, 2, 64, 32)], torch.float32
    rows = []
    for shape in shapes:
        impls = attention_impls()
        inputs = rotated(ragged_inputs(*shape, dtype))
        q, k, v, seqlens = inputs[0]
        failed = []
        if shape == shapes[0]:  # the launch configurations, at the first (paper) shape
            def result(fn):
                out = fn(q, k, v, seqlens)
                return (out, *grads_of(out, (q, k, v)))

            add_sweep(impls, SWEEP, lambda cfg: lambda q, k, v, s: _Configured.apply(q, k, v, s, cfg), result,
                      lambda a, b: all(torch.allclose(x.float(), y.float(), 2e-2, 2e-2) for x, y in zip(a, b)),
                      failed, {"op": "masked_attention", "shape": "B={} H={} N={} d={}".format(*shape)})
        for backward in (False, True):
            def call(fn, q, k, v, s, backward=backward):
                out = fn(q, k, v, s)
                if backward:
                    grads_of(out, (q, k, v))
            times = {}
            for name, fn in impls.items():
                reps = 3 if name == "reference" else 10
                times[name] = run(lambda *a, fn=fn: call(fn, *a), inputs, reps=reps, warmup=2)
                flops = valid_flops(counted_lengths(name, seqlens, shape[2]), shape[1], shape[3], backward)
                rows.append({"op": "masked_attention " + ("fwd+bwd" if backward else "fwd"),
                             "shape": "B={} H={} N={} d={}".format(*shape), "impl": name,
                             "dtype": str(dtype).replace("torch.", ""), "ms": times[name],
                             "tflops": flops / times[name] / 1e9,
                             "pct_matmul_ceiling": 100 * flops / times[name] / 1e9 / ceil["matmul_tflops"],
                             "peak_extra_mb": peak_extra_mb(lambda *a, fn=fn: call(fn, *a), inputs[0], device)})
            for row in rows[-len(impls):]:
                row["triton_speedup"] = row["ms"] / times["triton"]
        rows += failed
    return rows + _bench_packed_entry(shapes[0], dtype, run, ceil, device)


def _bench_packed_entry(shape, dtype, run, ceil, device):
    """A ViT block's attention, fwd+bwd from its qkv projection [B, N, 3C] to [B, N, C]: through
    masked_attention on the split views (autograd stacks and copies their gradients) and
    through masked_attention_qkv (one dqkv buffer, written by the kernels)."""
    from pacofr.ops import masked_attention, masked_attention_qkv

    b, h, n, d = shape
    seqlens = ragged_inputs(*shape, dtype)[3]
    qkv = torch.randn(b, n, 3 * h * d, device=device, dtype=dtype, requires_grad=True)

    def views(x, s):
        out = masked_attention(*x.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4), seqlens=s)
        return out.transpose(1, 2).reshape(b, n, h * d)

    def packed(x, s):
        return masked_attention_qkv(x.view(b, n, 3, h, d), seqlens=s).reshape(b, n, h * d)

    rows, times = [], {}
    for name, fn in (("triton", packed), ("triton_split_views", views)):
        def call(x, s, fn=fn):
            with forced_backend("triton"):
                grads_of(fn(x, s), (x,))
        times[name] = run(call, rotated((qkv, seqlens)), reps=10, warmup=2)
        flops = valid_flops(seqlens, h, d, True)
        rows.append({"op": "attention block fwd+bwd", "shape": "B={} H={} N={} d={}".format(*shape), "impl": name,
                     "dtype": str(dtype).replace("torch.", ""), "ms": times[name], "tflops": flops / times[name] / 1e9,
                     "pct_matmul_ceiling": 100 * flops / times[name] / 1e9 / ceil["matmul_tflops"],
                     "peak_extra_mb": peak_extra_mb(call, (qkv, seqlens), device)})
    for row in rows:
        row["triton_speedup"] = row["ms"] / times["triton"]
    return rows


class _Configured(torch.autograd.Function):
    """masked_attention straight through the kernels with a given launch configuration."""

    @staticmethod
    def forward(ctx, q, k, v, seqlens, config):
        from pacofr.kernels.masked_attention import masked_attention_forward

        out, lse = masked_attention_forward(q, k, v, seqlens, None, q.shape[-1] ** -0.5, config=config)
        ctx.save_for_backward(q, k, v, out, lse, seqlens)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from pacofr.kernels.masked_attention import masked_attention_backward

        q, k, v, out, lse, seqlens = ctx.saved_tensors
        grads = masked_attention_backward(grad_out, q, k, v, out, lse, seqlens, None, q.shape[-1] ** -0.5, ctx.config)
        return (*grads, None, None)


def check_patch_pixel_loss(device):
    from pacofr.kernels.patch_pixel_loss import (SWEEP, patch_pixel_loss_backward, patch_pixel_loss_forward,
                                                 patch_pixel_loss_forward_with_grad, patch_pixel_loss_rescale)
    from pacofr.ops import reference

    cases = [((4, 224, 16), None), ((4, 112, 14), None)]
    if device.type == "cuda":  # 12544 programs of one patch, each waiting for statistics up to 14 blocks ahead
        cases.append(((64, 224, 16), SWEEP[0]))
    for (batch, size, p), config in cases:
        pred, images, weight = (t.detach() for t in loss_inputs(batch, size, p))
        where = f"patch_pixel_loss B={batch} {size}px p={p}"
        *got, stats, norms = patch_pixel_loss_forward(pred, images, weight, p, True, 1e-6, config=config)
        want = reference.patch_pixel_loss(pred, images, weight, p, True, 1e-6)
        for a, b in zip(got, want):
            assert abs(a.item() - b.item()) <= 1e-4 * max(1.0, abs(b.item())), f"{where} fwd"
        g = patch_pixel_loss_backward(torch.tensor(1.0), torch.tensor(0.1), pred, images, weight, stats, norms, p,
                                      True, 1e-6, config=config)
        r = reference.patch_pixel_loss_backward(torch.tensor(1.0), torch.tensor(0.1), pred, images, weight, p, True, 1e-6)
        assert (g - r).abs().max() <= 1e-4 * r.abs().max(), f"{where} bwd"
        runs = [patch_pixel_loss_forward_with_grad(pred, images, weight, p, True, 1e-6, 0.1, config=config)
                for _ in range(4)]
        # a race on the statistics between programs would show as results that change
        assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0])), f"{where} fwd with grad"
        *again, _, _, fused = runs[0]
        assert all(abs(a.item() - b.item()) <= 1e-6 * max(1.0, abs(b.item())) for a, b in zip(again, got)), where
        assert (fused - r).abs().max() <= 1e-4 * r.abs().max(), f"{where} fwd with grad: gradient"
        patch_pixel_loss_rescale(torch.tensor(0.5, device=device), torch.tensor(1.0, device=device), fused, 0.1, pred,
                                 images, weight, stats, norms, p, config=config)
        r = reference.patch_pixel_loss_backward(torch.tensor(0.5), torch.tensor(1.0), pred, images, weight, p, True, 1e-6)
        assert (fused - r).abs().max() <= 1e-4 * r.abs().max(), f"{where} rescale"


def bench_patch_pixel_loss(device, run, ceil, quick):
    from pacofr.kernels.patch_pixel_loss import SWEEP

    shape = (256, 224, 16) if device.type == "cuda" and not quick else (8, 64, 8)
    dtypes = (torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32,)
    rows = []
    for dtype in dtypes:
        inputs = rotated(loss_inputs(*shape, dtype=dtype))
        pred, images, weight = inputs[0]
        impls = loss_impls(shape[2])
        failed = []
        if dtype == dtypes[0]:  # the launch configurations, in the first dtype
            def result(fn):
                loss = fn(pred, images, weight)
                return (loss, *grads_of(loss, (pred,)))

            # within a bf16 ulp of the largest element (gradients are about 1e-6 at B=256)
            add_sweep(impls, SWEEP, lambda cfg: lambda pr, im, w: _ConfiguredLoss.apply(pr, im, w, shape[2], cfg,
                                                                                       torch.is_grad_enabled()),
                      result, lambda a, b: all((x.float() - y.float()).abs().max() <= 1e-2 * y.float().abs().max()
                                               for x, y in zip(a, b)),
                      failed, {"op": "patch_pixel_loss", "shape": "B={} {}px p={}".format(*shape)})
        for backward in (False, True):
            def call(fn, pred, images, weight, backward=backward):
                with torch.set_grad_enabled(backward):  # forward rows: no gradient to prepare
                    loss = fn(pred, images, weight)
                if backward:
                    grads_of(loss, (pred,))
            times = {}
            for name, fn in impls.items():
                times[name] = run(lambda *a, fn=fn: call(fn, *a), inputs, reps=10, warmup=3)
                gbps = minimal_bytes(pred, images, backward) / times[name] / 1e6
                rows.append({"op": "patch_pixel_loss " + ("fwd+bwd" if backward else "fwd"),
                             "shape": "B={} {}px p={}".format(*shape), "impl": name,
                             "dtype": str(dtype).replace("torch.", ""),
                             "ms": times[name], "gbps": gbps, "pct_copy_ceiling": 100 * gbps / ceil["copy_gbps"],
                             "tflops": float("nan"), "pct_matmul_ceiling": float("nan"),
                             "peak_extra_mb": peak_extra_mb(lambda *a, fn=fn: call(fn, *a), inputs[0], device)})
            for row in rows[-len(impls):]:
                row["triton_speedup"] = row["ms"] / times["triton"]
        rows += failed
    return rows


class _ConfiguredLoss(torch.autograd.Function):
    """patch_pixel_loss (boundary weight 0.1, as in the suites) straight through the kernels
    with a given launch configuration, the gradient from the forward as in the op."""

    @staticmethod
    def forward(ctx, pred, images, weight, p, config, with_grad):
        from pacofr.kernels.patch_pixel_loss import patch_pixel_loss_forward, patch_pixel_loss_forward_with_grad

        if with_grad:
            l_pix, l_sc, stats, norms, ctx.grad = patch_pixel_loss_forward_with_grad(pred, images, weight, p, True,
                                                                                     1e-6, 0.1, config=config)
        else:
            l_pix, l_sc, stats, norms = patch_pixel_loss_forward(pred, images, weight, p, True, 1e-6, config=config)
        ctx.save_for_backward(pred, images, weight, stats, norms)
        ctx.args = (p, config)
        return l_pix + 0.1 * l_sc

    @staticmethod
    def backward(ctx, grad):
        from pacofr.kernels.patch_pixel_loss import patch_pixel_loss_rescale

        pred, images, weight, stats, norms = ctx.saved_tensors
        p, config = ctx.args
        g = patch_pixel_loss_rescale(grad, 0.1 * grad, ctx.grad, 0.1, pred, images, weight, stats, norms, p,
                                     config=config)
        return g, None, None, None, None, None


# DESIGN.md section 4 (bf16 on one H100): (what, op, shape, value from the row lookup, "ge" or
# "le", threshold). The ratios are baseline time over ours, except the GEMM one (ours over the
# GEMM's) and the memory one (extra MB over the N x k outputs' MB: O(N*k)).
_N, _K = 65536, 8  # the codebook target's rows and best-k
_CODEBOOK = ("codebook_topk fwd (ip)", f"N={_N} K=8192 D=768 k={_K}")
_ATTENTION = ("masked_attention fwd+bwd", "B=256 H=12 N=197 d=64")
_LOSS = ("patch_pixel_loss fwd+bwd", "B=256 224px p=16")
TARGETS = [
    ("codebook_topk: mm + topk time / triton time", *_CODEBOOK,
     lambda row: row("torch mm+topk")["ms"] / row("triton")["ms"], "ge", 4.0),
    ("codebook_topk: triton time / bare GEMM time", *_CODEBOOK,
     lambda row: row("triton")["ms"] / row("bare GEMM")["ms"], "le", 1.6),
    ("codebook_topk: extra memory / N x k outputs", *_CODEBOOK,
     lambda row: row("triton")["peak_extra_mb"] / (_N * _K * (4 + 8) / 2**20), "le", 2.0),
    ("masked_attention ragged: SDPA bool mask time / triton time", *_ATTENTION,
     lambda row: row("sdpa_bool_mask")["ms"] / row("triton")["ms"], "ge", 1.5),
    ("masked_attention unmasked: SDPA flash time / triton time", *_ATTENTION,
     lambda row: row("sdpa_unmasked")["ms"] / row("triton_unmasked")["ms"], "ge", 0.9),
    ("patch_pixel_loss: % of copy bandwidth", *_LOSS, lambda row: row("triton")["pct_copy_ceiling"], "ge", 75.0),
    ("patch_pixel_loss: eager time / triton time", *_LOSS,
     lambda row: row("eager")["ms"] / row("triton")["ms"], "ge", 3.0),
    ("patch_pixel_loss: torch.compile time / triton time", *_LOSS,
     lambda row: row("torch_compile")["ms"] / row("triton")["ms"], "ge", 1.3),
]


def targets(rows) -> list[dict]:
    """Each design target from this run's bf16 rows: its value, threshold and whether it holds
    (value and holds None where a row it needs is not in the run)."""
    timed = {(r["op"], r["shape"], r["impl"]): r for r in rows if r.get("dtype") == "bfloat16" and "ms" in r}
    verdicts = []
    for what, op, shape, value, sense, threshold in TARGETS:
        try:
            v = value(lambda impl: timed[(op, shape, impl)])
        except KeyError:
            v = None
        holds = None if v is None else (v >= threshold if sense == "ge" else v <= threshold)
        verdicts.append({"target": what, "shape": shape, "value": v, "threshold": threshold, "sense": sense,
                         "holds": holds})
    return verdicts


def fastest_configs(rows) -> list[dict]:
    """Per op, shape and dtype with sweep rows: the fastest launch configuration among the
    default called directly ("triton kernel") and the SWEEP's, and its time over the default's.
    Forward-only rows leave out the backward's options."""
    def swept(r):
        if "ms" not in r or not r["impl"].startswith("triton ") or r["impl"] == "triton products only":
            return False
        return "bwd" in r["op"] or not any(word in r["impl"] for word in BACKWARD_ONLY)

    groups = {}
    for r in filter(swept, rows):
        groups.setdefault((r["op"], r["shape"], r.get("dtype")), []).append(r)
    found = []
    for (op, shape, dtype), group in groups.items():
        default = next((r for r in group if r["impl"] == "triton kernel"), None)
        best = min(group, key=lambda r: r["ms"])
        name = "default" if best is default else best["impl"][len("triton "):]
        found.append({"op": op, "shape": shape, "dtype": dtype, "fastest": name,
                      "ms": best["ms"], "vs_default": best["ms"] / default["ms"] if default else None})
    return found


def print_rows(rows) -> None:
    header = (f"{'op':<26}{'shape':<28}{'dtype':<10}{'impl':<22}{'ms':>10}{'TFLOP/s':>10}{'% mm':>8}{'GB/s':>9}"
              f"{'% copy':>8}{'extra MB':>10}{'speedup':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<26}{r['shape']:<28}{r.get('dtype', ''):<10}{r['impl']:<22}  FAILED: {r['error']}")
            continue
        print(f"{r['op']:<26}{r['shape']:<28}{r['dtype']:<10}{r['impl']:<22}{r['ms']:>10.3f}{r['tflops']:>10.1f}"
              f"{r['pct_matmul_ceiling']:>8.1f}{r.get('gbps', float('nan')):>9.0f}"
              f"{r.get('pct_copy_ceiling', float('nan')):>8.1f}{r['peak_extra_mb']:>10.0f}{r['triton_speedup']:>9.2f}")
    sys.stdout.flush()  # under a time limit (gpu_session.sh), what was printed stays


def print_verdicts(verdicts, fastest) -> None:
    print("design targets (DESIGN.md section 4, bf16):")
    for v in verdicts:
        state = "not in this run" if v["holds"] is None else "holds" if v["holds"] else "MISSED"
        value = "" if v["value"] is None else f"{v['value']:.2f} "
        print(f"  {v['target']:<62}{value:>8}{'>=' if v['sense'] == 'ge' else '<='} {v['threshold']:<6g}{state}")
    for f in fastest:
        ratio = "" if f["vs_default"] is None else f", {f['vs_default']:.2f}x the default's time"
        print(f"  fastest configuration, {f['op']} {f['shape']} {f['dtype']}: {f['fastest']} ({f['ms']:.3f} ms{ratio})")


BENCHES = {"masked_attention": (check_masked_attention, bench_masked_attention),
           "patch_pixel_loss": (check_patch_pixel_loss, bench_patch_pixel_loss),
           "codebook_topk": (check_codebook_topk, bench_codebook_topk)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--ops", nargs="*", default=None, help=f"only these ops (of {', '.join(BENCHES)})")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    run = timer(device)
    t0 = time.time()
    ceil = ceilings(device, run, args.quick)
    print(f"device: {card}; matmul ceiling {ceil['matmul_tflops']:.1f} TFLOP/s, copy ceiling {ceil['copy_gbps']:.0f} GB/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # one file per op list, so that runs of one op each (gpu_session.sh) keep all their files
    path = out / f"gpu_report_{card.replace(' ', '_')}{''.join('_' + op for op in args.ops or [])}.json"
    rows, skipped, failed = [], [], []

    def save(complete: bool):
        """The JSON so far: written after each op, so a run cut short keeps what it measured."""
        verdicts, fastest = targets(rows), fastest_configs(rows)
        tmp = path.with_suffix(".tmp")  # (renamed into place: a run killed while writing keeps the last file)
        tmp.write_text(json.dumps(finite_floats({"device": card, "ceilings": ceil, "rows": rows, "targets": verdicts,
                                           "fastest_configs": fastest, "skipped": skipped, "failed": failed,
                                           "complete": complete, "seconds": time.time() - t0}),
                                  indent=1, allow_nan=False))
        tmp.replace(path)
        return verdicts, fastest

    for op, (check, bench) in BENCHES.items():
        if args.ops is not None and op not in args.ops:
            continue
        if "triton" not in backends(op):
            skipped.append(f"{op}: no Triton backend can run here")
            continue
        try:  # one op failing (wrong result, compile error) must not hide the others' figures
            check(device)
            print(f"{op}: matches the reference on {card}")
            new = bench(device, run, ceil, args.quick)
            rows += new
            print_rows(new)
        except Exception as e:
            failed.append(f"{op}: {type(e).__name__}: {e}")
            print(f"{op}: FAILED: {traceback.format_exc()}", file=sys.stderr)
        save(complete=False)
    print_verdicts(*save(complete=True))
    for s in skipped:
        print("skipped", s)
    for f in failed:
        print("FAILED", f)
    print(f"wrote {path} in {time.time() - t0:.0f} s; speedup = this row's time / the triton row's time "
          "(> 1: the public Triton op is faster)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
