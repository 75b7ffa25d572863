"""On a GPU: time every fused op that has a Triton kernel against its baselines at the
performance-target shapes (cases.py), print a table and write it as JSON.

    python benchmarks/gpu_report.py            # sized for a few minutes on one H100
    python benchmarks/gpu_report.py --quick    # the suites' small shapes, for a smoke run
    python benchmarks/gpu_report.py --ops codebook_topk

Each row is one case's implementation at one shape, dtype and pass, timed with
triton.testing.do_bench (timing.py). Ceilings are measured in the same run: a large bf16
matmul (TFLOP/s) and a device-to-device copy (GB/s, read + write). The table and a JSON file
(benchmarks/results/gpu_report_<card>[_<op>...].json, strict JSON, renamed into place after
each op) give time, throughput, % of ceiling, peak extra memory and the ratio to the "triton"
row, then each performance target's verdict and the fastest launch configuration. Results are
not checked here: the op tests check them (gpu_session.sh runs them on the same GPU). Needs
CUDA; `pytest benchmarks/` times the same cases on CPU.
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from cases import ATTENTION, CASES, CODEBOOK, LOSS, call, implementations, sweep
from common import BACKWARD_ONLY
from timing import ceilings, median_ms, peak_extra_mb

from pacofr.cli import finite_floats
from pacofr.ops import backends

OPS = ("masked_attention", "patch_pixel_loss", "codebook_topk")  # the order of a run: attention first


def case_rows(case, shape, dtype, ceil, timer=median_ms, with_sweep=False) -> list[dict]:
    """One row per implementation and pass: its time by `timer`, throughput and % of the
    ceiling, peak extra memory and its time over the "triton" row's; an implementation that
    raises (a launch configuration that does not compile, say) gives a row with its error."""
    inputs = case.inputs(shape, dtype)
    rows = []
    for backward in case.passes:
        start = len(rows)
        base = {"op": case.title(shape, backward), "shape": case.describe(shape), "dtype": str(dtype).split(".")[-1]}
        for impl, fn in implementations(case, shape, with_sweep).items():
            def step(fn=fn):
                return call(case, fn, inputs, backward)
            try:
                ms = timer(step)
                extra = peak_extra_mb(step)
            except Exception as e:
                rows.append({**base, "impl": impl, "error": f"{type(e).__name__}: {e}"[:500]})
                continue
            # FLOPs per ms / 1e9 = TFLOP/s; bytes per ms / 1e6 = GB/s
            per_s = case.work(impl, shape, inputs, backward) / ms / (1e9 if case.unit == "flops" else 1e6)
            row = {"op": base["op"], "shape": base["shape"], "impl": impl, "dtype": base["dtype"], "ms": ms}
            if case.unit == "flops":
                row.update(tflops=per_s, pct_matmul_ceiling=100 * per_s / ceil["matmul_tflops"])
            else:
                row.update(gbps=per_s, pct_copy_ceiling=100 * per_s / ceil["copy_gbps"], tflops=float("nan"),
                           pct_matmul_ceiling=float("nan"))
            rows.append({**row, "peak_extra_mb": extra})
        ours = next((r["ms"] for r in rows[start:] if r["impl"] == "triton" and "ms" in r), float("nan"))
        for row in rows[start:]:
            if "ms" in row:
                row["triton_speedup"] = row["ms"] / ours  # > 1: Triton is faster
    return rows


def op_rows(op, ceil, quick) -> list[dict]:
    """Every case of the op at its GPU shapes (with --quick its CPU shapes), in each dtype; the
    launch configurations at the first shape in the first dtype."""
    rows = []
    for case in (c for c in CASES if c.op == op):
        shapes = case.cpu_shapes if quick else case.gpu_shapes
        for dtype in case.dtypes:
            for shape in shapes:
                rows += case_rows(case, shape, dtype, ceil, with_sweep=case.kernel is not None and (
                    shape, dtype) == (shapes[0], case.dtypes[0]))
    return rows


# The performance targets (docs/design.md; bf16 on one H100/H200): (what, op, shape, value
# from the row lookup, "ge" or "le", threshold). The ratios are baseline time over ours, except
# the GEMM one (ours over the GEMM's) and the memory one (extra MB over the N x k outputs' MB:
# O(N*k)).
def _target(case):
    shape = case.gpu_shapes[0]
    return case.title(shape, True), case.describe(shape)


_N, _K = CODEBOOK.gpu_shapes[0][0], CODEBOOK.gpu_shapes[0][3]  # the codebook target's rows and best-k
TARGETS = [
    ("codebook_topk: mm + topk time / triton time", *_target(CODEBOOK),
     lambda row: row("torch mm+topk")["ms"] / row("triton")["ms"], "ge", 4.0),
    ("codebook_topk: triton time / bare GEMM time", *_target(CODEBOOK),
     lambda row: row("triton")["ms"] / row("bare GEMM")["ms"], "le", 1.6),
    ("codebook_topk: extra memory / N x k outputs", *_target(CODEBOOK),
     lambda row: row("triton")["peak_extra_mb"] / (_N * _K * (4 + 8) / 2**20), "le", 2.0),
    ("masked_attention ragged: SDPA bool mask time / triton time", *_target(ATTENTION),
     lambda row: row("sdpa_bool_mask")["ms"] / row("triton")["ms"], "ge", 1.5),
    ("masked_attention unmasked: SDPA flash time / triton time", *_target(ATTENTION),
     lambda row: row("sdpa_unmasked")["ms"] / row("triton_unmasked")["ms"], "ge", 0.9),
    ("patch_pixel_loss: % of copy bandwidth", *_target(LOSS),
     lambda row: row("triton")["pct_copy_ceiling"], "ge", 75.0),
    ("patch_pixel_loss: eager time / triton time", *_target(LOSS),
     lambda row: row("eager")["ms"] / row("triton")["ms"], "ge", 3.0),
    ("patch_pixel_loss: torch.compile time / triton time", *_target(LOSS),
     lambda row: row("torch_compile")["ms"] / row("triton")["ms"], "ge", 1.3),
]


def targets(rows) -> list[dict]:
    """Each performance target from this run's bf16 rows: its value, threshold and whether it
    holds (value and holds None where a row it needs is not in the run)."""
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


def document(card, ceil, rows, skipped, failed, complete, seconds) -> dict:
    """The JSON layout of benchmarks/results/README.md."""
    return {"device": card, "ceilings": ceil, "rows": rows, "targets": targets(rows),
            "fastest_configs": fastest_configs(rows), "skipped": skipped, "failed": failed, "complete": complete,
            "seconds": seconds}


def write_json(path: Path, doc: dict) -> None:
    """Strict JSON (NaN and inf as null), written beside `path` and renamed onto it: a run
    killed while writing leaves the previous file whole."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(finite_floats(doc), indent=1, allow_nan=False))
    tmp.replace(path)


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


