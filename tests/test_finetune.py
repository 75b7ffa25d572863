"""Recognition fine-tuning: the margin logits against their formulas, the sharded partial FC
against a full softmax in one process, and runs (exact resume, data parallelism and ZeRO
against one process) on CPU ranks."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
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
    classes = 7
    x, w = (torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (5, classes))
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


# A run of the tiny encoder on 40 in-memory faces of 5 identities (each identity a fixed
# pattern, each face that pattern with noise of its own).
SMALL = ["model.img_size=32", "model.patch_size=8", "model.encoder.depth=2"]
_RUN_SCRIPT = """
import json, sys, types, torch
from pacofr.config import load_config
from pacofr.data import Sample
from pacofr.engine.finetune import finetune


class Faces(torch.utils.data.Dataset):
    num_classes = 5

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return 40

    def __getitem__(self, i):
        label = i % 5
        pattern = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1000 + label))
        noise = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))
        return Sample(pattern + 0.5 * noise, torch.full((5, 2), float("nan")), name=str(i), label=label)


def evaluate_bin(embed_fn, path, size, batch_size):
    # a stand-in for the verification module: a score of 6 fixed images' embeddings
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(7))
    e = torch.nn.functional.normalize(embed_fn(images), dim=1)
    return {"accuracy": float((e[0::2] * e[1::2]).sum(1).mean()), "accuracy_std": 0.0}


sys.modules["pacofr.eval.verification"] = types.SimpleNamespace(evaluate_bin=evaluate_bin)
encoder, output, resume, overrides = sys.argv[1], sys.argv[2], sys.argv[3] or None, json.loads(sys.argv[4])
finetune(load_config("tiny", overrides), encoder, output, resume, dataset=Faces())
"""


def _encoder(tmp_path) -> Path:
    from pacofr.config import load_config
    from pacofr.model import ViTEncoder, save_encoder

    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    return save_encoder(ViTEncoder.from_config(cfg.model).state_dict(), tmp_path / "encoder.safetensors", cfg.model)


def _run(tmp_path, output, *overrides, ranks=1, resume="", port=29751, verify=False):
    """A run (`verify`: lfw scored every 2 steps by the stand-in module)."""
    script = tmp_path / "run.py"
    script.write_text(_RUN_SCRIPT)
    (tmp_path / "lfw.bin").touch()
    if verify:
        overrides = (*overrides, "finetune.eval_every=2", f"finetune.eval_bins={tmp_path / 'lfw.bin'}")
    base = ["train.batch_size=8", "train.log_every=1", "train.ckpt_every=3", "data.num_workers=0",
            "finetune.eval_every=0", "finetune.embedding_size=16", "finetune.warmup_epochs=0.4", *SMALL]
    launch = [sys.executable] if ranks == 1 else [*RUN[:-1], str(ranks), "--master_port", str(port)]
    run = subprocess.run([*launch, str(script), str(tmp_path / "encoder.safetensors"), str(tmp_path / output),
                          resume, json.dumps(base + list(overrides))], capture_output=True, text=True, env=_env(),
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp_path / output


def _losses(run: Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of `key` in the run's metrics.csv, in the training rows (`loss` set) but
    for the verification ones."""
    with open(run / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if bool(r["loss"]) != ("lfw" in key)]


# Parameters whose gradient is zero but for rounding, so that AdamW moves them by its noise:
# shifts that a BatchNorm in training mode (or the softmax over keys) takes out.
SHIFTS = ("encoder.norm.bias", "head.bn.bias", "head.fc.bias")


