"""Every Triton kernel compiles for an H100 (sm_90) through Triton's full pipeline, ptxas
included, with the launch configurations the wrappers pick on a GPU. The interpreter runs
the kernels' logic but never compiles them: code that only a compiler rejects (a global that
is not constexpr, shared memory over the per-block limit) and register spills show up here.

The compile runs in a subprocess (benchmarks/compile_report.py) because this session's
Triton is in interpreter mode."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "compile_report.py"
CUOBJDUMP = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _kernel_names() -> set[str]:
    """The @triton.jit functions that are launched (named *_kernel) in kernels/."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                names.add(node.name)
    return names


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    if not CUOBJDUMP.exists():
        pytest.skip("this Triton wheel ships no CUDA binaries (ptxas, cuobjdump)")
    out = tmp_path_factory.mktemp("compile") / "sm90.json"
    proc = subprocess.run([sys.executable, str(REPORT), "--arch", "90", "--quick", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert out.exists(), proc.stdout + proc.stderr
    return json.loads(out.read_text())["rows"], proc


def test_every_kernel_compiles_and_fits(sm90):
    rows, proc = sm90
    errors = [f"{r['case']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    unfit = [f"{r['case']} {r['kernel']}: {r['problems']}" for r in rows if r["problems"]]
    assert not unfit, "\n".join(unfit)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert {r["kernel"] for r in rows} == _kernel_names()


def test_fast_paths_do_not_spill(sm90):
    """Only fp32 attention (IEEE products on CUDA cores, the exact path) may spill."""
    rows, _ = sm90
    spills = [f"{r['case']} {r['kernel']}: {r['spill_bytes']} B" for r in rows
              if r["spill_bytes"] and not (r["case"].startswith("masked_attention") and r["dtype"] == "fp32")]
    assert not spills, "\n".join(spills)


def test_low_precision_products_use_tensor_cores(sm90):
    rows, _ = sm90
    for r in rows:
        if r["dtype"] != "fp32" and r["kernel"] in ("_topk_fwd_kernel", "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel",
                                   "_attn_bwd_dq_kernel"):
            assert r["tensor_cores"], f"{r['case']} {r['kernel']}: no mma/wgmma in the PTX"
