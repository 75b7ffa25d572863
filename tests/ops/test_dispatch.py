"""What the ops share: where the kernels are imported from, the backends each op lists and the
one explain() picks, inputs every op refuses, second-order gradients refused, autocast, the
custom ops under torch.compile and opcheck, and the launchers' device guard."""

import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import pacofr.ops as ops
from pacofr.ops import codebook_topk, masked_attention, masked_attention_qkv, patch_pixel_loss

from .utils import BF16, F32, ROOT, attention_inputs, backends_of, triton_kernels


# --------------------------------------------------------------------------- backends and explain()


def test_kernels_import_from_a_source_tree():
    """pacofr.kernels resolves to the top-level kernels/ with only the checkout on sys.path (no
    site-packages, so no install's mapping): the Triton backends must not depend on how
    pacofr was installed."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import pacofr.kernels; print(pacofr.kernels.__file__)"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == os.path.join(ROOT, "kernels", "__init__.py")


def test_interpreter_asked_for_too_late_is_explained():
    """TRITON_INTERPRET=1 set after triton's import: triton's own helpers were built for a GPU,
    so the Triton backend is refused with that reason (not an interpreter error inside a kernel)."""
    code = ("import os, triton, torch; os.environ['TRITON_INTERPRET'] = '1'; os.environ['PACOFR_OPS'] = 'triton'\n"
            "from pacofr.ops import masked_attention\nq = torch.randn(1, 2, 5, 32)\n"
            "try:\n    masked_attention(q, q, q)\nexcept RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PACOFR_OPS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TRITON_INTERPRET=1 was set after triton was imported" in out.stdout, out.stdout


def test_native_backend_is_built_by_make_test():
    """`make test` installs the package so that setup.py builds csrc/ (PACOFR_EXPECT_NATIVE=1
    there): a build that silently failed must not pass as a skipped backend."""
    from pacofr.ops import native

    why = native.unavailable()
    if os.environ.get("PACOFR_EXPECT_NATIVE") != "1":
        pytest.skip(why or "the C++ backend is built; only make test requires it")
    assert why is None, why
    assert all("native" in ops.backends(op) for op in ("codebook_topk", "patch_pixel_loss"))


def test_backends_listing():
    for op in ("codebook_topk", "masked_attention", "patch_pixel_loss"):
        names = ops.backends(op)
        assert "reference" in names
        assert all(isinstance(n, str) for n in names)


def test_explain_names_the_choice_and_the_rejections(monkeypatch):
    """explain() says which backend runs and why each other one was not taken; shapes come
    from meta tensors, so nothing is allocated."""
    if "triton" not in ops.backends("codebook_topk"):
        pytest.skip("no Triton backend here")
    monkeypatch.delenv("PACOFR_OPS", raising=False)
    dev = "cuda" if torch.cuda.is_available() else "meta"  # where Triton is preferred
    small = torch.empty(197, 48, device="meta")
    assert ops.explain("codebook_topk", dev, x=small, codebook=small, k=4, metric="l2") == "codebook_topk: triton"
    for x, why in ((small.double(), "float64"), (torch.empty(2**25, 64, device="meta"), "2^31")):
        line = ops.explain("codebook_topk", dev, x=x, codebook=small, k=4, metric="l2")
        assert line.startswith("codebook_topk: reference (rejected triton: ") and why in line, line
    both = ops.explain("codebook_topk", dev, x=torch.empty(2**25, 64, device="meta", dtype=torch.float64),
                       codebook=small, k=4, metric="l2")  # every reason, not the first alone
    assert "float64" in both and "2^31" in both, both
    with pytest.raises(ValueError, match="unknown op 'nope' \\(known: codebook_topk, masked_attention"):
        ops.explain("nope")


# --------------------------------------------------------------------------- input checks, gradients of gradients


def test_ops_refuse_inputs_they_would_truncate():
    q, k, v = attention_inputs(1, 2, 9, 32, "cpu", F32, seed=0)
    with pytest.raises(TypeError, match="masked_attention: q must be float16, bfloat16, float32 or float64"):
        masked_attention((q * 4).int(), k, v)
    with pytest.raises(TypeError, match="masked_attention: v must be"):
        masked_attention(q, k, v.int())
    with pytest.raises(TypeError, match="one dtype"):
        masked_attention(q, k.to(BF16), v)
    with pytest.raises(TypeError, match="seqlens must hold integers"):
        masked_attention(q, k, v, seqlens=torch.tensor([2.7]))
    with pytest.raises(TypeError, match="masked_attention_qkv: qkv must be"):
        masked_attention_qkv(torch.zeros(1, 9, 3, 2, 32, dtype=torch.int32))
    x, c = torch.randn(5, 8), torch.randn(7, 8)
    with pytest.raises(TypeError, match="codebook_topk: codebook must be"):
        codebook_topk(x, c.to(torch.complex64), 2)
    with pytest.raises(TypeError, match="codebook_topk: k must be an int, got 2.5"):
        codebook_topk(x, c, 2.5)
    with pytest.raises(TypeError, match="k must be an int, got True"):
        codebook_topk(x, c, True)
    import numpy as np

    assert codebook_topk(x, c, np.int64(2))[1].shape == (5, 2)  # (NumPy ints are ints)
    images, weight = torch.randn(1, 3, 8, 8), torch.ones(1, 4)
    with pytest.raises(TypeError, match="patch_pixel_loss: patch_size must be an int, got 4.5"):
        patch_pixel_loss(torch.randn(1, 4, 48), images, weight, 4.5)
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        patch_pixel_loss(torch.randn(1, 4, 48), images, weight, 0)
    with pytest.raises(TypeError, match="patch_pixel_loss: pred must be"):
        patch_pixel_loss(torch.zeros(1, 4, 48, dtype=torch.int64), images, weight, 4)


@pytest.mark.parametrize("op", ["codebook_topk", "masked_attention", "masked_attention_qkv", "patch_pixel_loss"])
def test_second_order_gradients_are_refused(op):
    """The ops are differentiable once: create_graph=True raises (naming the op) instead of
    giving gradients that silently leave the op out of a second-order gradient. First-order
    gradients from the same inputs still work."""
    torch.manual_seed(73)
    if op == "codebook_topk":
        x = torch.randn(7, 16, requires_grad=True)
        out = lambda: codebook_topk(x, torch.randn(9, 16), 3)[0].sum()  # noqa: E731
    elif op == "masked_attention":
        x = torch.randn(2, 2, 5, 32, requires_grad=True)
        out = lambda: masked_attention(x, x, x, torch.tensor([5, 3])).sum()  # noqa: E731
    elif op == "masked_attention_qkv":
        x = torch.randn(2, 5, 3, 2, 32, requires_grad=True)
        out = lambda: masked_attention_qkv(x, torch.tensor([5, 3])).sum()  # noqa: E731
    else:
        x = torch.randn(2, 12, 192, requires_grad=True)
        out = lambda: patch_pixel_loss(x, torch.randn(2, 3, 24, 32), torch.rand(2, 12), 8, boundary_weight=0.5)  # noqa: E731
    with pytest.raises(RuntimeError, match=op + ": gradients of gradients"):
        torch.autograd.grad(out(), x, create_graph=True)
    grad, = torch.autograd.grad(out(), x)
    assert grad.abs().sum() > 0


# --------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("backend", backends_of("codebook_topk"))
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_codebook_topk_under_autocast_runs_in_autocast_dtype(use_backend, backend, metric):
    """Like torch.mm: under bf16 autocast, fp32 inputs are searched as bf16, and the
    gradients reach the fp32 leaves in fp32."""
    dev = use_backend(backend)
    gen = torch.Generator().manual_seed(71)
    x = torch.randn(37, 24, generator=gen).to(dev).requires_grad_()
    cb = torch.randn(50, 24, generator=gen).to(dev).requires_grad_()
    with torch.autocast(dev, dtype=BF16):
        s, i = codebook_topk(x, cb, 4, metric)
    s_bf16, i_bf16 = codebook_topk(x.detach().to(BF16), cb.detach().to(BF16), 4, metric)
    s_fp32, _ = codebook_topk(x.detach(), cb.detach(), 4, metric)
    assert torch.equal(i, i_bf16) and torch.equal(s, s_bf16)
    assert not torch.equal(s, s_fp32), "autocast did not change the input precision"
    s.sum().backward()
    assert x.grad.dtype == F32 and cb.grad.dtype == F32
    assert torch.isfinite(x.grad).all() and (cb.grad != 0).any()


@pytest.mark.parametrize("backend", backends_of("masked_attention"))
def test_masked_attention_under_autocast_runs_in_autocast_dtype(use_backend, backend):
    dev = use_backend(backend)
    gen = torch.Generator().manual_seed(73)
    q, k, v = (torch.randn(2, 3, 19, 32, generator=gen).to(dev).requires_grad_() for _ in range(3))
    seqlens = torch.tensor([19, 7], device=dev)
    with torch.autocast(dev, dtype=BF16):
        out = masked_attention(q, k, v, seqlens=seqlens)
    want = masked_attention(*(t.detach().to(BF16) for t in (q, k, v)), seqlens=seqlens)
    assert out.dtype == BF16 and torch.equal(out, want)
    out.float().sum().backward()
    assert all(t.grad.dtype == F32 and torch.isfinite(t.grad).all() for t in (q, k, v))


# --------------------------------------------------------------------------- torch.compile
# The custom ops trace under torch.compile (fake impls + registered autograd): one graph, no
# breaks, and the same values and gradients as eager (where the ops run as plain autograd
# Functions, without the custom ops' dispatch).


def _step(x, codebook, qkv, packed, seqlens, pred, images, weight):
    scores, _ = codebook_topk(x, codebook, 3, "l2")
    q, k, v = qkv.view(2, 7, 3, 2, 32).permute(2, 0, 3, 1, 4)  # as a ViT block splits them
    out = masked_attention(q, k, v, seqlens=seqlens).transpose(1, 2).reshape(2, 7, 64)
    out_packed = masked_attention_qkv(packed.view(2, 7, 3, 2, 32), seqlens=seqlens).reshape(2, 7, 64)
    loss = patch_pixel_loss(pred, images, weight, 4, boundary_weight=0.5)
    return scores.sum() + out.square().sum() + out_packed.square().sum() + loss


_TRACED = set()


def _recording_aot_eager(gm, example_inputs):
    """aot_eager, noting which ops Dynamo's graph calls."""
    _TRACED.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
    return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)


