"""Triton kernels, one module per fused op; imported as `pacofr.kernels` and reached by model
code only through `pacofr.ops`."""

import os


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU in Triton's interpreter, whose cost is
    per block operation: kernels pick large blocks there)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
