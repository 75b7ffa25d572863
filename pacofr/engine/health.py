"""Whether a checkpoint is good: the steps that made its weights, and the first step after it,
were healthy.

A step with usable samples is healthy when it was applied (its loss and gradient norm finite)
and its loss is at most BLOWUP times the median loss of the last RECENT healthy steps (the
run's recent values: a blown-up step joins them only once the loss is back in range).
A checkpoint is good when every step since the previous checkpoint was healthy and its
parameters are finite. Its weights are first scored by the loss of the step after it: when that
step is not healthy the checkpoint is marked bad then (an update that blew the weights up shows
only in the next loss). The record lives in the run state, so a resumed run judges alike.
"""

import statistics

BLOWUP = 10.0  # a loss this many times the recent median is a blow-up
RECENT = 50  # healthy steps whose median loss is the reference
KEPT = 3  # problems named in a manifest (the rest counted)


def new_record() -> dict:
    """The run state's `health` entry: recent healthy losses and the problems since the last checkpoint."""
    return {"recent": [], "problems": [], "count": 0}


def judge(record: dict, step: int, loss: float, applied: bool) -> str | None:
    """The problem of a step with usable samples (recorded for the next checkpoint), or None."""
    recent = record["recent"]
    reference = statistics.median(recent) if recent else None
    if not applied:
        problem = f"step {step}: non-finite loss or gradient (skipped)"
    elif reference is not None and loss > BLOWUP * reference:
        problem = f"step {step}: loss {loss:.4g}, over {BLOWUP:g}x the recent median {reference:.4g}"
    else:
        recent.append(loss)
        del recent[:-RECENT]
        return None
    record["count"] += 1
    if len(record["problems"]) < KEPT:
        record["problems"].append(problem)
    return problem


def verdict(record: dict, first_step: int, step: int, params_finite: bool) -> dict:
    """The manifest's health of a checkpoint at `step`; the record starts over for the next."""
    problems = list(record["problems"])
    if record["count"] > len(problems):
        problems.append(f"{record['count'] - len(problems)} more")
    if not params_finite:
        problems.append("non-finite parameters")
    record["problems"], record["count"] = [], 0
    return {"good": not problems, "steps": [first_step, step], "problems": problems}
