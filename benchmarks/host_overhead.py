"""Host time of each public op's forward and backward with the kernel launches stubbed out,
beside that of calling the kernels' launchers directly: what the Python wrappers (argument
checks, dispatch, autograd) add to every call. On a GPU this time is spent before the first
kernel reaches the device, so it adds to small ops' wall time.

No GPU needed: CPU tensors, the Triton backend (TRITON_INTERPRET=1 selects it on CPU), and
launches replaced by no-ops. Run it as a script:

    python benchmarks/host_overhead.py
"""

import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
os.environ["PACOFR_OPS"] = "triton"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from pacofr.kernels import codebook_topk as codebook_kernels  # noqa: E402
from pacofr.kernels import masked_attention as attention_kernels  # noqa: E402
from pacofr.kernels import patch_pixel_loss as loss_kernels  # noqa: E402
from pacofr.ops import codebook_topk, masked_attention, masked_attention_qkv, patch_pixel_loss_terms  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_launches():
    for module in (codebook_kernels, attention_kernels, loss_kernels):
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            setattr(module, name, _NoLaunch())


def _median_us(fn, reps=100, rounds=7) -> float:
    """The lowest of `rounds` medians of `reps` calls: the machine's noise only adds time."""
    for _ in range(20):
        fn()
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return min(medians) * 1e6


_ONES: dict = {}


def _ones(like):
    """An upstream gradient of ones, made once per shape (a fresh large tensor per call would
    cost more than the op's wrappers)."""
    if like.shape not in _ONES:
        _ONES[like.shape] = torch.ones_like(like)
    return _ONES[like.shape]


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs, _ones(out))


def cases():
    """(name, the op's forward and backward, the launchers' forward and backward)."""
    q, k, v = (torch.randn(4, 2, 197, 64, requires_grad=True) for _ in range(3))
    seqlens = torch.tensor([197, 100, 150, 80])

    def attention_launchers():
        out, lse = attention_kernels.masked_attention_forward(q, k, v, seqlens, None, 0.125)
        attention_kernels.masked_attention_backward(_ones(out), q, k, v, out, lse, seqlens, None, 0.125)

    yield ("masked_attention B=4 H=2 N=197 d=64", lambda: _grads(masked_attention(q, k, v, seqlens), (q, k, v)),
           attention_launchers)

    qkv = torch.randn(4, 197, 3, 2, 64, requires_grad=True)

    def packed_launchers():
        views = qkv.permute(2, 0, 3, 1, 4)
        out, lse = attention_kernels.masked_attention_forward(*views, seqlens, None, 0.125)
        dqkv = torch.empty_like(qkv)
        attention_kernels.masked_attention_backward(_ones(out), *views, out, lse, seqlens, None, 0.125,
                                                    grads=tuple(dqkv.permute(2, 0, 3, 1, 4)))

    yield ("masked_attention_qkv B=4 H=2 N=197 d=64", lambda: _grads(masked_attention_qkv(qkv, seqlens), (qkv,)),
           packed_launchers)

    x, c = torch.randn(197, 64, requires_grad=True), torch.randn(1000, 64, requires_grad=True)

    def codebook_launchers():
        scores, idx = codebook_kernels.codebook_topk_forward(x, c, 8, "l2")
        codebook_kernels.codebook_topk_backward(_ones(scores), x, c, idx, "l2")

    yield "codebook_topk N=197 K=1000 D=64 k=8", lambda: _grads(codebook_topk(x, c, 8)[0], (x, c)), codebook_launchers

    pred = torch.randn(2, 49, 768, requires_grad=True)
    images, weight = torch.randn(2, 3, 112, 112), torch.rand(2, 49)

    def loss_launchers():  # the model's path: the gradient from the forward, then its rescale
        *_, stats, norms, grad = loss_kernels.patch_pixel_loss_forward_with_grad(pred, images, weight, 16, True,
                                                                                 1e-6, 0.5)
        loss_kernels.patch_pixel_loss_rescale(torch.tensor(1.0), torch.tensor(0.5), grad, 0.5, pred, images, weight,
                                              stats, norms, 16)

    def loss_op():
        l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, 16, sc_weight=0.5)
        return _grads(l_pix + 0.5 * l_sc, (pred,))

    yield "patch_pixel_loss B=2 112 px p=16", loss_op, loss_launchers


def main() -> int:
    _stub_launches()
    print(f"{'op (fwd+bwd, launches stubbed)':40s} {'op us':>8s} {'launchers us':>13s} {'wrapper us':>11s}")
    for name, op, launchers in cases():
        t_op, t_launchers = _median_us(op), _median_us(launchers)
        print(f"{name:40s} {t_op:8.1f} {t_launchers:13.1f} {t_op - t_launchers:11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
