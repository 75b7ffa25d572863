"""codebook_topk: the public op against the float64 brute force on every backend (shapes, dtypes,
ties, non-finite scores, gradients, peak memory); the reference's selection over small tiles;
then the Triton kernel's launchers on their own (a grid of shapes, split-K merging, outputs
poisoned before the call, packed keys, the deterministic backward, every configuration in its
SWEEP) and their host-side launch logic."""

import itertools
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import pacofr.ops as ops
from pacofr.ops import codebook_topk

from .utils import (BF16, CODEBOOK_RTOL, DEVICE, F16, F32, F64, GRAD_TOL, assert_close_scaled,
                    assert_grids_grow_only_along_axis_0, check_topk, codebook_scores, codebook_selected_scores,
                    device_for, op_under_test, skip_fp64_unless_reference)

BACKENDS, kernel, requires_kernel, SWEEP = op_under_test("codebook_topk")  # (kernel None where Triton cannot run)


# ============================================================================================
# the public op, every backend, against float64
# ============================================================================================


CB_SHAPES = [(197, 1000, 48, 5), (1, 1, 3, 1), (7, 5, 3, 4), (33, 257, 17, 32)]


@pytest.mark.parametrize("backend", BACKENDS)
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
    frac = check_topk(scores, idx, x, c, k, metric, CODEBOOK_RTOL[dtype])
    assert frac > 0.5, f"test data too tie-heavy ({frac:.2f}) to check indices"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_codebook_topk_forward_fp16(use_backend, backend, metric):
    dev = use_backend(backend)
    torch.manual_seed(2)
    N, K, D, k = 197, 1000, 48, 5
    x = torch.randn(N, D, device=dev).half()
    c = torch.randn(K, D, device=dev).half()
    scores, idx = codebook_topk(x, c, k, metric=metric)
    frac = check_topk(scores, idx, x, c, k, metric, CODEBOOK_RTOL[F16])
    assert frac > 0.5


def test_codebook_topk_default_metric_is_l2(use_backend):
    dev = use_backend(BACKENDS[0])
    torch.manual_seed(3)
    x = torch.randn(20, 8, device=dev)
    c = torch.randn(50, 8, device=dev)
    s_def, i_def = codebook_topk(x, c, 4)
    s_l2, i_l2 = codebook_topk(x, c, 4, metric="l2")
    assert torch.equal(i_def, i_l2) and torch.equal(s_def, s_l2)
    assert (s_def >= 0).all()


def _exact_topk(xi, cb, k, metric):
    """(all scores [N, K] int64, the k best scores float32, their indices) of integer data:
    every score is exact, so the order (score, then code index) is fully determined."""
    K = cb.shape[0]
    exact = codebook_scores(xi.long(), cb.long(), metric)
    key = (exact if metric == "l2" else -exact) * K + torch.arange(K)[None, :]
    idx = key.argsort(1)[:, :k]
    return exact, exact.gather(1, idx).to(F32), idx