def test_ops_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    inputs = dict(
        x=torch.randn(9, 5), codebook=torch.randn(11, 5),
        qkv=torch.randn(2, 7, 3 * 64), packed=torch.randn(2, 7, 3 * 64),
        seqlens=torch.tensor([3, 7]),
        pred=torch.randn(2, 6, 48), images=torch.randn(2, 3, 8, 12), weight=torch.rand(2, 6),
    )
    grads = {}
    for mode in ("eager", "compiled"):
        leaves = {n: t.clone().requires_grad_(t.is_floating_point() and n not in ("images", "weight"))
                  for n, t in inputs.items()}
        fn = _step if mode == "eager" else torch.compile(_step, backend=_recording_aot_eager, fullgraph=True)
        value = fn(**leaves)
        value.backward()
        grads[mode] = (value.detach(), {n: t.grad for n, t in leaves.items() if t.grad is not None})
    (v_e, g_e), (v_c, g_c) = grads["eager"], grads["compiled"]
    assert torch.allclose(v_e, v_c, rtol=1e-5)
    assert set(g_e) == set(g_c) == {"x", "codebook", "qkv", "packed", "pred"}
    for name in g_e:
        assert torch.allclose(g_e[name], g_c[name], rtol=1e-5, atol=1e-6), name
    assert {"pacofr.codebook_topk.default", "pacofr.masked_attention.default", "pacofr.masked_attention_qkv.default",
            "pacofr.patch_pixel_loss.default"} <= _TRACED, "the graph does not call the custom ops"


