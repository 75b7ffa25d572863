"""benchmarks/gpu_report.py without a GPU: its verdicts on the performance targets and its pick
of the fastest launch configuration (from a recorded H100 run in benchmarks/results/ and from
rows at the thresholds), its rows from the shared cases (benchmarks/cases.py) with a stand-in
timer, its strict JSON, and benchmarks/gpu_session.sh's deadline with a stand-in python."""

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pacofr.ops

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RUNS = sorted((BENCH / "results").glob("gpu_report_*_run*.json"))


@pytest.fixture(scope="module")
def report():
    """benchmarks/gpu_report.py as `python benchmarks/gpu_report.py` finds its sibling modules:
    with benchmarks/ first on the path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCH))
        yield importlib.import_module("gpu_report")


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


def test_targets_name_the_recorded_rows(report):
    """Each target's op and shape, now taken from the cases, are those of the recorded runs'
    rows (run 1 has all three ops), so old and new files are judged alike."""
    recorded = {(r["op"], r["shape"]) for path in RUNS for r in json.loads(path.read_text())["rows"]}
    assert len(RUNS) >= 2
    for what, op, shape, *_ in report.TARGETS:
        assert (op, shape) in recorded, what


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


def _stand_in_timer(times):
    """A timer that runs nothing and answers each implementation's time, in turn."""
    answers = iter(times)
    return lambda fn: next(answers)


def test_rows_from_the_cases(report):
    """The codebook case at its CPU shape with a stand-in timer: one row per implementation,
    in the recorded runs' layout, with TFLOP/s of the N x K products, % of the ceiling and the
    time over the triton row's; a raising implementation becomes a row with its error."""
    cases = sys.modules["cases"]
    case = cases.CODEBOOK
    shape = case.cpu_shapes[0]
    n, kc, d = shape[:3]
    ceil = {"matmul_tflops": 100.0, "copy_gbps": 1000.0}
    rows = report.case_rows(case, shape, torch.float32, ceil, timer=_stand_in_timer([2.0, 8.0, 50.0, 1.0, 3.0, 3.0]))
    names = [r["impl"] for r in rows]  # on CPU also the native kernel and faiss, where installed
    assert names == [impl for impl in case.impls if impl in names] and set(case.impls[:4]) <= set(names)
    recorded = json.loads(RUNS[0].read_text())["rows"]
    layout = [list(r) for r in recorded if r["op"] == "codebook_topk fwd (ip)"][0]
    assert all(list(r) == layout for r in rows)
    triton, mm_topk = rows[0], rows[1]
    assert triton["op"] == "codebook_topk fwd (ip)" and triton["shape"] == "N=1024 K=1024 D=64 k=4"
    assert triton["dtype"] == "float32" and triton["ms"] == 2.0
    assert triton["tflops"] == pytest.approx(2 * n * kc * d / 2.0 / 1e9)
    assert triton["pct_matmul_ceiling"] == pytest.approx(triton["tflops"])  # a 100 TFLOP/s ceiling
    assert mm_topk["triton_speedup"] == pytest.approx(4.0) and triton["triton_speedup"] == 1.0
    assert math.isnan(triton["peak_extra_mb"])  # not measured without CUDA

    def timer(fn):
        raise RuntimeError("out of resources")

    rows = report.case_rows(case, shape, torch.float32, ceil, timer=timer)
    assert all(r["error"] == "RuntimeError: out of resources" and "ms" not in r for r in rows)


