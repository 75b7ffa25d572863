"""The benchmark cases, defined once for the pytest-benchmark suites (test_<op>.py) and the GPU
report (gpu_report.py): for each fused op its shapes and dtypes, its inputs, the
implementations timed (the public Triton op and its baselines, and at the target shape the
kernels called directly with the default launch configuration and with each one of
`pacofr.kernels.<op>.SWEEP`) and the work of one call (matmul FLOPs or minimal bytes).

The suites time the small CPU shapes everywhere and the GPU shapes on a GPU; the report times
the GPU shapes, the first of which is the performance target's (docs/design.md).
"""

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from common import DEVICE, config_name, forced_backend, grads_of

PASSES = {False: "fwd", True: "fwd+bwd"}


@dataclass(frozen=True)
class Case:
    """One op's benchmark. A shape is the tuple that `inputs`, `baselines`, `kernel` and
    `work` take; `describe` writes it as the report's rows do."""

    title: Callable[[tuple, bool], str]  # (shape, backward) -> the rows' "op"
    op: str  # the op as pacofr.ops.backends and pacofr.kernels.<op> name it
    cpu_shapes: tuple
    gpu_shapes: tuple  # the first is the target's: the launch configurations are timed there
    dtypes: tuple  # on a GPU (on CPU float32); the configurations are timed in the first
    passes: tuple  # False: forward only, True: forward and backward
    describe: Callable[[tuple], str]
    inputs: Callable[[tuple, torch.dtype], tuple]  # fresh inputs on DEVICE
    impls: tuple  # the names that `baselines` gives (those that are installed)
    baselines: Callable[[tuple], dict]  # shape -> {impl: fn(*inputs)}
    work: Callable[[str, tuple, tuple, bool], float]  # (impl, shape, inputs, backward) -> per call
    unit: str  # what `work` counts: "flops" or "bytes"
    grad_inputs: tuple = ()  # the positions of the inputs that a backward differentiates
    kernel: Callable[[tuple, dict | None], Callable] | None = None  # the kernels with that configuration
    extra_configs: dict = field(default_factory=dict)  # named configurations timed beside SWEEP's


def sweep(case: Case) -> dict:
    """{impl: launch configuration} of the kernel rows: "triton kernel" (the default, called like
    the others), "triton <config>" for each of `pacofr.kernels.<op>.SWEEP`, then the extras."""
    if case.kernel is None:
        return {}
    configs = {"triton kernel": None}
    configs.update({"triton " + config_name(c): c for c in importlib.import_module(f"pacofr.kernels.{case.op}").SWEEP})
    configs.update({"triton " + name: c for name, c in case.extra_configs.items()})
    return configs


def implementations(case: Case, shape: tuple, with_sweep: bool) -> dict:
    """{impl: fn(*inputs)}: the baselines, and with `with_sweep` the kernel rows."""
    impls = case.baselines(shape)
    if with_sweep:
        impls.update({name: case.kernel(shape, config) for name, config in sweep(case).items()})
    return impls


def call(case: Case, fn, inputs: tuple, backward: bool):
    """One timed call: the forward, in grad mode only with a backward to come (the Triton
    loss computes its gradient in a forward that will be differentiated), then the backward."""
    with torch.set_grad_enabled(backward):
        out = fn(*inputs)
    if backward:
        grads_of(out, [inputs[i] for i in case.grad_inputs])
    return out


def dtypes(case: Case) -> tuple:
    return case.dtypes if DEVICE == "cuda" else (torch.float32,)


def _randn(gen, *shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, device=DEVICE, generator=gen).to(dtype).requires_grad_(grad)


# codebook_topk: (N, K, D, k, metric); the paper scale is every patch of a 256 x 224 px batch
# against 8192 codes.

def torch_mm_topk(x, c, k, metric):
    """What one writes without the op: the full score matrix, then topk."""
    s = x.float() @ c.float().T
    if metric == "l2":
        s = (x.float() ** 2).sum(1, keepdim=True) - 2 * s + (c.float() ** 2).sum(1)
        return torch.topk(s, k, dim=1, largest=False)
    return torch.topk(s, k, dim=1)


def faiss_knn(k, metric):
    """faiss's exact search (faiss-cpu, the `bench` extra) on CPU tensors, or None without it."""
    try:
        import faiss
    except ImportError:
        return None
    kind = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    return lambda x, c: faiss.knn(x.numpy(), c.numpy(), k, metric=kind)


def _codebook_inputs(shape, dtype):
    n, kc, d, _, _ = shape
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    return _randn(gen, n, d, dtype=dtype), _randn(gen, kc, d, dtype=dtype)