@pytest.mark.parametrize("backend", BACKENDS)
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
    exact, exp_scores, exp_idx = _exact_topk(xi, cb, k, metric)
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
    s = codebook_selected_scores(x64, c64, idx, metric)  # the op's own selection
    (s * g.double()).sum().backward()
    tol = GRAD_TOL[dtype]
    assert x.grad.dtype == dtype and c.grad.dtype == dtype
    assert_close_scaled(x.grad, x64.grad, tol, "dx")
    assert_close_scaled(c.grad, c64.grad, tol, "dcodebook")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("shape", [(197, 1000, 48, 5), (33, 257, 17, 32), (7, 5, 3, 4), (1, 1, 3, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_codebook_topk_grad_fp32(use_backend, backend, metric, shape):
    _cb_grad_check(use_backend(backend), shape, metric, F32, seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_codebook_topk_grad_bf16(use_backend, backend, metric):
    _cb_grad_check(use_backend(backend), (197, 1000, 48, 5), metric, BF16, seed=6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_codebook_topk_gradcheck(use_backend, backend, metric):
    skip_fp64_unless_reference(backend)
    dev = use_backend(backend)
    torch.manual_seed(7)
    x = torch.randn(5, 4, dtype=F64, device=dev, requires_grad=True)
    c = torch.randn(9, 4, dtype=F64, device=dev, requires_grad=True)

    def fn(x_, c_):
        return codebook_topk(x_, c_, 3, metric=metric)[0].double()

    assert torch.autograd.gradcheck(fn, (x, c), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
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
@pytest.mark.parametrize("backend", BACKENDS)
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


@pytest.mark.parametrize("backend", BACKENDS)
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
    check_topk(scores, idx, x, c, k, metric, CODEBOOK_RTOL[F32], rows=good)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2"])  # "ip" takes the same tiling path; one run keeps the file fast
def test_codebook_topk_never_builds_full_matrix(backend, metric):
    dev = device_for(backend)
    if backend == "triton" and dev == "cpu":
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
    # a full 20000 x 8192 fp32 distance matrix would be 655 MB; the native kernel holds the
    # outputs (1.9 MB) and a tile per thread
    bound = 8e6 if backend == "native" else 200e6
    assert delta < bound, f"peak memory above inputs {delta / 1e6:.0f} MB >= {bound / 1e6:.0f} MB"


# ============================================================================================
# the reference's tiled selection: small tiles, so that ties and non-finite scores straddle
# tile borders and the merge of each tile's best with the running best is exercised
# ============================================================================================


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("layout", ["repeat", "interleave"])
@pytest.mark.parametrize("k", [1, 5, 32])
@pytest.mark.parametrize("code_tile", [23, 500])  # 1200 codes: a last tile of 4 (fewer than k) or 200
def test_reference_ties_across_small_tiles(monkeypatch, use_backend, metric, layout, k, code_tile):
    from pacofr.ops import reference

    monkeypatch.setattr(reference, "TOPK_CODE_TILE", code_tile)
    monkeypatch.setattr(reference, "TOPK_TILE_SCORES", 24 * code_tile)  # 64 rows: tiles of 24, 24, 16
    test_codebook_topk_ties_lower_index_wins(use_backend, "reference", metric, F32, layout, k)


def _expected_selection(scores, k, metric):
    """Python sort of each row: finite scores best first, then infinitely bad ones, then NaN;
    equal scores by index."""
    bad = math.inf if metric == "l2" else -math.inf

    def rank(item):
        j, s = item
        if math.isnan(s):
            return (2, 0.0, j)
        if s == bad:
            return (1, 0.0, j)
        return (0, s if metric == "l2" else -s, j)

    return [[j for j, _ in sorted(enumerate(row), key=rank)[:k]] for row in scores.tolist()]


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("code_tile", [7, 64, 300])
@pytest.mark.parametrize("k", [1, 8])
def test_reference_selection_of_tied_and_non_finite_scores(monkeypatch, metric, code_tile, k):
    """The selection alone, on scores given to it: four finite values (ties at the k-th place
    in most rows), both infinities and NaN, rows made of NaN only, of infinitely bad scores
    only, and with fewer finite scores than k."""
    from pacofr.ops import reference

    gen = torch.Generator().manual_seed(code_tile + k)
    n, kc = 40, 300
    values = torch.tensor([0.0, 1.0, 2.0, 3.0, math.inf, -math.inf, math.nan])
    weights = torch.tensor([4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0])
    scores = values[torch.multinomial(weights, n * kc, replacement=True, generator=gen)].view(n, kc)
    scores[0] = math.nan
    scores[1] = math.inf if metric == "l2" else -math.inf
    scores[2] = math.nan
    scores[2, [5, 150, 299]] = torch.tensor([2.0, 1.0, 2.0])
    keys = scores if metric == "ip" else -scores

    def given_keys(x, x_sq, codes, codes_sq):  # x and codes carry their row and code numbers
        return keys[x[:, 0].long()][:, codes[:, 0].long()]

    monkeypatch.setattr(reference, "_keys", given_keys)
    monkeypatch.setattr(reference, "TOPK_CODE_TILE", code_tile)
    monkeypatch.setattr(reference, "TOPK_TILE_SCORES", 16 * code_tile)
    rows, codes = torch.arange(n, dtype=F32)[:, None], torch.arange(kc, dtype=F32)[:, None]
    got_s, got_i = reference.codebook_topk(rows, codes, k, metric)
    want_i = torch.tensor(_expected_selection(scores, k, metric))
    assert torch.equal(got_i, want_i)
    want_s = scores.gather(1, want_i)
    assert torch.equal(got_s.isnan(), want_s.isnan())
    assert torch.equal(got_s.nan_to_num(), want_s.nan_to_num())


# ============================================================================================
# the native (C++) kernel: tiles of 128 rows x 512 codes (csrc/codebook_topk.cpp), so rows and
# codes end mid-tile here, ties and non-finite scores straddle code tiles, and two threads must
# give what one gives
# ============================================================================================


requires_native = pytest.mark.skipif("native" not in BACKENDS, reason="the C++ extension is not built")
NATIVE_ROWS, NATIVE_CODES = 128, 512


@pytest.fixture(params=["simd", "plain"])
def native_screen(request, monkeypatch):
    """The kernel screens chunks of a tile with AVX-512 where the CPU has it, else in plain C++;
    PACOFR_NATIVE_SIMD=0 forces the plain one, so both are tested here."""
    if request.param == "plain":
        monkeypatch.setenv("PACOFR_NATIVE_SIMD", "0")


@requires_native
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(257, 1100, 33, 8), (130, 513, 7, 32), (129, 512, 3, 1), (3, 20, 5, 20),
                                   (40, 31, 64, 31)], ids=lambda s: "x".join(map(str, s)))
def test_native_odd_shapes(use_backend, native_screen, metric, dtype, shape):
    """Partial row blocks and code tiles, a codebook smaller than a tile, k = K, odd D."""
    use_backend("native")
    N, K, D, k = shape
    gen = torch.Generator().manual_seed(N + K + D + k)
    x = torch.randn(N, D, generator=gen).to(dtype)
    c = torch.randn(K, D, generator=gen).to(dtype)
    scores, idx = codebook_topk(x, c, k, metric=metric)
    assert check_topk(scores, idx, x, c, k, metric, CODEBOOK_RTOL[dtype]) > 0.5


@requires_native
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 4, 32])
def test_native_ties_across_tile_borders(use_backend, native_screen, metric, k):
    """Small integers (exact scores); copies of one code sit on both sides of each code-tile
    border and every third row is that code, so equal best scores fall in different tiles."""
    use_backend("native")
    gen = torch.Generator().manual_seed(k)
    K, D = 2 * NATIVE_CODES + 37, 8
    cb = torch.randint(-2, 3, (K, D), generator=gen)
    for border in (NATIVE_CODES, 2 * NATIVE_CODES):
        cb[border - 3 : border + 3] = cb[5]
    xi = torch.randint(-2, 3, (NATIVE_ROWS + 9, D), generator=gen)
    xi[::3] = cb[5]
    exact, exp_scores, exp_idx = _exact_topk(xi, cb, k, metric)
    if k > 1:  # some row's equal best scores straddle a border
        assert ((exp_scores == exp_scores[:, :1]) & (exp_idx >= NATIVE_CODES)).any()
    scores, idx = codebook_topk(xi.float(), cb.float(), k, metric=metric)
    assert torch.equal(idx, exp_idx), "tie-breaking across tiles is not 'lower code index first'"
    assert torch.equal(scores, exp_scores)


@requires_native
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_native_non_finite_codes_across_tiles(use_backend, native_screen, metric):
    """NaN codes fill the first tile; two infinitely bad ones (l2: +inf distance, ip: -inf
    product) come in later tiles and one finite code last. Best first: the finite one, the
    infinitely bad ones by index, then NaN by index."""
    use_backend("native")
    K = 2 * NATIVE_CODES + 100
    c = torch.full((K, 4), math.nan)
    bad = [NATIVE_CODES + 88, 2 * NATIVE_CODES + 3]
    c[bad] = 1e20 if metric == "l2" else -1e38  # l2: the squared norm overflows; ip: the sum does
    c[K - 1] = 1.0
    scores, idx = codebook_topk(torch.ones(3, 4), c, 5, metric=metric)
    assert idx.tolist() == [[K - 1, *bad, 0, 1]] * 3
    inf = math.inf if metric == "l2" else -math.inf
    want = torch.tensor([0.0 if metric == "l2" else 4.0, inf, inf, math.nan, math.nan]).expand(3, 5)
    assert torch.equal(scores.isnan(), want.isnan()) and torch.equal(scores.nan_to_num(), want.nan_to_num())


@requires_native
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_native_non_finite_rows(use_backend, native_screen, monkeypatch, metric):
    """Rows with NaN, +inf and -inf entries, on both sides of a row-block border: indices and
    scores as the reference's, and the indices of the float64 brute force's order (finite,
    infinitely bad, NaN; ties by index) except for l2 rows with an infinite entry (both expand
    the distance: 2 x.c - x.x is NaN or -inf there, by the sign of the code's entry); the other
    rows against the float64 brute force."""
    gen = torch.Generator().manual_seed(3)
    N, K, k = NATIVE_ROWS + 20, NATIVE_CODES + 40, 6
    x = torch.randn(N, 16, generator=gen)
    c = torch.randn(K, 16, generator=gen)
    odd = [0, NATIVE_ROWS - 1, NATIVE_ROWS, NATIVE_ROWS + 5, N - 1]
    x[odd[0]] = math.nan
    x[odd[1], 3] = math.nan
    x[odd[2], 0] = math.inf
    x[odd[3], 2] = -math.inf
    x[odd[4], [1, 7]] = torch.tensor([math.inf, -math.inf])
    use_backend("native")
    scores, idx = codebook_topk(x, c, k, metric=metric)
    use_backend("reference")
    ref_scores, ref_idx = codebook_topk(x, c, k, metric=metric)
    assert torch.equal(idx[odd], ref_idx[odd])
    brute_rows = odd if metric == "ip" else odd[:2]
    brute = codebook_scores(x[brute_rows].double(), c.double(), metric)
    assert idx[brute_rows].tolist() == _expected_selection(brute, k, metric)
    got, want = scores[odd], ref_scores[odd]
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got.nan_to_num(posinf=0, neginf=0), want.nan_to_num(posinf=0, neginf=0))
    assert got[0].isnan().all() and got[1].isnan().all()
    good = [r for r in range(N) if r not in odd]
    check_topk(scores, idx, x, c, k, metric, CODEBOOK_RTOL[F32], rows=good)


@requires_native
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_native_one_and_two_threads_agree(use_backend, metric):
    """Threads take blocks of rows; each row's result must not depend on how many there are.
    The inputs require grad, as a model's codebook does: the worker threads run with grad mode
    on (it is per thread), where the kernel's products must still take them."""
    use_backend("native")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5 * NATIVE_ROWS + 3, 24, generator=gen)
    c = torch.randn(NATIVE_CODES + 77, 24, generator=gen)
    c[NATIVE_CODES + 10] = c[3]  # a tie across tiles
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            xg, cg = x.clone().requires_grad_(), c.clone().requires_grad_()
            scores, idx = codebook_topk(xg, cg, 8, metric=metric)
            scores.sum().backward()
            runs.append((scores.detach(), idx, xg.grad, cg.grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    check_topk(*runs[1][:2], x, c, 8, metric, CODEBOOK_RTOL[F32])


@requires_native
def test_native_leaves_float64_and_says_why(use_backend):
    use_backend("native")
    x64, c = torch.zeros(2, 3, dtype=F64), torch.zeros(4, 3)
    assert "native: float64 runs on the reference" in ops.explain("codebook_topk", "cpu", x=x64, codebook=c, k=1,
                                                                   metric="l2")


# ============================================================================================
# the Triton kernel's launchers (interpreter on CPU, the GPU when there is one)
# ============================================================================================


AXES = dict(n=[1, 7, 197, 1000], kc=[1, 5, 1000, 4099], d=[3, 48, 768], k=[1, 4, 5, 32])


def _grid():
    """Every value of every axis at least twice, k <= K, without the slowest corners."""
    cases = []
    for n, kc, d, k in itertools.product(*AXES.values()):
        if k <= kc and n * kc * d <= 197 * 4099 * 48 and n * kc * k <= 1_000_000 and (n + kc + d + k) % 4 == 0:
            cases.append((n, kc, d, k))
    return cases


@requires_kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n, kc, d, k", _grid())
def test_forward_matches_bruteforce(n, kc, d, k, dtype, metric):
    gen = torch.Generator().manual_seed(n * 31 + kc * 7 + d + k)
    x = torch.randn(n, d, generator=gen).to(DEVICE, dtype)
    c = torch.randn(kc, d, generator=gen).to(DEVICE, dtype)
    out = (torch.full((n, k), math.nan, device=DEVICE), torch.full((n, k), -7, dtype=torch.int64, device=DEVICE))
    scores, idx = kernel.codebook_topk_forward(x, c, k, metric, out=out)
    assert scores is out[0] and idx is out[1]
    assert not scores.isnan().any() and not (idx == -7).any()  # every element written
    check_topk(scores, idx, x.float(), c.float(), k, metric, 1e-5 if dtype == torch.float32 else 1e-3)


@requires_kernel
def test_axes_are_covered():
    cases = _grid()
    for pos, values in enumerate(AXES.values()):
        assert {case[pos] for case in cases} == set(values)


@requires_kernel
@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_split_k_merge_equals_one_pass(splits, metric):
    gen = torch.Generator().manual_seed(splits)
    x = torch.randn(33, 20, generator=gen).to(DEVICE)
    c = torch.randn(1500, 20, generator=gen).to(DEVICE)
    c[700:760] = c[10]  # ties across splits: the lowest index must win
    one = kernel.codebook_topk_forward(x, c, 6, metric, splits=1)
    split = kernel.codebook_topk_forward(x, c, 6, metric, splits=splits)
    assert torch.equal(one[1], split[1]) and torch.equal(one[0], split[0])
    poisoned = (torch.full((33, 6), math.nan, device=DEVICE), torch.full((33, 6), -1, dtype=torch.int64, device=DEVICE))
    kernel.codebook_topk_forward(x, c, 6, metric, splits=splits, out=poisoned)
    assert torch.equal(poisoned[1], one[1])


@requires_kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_many_equal_codes_tie_to_lower_index(metric):
    # small integers: every score is exact in fp32, so equal codes really tie
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (7, 16), generator=gen).float()
    c = base.repeat(300, 1).to(DEVICE)  # code j equals code j + 7m
    x = torch.randint(-3, 4, (50, 16), generator=gen).float().to(DEVICE)
    scores, idx = kernel.codebook_topk_forward(x, c, 32, metric)
    full = codebook_scores(x.cpu().double(), c.cpu().double(), metric)
    expected = torch.sort(-full if metric == "l2" else full, dim=1, descending=True, stable=True).indices[:, :32]
    assert torch.equal(idx.cpu(), expected)


@requires_kernel
def test_nan_row_gives_nan_scores_and_valid_indices():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 8, generator=gen)
    x[4, 3] = math.nan
    c = torch.randn(300, 8, generator=gen)
    for metric in ("l2", "ip"):
        scores, idx = kernel.codebook_topk_forward(x.to(DEVICE), c.to(DEVICE), 5, metric)
        assert scores[4].isnan().all() and ((idx[4] >= 0) & (idx[4] < 300)).all()
        keep = torch.arange(9) != 4
        check_topk(scores[keep.to(DEVICE)], idx[keep.to(DEVICE)], x[keep], c, 5, metric, 1e-5)