def test_loss_rows_count_bytes(report):
    """The loss case's rows give GB/s of the minimal bytes and % of the copy ceiling, TFLOP/s
    as NaN, in the recorded runs' layout, forward then forward+backward."""
    cases = sys.modules["cases"]
    case = cases.LOSS
    shape = case.cpu_shapes[0]
    ceil = {"matmul_tflops": 100.0, "copy_gbps": 1000.0}
    rows = report.case_rows(case, shape, torch.float32, ceil, timer=lambda fn: 0.5)
    n = 4 + (cases.DEVICE == "cpu" and "native" in pacofr.ops.backends("patch_pixel_loss"))  # (+ native on CPU)
    assert [r["op"] for r in rows] == ["patch_pixel_loss fwd"] * n + ["patch_pixel_loss fwd+bwd"] * n
    b, size, p = shape
    pred_bytes, image_bytes = b * (size // p) ** 2 * p * p * 3 * 4, b * 3 * size * size * 4
    assert rows[0]["gbps"] == pytest.approx((pred_bytes + image_bytes) / 0.5 / 1e6)
    assert rows[n]["gbps"] == pytest.approx((2 * pred_bytes + image_bytes) / 0.5 / 1e6)
    assert rows[n]["pct_copy_ceiling"] == pytest.approx(rows[n]["gbps"] / 10)
    layout = [list(r) for r in json.loads(RUNS[0].read_text())["rows"] if r["op"] == "patch_pixel_loss fwd+bwd"][0]
    assert all(list(r) == layout and math.isnan(r["tflops"]) for r in rows)


def test_the_json_is_strict_and_renamed_into_place(report, tmp_path):
    """NaN and inf become null (strict JSON, readable by any parser), the document has the
    documented layout, and the file is replaced whole: no temporary file is left."""
    path = tmp_path / "gpu_report_card_op.json"
    path.write_text("previous")
    rows = [_row("patch_pixel_loss fwd+bwd", "B=256 224px p=16", "triton", 1.0, peak_extra_mb=float("nan"),
                 pct_copy_ceiling=80.0)]
    doc = report.document("card", {"matmul_tflops": float("inf"), "copy_gbps": 1.0}, rows, [], [], False, 3.0)
    report.write_json(path, doc)

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    back = json.loads(path.read_text(), parse_constant=refuse)
    assert list(back) == ["device", "ceilings", "rows", "targets", "fastest_configs", "skipped", "failed", "complete",
                          "seconds"]
    assert back["complete"] is False and back["ceilings"]["matmul_tflops"] is None
    assert back["rows"][0]["peak_extra_mb"] is None and back["rows"][0]["ms"] == 1.0
    (copy,) = [t for t in back["targets"] if t["target"] == "patch_pixel_loss: % of copy bandwidth"]
    assert copy["value"] == 80.0 and copy["holds"] is True
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_the_report_needs_cuda(report, monkeypatch, capsys, tmp_path):
    """Without CUDA the report says so in one line and exits 2, writing nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert report.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err
    assert not (tmp_path / "out").exists()


def test_gpu_session_caps_every_step_at_the_time_left(tmp_path):
    """benchmarks/gpu_session.sh with a stand-in python that takes 2 s a call and a 32 s
    session (the first step starts after two calls, 4 s): each step's limit is cut to the
    time left, and once too little is left the rest are skipped, so the whole fits its call;
    the op tests (tests/ops) come last."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\nsleep 2\n")
    (fake / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SESSION_SECONDS="32")
    run = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    steps = [f"report {op}" for op in ("masked_attention", "patch_pixel_loss", "codebook_topk")]
    assert [line.split(":")[0] for line in lines] == ["build_native"] + steps + ["dispatch table", "train_step",
                                                                                  "tests_ops"], lines
    assert lines[0].startswith("build_native: exit 0")
    limits = [int(m.group(1)) for m in map(re.compile(r".*\(limit (\d+) s\)").match, lines) if m]
    assert limits and all(limit <= 32 - 4 - 5 for limit in limits) and limits == sorted(limits, reverse=True), lines
    skipped = [" skipped, " in line for line in lines]
    assert skipped[-1] and skipped == sorted(skipped), lines  # (from the first skip on, all)
    assert {"summary.txt", "report.txt"} <= {p.name for p in (tmp_path / "out").iterdir()}


def test_gpu_session_runs_the_report_per_op_then_the_op_tests(tmp_path):
    """With time to spare (a stand-in python that returns at once): the C++ backend's build,
    the report once per op, attention first, each writing to OUT_DIR, the dispatch table
    refreshed from those reports and copied there, then the training step, then the op tests
    on the GPU: `pytest -q tests/ops` (but the compile-only check)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text("#!/bin/sh\nexit 0\n")
    (fake / "python").chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SESSION_SECONDS="300")
    run = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), str(out)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    ran = [line for line in (out / "report.txt").read_text().splitlines() if line.startswith("== ")]
    assert ran == (["== build_native: python setup.py -q build_ext --inplace"]
                   + [f"== report {op}: python benchmarks/gpu_report.py --ops {op} --out {out}"
                      for op in ("masked_attention", "patch_pixel_loss", "codebook_topk")]
                   + [f"== dispatch table: bash -c python benchmarks/dispatch_table.py {out}/gpu_report_*.json "
                      f"&& cp pacofr/ops/dispatch_table.json {out}/"])
    assert (out / "dispatch_table.json").read_text() == (BENCH.parent / "pacofr/ops/dispatch_table.json").read_text()
    tests = [line.split(": ", 1)[1] for line in (out / "tests.txt").read_text().splitlines() if line.startswith("== ")]
    assert tests == ["python -m pytest -q tests/ops --ignore=tests/ops/test_kernels_compile.py"]
    summary = [line.split(":")[0] for line in (out / "summary.txt").read_text().splitlines()]
    assert summary.index("train_step") == 5 and len(summary) == 6 + len(tests)
