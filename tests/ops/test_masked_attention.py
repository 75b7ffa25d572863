"""masked_attention and masked_attention_qkv: the public ops against the float64 brute force on
every backend (ragged lengths, key masks, rows with no valid key, head dims, dtypes, qkv views,
garbage in the padding, all three gradients), their custom ops under opcheck; then the Triton
kernel's launchers against the reference backend (outputs poisoned before the call, the split,
fused and atomic backwards, strided inputs, every configuration in its SWEEP, extreme logits)
and their launch grids."""

import math

import pytest
import torch

from pacofr.ops import masked_attention, masked_attention_qkv, reference

from .utils import (ATTENTION_GRAD_TOL, ATTENTION_OUT_TOL, BF16, DEVICE, F16, F32, F64, assert_close_scaled,
                    assert_grids_grow_only_along_axis_0, attention_inputs, attention_ref, attention_sdpa_ref,
                    attention_zero_sets, op_under_test, skip_fp64_unless_reference)

BACKENDS, kernel, requires_kernel, SWEEP = op_under_test("masked_attention")  # (kernel None where Triton cannot run)


# ============================================================================================
# the public ops, every backend, against float64
# ============================================================================================


def _attn_case(name, dev, seed=0):
    """Returns (B, H, N, d, seqlens, key_mask, scale)."""
    g = torch.Generator().manual_seed(seed)
    if name == "seqlens_edge":
        B, H, N, d = 3, 2, 197, 64
        return B, H, N, d, torch.tensor([0, 1, 197], dtype=torch.int32, device=dev), None, None
    if name == "seqlens_random":
        B, H, N, d = 3, 2, 197, 64
        sl = torch.randint(1, N + 1, (B,), generator=g)
        sl[0] = 150
        return B, H, N, d, sl.to(dev), None, None
    if name == "key_mask":
        B, H, N, d = 3, 2, 197, 64
        km = torch.rand(B, N, generator=g) < 0.7
        km[1] = False  # a sample with no valid key at all
        return B, H, N, d, None, km.to(dev), None
    if name == "both":
        B, H, N, d = 3, 2, 197, 64
        sl = torch.tensor([197, 60, 120], dtype=torch.int64)
        km = torch.rand(B, N, generator=g) < 0.6
        km[2, :120] = False  # only padded keys remain allowed by key_mask -> no valid key
        km[2, 150:] = True
        return B, H, N, d, sl.to(dev), km.to(dev), None
    if name == "N1":
        B, H, N, d = 3, 2, 1, 64
        km = torch.tensor([[True], [True], [False]])
        return B, H, N, d, torch.tensor([0, 1, 1], device=dev), km.to(dev), None
    if name == "scale":
        B, H, N, d = 2, 2, 50, 32
        return B, H, N, d, torch.tensor([50, 17], device=dev), None, 0.3
    if name == "plain":
        B, H, N, d = 2, 3, 70, 64
        return B, H, N, d, None, None, None
    raise KeyError(name)


ATTN_CASES = ["seqlens_edge", "seqlens_random", "key_mask", "both", "N1", "scale", "plain"]


