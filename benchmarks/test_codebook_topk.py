"""pytest-benchmark: codebook_topk, Triton against the torch reference and plain torch
(matmul, then topk over the full N x K matrix). `pytest benchmarks/ --benchmark-group-by=param:shape`."""

import pytest
import torch

from common import DEVICE, skip_unless_gpu

# (N, K, D, k); the last is the paper scale: every patch of a 256 x 224 px batch vs 8192 codes
SHAPES = [(1024, 1024, 64, 4), (4096, 8192, 256, 8), (256, 8192, 768, 4), (65536, 8192, 768, 8)]
BIG = {(65536, 8192, 768, 8), (4096, 8192, 256, 8), (256, 8192, 768, 4)}


def torch_mm_topk(x, c, k, metric):
    """What one writes without the op: the full score matrix, then topk."""
    s = x.float() @ c.float().T
    if metric == "l2":
        s = (x.float() ** 2).sum(1, keepdim=True) - 2 * s + (c.float() ** 2).sum(1)
        return torch.topk(s, k, dim=1, largest=False)
    return torch.topk(s, k, dim=1)


def _impl(name):
    if name == "torch":
        return torch_mm_topk
    if name == "reference":
        from pacofr.ops.reference import codebook_topk

        return codebook_topk
    from pacofr.kernels.codebook_topk import codebook_topk_forward

    return codebook_topk_forward


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("impl", ["triton", "reference", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_K{}_D{}_k{}".format(*s))
def test_codebook_topk_forward(benchmark, shape, impl, metric):
    skip_unless_gpu(impl, shape in BIG)
    n, kc, d, k = shape
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(n, d, device=DEVICE, generator=gen).to(dtype)
    c = torch.randn(kc, d, device=DEVICE, generator=gen).to(dtype)
    fn = _impl(impl)

    def run():
        out = fn(x, c, k, metric)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    scores, idx = benchmark(run)
    benchmark.extra_info.update(tflops=2 * n * kc * d / benchmark.stats["median"] / 1e12, dtype=str(dtype))
    assert scores.shape == (n, k) and idx.shape == (n, k)
