"""Tests for pacofr.ops: codebook_topk, masked_attention, patch_pixel_loss(_terms).

Every numeric test is parametrized over ``pacofr.ops.backends(op)`` and forces the backend with
the ``PACOFR_OPS`` environment variable, so a Triton backend added later runs the same tests.
The "reference" backend is exercised on CPU; any other backend on CUDA.

All expected values come from float64 brute forces written here, independently of the
implementation, evaluated on the inputs *after* their rounding to the test dtype (so a bf16
input is compared against float64 maths on the bf16 values).

Tolerances (stated once, used below):
  codebook_topk scores:  |err| <= r * (||x_n||^2 + max_k ||c_k||^2) per row,
                         r = 1e-4 for fp32, 2e-4 for bf16/fp16 (inputs are rounded, but the op
                         accumulates in fp32, so the error against float64 maths on the rounded
                         inputs stays at fp32 level).
  gradients (all ops):   max|err| <= tol * max|ref|; tol = 1e-4 (fp32), 1.5e-2 (bf16/fp16,
                         the gradient itself is rounded to the 8-bit mantissa).
  masked_attention out:  elementwise atol = rtol = 2e-4 (fp32), 2e-2 (bf16), 4e-3 (fp16).
  patch_pixel_loss:      relative 1e-4 (fp32 pred), 2e-4 (bf16/fp16 pred) on the loss value.
Exact-zero properties are asserted with ``== 0``, never with a tolerance.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pacofr.ops as ops
from pacofr.ops import codebook_topk, masked_attention, masked_attention_qkv, patch_pixel_loss, patch_pixel_loss_terms

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def _backends(op):
    names = list(ops.backends(op))
    assert names, f"no backend for {op}"
    return names


CB_BACKENDS = _backends("codebook_topk")
ATTN_BACKENDS = _backends("masked_attention")
PPL_BACKENDS = _backends("patch_pixel_loss")


def _device(backend):
    # the reference runs on CPU; other backends on CUDA when there is one (a Triton backend
    # listed on a CPU-only machine runs under TRITON_INTERPRET=1 on CPU tensors)
    if backend == "reference" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    # The problems here are small; one intra-op thread avoids the large slow-downs that OpenMP
    # spin-waiting causes when the machine's cores are shared with other work.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def use_backend(monkeypatch):
    """Force a backend via PACOFR_OPS and return the device its tensors live on."""

    def _use(backend):
        monkeypatch.setenv("PACOFR_OPS", backend)
        dev = _device(backend)
        return dev

    return _use


def _skip_fp64_unless_reference(backend):
    # float64 is not one of the ops' specified dtypes; gradcheck needs it, so it runs on the
    # reference backend (the other backends' backward passes are checked against float64
    # brute forces in fp32/bf16 below).
    if backend != "reference":
        pytest.skip("float64 gradcheck runs on the reference backend only")


def assert_close_scaled(actual, expected, tol, name="tensor", floor=0.0):
    """max|actual - expected| <= tol * max(max|expected|, floor).

    With floor=0 an all-zero expected tensor must be matched exactly; a floor is used where a
    gradient is mathematically zero but only zero up to rounding (e.g. dq when N == 1)."""
    assert actual is not None, f"{name}: missing"
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double()
    e = expected.detach().double().to(a.device)
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    if a.numel() == 0:
        return
    scale = max(e.abs().max().item(), floor)
    err = (a - e).abs().max().item()
    assert err <= tol * scale, f"{name}: max abs err {err:.3e} > {tol:.1e} * max|ref| ({scale:.3e})"


def test_kernels_import_from_a_source_tree():
    """pacofr.kernels resolves to the top-level kernels/ with only the checkout on sys.path (no
    site-packages, so no install's mapping): the Triton backends must not depend on how
    pacofr was installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import sys; sys.path.insert(0, {root!r}); import pacofr.kernels; print(pacofr.kernels.__file__)"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == os.path.join(root, "kernels", "__init__.py")


def test_interpreter_asked_for_too_late_is_explained():
    """TRITON_INTERPRET=1 set after triton's import: triton's own helpers were built for a GPU,
    so the Triton backend is refused with that reason (not an interpreter error inside a kernel)."""
    code = ("import os, triton, torch; os.environ['TRITON_INTERPRET'] = '1'; os.environ['PACOFR_OPS'] = 'triton'\n"
            "from pacofr.ops import masked_attention\nq = torch.randn(1, 2, 5, 32)\n"
            "try:\n    masked_attention(q, q, q)\nexcept RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PACOFR_OPS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TRITON_INTERPRET=1 was set after triton was imported" in out.stdout, out.stdout


def test_backends_listing():
    for op in ("codebook_topk", "masked_attention", "patch_pixel_loss"):
        names = ops.backends(op)
        assert "reference" in names
        assert all(isinstance(n, str) for n in names)


# ============================================================================================
# codebook_topk
# ============================================================================================


def _cb_full64(x64, c64, metric):
    """Float64 [N, K] brute-force scores (direct form, no expansion)."""
    if metric == "l2":
        return ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
    return (x64[:, None, :] * c64[None, :, :]).sum(-1)


def _cb_rtol(dtype):
    return 1e-4 if dtype == F32 else 2e-4


def _check_topk(scores, idx, x, c, k, metric, rtol, rows=None):
    """Check (scores, idx) against the float64 brute force; return the fraction of positions
    whose expected index is unambiguous (and therefore compared exactly)."""
    N, K = x.shape[0], c.shape[0]
    assert scores.shape == (N, k) and idx.shape == (N, k)
    assert scores.dtype == F32, scores.dtype
    assert idx.dtype == torch.int64, idx.dtype
    assert not idx.requires_grad
    x64, c64 = x.detach().double(), c.detach().double()
    if rows is not None:
        x64, scores, idx = x64[rows], scores[rows], idx[rows]
    scores = scores.detach().double().cpu()
    idx = idx.cpu()
    x64, c64 = x64.cpu(), c64.cpu()
    n = x64.shape[0]
    full = _cb_full64(x64, c64, metric)
    key = full if metric == "l2" else -full  # ascending key: best first
    key_sorted, ref_idx = torch.sort(key, dim=1, stable=True)
    ref_sorted = full.gather(1, ref_idx)
    tol = rtol * (x64.pow(2).sum(1) + c64.pow(2).sum(1).max())  # [n]
    tol = tol[:, None]

    assert torch.isfinite(scores).all()
    assert ((idx >= 0) & (idx < K)).all(), "index out of range"
    # distinct indices per row
    srt = idx.sort(1).values
    assert (srt[:, 1:] != srt[:, :-1]).all(), "duplicate index in a row"
    # scores are the best-k values
    err = (scores - ref_sorted[:, :k]).abs()
    assert (err <= tol).all(), f"score err {err.max().item():.3e} > tol {tol.min().item():.3e}"
    # scores are the scores of the returned indices
    chosen = full.gather(1, idx)
    err2 = (scores - chosen).abs()
    assert (err2 <= tol).all(), f"scores inconsistent with idx: {err2.max().item():.3e}"
    # best first, and among equal computed scores the lower index first
    if k > 1:
        a, b = scores[:, :-1], scores[:, 1:]
        ordered = (a <= b) if metric == "l2" else (a >= b)
        assert ordered.all(), "scores not sorted best-first"
        tie = a == b
        assert (idx[:, :-1][tie] < idx[:, 1:][tie]).all(), "equal scores not ordered by index"
    # exact index where the expected one is separated from its neighbours by > 2*tol
    inf = torch.full((n, 1), math.inf, dtype=F64)
    gaps = key_sorted[:, 1:] - key_sorted[:, :-1]  # [n, K-1]
    gap_prev = torch.cat([inf, gaps], 1)[:, :k]
    gap_next = torch.cat([gaps, inf], 1)[:, :k]
    sep = (gap_prev > 2 * tol) & (gap_next > 2 * tol)
    mism = (idx != ref_idx[:, :k]) & sep
    assert not mism.any(), f"{int(mism.sum())} separated positions with wrong index, e.g. row {mism.nonzero()[0].tolist()}"
    return sep.double().mean().item()


CB_SHAPES = [(197, 1000, 48, 5), (1, 1, 3, 1), (7, 5, 3, 4), (33, 257, 17, 32)]


@pytest.mark.parametrize("backend", CB_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CB_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_codebook_topk_forward(use_backend, backend, metric, dtype, shape):
    dev = use_backend(backend)
    torch.manual_seed(1)
    N, K, D, k = shape
    x = torch.randn(N, D, device=dev).to(dtype)
    c = torch.randn(K, D, device=dev).to(dtype)
    scores, idx = codebook_topk(x, c, k, metric=metric)
    frac = _check_topk(scores, idx, x, c, k, metric, _cb_rtol(dtype))
    assert frac > 0.5, f"test data too tie-heavy ({frac:.2f}) to check indices"


@pytest.mark.parametrize("backend", CB_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_codebook_topk_forward_fp16(use_backend, backend, metric):
    dev = use_backend(backend)
    torch.manual_seed(2)
    N, K, D, k = 197, 1000, 48, 5
    x = torch.randn(N, D, device=dev).half()
    c = torch.randn(K, D, device=dev).half()
    scores, idx = codebook_topk(x, c, k, metric=metric)
    frac = _check_topk(scores, idx, x, c, k, metric, _cb_rtol(F16))
    assert frac > 0.5


def test_codebook_topk_default_metric_is_l2(use_backend):
    dev = use_backend(CB_BACKENDS[0])
    torch.manual_seed(3)
    x = torch.randn(20, 8, device=dev)
    c = torch.randn(50, 8, device=dev)
    s_def, i_def = codebook_topk(x, c, 4)
    s_l2, i_l2 = codebook_topk(x, c, 4, metric="l2")
    assert torch.equal(i_def, i_l2) and torch.equal(s_def, s_l2)
    assert (s_def >= 0).all()


@pytest.mark.parametrize("backend", CB_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["repeat", "interleave"])
@pytest.mark.parametrize("k", [1, 5, 32])
def test_codebook_topk_ties_lower_index_wins(use_backend, backend, metric, dtype, layout, k):
    """Small-integer data: every score is exact in fp32 (and the data exact in bf16), so the
    expected result is fully determined: sort by (score, code index)."""
    dev = use_backend(backend)
    torch.manual_seed(4)
    N, M, D = 64, 400, 8  # K = 1200 spans several code tiles of any backend
    base = torch.randint(-2, 3, (M, D))
    if layout == "repeat":  # duplicates far apart (different tiles)
        cb = torch.cat([base, base[torch.randperm(M)], base], 0)
    else:  # duplicates adjacent
        cb = base.repeat_interleave(3, 0)
    xi = torch.randint(-2, 3, (N, D))
    K = cb.shape[0]
    exact = _cb_full64(xi.long(), cb.long(), metric)  # int64, exact
    key = (exact if metric == "l2" else -exact) * K + torch.arange(K)[None, :]
    exp_idx = key.argsort(1)[:, :k]
    exp_scores = exact.gather(1, exp_idx).to(F32)
    # the data must actually contain ties that straddle the selection
    kth = exact.gather(1, exp_idx[:, -1:])
    assert ((exact == kth).sum(1) > 1).any()

    scores, idx = codebook_topk(xi.to(dev, dtype), cb.to(dev, dtype), k, metric=metric)
    assert idx.dtype == torch.int64 and scores.dtype == F32
    assert torch.equal(idx.cpu(), exp_idx), "tie-breaking is not 'lower code index first'"
    assert torch.equal(scores.cpu(), exp_scores)


def _cb_grad_check(dev, shape, metric, dtype, seed):
    torch.manual_seed(seed)
    N, K, D, k = shape
    x = torch.randn(N, D, device=dev).to(dtype).requires_grad_()
    c = torch.randn(K, D, device=dev).to(dtype).requires_grad_()
    scores, idx = codebook_topk(x, c, k, metric=metric)
    assert scores.requires_grad and not idx.requires_grad
    g = torch.randn(N, k, device=dev)
    (scores * g).sum().backward()

    x64 = x.detach().double().requires_grad_()
    c64 = c.detach().double().requires_grad_()
    sel = c64[idx]  # [N, k, D], the op's own selection
    if metric == "l2":
        s = ((x64[:, None, :] - sel) ** 2).sum(-1)
    else:
        s = (x64[:, None, :] * sel).sum(-1)
    (s * g.double()).sum().backward()
    tol = 1e-4 if dtype == F32 else 1.5e-2
    assert x.grad.dtype == dtype and c.grad.dtype == dtype
    assert_close_scaled(x.grad, x64.grad, tol, "dx")
    assert_close_scaled(c.grad, c64.grad, tol, "dcodebook")


@pytest.mark.parametrize("backend", CB_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("shape", [(197, 1000, 48, 5), (33, 257, 17, 32), (7, 5, 3, 4), (1, 1, 3, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_codebook_topk_grad_fp32(use_backend, backend, metric, shape):
    _cb_grad_check(use_backend(backend), shape, metric, F32, seed=5)


@pytest.mark.parametrize("backend", CB_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_codebook_topk_grad_bf16(use_backend, backend, metric):
    _cb_grad_check(use_backend(backend), (197, 1000, 48, 5), metric, BF16, seed=6)


@pytest.mark.parametrize("backend", CB_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_codebook_topk_gradcheck(use_backend, backend, metric):
    _skip_fp64_unless_reference(backend)
    dev = use_backend(backend)
    torch.manual_seed(7)
    x = torch.randn(5, 4, dtype=F64, device=dev, requires_grad=True)
    c = torch.randn(9, 4, dtype=F64, device=dev, requires_grad=True)

    def fn(x_, c_):
        return codebook_topk(x_, c_, 3, metric=metric)[0].double()

    assert torch.autograd.gradcheck(fn, (x, c), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", CB_BACKENDS)
def test_codebook_topk_k_validation(use_backend, backend):
    dev = use_backend(backend)
    torch.manual_seed(9)
    x = torch.randn(4, 8, device=dev)
    with pytest.raises(ValueError):
        codebook_topk(x, torch.randn(5, 8, device=dev), 6)  # k > K
    with pytest.raises(ValueError):
        codebook_topk(x, torch.randn(100, 8, device=dev), 33)  # k > 32
    with pytest.raises(ValueError):
        codebook_topk(x, torch.randn(100, 8, device=dev), 33, metric="ip")
    # the limits themselves are accepted
    s, i = codebook_topk(x, torch.randn(100, 8, device=dev), 32)
    assert s.shape == (4, 32)
    s, i = codebook_topk(x, torch.randn(5, 8, device=dev), 5)
    assert s.shape == (4, 5)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # on purpose
@pytest.mark.parametrize("backend", CB_BACKENDS)
@pytest.mark.parametrize("metric, codes, scores, order", [
    # ip: -1e38 * 4 overflows to -inf, 1e38 * 4 to +inf
    ("ip", [[1.0] * 4, [2.0] * 4, [math.nan] * 4, [1e38] * 4, [-1e38] * 4, [0.0] * 4],
     [math.inf, 8.0, 4.0, 0.0, -math.inf, math.nan], [3, 1, 0, 5, 4, 2]),
    # l2: the squared norm of 1e20 * ones is +inf; codes 1 and 4 tie at 4 (lower index first)
    ("l2", [[1.0] * 4, [2.0] * 4, [math.nan] * 4, [1e20] * 4, [0.0] * 4, [3.0] * 4],
     [0.0, 4.0, 4.0, 16.0, math.inf, math.nan], [0, 1, 4, 5, 3, 2]),
])
def test_codebook_topk_infinite_and_nan_scores_rank_last(use_backend, backend, metric, codes, scores, order):
    """Best first: finite scores, then the infinitely bad one, then NaN; scores returned as
    computed (the Triton kernel keeps only keys and recovers scores from them)."""
    dev = use_backend(backend)
    got_s, got_i = codebook_topk(torch.ones(3, 4, device=dev), torch.tensor(codes, device=dev), 6, metric=metric)
    want = torch.tensor(scores).expand(3, 6)
    assert torch.equal(got_i.cpu(), torch.tensor(order).expand(3, 6))
    assert torch.equal(got_s.cpu().isnan(), want.isnan())
    assert torch.equal(got_s.cpu().nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("backend", CB_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_codebook_topk_nan_row(use_backend, backend, metric):
    dev = use_backend(backend)
    torch.manual_seed(8)
    N, K, D, k = 16, 300, 16, 5
    x = torch.randn(N, D, device=dev)
    c = torch.randn(K, D, device=dev)
    x[3] = float("nan")  # whole row
    x[7, 5] = float("nan")  # a single element
    scores, idx = codebook_topk(x, c, k, metric=metric)
    for r in (3, 7):
        assert torch.isnan(scores[r]).all(), f"row {r} should be NaN: {scores[r]}"
        assert ((idx[r] >= 0) & (idx[r] < K)).all(), f"row {r} index out of range: {idx[r]}"
    good = [i for i in range(N) if i not in (3, 7)]
    _check_topk(scores, idx, x, c, k, metric, _cb_rtol(F32), rows=good)


_MEM_CODE = r"""
import os, resource, sys, torch
os.environ["PACOFR_OPS"] = {backend!r}
torch.set_num_threads(1)
from pacofr.ops import codebook_topk
dev = {device!r}
torch.manual_seed(0)
# warm-up on a tiny problem: one-time library initialisation is not what is measured
codebook_topk(torch.randn(4, 64, device=dev), torch.randn(16, 64, device=dev), 8, metric={metric!r})
x = torch.randn(20000, 64, device=dev)
c = torch.randn(8192, 64, device=dev)
x.add_(1.0); c.mul_(1.0)  # touch the inputs
if dev == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
s, i = codebook_topk(x, c, 8, metric={metric!r})
if dev == "cuda":
    torch.cuda.synchronize()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert s.shape == (20000, 8) and i.shape == (20000, 8)
delta = (after - before) * 1024
if dev == "cuda":
    delta = max(delta, torch.cuda.max_memory_allocated() - base)
print("DELTA_BYTES", delta)
"""


@pytest.mark.parametrize("backend", CB_BACKENDS)
@pytest.mark.parametrize("metric", ["l2"])  # "ip" takes the same tiling path; one run keeps the file fast
def test_codebook_topk_never_builds_full_matrix(backend, metric):
    dev = _device(backend)
    if backend != "reference" and dev == "cpu":
        pytest.skip("the Triton interpreter's memory use says nothing of the kernel's; measured on CUDA")
    code = _MEM_CODE.format(backend=backend, device=dev, metric=metric)
    # A fixed glibc mmap threshold makes every large buffer its own mapping, returned to the OS
    # when freed: ru_maxrss then tracks the op's live allocations rather than freed-but-retained
    # heap pages (without it the reading drifts by ~100 MB from run to run).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [l for l in res.stdout.splitlines() if l.startswith("DELTA_BYTES")][-1]
    delta = int(line.split()[1])
    # a full 20000 x 8192 fp32 distance matrix would be 655 MB
    assert delta < 200e6, f"peak memory above inputs {delta / 1e6:.0f} MB >= 200 MB"


# ============================================================================================
# masked_attention
# ============================================================================================


def _attn_valid(B, N, seqlens, key_mask, dev):
    pos = torch.arange(N, device=dev)
    if seqlens is not None:
        vq = pos[None, :] < seqlens.to(dev).long()[:, None]
    else:
        vq = torch.ones(B, N, dtype=torch.bool, device=dev)
    vk = vq.clone()
    if key_mask is not None:
        vk = vk & key_mask
    return vq, vk


def _attn_ref(q, k, v, seqlens, key_mask, scale):
    """Hand-written float64 softmax attention; padded query rows and rows without a valid key
    are exactly zero, and everything stays finite under autograd."""
    B, H, N, d = q.shape
    vq, vk = _attn_valid(B, N, seqlens, key_mask, q.device)
    allowed = vq[:, None, :, None] & vk[:, None, None, :]  # [B,1,N,N]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, -1e30)
    p = torch.softmax(s, -1) * allowed
    has = allowed.any(-1, keepdim=True)
    return torch.matmul(p, v) * has


def _attn_sdpa_ref(q, k, v, seqlens, key_mask, scale):
    B, H, N, d = q.shape
    vq, vk = _attn_valid(B, N, seqlens, key_mask, q.device)
    allowed = vq[:, None, :, None] & vk[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    has = allowed.any(-1, keepdim=True)
    return torch.where(has, out, torch.zeros((), dtype=out.dtype, device=out.device))


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


def _attn_inputs(B, H, N, d, dev, dtype, seed, requires_grad=False):
    torch.manual_seed(seed)
    qkv = [torch.randn(B, H, N, d, device=dev).to(dtype) for _ in range(3)]
    if requires_grad:
        for t in qkv:
            t.requires_grad_()
    return qkv


def _attn_zero_sets(B, N, seqlens, key_mask, dev):
    """(zero query rows [B,N], padded keys [B,N])."""
    vq, vk = _attn_valid(B, N, seqlens, key_mask, dev)
    zero_rows = ~vq | ~vk.any(-1, keepdim=True)
    if seqlens is not None:
        padded = ~(torch.arange(N, device=dev)[None, :] < seqlens.to(dev).long()[:, None])
    else:
        padded = torch.zeros(B, N, dtype=torch.bool, device=dev)
    return zero_rows, padded


def test_attention_bruteforce_matches_sdpa():
    """Sanity check of this file's hand-written reference against SDPA (float64)."""
    for name in ATTN_CASES:
        B, H, N, d, sl, km, scale = _attn_case(name, "cpu")
        q, k, v = _attn_inputs(B, H, N, d, "cpu", F64, seed=0)
        sc = scale if scale is not None else d ** -0.5
        a = _attn_ref(q, k, v, sl, km, sc)
        b = _attn_sdpa_ref(q, k, v, sl, km, sc)
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10), name


_ATTN_FWD_TOL = {F32: 2e-4, BF16: 2e-2, F16: 4e-3}


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_masked_attention_forward(use_backend, backend, dtype, case):
    dev = use_backend(backend)
    if dtype == F16 and case not in ("both", "seqlens_edge"):
        pytest.skip("fp16 checked on two cases")
    B, H, N, d, sl, km, scale = _attn_case(case, dev, seed=11)
    q, k, v = _attn_inputs(B, H, N, d, dev, dtype, seed=12)
    out = masked_attention(q, k, v, seqlens=sl, key_mask=km, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    sc = scale if scale is not None else d ** -0.5
    ref = _attn_sdpa_ref(q.double(), k.double(), v.double(), sl, km, sc)
    assert torch.isfinite(out).all(), "NaN/inf in output"
    tol = _ATTN_FWD_TOL[dtype]
    err = (out.double() - ref).abs()
    assert (err <= tol + tol * ref.abs()).all(), f"max err {err.max().item():.3e} (tol {tol})"
    zero_rows, _ = _attn_zero_sets(B, N, sl, km, dev)
    zr = zero_rows[:, None, :].expand(B, H, N)
    assert (out[zr] == 0).all(), "padded / no-valid-key query rows are not exactly zero"
    if case in ("seqlens_edge", "key_mask", "both", "N1"):
        assert zr.any()  # the case really has such rows


def _attn_grad_check(dev, dtype, B, H, N, d, sl, km, scale, seed, tol):
    q, k, v = _attn_inputs(B, H, N, d, dev, dtype, seed=seed, requires_grad=True)
    out = masked_attention(q, k, v, seqlens=sl, key_mask=km, scale=scale)
    g = torch.randn(out.shape, device=dev).to(dtype)  # nonzero also on padded rows
    out.backward(g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    sc = scale if scale is not None else d ** -0.5
    ref = _attn_ref(q64, k64, v64, sl, km, sc)
    ref.backward(g.double())
    for name, t, r in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert t.grad is not None and t.grad.dtype == dtype, name
        assert torch.isfinite(t.grad).all(), f"{name} has NaN/inf"
        # q, k, v and the upstream gradient are O(1): floor 1 for the mathematically-zero cases
        assert_close_scaled(t.grad, r.grad, tol, name, floor=1.0)
    zero_rows, padded = _attn_zero_sets(B, N, sl, km, dev)
    zr = zero_rows[:, None, :].expand(B, H, N)
    pk = padded[:, None, :].expand(B, H, N)
    assert (out[zr] == 0).all()
    assert (q.grad[zr] == 0).all(), "dq of padded / no-valid-key query rows not exactly zero"
    assert (k.grad[pk] == 0).all(), "dk of padded keys not exactly zero"
    assert (v.grad[pk] == 0).all(), "dv of padded keys not exactly zero"


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("case", ATTN_CASES)
def test_masked_attention_grad_fp32(use_backend, backend, case):
    dev = use_backend(backend)
    B, H, N, d, sl, km, scale = _attn_case(case, dev, seed=21)
    _attn_grad_check(dev, F32, B, H, N, d, sl, km, scale, seed=22, tol=1e-4)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("case", ["both", "seqlens_edge"])
def test_masked_attention_grad_bf16(use_backend, backend, case):
    dev = use_backend(backend)
    B, H, N, d, sl, km, scale = _attn_case(case, dev, seed=23)
    _attn_grad_check(dev, BF16, B, H, N, d, sl, km, scale, seed=24, tol=3e-2)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
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
    ref = _attn_ref(q64, k64, v64, sl, None, d ** -0.5)
    assert_close_scaled(out, ref, 1e-5, "out", floor=1.0)
    ref.transpose(1, 2).reshape(B, N, H * d).backward(g.double())
    assert_close_scaled(qkv.grad, qkv64.grad, 1e-4, "dqkv", floor=1.0)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
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
    ref = _attn_ref(*qkv64.permute(2, 0, 3, 1, 4), sl, km, d ** -0.5).transpose(1, 2)
    ref.backward(g.double())
    tol = 1e-4 if dtype == F32 else 3e-2
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


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
def test_masked_attention_head_dims(use_backend, backend, d):
    dev = use_backend(backend)
    torch.manual_seed(30 + d)
    B, H, N = 2, 2, 37
    sl = torch.tensor([37, 20], device=dev)
    km = torch.rand(B, N, device=dev) < 0.8
    km[0, 0] = True
    # fp32 forward + backward
    _attn_grad_check(dev, F32, B, H, N, d, sl, km, None, seed=31 + d, tol=1e-4)
    # bf16 forward
    q, k, v = _attn_inputs(B, H, N, d, dev, BF16, seed=32 + d)
    out = masked_attention(q, k, v, seqlens=sl, key_mask=km)
    assert out.dtype == BF16 and out.shape == q.shape
    ref = _attn_sdpa_ref(q.double(), k.double(), v.double(), sl, km, d ** -0.5)
    tol = _ATTN_FWD_TOL[BF16]
    assert ((out.double() - ref).abs() <= tol + tol * ref.abs()).all()


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_masked_attention_seqlens_dtype_and_scale_default(use_backend, backend):
    dev = use_backend(backend)
    torch.manual_seed(40)
    B, H, N, d = 2, 2, 33, 32
    q, k, v = _attn_inputs(B, H, N, d, dev, F32, seed=41)
    a = masked_attention(q, k, v, seqlens=torch.tensor([33, 9], dtype=torch.int32, device=dev))
    b = masked_attention(q, k, v, seqlens=torch.tensor([33, 9], dtype=torch.int64, device=dev))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    c = masked_attention(q, k, v, seqlens=torch.tensor([33, 9], device=dev), scale=d ** -0.5)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)
    # and a different scale really changes the result
    e = masked_attention(q, k, v, seqlens=torch.tensor([33, 9], device=dev), scale=1.0)
    assert (a - e).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_masked_attention_ignores_what_padding_and_masked_keys_hold(use_backend, backend):
    """NaN and inf in padded queries and keys and in keys outside key_mask (torch.empty
    padding holds anything) change no output and no gradient: they equal those of zeros there,
    and padded rows stay exactly zero."""
    dev = use_backend(backend)
    B, H, N, d = 2, 2, 37, 32
    seqlens = torch.tensor([37, 20], device=dev)
    key_mask = torch.rand(B, N, generator=torch.Generator().manual_seed(3)).to(dev) > 0.3
    key_mask[:, 0] = True
    clean = _attn_inputs(B, H, N, d, dev, F32, seed=42)
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


def test_ops_refuse_inputs_they_would_truncate():
    q, k, v = _attn_inputs(1, 2, 9, 32, "cpu", F32, seed=0)
    with pytest.raises(TypeError, match="masked_attention: q must be float16, bfloat16, float32 or float64"):
        masked_attention((q * 4).int(), k, v)
    with pytest.raises(TypeError, match="masked_attention: v must be"):
        masked_attention(q, k, v.int())
    with pytest.raises(TypeError, match="one dtype"):
        masked_attention(q, k.to(BF16), v)
    with pytest.raises(TypeError, match="seqlens must hold integers"):
        masked_attention(q, k, v, seqlens=torch.tensor([2.7]))
    with pytest.raises(TypeError, match="masked_attention_qkv: qkv must be"):
        masked_attention_qkv(torch.zeros(1, 9, 3, 2, 32, dtype=torch.int32))
    x, c = torch.randn(5, 8), torch.randn(7, 8)
    with pytest.raises(TypeError, match="codebook_topk: codebook must be"):
        codebook_topk(x, c.to(torch.complex64), 2)
    with pytest.raises(TypeError, match="codebook_topk: k must be an int, got 2.5"):
        codebook_topk(x, c, 2.5)
    with pytest.raises(TypeError, match="k must be an int, got True"):
        codebook_topk(x, c, True)
    import numpy as np

    assert codebook_topk(x, c, np.int64(2))[1].shape == (5, 2)  # (NumPy ints are ints)
    images, weight = torch.randn(1, 3, 8, 8), torch.ones(1, 4)
    with pytest.raises(TypeError, match="patch_pixel_loss: patch_size must be an int, got 4.5"):
        patch_pixel_loss(torch.randn(1, 4, 48), images, weight, 4.5)
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        patch_pixel_loss(torch.randn(1, 4, 48), images, weight, 0)
    with pytest.raises(TypeError, match="patch_pixel_loss: pred must be"):
        patch_pixel_loss(torch.zeros(1, 4, 48, dtype=torch.int64), images, weight, 4)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_masked_attention_gradcheck(use_backend, backend):
    _skip_fp64_unless_reference(backend)
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


# ============================================================================================
# patch_pixel_loss
# ============================================================================================


def _patchify_loops(images, p):
    """[B,C,H,W] -> [B, (H/p)*(W/p), p*p*C], patches row-major, pixels (row, col, channel)."""
    B, C, H, W = images.shape
    h, w = H // p, W // p
    cols = []
    for r in range(h):
        for c in range(w):
            blk = images[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p]  # [B,C,p,p]
            cols.append(blk.permute(0, 2, 3, 1).reshape(B, p * p * C))
    return torch.stack(cols, 1)


def _ppl_ref(pred64, images, weight, p, norm_pix, eps):
    """Float64 brute force; returns (l_pix, l_sc) as differentiable functions of pred64."""
    images = images.double()
    w64 = weight.double()
    B, C, H, W = images.shape
    h, w = H // p, W // p
    t = _patchify_loops(images, p)
    P = t.shape[-1]
    if norm_pix:
        mean = t.sum(-1, keepdim=True) / P
        var = ((t - mean) ** 2).sum(-1, keepdim=True) / (P - 1)
        std = torch.sqrt(var + eps)
        tn = (t - mean) / std
        dpred = pred64 * std + mean
    else:
        tn = t
        dpred = pred64
    mse = ((pred64 - tn) ** 2).sum(-1) / P
    wsum = w64.sum()
    l_pix = (w64 * mse).sum() / wsum if wsum.item() != 0 else (pred64 * 0).sum()

    d6 = dpred.reshape(B, h, w, p, p, C)
    t6 = t.reshape(B, h, w, p, p, C)
    num = torch.zeros((), dtype=F64, device=pred64.device)
    den = torch.zeros((), dtype=F64, device=pred64.device)
    for r in range(h):  # horizontal pairs a=(r,c), b=(r,c+1)
        for c in range(w - 1):
            pd = d6[:, r, c + 1, :, 0, :] - d6[:, r, c, :, p - 1, :]
            td = t6[:, r, c + 1, :, 0, :] - t6[:, r, c, :, p - 1, :]
            pm = ((pd - td) ** 2).mean(dim=(1, 2))
            pw = torch.maximum(w64[:, r * w + c], w64[:, r * w + c + 1])
            num = num + (pw * pm).sum()
            den = den + pw.sum()
    for r in range(h - 1):  # vertical pairs a=(r,c), b=(r+1,c)
        for c in range(w):
            pd = d6[:, r + 1, c, 0, :, :] - d6[:, r, c, p - 1, :, :]
            td = t6[:, r + 1, c, 0, :, :] - t6[:, r, c, p - 1, :, :]
            pm = ((pd - td) ** 2).mean(dim=(1, 2))
            pw = torch.maximum(w64[:, r * w + c], w64[:, (r + 1) * w + c])
            num = num + (pw * pm).sum()
            den = den + pw.sum()
    l_sc = num / den if den.item() != 0 else (pred64 * 0).sum()
    return l_pix, l_sc


def test_patchify_helper_matches_mae_formula():
    torch.manual_seed(60)
    B, C, H, W, p = 2, 3, 24, 40, 8
    img = torch.randn(B, C, H, W, dtype=F64)
    h, w = H // p, W // p
    mae = img.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, p * p * C)
    assert torch.equal(_patchify_loops(img, p), mae)


# (B, H, W, p, C)
PPL_SIZES = [(3, 64, 64, 8, 3), (2, 224, 224, 16, 3), (3, 112, 112, 16, 3), (3, 56, 42, 14, 3), (3, 32, 48, 8, 1)]
_PPL_RTOL = {F32: 1e-4, BF16: 2e-4, F16: 2e-4}
_GRAD_TOL = {F32: 1e-4, BF16: 1.5e-2, F16: 1.5e-2}


def _ppl_inputs(size, dtype, norm_pix, dev, seed, weights="random"):
    torch.manual_seed(seed)
    B, H, W, p, C = size
    L, P = (H // p) * (W // p), p * p * C
    # per-image brightness/contrast so that patch statistics vary
    images = torch.rand(B, C, H, W, device=dev) * torch.rand(B, 1, 1, 1, device=dev) * 2 + torch.randn(B, 1, 1, 1, device=dev)
    if weights == "random":
        weight = torch.rand(B, L, device=dev)
        weight[torch.rand(B, L, device=dev) < 0.3] = 0.0
    elif weights == "zero":
        weight = torch.zeros(B, L, device=dev)
    else:
        raise KeyError(weights)
    pred = torch.randn(B, L, P, device=dev)
    if not norm_pix:
        pred = pred * 0.5 + images.mean()
    return pred.to(dtype), images, weight


def _check_loss(val, ref, rtol, name):
    assert val.dtype == F32 and val.dim() == 0, f"{name}: dtype {val.dtype}, shape {tuple(val.shape)}"
    assert torch.isfinite(val), f"{name} not finite"
    r = ref.item()
    assert abs(val.item() - r) <= rtol * abs(r) + 1e-12, f"{name}: {val.item():.8g} vs ref {r:.8g}"


@pytest.mark.parametrize("backend", PPL_BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("boundary_weight", [0.0, 0.5])
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("size", PPL_SIZES, ids=lambda s: "B{}_{}x{}_p{}_C{}".format(*s))
def test_patch_pixel_loss_matches_bruteforce(use_backend, backend, dtype, boundary_weight, norm_pix, size):
    dev = use_backend(backend)
    p = size[3]
    pred, images, weight = _ppl_inputs(size, dtype, norm_pix, dev, seed=61)
    pred.requires_grad_()
    loss = patch_pixel_loss(pred, images, weight, p, norm_pix=norm_pix, boundary_weight=boundary_weight)
    (loss * 1.7).backward()  # non-unit upstream gradient
    pred64 = pred.detach().double().requires_grad_()
    l_pix, l_sc = _ppl_ref(pred64, images, weight, p, norm_pix, 1e-6)
    ref = l_pix + boundary_weight * l_sc
    (ref * 1.7).backward()
    _check_loss(loss, ref, _PPL_RTOL[dtype], "loss")
    assert pred.grad is not None and pred.grad.dtype == dtype
    assert_close_scaled(pred.grad, pred64.grad, _GRAD_TOL[dtype], "dpred")


@pytest.mark.parametrize("backend", PPL_BACKENDS)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_patch_pixel_loss_fp16(use_backend, backend, norm_pix):
    dev = use_backend(backend)
    size = (3, 56, 42, 14, 3)
    pred, images, weight = _ppl_inputs(size, F16, norm_pix, dev, seed=62)
    pred.requires_grad_()
    loss = patch_pixel_loss(pred, images, weight, 14, norm_pix=norm_pix, boundary_weight=0.5)
    loss.backward()
    pred64 = pred.detach().double().requires_grad_()
    l_pix, l_sc = _ppl_ref(pred64, images, weight, 14, norm_pix, 1e-6)
    ref = l_pix + 0.5 * l_sc
    ref.backward()
    _check_loss(loss, ref, _PPL_RTOL[F16], "loss")
    assert pred.grad.dtype == F16
    assert_close_scaled(pred.grad, pred64.grad, _GRAD_TOL[F16], "dpred")


@pytest.mark.parametrize("backend", PPL_BACKENDS)
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("size", [PPL_SIZES[0], PPL_SIZES[3], PPL_SIZES[4]], ids=lambda s: "B{}_{}x{}_p{}_C{}".format(*s))
def test_patch_pixel_loss_terms(use_backend, backend, eps, norm_pix, size):
    dev = use_backend(backend)
    p = size[3]
    pred, images, weight = _ppl_inputs(size, F32, norm_pix, dev, seed=63)
    pred.requires_grad_()
    t_pix, t_sc = patch_pixel_loss_terms(pred, images, weight, p, norm_pix=norm_pix, eps=eps)
    pred64 = pred.detach().double().requires_grad_()
    r_pix, r_sc = _ppl_ref(pred64, images, weight, p, norm_pix, eps)
    _check_loss(t_pix, r_pix, 1e-4, "l_pix")
    _check_loss(t_sc, r_sc, 1e-4, "l_sc")
    assert t_sc.item() > 0 and t_pix.item() > 0
    # gradient of each term separately
    g_pix, = torch.autograd.grad(t_pix, pred, retain_graph=True)
    g_sc, = torch.autograd.grad(t_sc, pred)
    rg_pix, = torch.autograd.grad(r_pix, pred64, retain_graph=True)
    rg_sc, = torch.autograd.grad(r_sc, pred64)
    assert_close_scaled(g_pix, rg_pix, 1e-4, "d l_pix")
    assert_close_scaled(g_sc, rg_sc, 1e-4, "d l_sc")
    # patch_pixel_loss == l_pix + boundary_weight * l_sc
    for bw in (0.0, 0.5, 2.0):
        loss = patch_pixel_loss(pred, images, weight, p, norm_pix=norm_pix, boundary_weight=bw, eps=eps)
        comb = t_pix.detach().double() + bw * t_sc.detach().double()
        assert abs(loss.item() - comb.item()) <= 1e-6 * abs(comb.item()) + 1e-12, (bw, loss.item(), comb.item())


@pytest.mark.parametrize("backend", PPL_BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_patch_pixel_loss_zero_weights(use_backend, backend, dtype, norm_pix):
    dev = use_backend(backend)
    size = (2, 64, 64, 8, 3)
    pred, images, weight = _ppl_inputs(size, dtype, norm_pix, dev, seed=64, weights="zero")
    pred.requires_grad_()
    for bw in (0.0, 0.5):
        pred.grad = None
        loss = patch_pixel_loss(pred, images, weight, 8, norm_pix=norm_pix, boundary_weight=bw)
        assert loss.dtype == F32 and loss.dim() == 0
        assert loss.item() == 0.0, f"loss {loss.item()} with all-zero weights"
        loss.backward()
        assert pred.grad is not None
        assert not torch.isnan(pred.grad).any()
        assert (pred.grad == 0).all(), "grad not exactly zero with all-zero weights"
    l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, 8, norm_pix=norm_pix)
    assert l_pix.item() == 0.0 and l_sc.item() == 0.0
    (l_pix + l_sc).backward()
    assert (pred.grad == 0).all()


@pytest.mark.parametrize("backend", PPL_BACKENDS)
def test_patch_pixel_loss_empty_batch(use_backend, backend):
    dev = use_backend(backend)
    pred = torch.randn(0, 16, 192, device=dev, requires_grad=True)
    for sc_weight in (None, 0.5):
        pred.grad = None
        l_pix, l_sc = patch_pixel_loss_terms(pred, torch.randn(0, 3, 32, 32, device=dev), torch.ones(0, 16, device=dev),
                                             8, sc_weight=sc_weight)
        assert l_pix.item() == 0.0 and l_sc.item() == 0.0
        (l_pix + l_sc).backward()
        assert pred.grad.shape == pred.shape


@pytest.mark.parametrize("backend", PPL_BACKENDS)
@pytest.mark.parametrize("boundary_weight", [0.0, 0.5])
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("where", ["corner", "edge", "interior"])
def test_patch_pixel_loss_one_hot_weight(use_backend, backend, boundary_weight, norm_pix, where):
    dev = use_backend(backend)
    size = (2, 56, 42, 14, 3)  # grid 4 x 3
    B, H, W, p, C = size
    h, w = H // p, W // p
    pred, images, weight = _ppl_inputs(size, F32, norm_pix, dev, seed=65)
    weight.zero_()
    r, c = {"corner": (0, 0), "edge": (2, 2), "interior": (1, 1)}[where]
    i = r * w + c
    weight[1, i] = 0.7
    pred.requires_grad_()
    loss = patch_pixel_loss(pred, images, weight, p, norm_pix=norm_pix, boundary_weight=boundary_weight)
    loss.backward()
    pred64 = pred.detach().double().requires_grad_()
    l_pix, l_sc = _ppl_ref(pred64, images, weight, p, norm_pix, 1e-6)
    ref = l_pix + boundary_weight * l_sc
    ref.backward()
    _check_loss(loss, ref, 1e-4, "loss")
    assert_close_scaled(pred.grad, pred64.grad, 1e-4, "dpred")
    # gradient support: the weighted patch, plus its 4-neighbours when the boundary term is on
    support = torch.zeros(B, h * w, dtype=torch.bool, device=dev)
    support[1, i] = True
    if boundary_weight > 0:
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < h and 0 <= cc < w:
                support[1, rr * w + cc] = True
    assert (pred.grad[~support] == 0).all(), "gradient outside the weighted patch (and its neighbours)"
    assert (pred.grad[support].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", PPL_BACKENDS)
@pytest.mark.parametrize("fn_name", ["loss", "terms"])
def test_patch_pixel_loss_no_grad_to_images_and_weight(use_backend, backend, fn_name):
    dev = use_backend(backend)
    size = (2, 32, 48, 8, 1)
    pred, images, weight = _ppl_inputs(size, F32, True, dev, seed=66)
    pred.requires_grad_()
    images.requires_grad_()
    weight.requires_grad_()
    if fn_name == "loss":
        out = patch_pixel_loss(pred, images, weight, 8, norm_pix=True, boundary_weight=0.5)
    else:
        a, b = patch_pixel_loss_terms(pred, images, weight, 8, norm_pix=True)
        out = a + b
    out.backward()
    assert pred.grad is not None and (pred.grad != 0).any()
    assert images.grad is None, "images received a gradient"
    assert weight.grad is None, "weight received a gradient"


@pytest.mark.parametrize("backend", PPL_BACKENDS)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_patch_pixel_loss_gradcheck(use_backend, backend, norm_pix):
    _skip_fp64_unless_reference(backend)
    dev = use_backend(backend)
    torch.manual_seed(67)
    B, C, H, W, p = 2, 2, 4, 6, 2
    L, P = (H // p) * (W // p), p * p * C
    images = torch.rand(B, C, H, W, dtype=F64, device=dev)
    weight = torch.rand(B, L, dtype=F64, device=dev)
    weight[0, 2] = 0.0
    pred = torch.randn(B, L, P, dtype=F64, device=dev, requires_grad=True)

    def fn(pr):
        return patch_pixel_loss(pr, images, weight, p, norm_pix=norm_pix, boundary_weight=0.5).double()

    def fn_terms(pr):
        a, b = patch_pixel_loss_terms(pr, images, weight, p, norm_pix=norm_pix)
        return a.double(), b.double()

    assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(fn_terms, (pred,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", PPL_BACKENDS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sc_weight", [0.3, 10.0])
@pytest.mark.parametrize("unit", [(1.0, 1.0), (0.5, 0.5), (2.0, 1 / 3), (0.0, 1.0), (1.0, None)],
                         ids=["as_told", "scaled", "other_ratio", "l_sc_only", "l_pix_only"])
def test_patch_pixel_loss_terms_sc_weight_any_upstream(use_backend, backend, dtype, sc_weight, unit):
    """Terms computed with `sc_weight` (Triton: the gradient comes from the forward) give the
    float64 gradient of a * l_pix + b * l_sc for any a, b: the told ratio (b = sc_weight * a),
    a multiple of it, another, and a term left out of the loss (far below the told ratio
    with l_pix alone after sc_weight=10)."""
    dev = use_backend(backend)
    size = (3, 40, 56, 8, 3)
    pred, images, weight = _ppl_inputs(size, dtype, True, dev, seed=68)
    pred.requires_grad_()
    a, b = unit[0], None if unit[1] is None else unit[1] * sc_weight
    l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, 8, sc_weight=sc_weight)
    (a * l_pix + (b * l_sc if b is not None else 0)).backward()
    pred64 = pred.detach().double().cpu().requires_grad_()
    r_pix, r_sc = _ppl_ref(pred64, images.cpu(), weight.cpu(), 8, True, 1e-6)
    (a * r_pix + (b * r_sc if b is not None else 0)).backward()
    err = (pred.grad.double().cpu() - pred64.grad).abs().max().item()
    assert err <= _GRAD_TOL[dtype] * pred64.grad.abs().max().item(), err


@pytest.mark.parametrize("backend", PPL_BACKENDS)
def test_patch_pixel_loss_second_backward_through_retained_graph(use_backend, backend, monkeypatch):
    """The forward's gradient is rescaled in place by the first backward (Triton: the rescale
    kernel runs, the recomputing one does not); a second one through the retained graph
    (other upstream gradients) recomputes and still gets the exact gradient."""
    dev = use_backend(backend)
    calls = []
    if backend == "triton":
        kernel = pytest.importorskip("pacofr.kernels.patch_pixel_loss")
        for name in ("patch_pixel_loss_rescale", "patch_pixel_loss_backward"):
            real = getattr(kernel, name)
            monkeypatch.setattr(kernel, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    pred, images, weight = _ppl_inputs((2, 32, 48, 8, 3), F32, True, dev, seed=69)
    pred.requires_grad_()
    l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, 8, sc_weight=0.5)
    first, = torch.autograd.grad(0.5 * l_pix + 0.25 * l_sc, pred, retain_graph=True)
    assert calls == (["patch_pixel_loss_rescale"] if backend == "triton" else [])
    second, = torch.autograd.grad(l_pix + 2.0 * l_sc, pred)
    assert calls == (["patch_pixel_loss_rescale", "patch_pixel_loss_backward"] if backend == "triton" else [])
    pred64 = pred.detach().double().cpu().requires_grad_()
    r_pix, r_sc = _ppl_ref(pred64, images.cpu(), weight.cpu(), 8, True, 1e-6)
    for got, (a, b) in ((first, (0.5, 0.25)), (second, (1.0, 2.0))):
        want, = torch.autograd.grad(a * r_pix + b * r_sc, pred64, retain_graph=True)
        assert (got.double().cpu() - want).abs().max() <= 1e-4 * want.abs().max()


def test_patch_pixel_loss_gradient_in_forward_only_when_needed(monkeypatch):
    """The Triton forward computes the gradient only when pred needs one and the weight of
    l_sc is told (spy on the kernel module's entry)."""
    kernel = pytest.importorskip("pacofr.kernels.patch_pixel_loss")
    if "triton" not in PPL_BACKENDS:
        pytest.skip("Triton cannot run here")
    monkeypatch.setenv("PACOFR_OPS", "triton")
    calls = []
    real = kernel.patch_pixel_loss_forward_with_grad
    monkeypatch.setattr(kernel, "patch_pixel_loss_forward_with_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    pred, images, weight = _ppl_inputs((2, 32, 48, 8, 3), F32, True, _device("triton"), seed=70)
    patch_pixel_loss(pred.requires_grad_(), images, weight, 8, boundary_weight=0.5).backward()
    assert calls == [1]
    with torch.no_grad():
        patch_pixel_loss(pred, images, weight, 8, boundary_weight=0.5)
    patch_pixel_loss_terms(pred, images, weight, 8)
    patch_pixel_loss(pred.detach(), images, weight, 8, boundary_weight=0.5)
    assert calls == [1]


@pytest.mark.parametrize("backend", PPL_BACKENDS)
@pytest.mark.parametrize("sc_weight", [None, 0.5])
def test_patch_pixel_loss_nan_in_pred_is_reported(use_backend, backend, sc_weight):
    """A NaN in a prediction gives NaN losses and NaN gradient elements exactly where the
    float64 reference has them (that patch, and its neighbours' border lines), not a
    finite number that hides it."""
    dev = use_backend(backend)
    pred, images, weight = _ppl_inputs((2, 32, 48, 8, 3), F32, True, dev, seed=72)
    pred[1, 7, 11] = float("nan")
    pred.requires_grad_()
    l_pix, l_sc = patch_pixel_loss_terms(pred, images, weight, 8, sc_weight=sc_weight)
    (l_pix + 0.5 * l_sc).backward()
    pred64 = pred.detach().double().cpu().requires_grad_()
    r_pix, r_sc = _ppl_ref(pred64, images.cpu(), weight.cpu(), 8, True, 1e-6)
    (r_pix + 0.5 * r_sc).backward()
    assert l_pix.isnan() and l_sc.isnan() and r_pix.isnan() and r_sc.isnan()
    assert torch.equal(pred.grad.isnan().cpu(), pred64.grad.isnan())
    assert pred64.grad.isnan().any() and not pred64.grad.isnan().all()


@pytest.mark.parametrize("op", ["codebook_topk", "masked_attention", "masked_attention_qkv", "patch_pixel_loss"])
def test_second_order_gradients_are_refused(op):
    """The ops are differentiable once: create_graph=True raises (naming the op) instead of
    giving gradients that silently leave the op out of a second-order gradient. First-order
    gradients from the same inputs still work."""
    torch.manual_seed(73)
    if op == "codebook_topk":
        x = torch.randn(7, 16, requires_grad=True)
        out = lambda: codebook_topk(x, torch.randn(9, 16), 3)[0].sum()  # noqa: E731
    elif op == "masked_attention":
        x = torch.randn(2, 2, 5, 32, requires_grad=True)
        out = lambda: masked_attention(x, x, x, torch.tensor([5, 3])).sum()  # noqa: E731
    elif op == "masked_attention_qkv":
        x = torch.randn(2, 5, 3, 2, 32, requires_grad=True)
        out = lambda: masked_attention_qkv(x, torch.tensor([5, 3])).sum()  # noqa: E731
    else:
        x = torch.randn(2, 12, 192, requires_grad=True)
        out = lambda: patch_pixel_loss(x, torch.randn(2, 3, 24, 32), torch.rand(2, 12), 8, boundary_weight=0.5)  # noqa: E731
    with pytest.raises(RuntimeError, match=op + ": gradients of gradients"):
        torch.autograd.grad(out(), x, create_graph=True)
    grad, = torch.autograd.grad(out(), x)
    assert grad.abs().sum() > 0


# --------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("backend", CB_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_codebook_topk_under_autocast_runs_in_autocast_dtype(use_backend, backend, metric):
    """Like torch.mm: under bf16 autocast, fp32 inputs are searched as bf16, and the
    gradients reach the fp32 leaves in fp32."""
    dev = use_backend(backend)
    gen = torch.Generator().manual_seed(71)
    x = torch.randn(37, 24, generator=gen).to(dev).requires_grad_()
    cb = torch.randn(50, 24, generator=gen).to(dev).requires_grad_()
    with torch.autocast(dev, dtype=BF16):
        s, i = codebook_topk(x, cb, 4, metric)
    s_bf16, i_bf16 = codebook_topk(x.detach().to(BF16), cb.detach().to(BF16), 4, metric)
    s_fp32, _ = codebook_topk(x.detach(), cb.detach(), 4, metric)
    assert torch.equal(i, i_bf16) and torch.equal(s, s_bf16)
    assert not torch.equal(s, s_fp32), "autocast did not change the input precision"
    s.sum().backward()
    assert x.grad.dtype == F32 and cb.grad.dtype == F32
    assert torch.isfinite(x.grad).all() and (cb.grad != 0).any()


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_masked_attention_under_autocast_runs_in_autocast_dtype(use_backend, backend):
    dev = use_backend(backend)
    gen = torch.Generator().manual_seed(73)
    q, k, v = (torch.randn(2, 3, 19, 32, generator=gen).to(dev).requires_grad_() for _ in range(3))
    seqlens = torch.tensor([19, 7], device=dev)
    with torch.autocast(dev, dtype=BF16):
        out = masked_attention(q, k, v, seqlens=seqlens)
    want = masked_attention(*(t.detach().to(BF16) for t in (q, k, v)), seqlens=seqlens)
    assert out.dtype == BF16 and torch.equal(out, want)
    out.float().sum().backward()
    assert all(t.grad.dtype == F32 and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_explain_names_the_choice_and_the_rejections(monkeypatch):
    """explain() says which backend runs and why each other one was not taken; shapes come
    from meta tensors, so nothing is allocated."""
    if "triton" not in ops.backends("codebook_topk"):
        pytest.skip("no Triton backend here")
    monkeypatch.delenv("PACOFR_OPS", raising=False)
    dev = "cuda" if torch.cuda.is_available() else "meta"  # where Triton is preferred
    small = torch.empty(197, 48, device="meta")
    assert ops.explain("codebook_topk", dev, x=small, codebook=small, k=4, metric="l2") == "codebook_topk: triton"
    for x, why in ((small.double(), "float64"), (torch.empty(2**25, 64, device="meta"), "2^31")):
        line = ops.explain("codebook_topk", dev, x=x, codebook=small, k=4, metric="l2")
        assert line.startswith("codebook_topk: reference (rejected triton: ") and why in line, line
    with pytest.raises(ValueError, match="unknown op 'nope' \\(known: codebook_topk, masked_attention"):
        ops.explain("nope")
