"""Host-side launch logic that only a GPU run would otherwise reach: the device the kernels
launch on, the CUDA grid limits, and the codebook search's split count."""

import contextlib
import types

import pytest
import torch

from pacofr.ops import backends

pytestmark = pytest.mark.skipif("triton" not in backends("codebook_topk"), reason="Triton cannot run here")

from pacofr import kernels  # noqa: E402
from pacofr.kernels import codebook_topk as cb  # noqa: E402
from pacofr.kernels import masked_attention as attn  # noqa: E402
from pacofr.kernels import patch_pixel_loss as loss  # noqa: E402

LAUNCHERS = [cb.codebook_topk_forward, cb.merge_splits, cb.codebook_topk_backward, attn.masked_attention_forward,
             attn.masked_attention_backward, loss.patch_pixel_loss_forward, loss.patch_pixel_loss_forward_with_grad,
             loss.patch_pixel_loss_backward, loss.patch_pixel_loss_rescale]


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (what the device guard reads)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launchers_run_with_their_tensors_device_current(monkeypatch):
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
    for launcher in LAUNCHERS:
        assert launcher.__wrapped__ is not None, launcher.__name__


def _grids(monkeypatch, run):
    """{kernel name: grids} of the launches that run() makes."""
    from triton.runtime.interpreter import InterpretedFunction

    grids = {}
    original = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        grids.setdefault(self.__name__, []).append(tuple(grid))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", record)
    run()
    monkeypatch.setattr(InterpretedFunction, "run", original)
    return grids


def _attention(batch):
    q, k, v = (torch.randn(batch, 3, 5, 32) for _ in range(3))
    seqlens = torch.tensor([5, 2, 0, 4][:batch])
    out, lse = attn.masked_attention_forward(q, k, v, seqlens, None, 0.2)
    for config in (None, {"ATOMIC_DQ": True}, {"FUSED_BWD": True}):
        attn.masked_attention_backward(torch.randn_like(out), q, k, v, out, lse, seqlens, None, 0.2, config)


def _loss(batch):
    pred, images, weight = torch.randn(batch, 64, 48), torch.rand(batch, 3, 32, 32), torch.rand(batch, 64)
    *_, stats, norms, grad = loss.patch_pixel_loss_forward_with_grad(pred, images, weight, 4, True, 1e-6, 0.5)
    loss.patch_pixel_loss_rescale(torch.tensor(0.5), torch.tensor(1.0), grad, 0.5, pred, images, weight, stats,
                                  norms, 4)
    loss.patch_pixel_loss_backward(1.0, 0.5, pred, images, weight, stats, norms, 4, True, 1e-6)


def _codebook(batch):
    x, c = torch.randn(40 * batch, 20), torch.randn(40, 20)
    scores, idx = cb.codebook_topk_forward(x, c, 4, "l2", splits=3)
    cb.codebook_topk_backward(torch.randn_like(scores), x, c, idx, "l2")
    cb.codebook_topk_backward(torch.randn_like(scores), x, c, idx, "l2", deterministic=True)


@pytest.mark.parametrize("op", [_attention, _loss, _codebook], ids=["attention", "loss", "codebook"])
def test_grids_grow_with_the_batch_only_along_axis_0(monkeypatch, op):
    """CUDA caps grid axes 1 and 2 at 65535 programs, axis 0 at 2^31 - 1: what scales with the
    batch (B x H attention slabs, patches, rows) must go along axis 0."""
    small, large = (_grids(monkeypatch, lambda b=b: op(b)) for b in (2, 4))
    assert small.keys() == large.keys() and small
    for name in small:
        assert [g[1:] for g in small[name]] == [g[1:] for g in large[name]], name
    # the sizes are large enough that the batch changes some grid (the test is not vacuous)
    assert any(s[0] < g[0] for name in small for s, g in zip(small[name], large[name]))


def test_splits_with_no_rows_or_a_full_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132))
    cuda = torch.device("cuda")
    assert cb._splits(0, 8192, 64, 128, cuda) == 1  # an empty search: no division by zero row blocks
    assert cb._splits(1024, 8192, 64, 128, cuda) == 16  # 16 row blocks x 16 ranges: 2 programs per SM
    assert cb._splits(256, 8192, 64, 128, cuda) == 64  # at most one range per code tile
    assert cb._splits(65536, 8192, 64, 128, cuda) == 1
