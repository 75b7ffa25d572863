"""The Triton masked attention (interpreter on CPU, the GPU when there is one): outputs poisoned
before the call, bitwise-reproducible gradients, every head dim, odd N, and the model's
`attn_impl` switch. tests/test_ops.py runs the op-level suite (forward and all three gradients
against float64 SDPA) on this backend too."""

import math

import pytest
import torch

kernel = pytest.importorskip("pacofr.kernels.masked_attention")
from pacofr.ops import backends, reference  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in backends("masked_attention"), reason="Triton cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKWARDS = {"split": None, "fused": dict(FUSED_BWD=True), "atomic": dict(ATOMIC_DQ=True)}


def _inputs(b, h, n, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen).to(DEVICE, dtype) for _ in range(4)]


@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("n", [1, 197])
def test_every_output_written_and_matches_reference(d, n):
    q, k, v, _ = _inputs(3, 2, n, d, torch.float32, seed=d + n)
    seqlens = torch.tensor([0, 1, n], device=DEVICE)
    out = torch.full_like(q, math.nan)
    got, lse = kernel.masked_attention_forward(q, k, v, seqlens, None, d**-0.5, out=out)
    assert got is out and not out.isnan().any() and not lse.isnan().any()
    expected, ref_lse = reference.masked_attention(q.cpu(), k.cpu(), v.cpu(), seqlens.cpu(), None, d**-0.5)
    assert (got.cpu() - expected).abs().max() < 1e-5
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(ref_lse))  # padded rows: lse = +inf
    assert (got[0] == 0).all() and (got[1, :, 1:] == 0).all()  # padding is exactly zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_is_bitwise_reproducible(dtype):
    q, k, v, g = _inputs(2, 3, 97, 64, dtype, seed=1)
    seqlens = torch.tensor([60, 97], device=DEVICE)
    key_mask = torch.rand(2, 97, generator=torch.Generator().manual_seed(2)).to(DEVICE) > 0.2
    out, lse = kernel.masked_attention_forward(q, k, v, seqlens, key_mask, 0.125)
    first = kernel.masked_attention_backward(g, q, k, v, out, lse, seqlens, key_mask, 0.125)
    second = kernel.masked_attention_backward(g, q, k, v, out, lse, seqlens, key_mask, 0.125)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref = reference.masked_attention_backward(g.cpu(), q.cpu(), k.cpu(), v.cpu(), out.cpu(), lse.cpu(),
                                              seqlens.cpu(), key_mask.cpu(), 0.125)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(first, ref):
        assert (a.float().cpu() - b.float()).abs().max() <= tol * b.float().abs().max()
    dq, dk, dv = first
    assert (dq[0, :, 60:] == 0).all() and (dk[0, :, 60:] == 0).all() and (dv[0, :, 60:] == 0).all()


@pytest.fixture(autouse=True)
def _atomics_allowed(monkeypatch):
    """The atomic backward's tests mean it: not the split one that the deterministic mode
    would run in its place."""
    monkeypatch.delenv("PACOFR_DETERMINISTIC", raising=False)


