"""pytest-benchmark: masked_attention (cases.ATTENTION; forward, forward+backward) on ragged
lengths, Triton against SDPA with the equivalent boolean mask, SDPA on unmasked input (its
flash path on a GPU), our op on that same unmasked input, the torch reference, and the varlen
kernels of flash-attn and xformers when installed; and a ViT block's attention from its packed
qkv projection (cases.ATTENTION_BLOCK). TFLOP/s count the tokens each one computes over: the
valid ones, all N for the unmasked rows."""

import pytest

from cases import ATTENTION, ATTENTION_BLOCK
from suite import params, time_case


@pytest.mark.parametrize("dtype, shape, impl, backward", params(ATTENTION))
def test_masked_attention(benchmark, dtype, shape, impl, backward):
    time_case(benchmark, ATTENTION, dtype, shape, impl, backward)


@pytest.mark.parametrize("dtype, shape, impl, backward", params(ATTENTION_BLOCK))
def test_attention_block(benchmark, dtype, shape, impl, backward):
    time_case(benchmark, ATTENTION_BLOCK, dtype, shape, impl, backward)
