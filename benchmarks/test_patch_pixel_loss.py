"""pytest-benchmark: patch_pixel_loss (cases.LOSS) forward and forward+backward, Triton against
the eager torch reference and torch.compile of it. GB/s counts the minimal bytes: pred read,
image read, and (with backward) the gradient written. Forward rows run without grad mode;
with a backward to come, the "triton" forward also computes the gradient (the backward then
has nothing left to do), the "triton_recompute" one does not (its backward reads pred and the
image again)."""

import pytest

from cases import LOSS
from suite import params, time_case


@pytest.mark.parametrize("dtype, shape, impl, backward", params(LOSS))
def test_patch_pixel_loss(benchmark, dtype, shape, impl, backward):
    time_case(benchmark, LOSS, dtype, shape, impl, backward)