def test_fake_impls_promote_like_eager_with_float64_inputs(monkeypatch):
    """A float64 codebook (or key) against float32 queries: eager accumulates and returns in
    float64, and the fake impls that torch.compile traces with must say so too."""
    monkeypatch.setenv("PACOFR_OPS", "reference")  # the only backend that takes float64
    torch.manual_seed(2)
    x, codebook = torch.randn(10, 8), torch.randn(20, 8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.pacofr.codebook_topk.default, (x, codebook, 2, "l2"))
    q, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.pacofr.masked_attention.default, (q, k, v, None, None, 0.3))


# --------------------------------------------------------------------------- the launchers' device


LAUNCHERS = {"codebook_topk": ("codebook_topk_forward", "merge_splits", "codebook_topk_backward"),
             "masked_attention": ("masked_attention_forward", "masked_attention_backward"),
             "patch_pixel_loss": ("patch_pixel_loss_forward", "patch_pixel_loss_forward_with_grad",
                                  "patch_pixel_loss_backward", "patch_pixel_loss_rescale")}


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (what the device guard reads)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


@pytest.mark.skipif("triton" not in ops.backends("codebook_topk"), reason="Triton cannot run here")
def test_launchers_run_with_their_tensors_device_current(monkeypatch):
    from pacofr import kernels

    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield

    current = [0]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    launch = kernels.on_device(lambda *args, **kwargs: seen.append((args[1], kwargs, list(entered))) or "done")
    t = torch.Tensor._make_subclass(_OnCuda1, torch.zeros(2))
    assert launch(3, t, k=4) == "done"
    assert seen == [(t, {"k": 4}, [torch.device("cuda", 1)])]
    entered.clear()
    launch(torch.zeros(()), t)  # a CPU scalar first (an upstream gradient): the CUDA tensor decides
    assert entered == [torch.device("cuda", 1)]
    current[0] = 1  # already current: no switch
    entered.clear()
    launch(3, t)
    assert entered == []
    launch(3, torch.zeros(2))  # CPU tensors (the interpreter): no switch
    assert entered == []
    for op, names in LAUNCHERS.items():
        for launcher in (getattr(triton_kernels(op), name) for name in names):
            assert launcher.__wrapped__ is not None, launcher.__name__