def _same(a, b, atomic_dq=False):
    """Bit for bit; the atomic backward's dq on a GPU, whose sums run in a varying order, to
    within fp32 rounding of its sums (the interpreter runs atomics in a fixed order)."""
    if atomic_dq and DEVICE == "cuda":
        return torch.allclose(a.float(), b.float(), rtol=1e-2 if a.dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    return torch.equal(a, b)


@pytest.mark.parametrize("backward", list(BACKWARDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_inputs_are_read_in_place(dtype, backward):
    """q, k, v split from one qkv projection ([B, N, 3, H, d], as in a ViT block) and the
    gradient of out.transpose(1, 2).reshape(B, N, H * d): the same results, bit for bit, as
    contiguous copies; the output laid out as [B, N, H, d]; one input with other strides
    falls back to copies. The gradients written into views of one poisoned dqkv buffer fill
    it whole."""
    atomic = backward == "atomic"
    b, h, n, d = 2, 3, 70, 32
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(b, n, 3, h, d, generator=gen).to(DEVICE, dtype)
    g = torch.randn(b, n, h * d, generator=gen).to(DEVICE, dtype)
    seqlens = torch.tensor([41, 70], device=DEVICE)
    config = BACKWARDS[backward]
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    grad_out = g.view(b, n, h, d).transpose(1, 2)
    contiguous = [t.contiguous() for t in (q, k, v)]

    want, want_lse = kernel.masked_attention_forward(*contiguous, seqlens, None, 0.2)
    want_grads = kernel.masked_attention_backward(grad_out.contiguous(), *contiguous, want, want_lse, seqlens, None,
                                                  0.2, config)
    for inputs in ((q, k, v), (contiguous[0], k, v)):
        got, lse = kernel.masked_attention_forward(*inputs, seqlens, None, 0.2)
        assert torch.equal(got, want) and torch.equal(lse, want_lse)
        grads = kernel.masked_attention_backward(grad_out, *inputs, got, lse, seqlens, None, 0.2, config)
        for i, (a, c) in enumerate(zip(grads, want_grads)):
            assert a.is_contiguous() and _same(a, c, atomic and i == 0)
    dqkv = torch.full_like(qkv, math.nan)
    grads = kernel.masked_attention_backward(grad_out, q, k, v, got, lse, seqlens, None, 0.2, config,
                                             tuple(dqkv.permute(2, 0, 3, 1, 4)))
    assert all(a.data_ptr() == dqkv[:, :, i].data_ptr() for i, a in enumerate(grads))
    assert not dqkv.isnan().any()
    for i, c in enumerate(want_grads):
        assert _same(dqkv[:, :, i].permute(0, 2, 1, 3), c, atomic and i == 0)
    got = kernel.masked_attention_forward(q, k, v, seqlens, None, 0.2)[0]
    assert got.transpose(1, 2).is_contiguous()  # [B, N, H, d] memory: the block's reshape is a view
    assert want.is_contiguous()


def test_attn_impl_switch_gives_the_same_model_output(monkeypatch, faces64):
    from pacofr.config import load_config
    from pacofr.masking import structured_masks
    from pacofr.model import PaCoFR

    cfg = load_config("tiny")
    masks = structured_masks(4, (64, 64), 8, cfg.masking, generator=torch.Generator().manual_seed(0))
    preds = {}
    for impl, ops in (("sdpa", "reference"), ("pacofr", "reference"), ("pacofr", "triton")):
        monkeypatch.setenv("PACOFR_OPS", ops)
        torch.manual_seed(0)
        model = PaCoFR(load_config("tiny", [f"model.attn_impl={impl}"])).eval()
        model.set_incubation(False)
        with torch.no_grad():
            preds[(impl, ops)] = model(faces64[:4], masks=masks)["pred"]
    base = preds[("pacofr", "reference")]
    for key, pred in preds.items():
        assert (pred - base).abs().max() < 1e-4, key


def _config_id(config):
    return "-".join(f"{key}{value}" for key, value in config.items())


def _check_config(config, d, dtype, seqlens, key_mask=None, n=131, tol=3e-2):
    """Forward and gradients of a launch configuration against the reference, with every
    output poisoned before the call and padded rows exactly zero."""
    q, k, v, g = _inputs(len(seqlens), 2, n, d, dtype, seed=5 + d)
    seqlens = torch.tensor(seqlens, device=DEVICE)
    out = torch.full_like(q, math.nan)
    grads = tuple(torch.full_like(q, math.nan) for _ in range(3))
    got, lse = kernel.masked_attention_forward(q, k, v, seqlens, key_mask, 0.125, out=out, config=config)
    back = kernel.masked_attention_backward(g, q, k, v, got, lse, seqlens, key_mask, 0.125, config=config, grads=grads)
    assert all(a is b for a, b in zip(back, grads))
    km = None if key_mask is None else key_mask.cpu()
    ref, ref_lse = reference.masked_attention(q.cpu(), k.cpu(), v.cpu(), seqlens.cpu(), km, 0.125)
    ref_grads = reference.masked_attention_backward(g.cpu(), q.cpu(), k.cpu(), v.cpu(), ref, ref_lse, seqlens.cpu(),
                                                    km, 0.125)
    assert not out.isnan().any() and (got.float().cpu() - ref.float()).abs().max() <= tol
    for a, b in zip(grads, ref_grads):
        assert not a.isnan().any()
        assert (a.float().cpu() - b.float()).abs().max() <= tol * b.float().abs().max()
    for i, length in enumerate(seqlens.tolist()):
        assert all((t[i, :, length:] == 0).all() for t in (got, *grads))
    return grads


@pytest.mark.parametrize("config", kernel.SWEEP, ids=_config_id)
def test_every_swept_launch_configuration_is_correct(config):
    """The alternatives gpu_report.py times give the reference's output and gradients, with
    ragged lengths (0 and full included) and poisoned outputs."""
    _check_config(config, 64, torch.bfloat16, [0, 77, 131])


@pytest.mark.parametrize("backward", ["fused", "atomic"])
@pytest.mark.parametrize("d", [32, 80, 128])
def test_fused_and_atomic_backwards_match_the_split_one(d, backward):
    """The fused and the atomic backward in fp32 over one to three key blocks of 64 (first,
    middle and last shares of dq's sum), with a key mask: the reference's gradients, and the
    split backward's to within fp32 summation order; the fused one bitwise reproducible."""
    key_mask = torch.rand(4, 131, generator=torch.Generator().manual_seed(d)).to(DEVICE) > 0.3
    seqlens = [1, 33, 100, 131]
    config = dict(BLOCK_M=64, BLOCK_N=64, **BACKWARDS[backward])
    got = _check_config(config, d, torch.float32, seqlens, key_mask, tol=1e-5)
    split = _check_config(dict(BLOCK_M=64, BLOCK_N=64), d, torch.float32, seqlens, key_mask, tol=1e-5)
    for a, c in zip(got, split):
        assert (a - c).abs().max() <= 1e-5 * c.abs().max()
    if backward == "fused":
        again = _check_config(config, d, torch.float32, seqlens, key_mask, tol=1e-5)
        assert all(map(torch.equal, got, again))


@pytest.mark.parametrize("switch", ["env", "torch"])
def test_deterministic_mode_keeps_dq_atomic_free(monkeypatch, switch):
    """Under PACOFR_DETERMINISTIC=1 or torch's deterministic mode an ATOMIC_DQ config runs the
    split backward, dq kernel included (the interpreter runs atomics in a fixed order, so the
    bits alone cannot tell the two apart)."""
    launches = []

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return dq_kernel[grid]

    dq_kernel = kernel._attn_bwd_dq_kernel
    monkeypatch.setattr(kernel, "_attn_bwd_dq_kernel", Spy())
    config = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, ATOMIC_DQ=True)
    _check_config(config, 64, torch.float32, [40, 131], tol=1e-5)
    assert not launches
    if switch == "env":
        monkeypatch.setenv("PACOFR_DETERMINISTIC", "1")
        _check_config(config, 64, torch.float32, [40, 131], tol=1e-5)
    else:
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            _check_config(config, 64, torch.float32, [40, 131], tol=1e-5)
        finally:
            torch.use_deterministic_algorithms(was)
    assert len(launches) == 1


# padded keys' P overflows here before the mask drops it (or, in the split dk/dv kernel, before
# their rows are dropped): numpy warns, the kernels mean it
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("backward", list(BACKWARDS))
@pytest.mark.parametrize("scale", [1.0, -0.7, 0.0])
def test_extreme_logits_and_non_positive_scales(scale, backward):
    """Tiles wholly inside the length skip the key mask; the tail tile must not. With logits
    near -400 (scale 1) the probability a padded key (read as 0) would get overflows fp32, so
    an unmasked tail gives inf or NaN. Negative and zero scales take the masked path (the
    forward folds a positive scale into the row max). fp32 against the float64 reference."""
    b, h, n, d = 2, 2, 70, 32
    gen = torch.Generator().manual_seed(9)
    q, k, v, g = (torch.randn(b, h, n, d, generator=gen) for _ in range(4))
    if scale == 1.0:
        u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
        q, k = 20 * u + 0.1 * q, -20 * u + 0.5 * k
    q, k, v, g = (t.to(DEVICE) for t in (q, k, v, g))
    seqlens = torch.tensor([70, 37], device=DEVICE)
    out, lse = kernel.masked_attention_forward(q, k, v, seqlens, None, scale)
    grads = kernel.masked_attention_backward(g, q, k, v, out, lse, seqlens, None, scale, BACKWARDS[backward])
    q64, k64, v64, g64 = (t.cpu().double() for t in (q, k, v, g))
    ref, ref_lse = reference.masked_attention(q64, k64, v64, seqlens.cpu(), None, scale)
    ref_grads = reference.masked_attention_backward(g64, q64, k64, v64, ref, ref_lse, seqlens.cpu(), None, scale)
    for got, want in ((out, ref), *zip(grads, ref_grads)):
        assert got.isfinite().all()
        assert (got.cpu().double() - want).abs().max() <= 1e-3 * max(want.abs().max().item(), 1.0)
    for t in (out, *grads):
        assert (t[1, :, 37:] == 0).all()
