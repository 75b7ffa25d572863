"""The custom ops trace under torch.compile (fake impls + registered autograd): one graph, no
breaks, and the same values and gradients as eager (where the ops run as plain autograd
Functions, without the custom ops' dispatch)."""

import pytest
import torch

from pacofr.ops import backends, codebook_topk, masked_attention, masked_attention_qkv, patch_pixel_loss


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


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_masked_attention_qkv_ops_pass_opcheck(monkeypatch, backend):
    """The packed op and its backward op (fake impls, strides, autograd registration), also
    for a qkv with other strides than contiguous: its gradient comes back contiguous."""
    if backend not in backends("masked_attention"):
        pytest.skip(f"{backend} cannot run here")
    monkeypatch.setenv("PACOFR_OPS", backend)
    torch.manual_seed(1)
    qkv = torch.randn(2, 5, 3, 2, 8)
    seqlens = torch.tensor([5, 2])
    for x in (qkv, qkv.transpose(3, 1).contiguous().transpose(3, 1)):
        torch.library.opcheck(torch.ops.pacofr.masked_attention_qkv.default, (x.requires_grad_(), seqlens, None, 0.3))
        out, lse = torch.ops.pacofr.masked_attention_qkv(x.detach(), seqlens, None, 0.3)
        torch.library.opcheck(torch.ops.pacofr.masked_attention_qkv_backward.default,
                              (torch.randn_like(out), x.detach(), out, lse, seqlens, None, 0.3))


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
