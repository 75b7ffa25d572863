"""Refreshes the dispatch table (pacofr/ops/dispatch_table.json) from benchmark results: the
JSON of gpu_report.py (a GPU's rows) or of cpu_report.py (this CPU's).

    python benchmarks/dispatch_table.py REPORT.json [REPORT.json ...] [--check]

For each op and device in the reports, the backends are ranked by their measured time at each
shape (a report's implementations map onto backends: `triton`, `sdpa_bool_mask` -> sdpa,
`reference`/`eager` -> reference, `native`, `torch_compile` -> compiled); attention's forward-only and forward+backward rows
give separate rows for inference and training (`grad`). Shapes of one op whose rankings
differ split the sizes n between them at the geometric mean of their n (the crossover between
two measured sizes is not measured: the table says so). The rows of an op and device that the
reports cover replace the table's; the others stay; where reports measure the same shape, the later one counts. --check prints the rows without writing.
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

TABLE = Path(__file__).resolve().parents[1] / "pacofr" / "ops" / "dispatch_table.json"
BACKEND = {"triton": "triton", "sdpa": "sdpa", "reference": "reference", "native": "native", "compiled": "compiled",
           "torch_compile": "compiled"}  # (torch.compile of the eager loss: the compiled backend's computation)
# stand-ins where a report has no row of the backend itself (older reports): SDPA with the
# bool mask for the sdpa backend, the eager loss for the reference
PROXY = {"sdpa_bool_mask": "sdpa", "eager": "reference"}
# the dtype a device's rows are read at where a shape was measured in several: training's there
DTYPE = {"cuda": "bfloat16", "cpu": "float32"}


def _n(shape: str) -> int | None:
    match = re.search(r"\bN=(\d+)", shape)
    return int(match.group(1)) if match else None


def _measurements(report: dict, source: str) -> dict:
    """{(op, device, pass, shape): ({backend: ms}, {other impl: ms}, "source, dtype")} of one report."""
    device = report.get("device_type", "cuda")
    shapes = {}
    for row in report["rows"]:
        ms = row.get("ms")
        if not isinstance(ms, (int, float)) or math.isnan(ms):
            continue
        op, pass_ = row["op"].split(" ", 1)
        key = (op, device, pass_.split(" ")[0], row["shape"])
        dtype = shapes.get(key, (None, None, None, row["dtype"]))[3]
        if row["dtype"] != dtype:  # one dtype per shape: training's, else the first measured
            if row["dtype"] != DTYPE[device]:
                continue
            shapes.pop(key)
        times, others, _, _ = shapes.setdefault(key, ({}, {}, f"{source}, {row['dtype']}", row["dtype"]))
        impl = row["impl"]
        if impl in BACKEND:
            times[BACKEND[impl]] = ms
        elif impl in PROXY and not any(row_["impl"] == PROXY[impl] and row_["op"] == row["op"]
                                       and row_["shape"] == row["shape"] for row_ in report["rows"]):
            times[PROXY[impl]] = ms
        if impl not in BACKEND and not impl.startswith("triton "):  # sweep rows are not choices
            others[impl] = ms
    return {key: value[:3] for key, value in shapes.items() if value[0]}


def _classes(shapes: dict) -> dict:
    """{(op, device, grad or None): [(n, what, times, others, source)]}; a training / inference
    split only for the ops measured in both passes."""
    passes = {}
    for op, device, pass_, _ in shapes:
        passes.setdefault((op, device), set()).add(pass_)
    out = {}
    for (op, device, pass_, shape), (times, others, source) in shapes.items():
        grad = (pass_ == "fwd+bwd") if passes[op, device] >= {"fwd", "fwd+bwd"} else None
        out.setdefault((op, device, grad), []).append((_n(shape), f"{op} {pass_} {shape}", times, others, source))
    return out


def _rows(op: str, device: str, grad, measured: list) -> list[dict]:
    measured.sort(key=lambda m: m[0] or 0)
    rows = []
    for i, (n, what, times, others, source) in enumerate(measured):
        order = sorted(times, key=times.get)
        figures = ", ".join(f"{b} {times[b]:.3g} ms" for b in order)
        figures += "".join(f", {name} {ms:.3g} ms (not a backend)" for name, ms in others.items())
        text = f"{source}: {what}: {figures}"
        when = {} if grad is None else {"grad": grad}
        if rows and rows[-1]["order"][: len(order)] == order:
            rows[-1]["measured"] += f"; {text}"
            continue
        if rows and n is not None:
            bound = round(math.sqrt(n * measured[i - 1][0]))
            rows[-1]["when"]["n_max"] = bound
            rows[-1]["measured"] += f" (up to n={bound}, the geometric mean of the two measured sizes)"
            when["n_min"] = bound + 1
        rows.append({"op": op, "device": device, "when": when, "order": order, "measured": text})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--check", action="store_true", help="print the new rows, write nothing")
    parser.add_argument("--table", type=Path, default=TABLE, help="the table to refresh (default: the package's)")
    args = parser.parse_args(argv)
    shapes = {}  # a later report's measurement of a shape replaces an earlier one's
    for path in args.reports:
        shapes.update(_measurements(json.loads(Path(path).read_text()), Path(path).name))
    found = _classes(shapes)
    new = [row for key in sorted(found, key=str) for row in _rows(*key, found[key])]
    covered = {(row["op"], row["device"]) for row in new}
    table = json.loads(args.table.read_text())
    kept = [row for row in table["rows"] if (row["op"], row["device"]) not in covered]
    table["rows"] = sorted(kept + new, key=lambda r: (r["op"], r["device"], r["when"].get("grad", 2) is False,
                                                      r["when"].get("n_min", 0)))
    for row in new:
        print(json.dumps(row))
    if not args.check:
        args.table.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
