"""pytest-benchmark: patch_pixel_loss forward and forward+backward, Triton against the eager
torch reference and torch.compile of it. GB/s counts the minimal bytes: pred read, image read,
and (with backward) the gradient written. Forward rows run without grad mode; with a backward
to come, the "triton" forward also computes the gradient (the backward then has nothing left
to do), the "triton_recompute" one does not (its backward reads pred and the image again)."""

import pytest
import torch

from common import DEVICE, forced_backend, grads_of, skip_unless_gpu

# (B, image size, patch); boundary weight 0.1 as in training
SHAPES = [(8, 64, 8), (256, 224, 16)]
BIG = {(256, 224, 16)}


def loss_inputs(b, size, p, seed=0, dtype=torch.float32):
    """pred [B, L, p*p*3] in `dtype` (a decoder's output under autocast is bf16), fp32 images."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    L = (size // p) ** 2
    pred = torch.randn(b, L, p * p * 3, device=DEVICE, generator=gen).to(dtype).requires_grad_()
    images = torch.randn(b, 3, size, size, device=DEVICE, generator=gen)
    weight = (torch.rand(b, L, device=DEVICE, generator=gen) < 0.6).float()
    return pred, images, weight


def minimal_bytes(pred, images, backward: bool) -> int:
    return pred.numel() * pred.element_size() * (2 if backward else 1) + images.numel() * images.element_size()


def implementations(p):
    from pacofr.ops import patch_pixel_loss, patch_pixel_loss_terms, reference

    def eager(pred, images, weight):
        # the reference forward as plain differentiable torch (what one writes without the op)
        l_pix, l_sc = reference.patch_pixel_loss(pred, images, weight, p, True, 1e-6)
        return l_pix + 0.1 * l_sc

    compiled = torch.compile(eager)

    def triton(pred, images, weight):
        # told the boundary weight: with a backward to come, the forward computes the gradient
        with forced_backend("triton"):
            return patch_pixel_loss(pred, images, weight, p, boundary_weight=0.1)

    def triton_recompute(pred, images, weight):
        # not told: a forward pass, then a backward that reads pred and the image again
        with forced_backend("triton"):
            l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, p)
            return l_pix + 0.1 * l_sc

    return {"triton": triton, "triton_recompute": triton_recompute, "eager": eager, "torch_compile": compiled}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", ["triton", "triton_recompute", "eager", "torch_compile"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_{}px_p{}".format(*s))
def test_patch_pixel_loss(benchmark, shape, impl, backward):
    skip_unless_gpu(impl, shape in BIG)
    pred, images, weight = loss_inputs(*shape)
    fn = implementations(shape[2])[impl]

    def run():
        with torch.set_grad_enabled(backward):  # forward only: no gradient to prepare
            loss = fn(pred, images, weight)
        if backward:
            grads_of(loss, (pred,))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return loss

    benchmark(run)
    benchmark.extra_info["gbps"] = minimal_bytes(pred, images, backward) / benchmark.stats["median"] / 1e9