def _codebook_baselines(shape):
    from pacofr.ops import codebook_topk, reference

    _, _, _, k, metric = shape

    def triton(x, c):
        with forced_backend("triton"):
            return codebook_topk(x, c, k, metric)

    impls = {"triton": triton, "torch mm+topk": lambda x, c: torch_mm_topk(x, c, k, metric),
             "reference": lambda x, c: reference.codebook_topk(x, c, k, metric), "bare GEMM": lambda x, c: x @ c.T}
    if DEVICE == "cpu":  # the CPU-only implementations
        impls.update(_cpu_codebook_impls(k, metric))
    return impls


def _cpu_codebook_impls(k, metric):
    from pacofr.ops import backends, codebook_topk

    impls = {}
    if "native" in backends("codebook_topk"):
        def native(x, c):
            with forced_backend("native"):
                return codebook_topk(x, c, k, metric)

        impls["native"] = native
    if (knn := faiss_knn(k, metric)) is not None:
        impls["faiss"] = knn
    return impls


def _codebook_kernel(shape, config):
    from pacofr.kernels.codebook_topk import codebook_topk_forward

    _, _, _, k, metric = shape
    return lambda x, c: codebook_topk_forward(x, c, k, metric, config=config)


CODEBOOK = Case(
    title=lambda shape, backward: f"codebook_topk fwd ({shape[4]})", op="codebook_topk",
    # the last CPU shape is the native kernel's target (against faiss, docs/design.md)
    cpu_shapes=((1024, 1024, 64, 4, "ip"), (1024, 1024, 64, 4, "l2"), (20000, 8192, 64, 8, "l2")),
    gpu_shapes=((65536, 8192, 768, 8, "ip"), (16384, 8192, 768, 8, "ip"), (256, 8192, 768, 4, "ip")),
    dtypes=(torch.bfloat16,), passes=(False,), describe=lambda s: "N={} K={} D={} k={}".format(*s[:4]),
    inputs=_codebook_inputs, impls=("triton", "torch mm+topk", "reference", "bare GEMM", "native", "faiss"),
    baselines=_codebook_baselines, work=lambda impl, s, inputs, backward: 2 * s[0] * s[1] * s[2], unit="flops",
    kernel=_codebook_kernel,
    # not a result: the default kernel without its best-k selection, which splits the kernel's
    # time into products and selection
    extra_configs={"products only": {"SELECT": False}})


# masked_attention: (B, H, N, d), lengths uniform in 40-100% of N per sample.

def ragged_inputs(shape, dtype, seed=0):
    b, h, n, d = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (_randn(gen, b, h, n, d, dtype=dtype, grad=True) for _ in range(3))
    seqlens = torch.randint(int(0.4 * n), n + 1, (b,), device=DEVICE, generator=gen)
    return q, k, v, seqlens


# these run on the unmasked input (every token valid), so their FLOPs count all N tokens
UNMASKED = {"sdpa_unmasked", "triton_unmasked"}


def valid_flops(seqlens, h, d, backward: bool) -> float:
    """Matmul FLOPs of the valid tokens only: 4 L^2 d per head forward, 2.5x that backward."""
    fwd = 4.0 * float((seqlens.double() ** 2).sum()) * h * d
    return fwd * (3.5 if backward else 1.0)


def _attention_work(impl, shape, inputs, backward):
    seqlens = inputs[3]
    return valid_flops(torch.full_like(seqlens, shape[2]) if impl in UNMASKED else seqlens, shape[1], shape[3],
                       backward)


def _triton_attention(q, k, v, seqlens):
    from pacofr.ops import masked_attention

    with forced_backend("triton"):
        return masked_attention(q, k, v, seqlens=seqlens)


def _dispatched_attention(backend):
    from pacofr.ops import masked_attention

    def run(q, k, v, seqlens):
        with forced_backend(backend):
            return masked_attention(q, k, v, seqlens=seqlens)
    return run


def _sdpa_jagged(q, k, v, seqlens):
    """SDPA over nested jagged tensors: each sample's valid tokens only, no mask."""
    offsets = F.pad(torch.cumsum(seqlens, 0), (1, 0))
    q, k, v = (torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in _packed(q, k, v, seqlens))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()  # [total, H, d]