# --------------------------------------------------------------------------- the dispatch table


def _cited_times(measured: str) -> list[dict]:
    """{backend: ms} of each measurement a row cites ("...: a 1.2 ms, b 3.4 ms, ...")."""
    found = []
    for part in measured.split("; "):
        figures = part.split(": ")[-1]
        times = {}
        for name, ms, rest in re.findall(r"([\w+.\- ]+?) ([\d.e+-]+) ms( \(not a backend\))?", figures):
            if not rest:
                times[name.strip(", ")] = float(ms)
        assert len(times) >= 2, f"no ranking in {part!r}"
        found.append(times)
    return found


def test_every_table_row_orders_its_backends_by_the_times_it_cites():
    """Each row names known backends only, cites a results file that is in the repository, and
    its order is the order of the times it cites, fastest first, in every measurement."""
    from pacofr.ops.dispatch import KNOWN, TABLE

    assert TABLE, "the dispatch table is empty"
    for row in TABLE:
        assert set(row["order"]) <= set(KNOWN), row
        source = row["measured"].split(",")[0]
        assert (ROOT / "benchmarks" / "results" / source).is_file(), f"{source}: not in benchmarks/results"
        for times in _cited_times(row["measured"]):
            ranked = sorted((b for b in row["order"] if b in times), key=times.get)
            assert ranked == [b for b in row["order"] if b in times], (row["op"], row["device"], times)