@requires_kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_atomic_and_deterministic(metric, dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(130, 24, generator=gen).to(DEVICE, dtype)
    c = torch.randn(40, 24, generator=gen).to(DEVICE, dtype)  # few codes: many rows share each
    _, idx = kernel.codebook_topk_forward(x, c, 5, metric)
    g = torch.randn(130, 5, generator=gen).to(DEVICE)
    # float64 reference of the same selection
    x64 = x.double().cpu().requires_grad_()
    c64 = c.double().cpu().requires_grad_()
    s = codebook_selected_scores(x64, c64, idx.cpu(), metric)
    gx_ref, gc_ref = torch.autograd.grad((s * g.double().cpu()).sum(), (x64, c64))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    runs = [kernel.codebook_topk_backward(g, x, c, idx, metric, deterministic=True) for _ in range(2)]
    atomic = kernel.codebook_topk_backward(g, x, c, idx, metric, deterministic=False)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])  # bitwise
    for gx, gc in (runs[0], atomic):
        assert gx.dtype == dtype and gc.dtype == dtype
        assert (gx.double().cpu() - gx_ref).abs().max() <= tol * gx_ref.abs().max()
        assert (gc.double().cpu() - gc_ref).abs().max() <= tol * gc_ref.abs().max()


@requires_kernel
def test_model_uses_the_kernel_for_both_searches(monkeypatch, faces64):
    from pacofr.config import load_config
    from pacofr.losses import PaCoFRLoss
    from pacofr.model import PaCoFR

    calls = []
    real = kernel.codebook_topk_forward

    def spy(x, codebook, k, metric, **kw):
        calls.append(metric)
        return real(x, codebook, k, metric, **kw)

    monkeypatch.setattr(kernel, "codebook_topk_forward", spy)
    monkeypatch.setenv("PACOFR_OPS", "triton")
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = PaCoFR(cfg).to(DEVICE)
    images = faces64[:2].to(DEVICE)
    loss = PaCoFRLoss(cfg)(model(images, generator=torch.Generator(DEVICE).manual_seed(0)), images)["loss"]
    loss.backward()
    assert "ip" in calls and "l2" in calls  # belief candidates and nearest codes
    assert torch.isfinite(loss) and model.belief.fc1.weight.grad.abs().sum() > 0


