"""pytest-benchmark: codebook_topk (cases.CODEBOOK), the Triton op (on CPU: the native one and
faiss's exact search) against the torch reference, plain torch (matmul, then topk over the full
N x K matrix) and the bare GEMM, in TFLOP/s of the N x K products. `pytest benchmarks/ --benchmark-group-by=param:shape`."""

import pytest

from cases import CODEBOOK
from suite import params, time_case


@pytest.mark.parametrize("dtype, shape, impl, backward", params(CODEBOOK))
def test_codebook_topk(benchmark, dtype, shape, impl, backward):
    time_case(benchmark, CODEBOOK, dtype, shape, impl, backward)