def test_explain_cites_the_measurement_behind_the_choice(monkeypatch):
    """On CUDA shapes (meta tensors, nothing allocated): training-time attention takes the
    backend its table row puts first among those that can run, and explain quotes that row."""
    from pacofr.ops.dispatch import TABLE

    monkeypatch.delenv("PACOFR_OPS", raising=False)
    (row,) = [r for r in TABLE if r["op"] == "masked_attention" and r["device"] == "cuda" and r["when"].get("grad")]
    q = torch.empty(2, 12, 197, 64, device="meta", requires_grad=True)
    line = ops.explain("masked_attention", "cuda", q=q, k=q, v=q, seqlens=None, key_mask=None)
    runnable = [b for b in row["order"] if b != "triton" or torch.cuda.is_available()]
    assert line.startswith(f"masked_attention: {runnable[0]} [measured: {row['measured']}]"), line


def test_dispatch_table_refresh_splits_sizes_between_measured_winners(tmp_path):
    """benchmarks/dispatch_table.py on a report where triton wins at N=100 and sdpa at N=900,
    in both passes: rows for training and inference, the sizes split at sqrt(100 * 900) = 300,
    each citing its figures; the rows of other ops and devices are kept."""
    def row(op, shape, impl, ms):
        return {"op": op, "shape": shape, "impl": impl, "dtype": "bfloat16", "ms": ms}

    rows = []
    for pass_ in ("fwd", "fwd+bwd"):
        rows += [row(f"masked_attention {pass_}", "B=2 H=1 N=100 d=8", "triton", 1.0),
                 row(f"masked_attention {pass_}", "B=2 H=1 N=100 d=8", "sdpa_bool_mask", 2.0),
                 row(f"masked_attention {pass_}", "B=2 H=1 N=900 d=8", "triton", 5.0),
                 row(f"masked_attention {pass_}", "B=2 H=1 N=900 d=8", "sdpa_bool_mask", 4.0),
                 row(f"masked_attention {pass_}", "B=2 H=1 N=900 d=8", "triton 64x64 w4 s2", 0.1)]
    report = tmp_path / "gpu_report_card.json"
    report.write_text(json.dumps({"device": "card", "rows": rows}))
    kept = {"op": "codebook_topk", "device": "cpu", "when": {}, "order": ["reference"], "measured": "x"}
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"rows": [kept]}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dispatch_table.py"), str(report),
                           "--table", str(table)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(table.read_text())["rows"]
    assert kept in got
    attention = [(r["when"], r["order"]) for r in got if r["op"] == "masked_attention"]
    for grad in (True, False):
        assert ({"grad": grad, "n_max": 300}, ["triton", "sdpa"]) in attention
        assert ({"grad": grad, "n_min": 301}, ["sdpa", "triton"]) in attention
    assert len(attention) == 4
    assert all("triton 64x64" not in r["measured"] for r in got)  # sweep rows are not choices


def test_without_the_native_build_the_ops_fall_back_and_explain_says_why():
    """PACOFR_NATIVE=0 stands for a machine where csrc/ was not built: the op still runs (on
    the next backend of its row) with the same result, and explain() names the reason."""
    code = ("import torch, pacofr.ops as ops\n"
            "g = torch.Generator().manual_seed(0)\n"
            "x, c = torch.randn(37, 16, generator=g), torch.randn(300, 16, generator=g)\n"
            "print(ops.explain('codebook_topk', 'cpu', x=x, codebook=c, k=3, metric='l2'))\n"
            "print(ops.codebook_topk(x, c, 3)[1].tolist())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PACOFR_OPS")}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "PACOFR_NATIVE": "0"})
    assert off.returncode == 0, off.stderr[-2000:]
    line, idx = off.stdout.splitlines()
    assert "native: switched off (PACOFR_NATIVE=0)" in line and not line.startswith("codebook_topk: native"), line
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert on.returncode == 0 and on.stdout.splitlines()[1] == idx, on.stderr[-2000:]
