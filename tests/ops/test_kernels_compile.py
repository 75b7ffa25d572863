"""Every Triton kernel compiles for an H100 (sm_90) and an A100 (sm_80) through Triton's full
pipeline, ptxas included, with the launch configurations the wrappers pick on a GPU. The interpreter runs
the kernels' logic but never compiles them: code that only a compiler rejects (a global that
is not constexpr, shared memory over the per-block limit) and register spills show up here.

The compile runs in a subprocess (benchmarks/compile_report.py) because the test process's
Triton is in interpreter mode."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .utils import ROOT

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
def reports(tmp_path_factory):
    """{arch: (rows, exit status, printed table)}; the two compiles run side by side (ptxas
    is single-threaded)."""
    if not CUOBJDUMP.exists():
        pytest.skip("this Triton wheel ships no CUDA binaries (ptxas, cuobjdump)")
    out = tmp_path_factory.mktemp("compile")
    procs = {arch: subprocess.Popen([sys.executable, str(REPORT), "--arch", str(arch), "--quick", "--json",
                                     str(out / f"sm{arch}.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, cwd=ROOT) for arch in (90, 80)}
    result = {}
    for arch, proc in procs.items():
        text = proc.communicate(timeout=1200)[0]
        path = out / f"sm{arch}.json"
        assert path.exists(), text
        result[arch] = json.loads(path.read_text())["rows"], proc.returncode, text
    return result


@pytest.fixture
def sm90(reports):
    return reports[90]


@pytest.fixture(params=[90, 80], ids=["sm90", "sm80"])
def compiled(request, reports):
    return reports[request.param]


def test_every_kernel_compiles_and_fits(compiled):
    rows, status, text = compiled
    errors = [f"{r['case']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    unfit = [f"{r['case']} {r['kernel']}: {r['problems']}" for r in rows if r["problems"]]
    assert not unfit, "\n".join(unfit)
    assert status == 0, text[-3000:]
    assert {r["kernel"] for r in rows} == _kernel_names()


def test_fast_paths_do_not_spill_in_loops(sm90):
    """On sm_90 the default configurations have no spill load or store inside a loop, except
    fp32 attention (IEEE products on CUDA cores, the exact path), and spill at most 24 bytes
    in all (the register-capped attention forward from d = 80 keeps six values in local memory
    across its key loop: a few instructions per program, for twice the blocks per SM). The
    alternatives that gpu_report.py sweeps only have to launch."""
    rows, _, _ = sm90

    def allowed(r):
        return r["case"].startswith("sweep") or (r["case"].startswith("masked_attention") and r["dtype"] == "fp32")

    spills = [f"{r['case']} {r['kernel']}: {r['spill_bytes']} B, {r['loop_spills']} in loops" for r in rows
              if (r["loop_spills"] or r["spill_bytes"] > 24) and not allowed(r)]
    assert not spills, "\n".join(spills)
    assert any(r["loop_instructions"] for r in rows if r["kernel"] == "_attn_fwd_kernel")  # loops are found


MATMUL_KERNELS = ("_topk_fwd_kernel", "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")


def test_low_precision_products_use_tensor_cores(compiled):
    rows, _, _ = compiled
    for r in rows:
        if r["dtype"] != "fp32" and r["kernel"] in MATMUL_KERNELS:
            assert r["tensor_cores"], f"{r['case']} {r['kernel']}: no mma/wgmma in the PTX"