def _attention_baselines(shape):
    from pacofr.ops import reference

    def sdpa_masked(q, k, v, seqlens):
        valid = torch.arange(q.shape[2], device=q.device)[None] < seqlens[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])

    impls = {
        "triton": _triton_attention,
        "sdpa_bool_mask": sdpa_masked,
        "sdpa": _dispatched_attention("sdpa"),  # the op's SDPA backend (padding zeroed, empty rows 0)
        "sdpa_jagged": _sdpa_jagged,
        "sdpa_unmasked": lambda q, k, v, s: F.scaled_dot_product_attention(q, k, v),
        # the same unmasked input through our kernel: what SDPA's flash path is measured against
        "triton_unmasked": lambda q, k, v, s: _triton_attention(q, k, v, None),
        "reference": lambda q, k, v, s: reference.masked_attention(q, k, v, s, None, q.shape[-1] ** -0.5)[0],
    }
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401

        impls["flash_attn_varlen"] = _flash_varlen
    except ImportError:
        pass
    try:
        from xformers.ops import fmha  # noqa: F401

        impls["xformers_varlen"] = _xformers_varlen
    except ImportError:
        pass
    return impls


def _packed(q, k, v, seqlens):
    """The valid tokens of q, k, v packed back to back, [total, H, d] each (varlen layout)."""
    valid = torch.arange(q.shape[2], device=q.device)[None] < seqlens[:, None]
    return (t.transpose(1, 2)[valid] for t in (q, k, v))


def _flash_varlen(q, k, v, seqlens):
    from flash_attn import flash_attn_varlen_func

    cu = torch.zeros(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    cu[1:] = torch.cumsum(seqlens, 0)
    m = int(seqlens.max())
    return flash_attn_varlen_func(*_packed(q, k, v, seqlens), cu, cu, m, m)


def _xformers_varlen(q, k, v, seqlens):
    from xformers.ops import fmha

    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(seqlens.tolist())
    return fmha.memory_efficient_attention(*(t[None] for t in _packed(q, k, v, seqlens)), attn_bias=bias)


class _ConfiguredAttention(torch.autograd.Function):
    """masked_attention straight through the kernels with a given launch configuration."""

    @staticmethod
    def forward(ctx, q, k, v, seqlens, config):
        from pacofr.kernels.masked_attention import masked_attention_forward

        out, lse = masked_attention_forward(q, k, v, seqlens, None, q.shape[-1] ** -0.5, config=config)
        ctx.save_for_backward(q, k, v, out, lse, seqlens)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from pacofr.kernels.masked_attention import masked_attention_backward

        q, k, v, out, lse, seqlens = ctx.saved_tensors
        grads = masked_attention_backward(grad_out, q, k, v, out, lse, seqlens, None, q.shape[-1] ** -0.5, ctx.config)
        return (*grads, None, None)


def _describe_attention(shape):
    return "B={} H={} N={} d={}".format(*shape)


ATTENTION = Case(
    title=lambda shape, backward: "masked_attention " + PASSES[backward], op="masked_attention",
    cpu_shapes=((8, 4, 197, 64),), gpu_shapes=((256, 12, 197, 64), (16, 12, 1024, 64)),
    dtypes=(torch.bfloat16,), passes=(False, True), describe=_describe_attention, inputs=ragged_inputs,
    impls=("triton", "sdpa_bool_mask", "sdpa", "sdpa_jagged", "sdpa_unmasked", "triton_unmasked", "reference",
           "flash_attn_varlen", "xformers_varlen"),
    baselines=_attention_baselines, work=_attention_work, unit="flops", grad_inputs=(0, 1, 2),
    kernel=lambda shape, config: lambda q, k, v, s: _ConfiguredAttention.apply(q, k, v, s, config))


# A ViT block's attention, fwd+bwd from its qkv projection [B, N, 3C] to [B, N, C]: through
# masked_attention_qkv (one dqkv buffer, written by the kernels) and through masked_attention
# on the split views (autograd stacks and copies their gradients).

def _block_inputs(shape, dtype):
    b, h, n, d = shape
    seqlens = ragged_inputs(shape, dtype)[3]
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    return _randn(gen, b, n, 3 * h * d, dtype=dtype, grad=True), seqlens


def _block_baselines(shape):
    from pacofr.ops import masked_attention, masked_attention_qkv

    b, h, n, d = shape

    def packed(x, s):
        with forced_backend("triton"):
            return masked_attention_qkv(x.view(b, n, 3, h, d), seqlens=s).reshape(b, n, h * d)

    def views(x, s):
        with forced_backend("triton"):
            out = masked_attention(*x.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4), seqlens=s)
        return out.transpose(1, 2).reshape(b, n, h * d)

    return {"triton": packed, "triton_split_views": views}


ATTENTION_BLOCK = Case(
    title=lambda shape, backward: "attention block fwd+bwd", op="masked_attention",
    cpu_shapes=((8, 4, 197, 64),), gpu_shapes=((256, 12, 197, 64),), dtypes=(torch.bfloat16,), passes=(True,),
    describe=_describe_attention, inputs=_block_inputs, impls=("triton", "triton_split_views"),
    baselines=_block_baselines, work=lambda impl, s, inputs, backward: valid_flops(inputs[1], s[1], s[3], True),
    unit="flops", grad_inputs=(0,))


