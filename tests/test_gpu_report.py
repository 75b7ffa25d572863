"""benchmarks/gpu_report.py's verdicts on the design targets and its pick of the fastest launch
configuration, from a recorded H100 run (benchmarks/results/) and from rows at the thresholds."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def report():
    """benchmarks/gpu_report.py loaded from its path (it puts benchmarks/ on sys.path itself,
    for its sibling modules)."""
    spec = importlib.util.spec_from_file_location("gpu_report", BENCH / "gpu_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _by_target(verdicts):
    return {v["target"]: v for v in verdicts}


def test_verdicts_of_a_recorded_run(report):
    """Run 2 (benchmarks/results/): codebook 23.39 ms mm + topk, 3.168 ms ours, 1.200 ms GEMM;
    attention fwd+bwd through the public op 2.043 ms against SDPA's 1.681 ms; no unmasked
    Triton row and no loss rows in that run."""
    rows = json.loads((BENCH / "results" / "gpu_report_NVIDIA_H100_80GB_HBM3_run2.json").read_text())["rows"]
    v = _by_target(report.targets(rows))
    assert len(v) == len(report.TARGETS)
    mm_topk = v["codebook_topk: mm + topk time / triton time"]
    assert mm_topk["value"] == pytest.approx(7.38, abs=0.01) and mm_topk["holds"] is True
    gemm = v["codebook_topk: triton time / bare GEMM time"]
    assert gemm["value"] == pytest.approx(2.64, abs=0.01) and gemm["holds"] is False
    memory = v["codebook_topk: extra memory / N x k outputs"]  # 6.0 MiB: fp32 scores + int64 indices
    assert memory["value"] == pytest.approx(1.0, abs=0.01) and memory["holds"] is True
    ragged = v["masked_attention ragged: SDPA bool mask time / triton time"]
    assert ragged["value"] == pytest.approx(0.82, abs=0.01) and ragged["holds"] is False
    for name in ("masked_attention unmasked: SDPA flash time / triton time", "patch_pixel_loss: % of copy bandwidth",
                 "patch_pixel_loss: torch.compile time / triton time"):
        assert v[name]["value"] is None and v[name]["holds"] is None
    fastest = {(f["op"], f["dtype"]): f for f in report.fastest_configs(rows)}
    attn = fastest[("masked_attention fwd+bwd", "bfloat16")]
    assert attn["fastest"] == "64x64 w4 s2" and attn["ms"] == pytest.approx(1.469, abs=1e-3)
    assert attn["vs_default"] is None  # that run had no "triton kernel" row


def _row(op, shape, impl, ms, dtype="bfloat16", **extra):
    return {"op": op, "shape": shape, "impl": impl, "ms": ms, "dtype": dtype, **extra}


@pytest.mark.parametrize("ours, holds", [(1.0, True), (1.001, False)])
def test_verdicts_at_the_thresholds(report, ours, holds):
    """Exactly at a threshold a target holds, just past it it does not; fp32 rows are not
    the bf16 target's, and a sweep row slower than the default is not picked."""
    loss = ("patch_pixel_loss fwd+bwd", "B=256 224px p=16")
    attn = ("masked_attention fwd+bwd", "B=256 H=12 N=197 d=64")
    rows = [_row(*loss, "triton", ours, pct_copy_ceiling=75.0 / ours), _row(*loss, "eager", 3.0),
            _row(*loss, "torch_compile", 1.3), _row(*loss, "eager", 100.0, dtype="float32"),
            _row(*attn, "triton_unmasked", ours), _row(*attn, "sdpa_unmasked", 0.9),
            _row(*attn, "triton kernel", 2.0), _row(*attn, "triton 64x64 w4 s3 atomic", 1.5),
            _row(*attn, "triton 128x64 w8 s3", 2.5)]
    v = _by_target(report.targets(rows))
    for name in ("patch_pixel_loss: % of copy bandwidth", "patch_pixel_loss: eager time / triton time",
                 "patch_pixel_loss: torch.compile time / triton time",
                 "masked_attention unmasked: SDPA flash time / triton time"):
        assert v[name]["holds"] is holds, name
    assert v["masked_attention ragged: SDPA bool mask time / triton time"]["holds"] is None
    (fastest,) = report.fastest_configs(rows)
    assert fastest["fastest"] == "64x64 w4 s3 atomic" and fastest["vs_default"] == pytest.approx(0.75)
    # a forward-only row: the backward's options time the same forward kernel again
    fwd = ("masked_attention fwd", attn[1])
    rows = [_row(*fwd, "triton kernel", 2.0), _row(*fwd, "triton 64x64 w4 s3 atomic", 1.5),
            _row(*fwd, "triton 128x64 w8 s3", 1.8)]
    (fastest,) = report.fastest_configs(rows)
    assert fastest["fastest"] == "128x64 w8 s3"


def test_gpu_session_caps_every_step_at_the_time_left(tmp_path):
    """benchmarks/gpu_session.sh with a stand-in python that takes 1 s a call and a 30 s
    session: each step's limit is cut to the time left, and once too little is left the rest
    are skipped, so the whole fits its call."""
    import os
    import re
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\nsleep 1\n")
    (fake / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SESSION_SECONDS="30")
    run = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert len(lines) == 3 + 1 + 4 and lines[0].startswith("report masked_attention: exit 0")
    limits = [int(m.group(1)) for m in map(re.compile(r".*\(limit (\d+) s\)").match, lines) if m]
    assert limits and all(limit <= 25 for limit in limits) and limits == sorted(limits, reverse=True), lines
    skipped = [" skipped, " in line for line in lines]
    assert skipped[-1] and skipped == sorted(skipped), lines  # (from the first skip on, all)
    assert {"gpu.txt", "summary.txt", "report.txt"} <= {p.name for p in (tmp_path / "out").iterdir()}