@requires_kernel
@pytest.mark.parametrize("config", SWEEP, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_every_swept_launch_configuration_is_correct(config):
    """The alternatives gpu_report.py times: other tile shapes change how tiles are merged,
    not the result (against the float64 brute force, both metrics, poisoned outputs)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(197, 48, generator=gen).to(DEVICE, torch.bfloat16)
    c = torch.randn(1000, 48, generator=gen).to(DEVICE, torch.bfloat16)
    for metric in ("l2", "ip"):
        out = (torch.full((197, 8), math.nan, device=DEVICE), torch.full((197, 8), -7, dtype=torch.int64, device=DEVICE))
        scores, idx = kernel.codebook_topk_forward(x, c, 8, metric, out=out, config=config)
        check_topk(scores, idx, x.float(), c.float(), 8, metric, 2e-4)


@requires_kernel
@pytest.mark.parametrize("config", [c for c in SWEEP if c.get("FLAT")], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_flat_configurations_carry_products_across_d_slices(config):
    """FLAT runs code tiles and D slices as one loop: with D = 48 in slices of 16 (the default
    slice covers D = 48 at once) a tile's product is summed over three steps before its merge."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(197, 48, generator=gen).to(DEVICE, torch.bfloat16)
    c = torch.randn(1000, 48, generator=gen).to(DEVICE, torch.bfloat16)
    for metric in ("l2", "ip"):
        scores, idx = kernel.codebook_topk_forward(x, c, 8, metric, config={**config, "BLOCK_D": 16})
        check_topk(scores, idx, x.float(), c.float(), 8, metric, 2e-4)


@requires_kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_split_shorter_than_k_leaves_no_empty_slot(metric):
    """K = 4099 in 17 splits of 256 codes: the last split holds 3 codes, fewer than k = 5, so
    its list has empty slots. The merge must never pick them, NaN rows included (a GPU picks
    this split count on its own for small N)."""
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(9, 8, generator=gen).to(DEVICE)
    x[4, 2] = math.nan
    c = torch.randn(4099, 8, generator=gen).to(DEVICE)
    one = kernel.codebook_topk_forward(x, c, 5, metric, splits=1)
    split = kernel.codebook_topk_forward(x, c, 5, metric, splits=17)
    assert ((split[1] >= 0) & (split[1] < 4099)).all()
    keep = torch.arange(9, device=DEVICE) != 4
    assert torch.equal(one[1][keep], split[1][keep]) and torch.equal(one[0][keep], split[0][keep])
    assert split[0][4].isnan().all()


@requires_kernel
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("splits, k", [(3, 1), (7, 5), (64, 32)])
def test_merge_splits_against_a_sorted_list(metric, splits, k):
    """The split merge alone: few distinct scores (many ties across splits, broken by the
    lower code index), infinite scores, NaN scores (last among real entries) and empty slots
    (never taken while real entries remain), against a Python sort of each row's candidates."""
    gen = torch.Generator().manual_seed(splits * 100 + k)
    n = 13
    part_s = torch.randint(0, 4, (splits, n, k), generator=gen).float()
    part_s[torch.rand(splits, n, k, generator=gen) < 0.1] = math.nan
    part_s[torch.rand(splits, n, k, generator=gen) < 0.05] = math.inf
    part_s[torch.rand(splits, n, k, generator=gen) < 0.05] = -math.inf
    worst = math.inf if metric == "l2" else -math.inf  # row 0 holds only the two lowest ranks
    part_s[:, 0] = torch.where(torch.rand(splits, k, generator=gen) < 0.5, math.nan, worst)
    part_i = torch.randperm(splits * n * k, generator=gen).reshape(splits, n, k)
    part_i[-1, :, k // 2:] = -1 - torch.arange(k - k // 2)  # the last split is short
    out = (torch.full((n, k), math.nan, device=DEVICE), torch.full((n, k), -7, dtype=torch.int64, device=DEVICE))
    scores, idx = kernel.merge_splits(part_s.to(DEVICE), part_i.to(DEVICE), k, metric, out=out)
    assert scores is out[0] and idx is out[1]
    for r in range(n):
        cands = [(s, i) for s, i in zip(part_s[:, r].flatten().tolist(), part_i[:, r].flatten().tolist()) if i >= 0]
        def rank(c):
            s, i = c
            return (1, 0.0, i) if math.isnan(s) else (0, -s if metric == "ip" else s, i)
        want = sorted(cands, key=rank)[:k]
        assert idx[r].tolist() == [i for _, i in want]
        got = scores[r].tolist()
        assert all((math.isnan(a) and math.isnan(b)) or a == b for a, (b, _) in zip(got, want))


@requires_kernel
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN codes, on purpose
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("dtype, kc, k, splits", [(torch.bfloat16, 300, 32, 1), (torch.float16, 1000, 1, 1),
                                                  (torch.bfloat16, 4099, 5, 17)], ids=["bf16", "fp16", "bf16-split"])
def test_packed_selection_is_exact_on_integer_scores(metric, dtype, kc, k, splits):
    """PACKED keeps 23 - log2(BLOCK_N) mantissa bits of each key. Scores of small integers
    need fewer, so they come out exact: indices must equal a stable float64 sort's (ties, of
    which there are many, to the lower index) and scores the brute force's, bit for bit.
    Non-finite scores (a NaN query row, NaN codes, a code with an infinite entry giving +-inf
    and NaN) rank exactly as in the float selection."""
    gen = torch.Generator().manual_seed(kc + k)
    x = torch.randint(-3, 4, (70, 48), generator=gen).to(dtype)
    c = torch.randint(-3, 4, (kc, 48), generator=gen).to(dtype)

    def search(x, c, config):
        out = (torch.full((70, k), math.nan, device=DEVICE), torch.full((70, k), -7, dtype=torch.int64, device=DEVICE))
        got = kernel.codebook_topk_forward(x.to(DEVICE), c.to(DEVICE), k, metric, splits=splits, out=out,
                                           config=config)
        assert got[0] is out[0] and not (got[1] == -7).any()
        return got[0].cpu(), got[1].cpu()

    scores, idx = search(x, c, dict(PACKED=True))
    full = codebook_scores(x.double(), c.double(), metric)  # exact: integers
    order = torch.sort(-full if metric == "l2" else full, dim=1, descending=True, stable=True)
    assert torch.equal(idx, order.indices[:, :k])
    assert torch.equal(scores.double(), full.gather(1, order.indices[:, :k]))

    # NaN of either sign (the sign bit orders them as integers), infinite scores of either sign
    x[5, 0], c[7, 3], c[9, 0], c[11, 0] = math.nan, math.inf, math.nan, -math.nan
    packed, plain = search(x, c, dict(PACKED=True)), search(x, c, None)
    assert torch.equal(packed[1], plain[1])
    torch.testing.assert_close(packed[0], plain[0], rtol=0, atol=0, equal_nan=True)
    assert packed[0][5].isnan().all() and ((packed[1] >= 0) & (packed[1] < kc)).all()


@requires_kernel
def test_packed_selection_rounds_scores_toward_zero():
    """On random scores PACKED returns the same indices where keys are separated by more than
    its precision, and scores rounded toward zero to 23 - log2(BLOCK_N) mantissa bits."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(197, 48, generator=gen).to(DEVICE, torch.bfloat16)
    c = torch.randn(1000, 48, generator=gen).to(DEVICE, torch.bfloat16)
    for metric in ("l2", "ip"):
        config = dict(PACKED=True)
        scores, idx = kernel.codebook_topk_forward(x, c, 8, metric, config=config)
        plain, plain_idx = kernel.codebook_topk_forward(x, c, 8, metric)
        block_n = {**kernel._default_config(48, 8, torch.bfloat16), **config}["BLOCK_N"]
        step = 2.0 ** -(23 - (block_n.bit_length() - 1))
        assert (scores.abs() <= plain.abs()).all() and ((plain - scores).abs() <= step * plain.abs()).all()
        check_topk(scores, idx, x.float(), c.float(), 8, metric, 2 * step)


# ============================================================================================
# host-side launch logic that only a GPU run would otherwise reach
# ============================================================================================


def _launch(batch):
    x, c = torch.randn(40 * batch, 20), torch.randn(40, 20)
    scores, idx = kernel.codebook_topk_forward(x, c, 4, "l2", splits=3)
    kernel.codebook_topk_backward(torch.randn_like(scores), x, c, idx, "l2")
    kernel.codebook_topk_backward(torch.randn_like(scores), x, c, idx, "l2", deterministic=True)


@requires_kernel
def test_grids_grow_with_the_batch_only_along_axis_0(monkeypatch):
    assert_grids_grow_only_along_axis_0(monkeypatch, _launch)


@requires_kernel
def test_splits_with_no_rows_or_a_full_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132))
    cuda = torch.device("cuda")
    assert kernel._splits(0, 8192, 64, 128, cuda) == 1  # an empty search: no division by zero row blocks
    assert kernel._splits(1024, 8192, 64, 128, cuda) == 16  # 16 row blocks x 16 ranges: 2 programs per SM
    assert kernel._splits(256, 8192, 64, 128, cuda) == 64  # at most one range per code tile
    assert kernel._splits(65536, 8192, 64, 128, cuda) == 1