def test_attention_bruteforce_matches_sdpa():
    """Sanity check of the hand-written reference (utils.attention_ref) against SDPA (float64)."""
    for name in ATTN_CASES:
        B, H, N, d, sl, km, scale = _attn_case(name, "cpu")
        q, k, v = attention_inputs(B, H, N, d, "cpu", F64, seed=0)
        sc = scale if scale is not None else d ** -0.5
        a = attention_ref(q, k, v, sl, km, sc)
        b = attention_sdpa_ref(q, k, v, sl, km, sc)
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_masked_attention_forward(use_backend, backend, dtype, case):
    dev = use_backend(backend)
    if dtype == F16 and case not in ("both", "seqlens_edge"):
        pytest.skip("fp16 checked on two cases")
    B, H, N, d, sl, km, scale = _attn_case(case, dev, seed=11)
    q, k, v = attention_inputs(B, H, N, d, dev, dtype, seed=12)
    out = masked_attention(q, k, v, seqlens=sl, key_mask=km, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    sc = scale if scale is not None else d ** -0.5
    ref = attention_sdpa_ref(q.double(), k.double(), v.double(), sl, km, sc)
    assert torch.isfinite(out).all(), "NaN/inf in output"
    tol = ATTENTION_OUT_TOL[dtype]
    err = (out.double() - ref).abs()
    assert (err <= tol + tol * ref.abs()).all(), f"max err {err.max().item():.3e} (tol {tol})"
    zero_rows, _ = attention_zero_sets(B, N, sl, km, dev)
    zr = zero_rows[:, None, :].expand(B, H, N)
    assert (out[zr] == 0).all(), "padded / no-valid-key query rows are not exactly zero"
    if case in ("seqlens_edge", "key_mask", "both", "N1"):
        assert zr.any()  # the case really has such rows


def _attn_grad_check(dev, dtype, B, H, N, d, sl, km, scale, seed, tol):
    q, k, v = attention_inputs(B, H, N, d, dev, dtype, seed=seed, requires_grad=True)
    out = masked_attention(q, k, v, seqlens=sl, key_mask=km, scale=scale)
    g = torch.randn(out.shape, device=dev).to(dtype)  # nonzero also on padded rows
    out.backward(g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    sc = scale if scale is not None else d ** -0.5
    ref = attention_ref(q64, k64, v64, sl, km, sc)
    ref.backward(g.double())
    for name, t, r in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert t.grad is not None and t.grad.dtype == dtype, name
        assert torch.isfinite(t.grad).all(), f"{name} has NaN/inf"
        # q, k, v and the upstream gradient are O(1): floor 1 for the mathematically-zero cases
        assert_close_scaled(t.grad, r.grad, tol, name, floor=1.0)
    zero_rows, padded = attention_zero_sets(B, N, sl, km, dev)
    zr = zero_rows[:, None, :].expand(B, H, N)
    pk = padded[:, None, :].expand(B, H, N)
    assert (out[zr] == 0).all()
    assert (q.grad[zr] == 0).all(), "dq of padded / no-valid-key query rows not exactly zero"
    assert (k.grad[pk] == 0).all(), "dk of padded keys not exactly zero"
    assert (v.grad[pk] == 0).all(), "dv of padded keys not exactly zero"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ATTN_CASES)
def test_masked_attention_grad_fp32(use_backend, backend, case):
    dev = use_backend(backend)
    B, H, N, d, sl, km, scale = _attn_case(case, dev, seed=21)
    _attn_grad_check(dev, F32, B, H, N, d, sl, km, scale, seed=22, tol=ATTENTION_GRAD_TOL[F32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["both", "seqlens_edge"])
def test_masked_attention_grad_bf16(use_backend, backend, case):
    dev = use_backend(backend)
    B, H, N, d, sl, km, scale = _attn_case(case, dev, seed=23)
    _attn_grad_check(dev, BF16, B, H, N, d, sl, km, scale, seed=24, tol=ATTENTION_GRAD_TOL[BF16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_attention_qkv_views_and_output_layout(use_backend, backend):
    """q, k, v as a ViT block makes them (views of one qkv projection): the result and all
    three gradients against float64, and the promised output layout on every backend
    ([B, N, H, d] memory, so the block's reshape after it is a view)."""
    dev = use_backend(backend)
    torch.manual_seed(40)
    B, H, N, d = 2, 3, 45, 32
    qkv = torch.randn(B, N, 3 * H * d, device=dev, requires_grad=True)
    sl = torch.tensor([45, 20], device=dev)
    q, k, v = qkv.view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    out = masked_attention(q, k, v, seqlens=sl)
    assert out.transpose(1, 2).is_contiguous()
    merged = out.transpose(1, 2).reshape(B, N, H * d)
    assert merged.data_ptr() == out.data_ptr()  # a view, no copy
    g = torch.randn(B, N, H * d, device=dev)
    merged.backward(g)
    qkv64 = qkv.detach().double().requires_grad_()
    q64, k64, v64 = qkv64.view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    ref = attention_ref(q64, k64, v64, sl, None, d ** -0.5)
    assert_close_scaled(out, ref, 1e-5, "out", floor=1.0)
    ref.transpose(1, 2).reshape(B, N, H * d).backward(g.double())
    assert_close_scaled(qkv.grad, qkv64.grad, 1e-4, "dqkv", floor=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_masked_attention_qkv(use_backend, backend, dtype):
    """The packed entry against float64 (seqlens with 0, a key mask, odd N): a contiguous
    [B, N, H, d] output, one contiguous dqkv with exact zeros for padded tokens, and bitwise
    the results of masked_attention on the split views."""
    dev = use_backend(backend)
    torch.manual_seed(42)
    B, H, N, d = 3, 2, 37, 32
    qkv = torch.randn(B, N, 3, H, d, device=dev).to(dtype).requires_grad_()
    sl = torch.tensor([37, 0, 20], device=dev)
    km = torch.rand(B, N, device=dev) < 0.8
    km[:, 0] = True
    out = masked_attention_qkv(qkv, seqlens=sl, key_mask=km)
    assert out.shape == (B, N, H, d) and out.dtype == dtype and out.is_contiguous()
    g = torch.randn(B, N, H, d, device=dev).to(dtype)
    out.backward(g)
    assert qkv.grad.is_contiguous() and qkv.grad.dtype == dtype
    assert (out[1] == 0).all() and (out[2, 20:] == 0).all()
    assert (qkv.grad[1] == 0).all() and (qkv.grad[2, 20:] == 0).all()

    qkv64 = qkv.detach().double().requires_grad_()
    ref = attention_ref(*qkv64.permute(2, 0, 3, 1, 4), sl, km, d ** -0.5).transpose(1, 2)
    ref.backward(g.double())
    tol = ATTENTION_GRAD_TOL[dtype]
    assert_close_scaled(out, ref, tol, "out", floor=1.0)
    assert_close_scaled(qkv.grad, qkv64.grad, tol, "dqkv", floor=1.0)

    split = qkv.detach().clone().requires_grad_()
    out_split = masked_attention(*split.permute(2, 0, 3, 1, 4), seqlens=sl, key_mask=km).transpose(1, 2)
    out_split.backward(g)
    assert torch.equal(out, out_split) and torch.equal(qkv.grad, split.grad)


def test_masked_attention_qkv_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, N, 3, H, d\]"):
        masked_attention_qkv(torch.randn(2, 5, 4, 2, 8))
    with pytest.raises(ValueError, match="seqlens must be"):
        masked_attention_qkv(torch.randn(2, 5, 3, 2, 8), seqlens=torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
def test_masked_attention_head_dims(use_backend, backend, d):
    dev = use_backend(backend)
    torch.manual_seed(30 + d)
    B, H, N = 2, 2, 37
    sl = torch.tensor([37, 20], device=dev)
    km = torch.rand(B, N, device=dev) < 0.8
    km[0, 0] = True
    # fp32 forward + backward
    _attn_grad_check(dev, F32, B, H, N, d, sl, km, None, seed=31 + d, tol=ATTENTION_GRAD_TOL[F32])
    # bf16 forward
    q, k, v = attention_inputs(B, H, N, d, dev, BF16, seed=32 + d)
    out = masked_attention(q, k, v, seqlens=sl, key_mask=km)
    assert out.dtype == BF16 and out.shape == q.shape
    ref = attention_sdpa_ref(q.double(), k.double(), v.double(), sl, km, d ** -0.5)
    tol = ATTENTION_OUT_TOL[BF16]
    assert ((out.double() - ref).abs() <= tol + tol * ref.abs()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_attention_seqlens_dtype_and_scale_default(use_backend, backend):
    dev = use_backend(backend)
    torch.manual_seed(40)
    B, H, N, d = 2, 2, 33, 32
    q, k, v = attention_inputs(B, H, N, d, dev, F32, seed=41)
    a = masked_attention(q, k, v, seqlens=torch.tensor([33, 9], dtype=torch.int32, device=dev))
    b = masked_attention(q, k, v, seqlens=torch.tensor([33, 9], dtype=torch.int64, device=dev))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    c = masked_attention(q, k, v, seqlens=torch.tensor([33, 9], device=dev), scale=d ** -0.5)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)
    # and a different scale really changes the result
    e = masked_attention(q, k, v, seqlens=torch.tensor([33, 9], device=dev), scale=1.0)
    assert (a - e).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_attention_ignores_what_padding_and_masked_keys_hold(use_backend, backend):
    """NaN and inf in padded queries and keys and in keys outside key_mask (torch.empty
    padding holds anything) change no output and no gradient: they equal those of zeros there,
    and padded rows stay exactly zero."""
    dev = use_backend(backend)
    B, H, N, d = 2, 2, 37, 32
    seqlens = torch.tensor([37, 20], device=dev)
    key_mask = torch.rand(B, N, generator=torch.Generator().manual_seed(3)).to(dev) > 0.3
    key_mask[:, 0] = True
    clean = attention_inputs(B, H, N, d, dev, F32, seed=42)
    padded = ~(torch.arange(N, device=dev)[None, :] < seqlens[:, None])  # [B, N]
    dropped = padded | ~key_mask
    dirty = [t.clone() for t in clean]
    dirty[0][padded[:, None, :].expand(B, H, N)] = float("nan")
    for t, bad in zip(dirty[1:], (float("nan"), float("inf"))):
        t[dropped[:, None, :].expand(B, H, N)] = bad
    for t in clean:  # the reference inputs: zeros where the dirty ones hold garbage
        t[padded[:, None, :].expand(B, H, N)] = 0.0
    for t in clean[1:]:
        t[dropped[:, None, :].expand(B, H, N)] = 0.0
    g = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(5)).to(dev)
    results = []
    for qkv in (clean, dirty):
        q, k, v = (t.clone().requires_grad_() for t in qkv)
        out = masked_attention(q, k, v, seqlens=seqlens, key_mask=key_mask)
        out.backward(g)
        results.append([out, q.grad, k.grad, v.grad])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.isfinite(b).all(), f"{name}: garbage reached it"
        assert torch.equal(a, b), f"{name}: differs from zeros in the padding"
    rows = padded[:, None, :].expand(B, H, N)
    assert (results[1][0][rows] == 0).all() and (results[1][1][rows] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_attention_gradcheck(use_backend, backend):
    skip_fp64_unless_reference(backend)
    dev = use_backend(backend)
    torch.manual_seed(50)
    B, H, N, d = 3, 1, 5, 32
    sl = torch.tensor([3, 5, 4], device=dev)
    km = torch.tensor(
        [[True, False, True, False, False],
         [False, True, True, False, True],
         [False, False, False, False, True]],  # sample 2: only key 4 allowed, but it is padded
        device=dev,
    )
    q, k, v = (torch.randn(B, H, N, d, dtype=F64, device=dev, requires_grad=True) for _ in range(3))

    def fn(q_, k_, v_):
        return masked_attention(q_, k_, v_, seqlens=sl, key_mask=km)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_masked_attention_qkv_ops_pass_opcheck(monkeypatch, backend):
    """The packed op and its backward op (fake impls, strides, autograd registration), also
    for a qkv with other strides than contiguous: its gradient comes back contiguous."""
    if backend not in BACKENDS:
        pytest.skip(f"{backend} cannot run here")
    monkeypatch.setenv("PACOFR_OPS", backend)
    torch.manual_seed(1)
    qkv = torch.randn(2, 5, 3, 2, 8)
    seqlens = torch.tensor([5, 2])
    for x in (qkv, qkv.transpose(3, 1).contiguous().transpose(3, 1)):
        torch.library.opcheck(torch.ops.pacofr.masked_attention_qkv.default, (x.requires_grad_(), seqlens, None, 0.3))
        out, lse = torch.ops.pacofr.masked_attention_qkv(x.detach(), seqlens, None, 0.3)
        torch.library.opcheck(torch.ops.pacofr.masked_attention_qkv_backward.default,
                              (torch.randn_like(out), x.detach(), out, lse, seqlens, None, 0.3))


# ============================================================================================
# the Triton kernel's launchers (interpreter on CPU, the GPU when there is one)
# ============================================================================================


BACKWARDS = {"split": None, "fused": dict(FUSED_BWD=True), "atomic": dict(ATOMIC_DQ=True)}


def _inputs(b, h, n, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen).to(DEVICE, dtype) for _ in range(4)]


@requires_kernel
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


@requires_kernel
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


@requires_kernel
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


@requires_kernel
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


@requires_kernel
@pytest.mark.parametrize("config", SWEEP, ids=_config_id)
def test_every_swept_launch_configuration_is_correct(config):
    """The alternatives gpu_report.py times give the reference's output and gradients, with
    ragged lengths (0 and full included) and poisoned outputs."""
    _check_config(config, 64, torch.bfloat16, [0, 77, 131])


@requires_kernel
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


@requires_kernel
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
@requires_kernel
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


# ============================================================================================
# host-side launch logic that only a GPU run would otherwise reach
# ============================================================================================


def _launch(batch):
    q, k, v = (torch.randn(batch, 3, 5, 32) for _ in range(3))
    seqlens = torch.tensor([5, 2, 0, 4][:batch])
    out, lse = kernel.masked_attention_forward(q, k, v, seqlens, None, 0.2)
    for config in (None, {"ATOMIC_DQ": True}, {"FUSED_BWD": True}):
        kernel.masked_attention_backward(torch.randn_like(out), q, k, v, out, lse, seqlens, None, 0.2, config)


@requires_kernel
def test_grids_grow_with_the_batch_only_along_axis_0(monkeypatch):
    assert_grids_grow_only_along_axis_0(monkeypatch, _launch)
