"""Compile every Triton kernel specialization that pacofr's launchers use, for a GPU
architecture, on a machine without a GPU, and report each kernel's resources.

    python benchmarks/compile_report.py                 # sm_90 (H100)
    python benchmarks/compile_report.py --arch 80       # sm_80 (A100)
    python benchmarks/compile_report.py --json out.json

The launchers run on CPU tensors with the GPU code path (not the interpreter): each launch
compiles through Triton's full pipeline (TTIR, TTGIR, LLVM, PTX, cubin with ptxas) for the
chosen target and is then dropped instead of run. This catches what the interpreter cannot:
code that does not compile, shared memory over the per-block limit, too many registers for
the launch, and register spills (local memory), also those inside a loop. It says nothing
about speed; the instructions in each loop body (per tile, statically) are a stand-in for it.

Needs the ptxas and cuobjdump that Triton's wheel ships; exits 2 with a message otherwise.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The GPU code path: this must hold before triton is imported.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from common import config_name  # noqa: E402

# Opt-in shared memory per block and registers per SM (CUDA occupancy tables).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
REGS_PER_SM = 65536
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class _TargetDriver:
    """The few driver calls Triton's JIT makes before compiling, answered for a fixed target."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _codebook_cases(quick):
    """(name, dtype, launch) for each case."""
    from pacofr.kernels.codebook_topk import SWEEP, codebook_topk_backward, codebook_topk_forward

    def case(n, kc, d, k, metric, dtype, splits=None, deterministic=False):
        x, c = torch.randn(n, d).to(dtype), torch.randn(kc, d).to(dtype)
        codebook_topk_forward(x, c, k, metric, splits=splits)
        codebook_topk_backward(torch.randn(n, k), x, c, torch.randint(0, kc, (n, k)), metric, deterministic)

    for dtype in (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32):
        for metric in ("ip", "l2"):
            yield f"codebook_topk N=4096 K=8192 D=768 k=8 {metric}", dtype, lambda m=metric, t=dtype: case(
                4096, 8192, 768, 8, m, t)
    for k in (1, 32):
        yield f"codebook_topk N=197 K=1000 D=48 k={k} l2 split", torch.bfloat16, lambda k=k: case(
            197, 1000, 48, k, "l2", torch.bfloat16, splits=4)
    yield "codebook_topk N=197 K=8192 D=48 k=32 ip split 64 (widest merge)", torch.bfloat16, lambda: case(
        197, 8192, 48, 32, "ip", torch.bfloat16, splits=64)
    for dtype in (torch.bfloat16, torch.float32):
        yield "codebook_topk N=1000 K=4099 D=3 k=5 ip deterministic", dtype, lambda t=dtype: case(
            1000, 4099, 3, 5, "ip", t, deterministic=True)
    x, c = torch.randn(4096, 768).bfloat16(), torch.randn(8192, 768).bfloat16()
    for config in SWEEP:
        yield f"sweep codebook_topk D=768 k=8 {config_name(config)}", torch.bfloat16, lambda cfg=config: \
            codebook_topk_forward(x, c, 8, "ip", config=cfg)
    yield "codebook_topk D=768 k=8 products only", torch.bfloat16, lambda: codebook_topk_forward(
        x, c, 8, "ip", config={"SELECT": False})