# patch_pixel_loss: (B, image size, patch), boundary weight 0.1 as in training. The bytes are
# the minimal ones: pred read, image read, and with a backward the gradient written.

def loss_inputs(shape, dtype, seed=0):
    """pred [B, L, p*p*3] in `dtype` (a decoder's output under autocast is bf16), fp32 images."""
    b, size, p = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    L = (size // p) ** 2
    pred = _randn(gen, b, L, p * p * 3, dtype=dtype, grad=True)
    images = _randn(gen, b, 3, size, size)
    weight = (torch.rand(b, L, device=DEVICE, generator=gen) < 0.6).float()
    return pred, images, weight


def minimal_bytes(pred, images, backward: bool) -> int:
    return pred.numel() * pred.element_size() * (2 if backward else 1) + images.numel() * images.element_size()


def _loss_baselines(shape):
    from pacofr.ops import backends, patch_pixel_loss, patch_pixel_loss_terms, reference

    p = shape[2]

    def eager(pred, images, weight):
        # the reference forward as plain differentiable torch (what one writes without the op)
        l_pix, l_sc = reference.patch_pixel_loss(pred, images, weight, p, True, 1e-6)
        return l_pix + 0.1 * l_sc

    def triton(pred, images, weight):
        # told the boundary weight: with a backward to come, the forward computes the gradient
        with forced_backend("triton"):
            return patch_pixel_loss(pred, images, weight, p, boundary_weight=0.1)

    def triton_recompute(pred, images, weight):
        # not told: a forward pass, then a backward that reads pred and the image again
        with forced_backend("triton"):
            l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, p)
            return l_pix + 0.1 * l_sc

    impls = {"triton": triton, "triton_recompute": triton_recompute, "eager": eager,
             "torch_compile": torch.compile(eager)}
    if DEVICE == "cpu" and "native" in backends("patch_pixel_loss"):
        def native(pred, images, weight):
            # (the backward keeps to native too: it is the CPU dispatch's choice)
            with forced_backend("native"):
                return patch_pixel_loss(pred, images, weight, p, boundary_weight=0.1)

        impls["native"] = native
    return impls


class _ConfiguredLoss(torch.autograd.Function):
    """patch_pixel_loss (boundary weight 0.1) straight through the kernels with a given launch
    configuration, the gradient from the forward as in the op."""

    @staticmethod
    def forward(ctx, pred, images, weight, p, config, with_grad):
        from pacofr.kernels.patch_pixel_loss import patch_pixel_loss_forward, patch_pixel_loss_forward_with_grad

        if with_grad:
            l_pix, l_sc, stats, norms, ctx.grad = patch_pixel_loss_forward_with_grad(pred, images, weight, p, True,
                                                                                     1e-6, 0.1, config=config)
        else:
            l_pix, l_sc, stats, norms = patch_pixel_loss_forward(pred, images, weight, p, True, 1e-6, config=config)
        ctx.save_for_backward(pred, images, weight, stats, norms)
        ctx.args = (p, config)
        return l_pix + 0.1 * l_sc

    @staticmethod
    def backward(ctx, grad):
        from pacofr.kernels.patch_pixel_loss import patch_pixel_loss_rescale

        pred, images, weight, stats, norms = ctx.saved_tensors
        p, config = ctx.args
        g = patch_pixel_loss_rescale(grad, 0.1 * grad, ctx.grad, 0.1, pred, images, weight, stats, norms, p,
                                     config=config)
        return g, None, None, None, None, None


LOSS = Case(
    title=lambda shape, backward: "patch_pixel_loss " + PASSES[backward], op="patch_pixel_loss",
    # the last CPU shape is the native kernel's target (against eager and torch.compile, docs/design.md)
    cpu_shapes=((8, 64, 8), (32, 224, 16)), gpu_shapes=((256, 224, 16),), dtypes=(torch.bfloat16, torch.float32),
    passes=(False, True), describe=lambda s: "B={} {}px p={}".format(*s), inputs=loss_inputs,
    impls=("triton", "triton_recompute", "eager", "torch_compile", "native"), baselines=_loss_baselines,
    work=lambda impl, s, inputs, backward: minimal_bytes(inputs[0], inputs[1], backward), unit="bytes",
    grad_inputs=(0,),
    kernel=lambda shape, config: lambda pred, images, weight: _ConfiguredLoss.apply(
        pred, images, weight, shape[2], config, torch.is_grad_enabled()))

CASES = (ATTENTION, ATTENTION_BLOCK, LOSS, CODEBOOK)
