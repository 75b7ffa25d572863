"""Triton kernels, one module per fused op; imported as `pacofr.kernels` and reached by model
code only through `pacofr.ops`."""