def _attention_cases(quick):
    from pacofr.kernels.masked_attention import SWEEP, masked_attention_backward, masked_attention_forward

    def case(n, d, dtype, seq, km, config=None):
        q, k, v = (torch.randn(2, 3, n, d).to(dtype) for _ in range(3))
        seqlens = torch.tensor([n, n // 2]) if seq else None
        key_mask = torch.rand(2, n) > 0.2 if km else None
        out, lse = masked_attention_forward(q, k, v, seqlens, key_mask, d**-0.5, config=config)
        masked_attention_backward(torch.randn_like(out), q, k, v, out, lse, seqlens, key_mask, d**-0.5, config)

    for dtype in (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16, torch.float32):
        for d in (32, 64, 80, 96, 128):
            yield f"masked_attention N=197 d={d} seqlens", dtype, lambda d=d, t=dtype: case(197, d, t, True, False)
    yield "masked_attention N=197 d=64 key_mask", torch.float32, lambda: case(197, 64, torch.float32, False, True)
    yield "masked_attention N=1024 d=64 seqlens+key_mask", torch.bfloat16, lambda: case(
        1024, 64, torch.bfloat16, True, True)
    for config in SWEEP:
        yield f"sweep masked_attention d=64 {config_name(config)}", torch.bfloat16, lambda cfg=config: case(
            197, 64, torch.bfloat16, True, False, cfg)


def _loss_cases(quick):
    from pacofr.kernels.patch_pixel_loss import (SWEEP, patch_pixel_loss_backward, patch_pixel_loss_forward,
                                                 patch_pixel_loss_forward_with_grad, patch_pixel_loss_rescale)

    def case(h, w, p, c, dtype, norm, config=None):
        gh, gw = h // p, w // p
        pred = torch.randn(2, gh * gw, p * p * c).to(dtype)
        images, weight = torch.rand(2, c, h, w), (torch.rand(2, gh * gw) > 0.5).float()
        *_, stats, norms = patch_pixel_loss_forward(pred, images, weight, p, norm, 1e-6, config=config)
        g = torch.tensor(1.0), torch.tensor(0.5)
        patch_pixel_loss_backward(*g, pred, images, weight, stats, norms, p, norm, 1e-6, config=config)
        *_, stats, norms, grad = patch_pixel_loss_forward_with_grad(pred, images, weight, p, norm, 1e-6, 0.5,
                                                                    config=config)
        patch_pixel_loss_rescale(*g, grad, 0.5, pred, images, weight, stats, norms, p, config=config)

    for h, w, p, c in ((224, 224, 16, 3), (224, 224, 14, 3), (64, 64, 8, 3), (96, 160, 16, 1)):
        for dtype in (torch.float32, torch.bfloat16):
            yield f"patch_pixel_loss {h}x{w} p={p} C={c}", dtype, lambda a=(h, w, p, c, dtype): case(*a, True)
    yield "patch_pixel_loss 224x224 p=16 C=3 no norm_pix", torch.float32, lambda: case(
        224, 224, 16, 3, torch.float32, False)
    for config in SWEEP:
        yield f"sweep patch_pixel_loss p=16 C=3 {config_name(config)}", torch.bfloat16, lambda cfg=config: case(
            224, 224, 16, 3, torch.bfloat16, True, cfg)


def _loops(sass: str) -> tuple[list[int], int]:
    """(instructions in each loop body, longest first; spill loads and stores inside loops) of
    a SASS listing. A loop is the range from a backward branch's target to the branch. Body
    sizes are a static stand-in for the work per tile; a spill inside a loop costs every
    iteration, one outside it (a value kept across the loop) a few instructions per program."""
    code = [(int(a, 16), text) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in code:
        branch = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < addr:
            loops.append((int(branch.group(1), 16), addr))
    sizes = sorted((sum(1 for a, _ in code if lo <= a <= hi) for lo, hi in loops), reverse=True)
    spills = sum(1 for a, text in code if re.search(r"\b(LDL|STL)\b", text) and any(lo <= a <= hi for lo, hi in loops))
    return sizes, spills


def _resources(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK):(\d+)", text))
    loop_sizes, loop_spills = _loops(sass)
    # Triton kernels keep no arrays in local memory: a stack frame is register spills.
    return {"regs": int(usage["REG"]), "spill_bytes": int(usage["STACK"]), "loop_spills": loop_spills,
            "tensor_cores": bool(re.search(r"\b(wgmma|mma)\.", kernel.asm["ptx"])),
            # static count: for a kernel without loops, what each thread executes
            "instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.M)),
            "loop_instructions": loop_sizes,
            "shared": int(kernel.metadata.shared), "num_warps": kernel.metadata.num_warps,
            "num_stages": kernel.metadata.num_stages}


def compile_all(arch: int, quick: bool = False, only: str | None = None) -> list[dict]:
    """One row per (case, kernel): the case that launched it, resources and problems found."""
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    launched = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        launched.append(kernel)
        return kernel

    JITFunction.run = compile_only
    rows = []
    try:
        for name, dtype, case in [*_codebook_cases(quick), *_attention_cases(quick), *_loss_cases(quick)]:
            name = f"{name} {_short(dtype)}"
            if only is not None and only not in name:
                continue
            launched.clear()
            try:
                case()
            except Exception as e:  # a kernel that does not compile: report it, go on
                rows.append({"case": name, "dtype": _short(dtype), "kernel": "?", "error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            for kernel in launched:
                row = {"case": name, "dtype": _short(dtype), "kernel": kernel.name, **_resources(kernel)}
                row["problems"] = problems(row, arch)
                rows.append(row)
    finally:
        JITFunction.run = run
        try:
            driver.reset_active()
        except RuntimeError:  # no GPU driver on this machine: nothing to go back to
            pass
    return rows


def problems(row: dict, arch: int) -> list[str]:
    """What stops the kernel from launching on that architecture (spills only slow it)."""
    found = []
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and row["shared"] > limit:
        found.append(f"shared memory {row['shared']} B > {limit} B per block on sm_{arch}")
    if row["regs"] * row["num_warps"] * 32 > REGS_PER_SM:
        found.append(f"{row['regs']} registers x {row['num_warps'] * 32} threads > {REGS_PER_SM} per SM")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80 = A100, 90 = H100)")
    parser.add_argument("--quick", action="store_true", help="bf16 and fp32 only (no fp16)")
    parser.add_argument("--only", help="only the cases whose name contains this")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if not CUOBJDUMP.exists():
        print(f"compile_report: {CUOBJDUMP} not found (Triton's CUDA backend binaries are needed)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    t0 = time.time()
    rows = compile_all(args.arch, args.quick, args.only)
    header = (f"{'case':<60}{'kernel':<28}{'warps':>6}{'regs':>6}{'spill B':>8}{'in loop':>8}{'smem KB':>9}{'  mma':>5}"
              f"{'instr':>7}  loops")
    print(f"sm_{args.arch}, triton {triton.__version__}\n{header}\n{'-' * len(header)}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<60}COMPILE ERROR: {r['error'].splitlines()[-1]}")
            continue
        print(f"{r['case']:<60}{r['kernel']:<28}{r['num_warps']:>6}{r['regs']:>6}{r['spill_bytes']:>8}"
              f"{r['loop_spills']:>8}{r['shared'] / 1024:>9.1f}{'  yes' if r['tensor_cores'] else '   no'}"
              f"{r['instructions']:>7}  {'/'.join(map(str, r['loop_instructions'][:3]))}"
              + "".join(f"\n    ! {p}" for p in r["problems"]))
    spilled = sum(1 for r in rows if r.get("spill_bytes"))
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "rows": rows}, indent=1))
    bad = [r for r in rows if "error" in r or r["problems"]]
    print(f"{len(rows)} kernels compiled in {time.time() - t0:.0f} s; {len(bad)} cannot launch; {spilled} spill registers")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