def _params(path: Path) -> dict:
    """The weights of a saved model without the BatchNorm running statistics (each rank keeps
    those of its own rows) and the shifts, of the attention's biases those of queries and values."""
    out = {}
    for k, v in load_file(str(path)).items():
        if "running_" in k or "num_batches" in k or k in SHIFTS:
            continue
        out[k] = torch.cat([v[: len(v) // 3], v[2 * len(v) // 3 :]]) if k.endswith("qkv.bias") else v
    return out


def test_finetuning_resumes_exactly_and_saves_a_loadable_model(tmp_path):
    """6 steps (over an epoch's end) straight, and from the step-3 checkpoint in a fresh folder:
    the same losses and the same model and centres at the end; the model loads from its file."""
    from pacofr.model.recognition import load_recognizer

    _encoder(tmp_path)
    straight = _run(tmp_path, "a", "train.max_steps=6", verify=True)
    ckpt = straight / "checkpoints" / "ckpt-00000003"
    assert load_file(str(ckpt / "model.safetensors"))["centres"].shape == (5, 16)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    os.system(f"cp -r {ckpt} {tmp_path / 'b' / 'checkpoints'}")
    resumed = _run(tmp_path, "b", "train.max_steps=6", resume="auto", verify=True)
    a, b = _losses(straight), _losses(resumed)
    assert [s for s, _ in a] == list(range(1, 7)) and [s for s, _ in b] == [4, 5, 6]
    assert a[3:] == b
    scores = _losses(straight, "lfw_accuracy")
    assert [s for s, _ in scores] == [2, 4, 6] and _losses(resumed, "lfw_accuracy") == scores[1:]
    assert yaml.safe_load((straight / "summary.yaml").read_text())["verification"]["lfw"]["accuracy"] == scores[-1][1]
    for name in ("recognizer.safetensors", "checkpoints/ckpt-00000006/model.safetensors"):
        x, y = load_file(str(straight / name)), load_file(str(resumed / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert a[0][1] > a[-1][1]  # it learns
    model = load_recognizer(straight / "recognizer.safetensors")
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 16)


def _same_run(x: Path, y: Path, steps: int) -> None:
    """The losses and gradient norms of every step (AdamW's steps hardly show a gradient's scale),
    the model's parameters and the class centres agree."""
    for key in ("loss", "grad_norm", "centres_grad_norm"):
        a, b = _losses(x, key), _losses(y, key)
        assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, steps + 1))
        for (_, u), (_, v) in zip(a, b):
            assert abs(u - v) < 1e-4 * max(1.0, abs(u)), (key, a, b)
    p, q = _params(x / "recognizer.safetensors"), _params(y / "recognizer.safetensors")
    assert p.keys() == q.keys() and all(torch.allclose(p[k], q[k], rtol=1e-4, atol=1e-5) for k in p)
    ckpt = f"checkpoints/ckpt-{steps:08d}/model.safetensors"
    torch.testing.assert_close(load_file(str(x / ckpt))["centres"], load_file(str(y / ckpt))["centres"],
                               rtol=1e-4, atol=1e-5)


def test_two_ranks_match_one_process(tmp_path):
    """DDP on 2 gloo ranks (centres 3 + 2 rows) and one process with two micro-batches a step
    (the same rows in each BatchNorm) give the same losses, model and centres."""
    _encoder(tmp_path)
    one = _run(tmp_path, "one", "train.max_steps=4", "train.accum_steps=2")
    two = _run(tmp_path, "two", "train.max_steps=4", ranks=2)
    _same_run(one, two, 4)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_two_ranks_matches_one_process_and_resumes_in_one(tmp_path, stage):
    """DeepSpeed ZeRO-2, and ZeRO-3 with every parameter partitioned (verification forwards on
    every rank), on 2 gloo ranks give one process's run (the centres stay outside ZeRO); the
    step-3 checkpoint resumes in one plain process to the same end."""
    pytest.importorskip("deepspeed")
    _encoder(tmp_path)
    ds = json.loads((ROOT / "configs" / f"zero{stage}.json").read_text())
    if stage == 3:  # no parameter kept whole: the tiny model's are all below the shipped threshold
        ds["zero_optimization"].update(stage3_param_persistence_threshold=0)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    one = _run(tmp_path, "one", "train.max_steps=4", "train.accum_steps=2")
    zero = _run(tmp_path, "zero", "train.max_steps=4", f"train.deepspeed={tmp_path / 'ds.json'}", ranks=2,
                port=29752 + stage, verify=True)
    _same_run(one, zero, 4)
    # (scores differ from one process's: each rank's BatchNorm statistics are of its own rows)
    assert [s for s, v in _losses(zero, "lfw_accuracy") if math.isfinite(v)] == [2, 4]
    (tmp_path / "back" / "checkpoints").mkdir(parents=True)
    os.system(f"cp -r {zero / 'checkpoints' / 'ckpt-00000003'} {tmp_path / 'back' / 'checkpoints'}")
    back = _run(tmp_path, "back", "train.max_steps=4", "train.accum_steps=2", resume="auto")
    assert _losses(back) == [(4, pytest.approx(_losses(one)[3][1], rel=1e-4))]


def test_cli_mistakes_are_one_line(tmp_path, capsys):
    """A missing verification set, unlabelled data (the embedded faces) without and with a class
    count: exit 2 and one line naming what to change, before any checkpoint."""
    from pacofr.cli import main

    enc = str(_encoder(tmp_path))
    base = ["finetune-recognition", "--encoder", enc, "--set", "data.num_workers=0", "--set", "train.batch_size=8",
            "--max-steps", "1"]
    cases = [(["--eval-bin", str(tmp_path / "lfw.bin")], "--eval-bin"),
             ([], "finetune.num_classes"),
             (["--set", "finetune.num_classes=3"], "no identity label")]
    for i, (extra, said) in enumerate(cases):
        assert main([*base, "--output", str(tmp_path / f"run{i}"), *extra]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"run{i}" / "checkpoints").exists()


def test_layer_decay_groups_scale_the_lr_by_depth():
    from pacofr.config import load_config
    from pacofr.engine.finetune import layer_decay_groups
    from pacofr.model.recognition import build_recognizer

    model = build_recognizer(load_config("tiny", SMALL), 16)  # depth 2
    groups = layer_decay_groups(model, 1.0, 0.05, 0.5)
    scale = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale[id(named["encoder.patch_embed.proj.weight"])] == (0.125, 0.05)
    assert scale[id(named["encoder.cls_token"])] == (0.125, 0.0)
    assert scale[id(named["encoder.blocks.0.attn.qkv.weight"])] == (0.25, 0.05)
    assert scale[id(named["encoder.blocks.1.mlp.fc1.bias"])] == (0.5, 0.0)
    assert scale[id(named["head.fc.weight"])] == (1.0, 0.05) and scale[id(named["encoder.norm.weight"])] == (1.0, 0.0)
    assert id(named["head.features.weight"]) not in scale and id(named["encoder.pos_embed"]) not in scale  # frozen
    assert groups[0]["lr"] == 1.0 and len(scale) == sum(p.requires_grad for p in model.parameters())


def test_cli_finetunes_on_an_insightface_recordio_pair(tmp_path, capsys):
    """`pacofr finetune-recognition` end to end on a train.rec/.idx written byte for byte (the
    writer of tests/test_prepare.py): the identities and their count come from the records, the
    bad ones are skipped and listed, and the model file is written and loads."""
    from test_prepare import _frame, _jpeg, _pack

    from pacofr.cli import main
    from pacofr.model.recognition import load_recognizer

    # header record 0 (images 1..12, identity records 13..15), 4 images of each of 3 identities,
    # record 12 a JPEG cut short
    images = {i: (float((i - 1) // 4), _jpeg(i, (64, 64))) for i in range(1, 13)}
    images[12] = (2.0, images[12][1][:300])
    records = {0: _pack((13.0, 16.0)), **{i: _pack(label, data, id_=i) for i, (label, data) in images.items()},
               **{13 + k: _pack((1.0 + 4 * k, 5.0 + 4 * k)) for k in range(3)}}
    rec, offsets = b"", {}
    for i, payload in records.items():
        offsets[i] = len(rec)
        rec += _frame(payload)
    (tmp_path / "train.rec").write_bytes(rec)
    (tmp_path / "train.idx").write_text("".join(f"{i}\t{o}\n" for i, o in offsets.items()))
    out = tmp_path / "run"
    overrides = [f"data.source={tmp_path / 'train.rec'}", "data.num_workers=0", "train.batch_size=4",
                 "finetune.embedding_size=16", "train.ckpt_every=2", *SMALL]
    args = ["finetune-recognition", "--encoder", str(_encoder(tmp_path)), "--output", str(out), "--max-steps", "3"]
    assert main([*args, *(x for o in overrides for x in ("--set", o))]) == 0, capsys.readouterr().err
    summary = yaml.safe_load((out / "summary.yaml").read_text())
    assert summary["steps"] == 3 and summary["skipped_or_repaired_samples"] == {"unreadable": 1}
    assert (out / "skipped.csv").read_text().splitlines()[1:] == [f"{tmp_path / 'train.rec'}#12,unreadable"]
    model = load_recognizer(out / "recognizer.safetensors")
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 16)
