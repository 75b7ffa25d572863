"""pacofr.ops.autograd.define_op: an op defined from its pieces behaves as the torch code it
wraps, eagerly and under torch.compile, and the dispatch lists every reason a backend rejects
its inputs."""

import pytest
import torch
from torch import Tensor

import pacofr.ops as ops
from pacofr.ops.autograd import define_op
from pacofr.ops import dispatch
from pacofr.ops.dispatch import Backend, choose, register


def _cube_forward(x: Tensor, scale: float) -> Tensor:
    return choose("test_cube", x.device, x=x).forward(x, scale)


def _cube_backward(grad: Tensor, x: Tensor, scale: float) -> Tensor:
    return choose("test_cube", x.device, x=x).backward(grad, x, scale)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.scale = inputs[1]


def _gradients(ctx, backward, grad):
    (x,) = ctx.saved_tensors
    return backward(grad, x, ctx.scale), None


def _refuse_odd(x: Tensor) -> list[str]:
    reasons = [f"{x.dtype} is not float32"] if x.dtype != torch.float32 else []
    return reasons + ([f"odd length {x.shape[-1]}"] if x.shape[-1] % 2 else [])


# "triton" here is a stand-in with limits of its own, preferred for CUDA devices as the real one
register("test_cube", Backend("triton", lambda x, s: s * x**3, lambda g, x, s: 3 * s * g * x**2, supports=_refuse_odd))
register("test_cube", Backend("reference", lambda x, s: s * x**3, lambda g, x, s: 3 * s * g * x**2))
cube = define_op("test_cube", _cube_forward, lambda x, scale: torch.empty_like(x), _cube_backward,
                 lambda grad, x, scale: torch.empty_like(x), _setup_context, _gradients)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_defined_op_matches_torch(compiled, dtype):
    x = torch.randn(3, 7, dtype=dtype, requires_grad=True)
    fn = torch.compile(lambda t: cube(t, 0.5), backend="aot_eager", fullgraph=True) if compiled else \
        (lambda t: cube(t, 0.5))
    out = fn(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    want_x = x.detach().clone().requires_grad_()
    want = 0.5 * want_x**3
    (want_grad,) = torch.autograd.grad(want.square().sum(), want_x)
    assert torch.equal(out.detach(), want.detach())
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=0)
    if not compiled:
        assert type(out.grad_fn).__name__ == "TestCubeBackward"
        with pytest.raises(RuntimeError, match="test_cube: gradients of gradients"):
            torch.autograd.grad(cube(x, 0.5).sum(), x, create_graph=True)


def test_every_rejection_reason_is_listed(monkeypatch):
    """With a table row that puts "triton" first on CUDA, every reason it refuses the inputs is
    listed; without a row for the device the reference runs."""
    monkeypatch.delenv("PACOFR_OPS", raising=False)
    assert ops.explain("test_cube", "cuda", x=torch.zeros(2, 4)) == "test_cube: reference"
    row = {"op": "test_cube", "device": "cuda", "when": {}, "order": ["triton", "reference"], "measured": "a figure"}
    monkeypatch.setattr(dispatch, "TABLE", dispatch.TABLE + (row,))
    dispatch._order.cache_clear(), dispatch._row_of.cache_clear()
    both = ops.explain("test_cube", "cuda", x=torch.zeros(2, 3, dtype=torch.float64))
    assert both == "test_cube: reference [measured: a figure] (rejected triton: torch.float64 is not float32, odd length 3)"
    assert ops.explain("test_cube", "cuda", x=torch.zeros(2, 3)) == \
        "test_cube: reference [measured: a figure] (rejected triton: odd length 3)"
    assert ops.explain("test_cube", "cuda", x=torch.zeros(2, 4)) == "test_cube: triton [measured: a figure]"
    dispatch._order.cache_clear(), dispatch._row_of.cache_clear()