def print_verdicts(doc) -> None:
    print("performance targets (docs/design.md, bf16):")
    for v in doc["targets"]:
        state = "not in this run" if v["holds"] is None else "holds" if v["holds"] else "MISSED"
        value = "" if v["value"] is None else f"{v['value']:.2f} "
        print(f"  {v['target']:<62}{value:>8}{'>=' if v['sense'] == 'ge' else '<='} {v['threshold']:<6g}{state}")
    for f in doc["fastest_configs"]:
        ratio = "" if f["vs_default"] is None else f", {f['vs_default']:.2f}x the default's time"
        print(f"  fastest configuration, {f['op']} {f['shape']} {f['dtype']}: {f['fastest']} ({f['ms']:.3f} ms{ratio})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--ops", nargs="*", default=None, help=f"only these ops (of {', '.join(OPS)})")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_report: no CUDA GPU here (do_bench times on one); `pytest benchmarks/` times the cases on CPU",
              file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    t0 = time.time()
    ceil = ceilings(args.quick)
    print(f"device: {card}; matmul ceiling {ceil['matmul_tflops']:.1f} TFLOP/s, copy ceiling {ceil['copy_gbps']:.0f} GB/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # one file per op list, so that runs of one op each (gpu_session.sh) keep all their files
    path = out / f"gpu_report_{card.replace(' ', '_')}{''.join('_' + op for op in args.ops or [])}.json"
    rows, skipped, failed = [], [], []
    for op in OPS:
        if args.ops is not None and op not in args.ops:
            continue
        if "triton" not in backends(op):
            skipped.append(f"{op}: no Triton backend can run here")
            continue
        try:  # one op failing (a CUDA error, say) must not hide the others' figures
            new = op_rows(op, ceil, args.quick)
            rows += new
            print_rows(new)
            # a launch configuration that fails is a finding of the sweep; any other row, a failure
            tried = {name for case in CASES if case.op == op for name in sweep(case)}
            failed += [f"{op}: {r['op']} {r['shape']} {r['dtype']} {r['impl']}: {r['error']}" for r in new
                       if "error" in r and r["impl"] not in tried]
        except Exception as e:
            failed.append(f"{op}: {type(e).__name__}: {e}")
            print(f"{op}: FAILED: {traceback.format_exc()}", file=sys.stderr)
        # after each op, so a run cut short keeps what it measured
        write_json(path, document(card, ceil, rows, skipped, failed, False, time.time() - t0))
    doc = document(card, ceil, rows, skipped, failed, True, time.time() - t0)
    write_json(path, doc)
    print_verdicts(doc)
    for s in skipped:
        print("skipped", s)
    for f in failed:
        print("FAILED", f)
    print(f"wrote {path} in {time.time() - t0:.0f} s; speedup = this row's time / the triton row's time "
          "(> 1: the public Triton op is faster)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
