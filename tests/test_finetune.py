"""Recognition fine-tuning: the margin logits against their formulas, the sharded partial FC
against a full softmax in one process, and runs (exact resume, data parallelism and ZeRO
against one process) on CPU ranks."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pacofr.engine.partial_fc import PartialFC, init_centres, margin_logits, shard

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))


def _reference_logits(cos, labels, margin, m, s):
    """The margin logits written out: ArcFace s*cos(arccos(c) + m) on the target (insightface's
    fallback c - m sin(m) once arccos(c) + m passes pi), CosFace s*(c - m)."""
    out = cos.clone()
    for i, y in enumerate(labels.tolist()):
        c = cos[i, y]
        if margin == "cosface":
            out[i, y] = c - m
        elif math.acos(float(c.detach())) + m < math.pi:
            out[i, y] = torch.cos(torch.acos(c) + m)
        else:
            out[i, y] = c - math.sin(m) * m
    return out * s


@pytest.mark.parametrize("margin, m", [("arcface", 0.5), ("cosface", 0.35)])
def test_margin_logits_follow_their_formulas(margin, m):
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(6, 5, generator=g, dtype=torch.float64) * 2 - 1
    cos[0, 1] = -0.95  # theta + m past pi: the fallback
    labels = torch.tensor([1, 0, 4, 2, 3, 3])
    got = margin_logits(cos, labels, margin, m, 64.0)
    torch.testing.assert_close(got, _reference_logits(cos, labels, margin, m, 64.0))
    # rows whose class is held elsewhere (-1) are only scaled
    skip = labels.clone()
    skip[2:] = -1
    mixed = margin_logits(cos, skip, margin, m, 64.0)
    torch.testing.assert_close(mixed[2:], cos[2:] * 64.0)
    torch.testing.assert_close(mixed[:2], got[:2])


def test_centres_are_the_same_matrix_for_any_rank_count():
    whole = init_centres(10, 4, 0, 10, seed=3)
    for world in (2, 3, 4):
        parts = [init_centres(10, 4, *shard(10, r, world), seed=3) for r in range(world)]
        assert [p.shape[0] for p in parts] == [10 // world + (r < 10 % world) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)


_WORKER = """
import sys, torch
from torch import distributed as dist
from pacofr.engine.partial_fc import PartialFC
dist.init_process_group("gloo")
rank = dist.get_rank()
data = torch.load(sys.argv[1])
rows = data["rows"][rank]
fc = PartialFC(data["classes"], data["x"].shape[1], data["margin"], data["m"], 64.0).double()
with torch.no_grad():
    fc.weight.copy_(data["w"][fc.start:fc.end])
x = data["x"][rows].clone().requires_grad_()
ce, own = fc(x, data["y"][rows])
ce.sum().backward()
torch.save({"ce": ce.detach(), "own": (own.start, own.stop), "gx": x.grad, "gw": fc.weight.grad,
            "shard": (fc.start, fc.end)}, sys.argv[2] + f"/out{rank}.pt")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("margin, m", [("arcface", 0.5), ("cosface", 0.35)])
def test_partial_fc_on_two_ranks_is_the_full_softmax(tmp_path, margin, m):
    """7 classes over 2 gloo ranks (4 + 3), 5 samples split 3 + 2, float64: the cross-entropy
    of every sample and the gradients of the embeddings and of every centre are those of one
    softmax over all classes in one process."""
    g = torch.Generator().manual_seed(1)
    classes, x, w = 7, torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(7, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 6, 3, 4, 0])
    torch.save({"rows": [[0, 1, 2], [3, 4]], "classes": classes, "x": x, "w": w, "y": y, "margin": margin, "m": m},
               tmp_path / "in.pt")
    (tmp_path / "worker.py").write_text(_WORKER)
    run = subprocess.run([*RUN, "--master_port", "29741", str(tmp_path / "worker.py"), str(tmp_path / "in.pt"),
                          str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    outs = [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    cos = F.normalize(xr, dim=1) @ F.normalize(wr, dim=1).T
    ce = F.cross_entropy(_reference_logits(cos, y, margin, m, 64.0), y, reduction="none")
    ce.sum().backward()
    assert [o["shard"] for o in outs] == [(0, 4), (4, 7)] and [o["own"] for o in outs] == [(0, 3), (3, 5)]
    for o in outs:
        torch.testing.assert_close(o["ce"], ce.detach())  # every rank holds the whole batch's
    torch.testing.assert_close(torch.cat([o["gx"] for o in outs]), xr.grad)
    torch.testing.assert_close(torch.cat([o["gw"] for o in outs]), wr.grad)


def test_partial_fc_in_one_process_is_the_full_softmax():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True), torch.tensor([2, 0, 2, 1])
    fc = PartialFC(3, 6, "arcface", 0.5, 64.0, rank=0, world=1).double()
    ce, own = fc(x, y)
    cos = F.normalize(x, dim=1) @ F.normalize(fc.weight, dim=1).T
    ref = F.cross_entropy(_reference_logits(cos, y, "arcface", 0.5, 64.0), y, reduction="none")
    torch.testing.assert_close(ce, ref)
    assert own == slice(0, 4)
