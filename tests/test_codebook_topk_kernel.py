"""The Triton codebook search (interpreter on CPU, the GPU when there is one) against a
float64 brute force: the issue's shape grid, split-K merging, outputs poisoned before the
call, ties, NaN rows, and the deterministic backward. tests/test_ops.py runs the op-level
suite on this backend too."""

import itertools
import math

import pytest
import torch

kernel = pytest.importorskip("pacofr.kernels.codebook_topk")
from pacofr.ops import backends  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in backends("codebook_topk"), reason="Triton cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _brute(x, c, metric):
    x64, c64 = x.double(), c.double()
    return torch.cdist(x64, c64) ** 2 if metric == "l2" else x64 @ c64.T


def _check(x, c, k, metric, scores, idx, rtol):
    full = _brute(x.cpu(), c.cpu(), metric)
    key = -full if metric == "l2" else full
    order = torch.sort(key, dim=1, descending=True, stable=True)
    ref_s = full.gather(1, order.indices[:, :k])
    scale = (x.double().cpu() ** 2).sum(1, keepdim=True) + (c.double().cpu() ** 2).sum(1).max()
    assert ((scores.double().cpu() - ref_s).abs() <= rtol * scale + 1e-6).all(), "scores"
    # indices must match where the score is separated from its neighbours by more than rounding
    sorted_key = order.values
    gap_prev = torch.cat([torch.full_like(sorted_key[:, :1], math.inf), sorted_key[:, :-1] - sorted_key[:, 1:]], 1)
    gap_next = torch.cat([sorted_key[:, :-1] - sorted_key[:, 1:], torch.full_like(sorted_key[:, :1], math.inf)], 1)
    clear = (torch.minimum(gap_prev, gap_next)[:, :k] > 4 * rtol * scale)
    assert torch.equal(idx.cpu()[clear], order.indices[:, :k][clear]), "indices"
    assert ((idx >= 0) & (idx < c.shape[0])).all()


AXES = dict(n=[1, 7, 197, 1000], kc=[1, 5, 1000, 4099], d=[3, 48, 768], k=[1, 4, 5, 32])


def _grid():
    """Every value of every axis at least twice, k <= K, without the slowest corners."""
    cases = []
    for n, kc, d, k in itertools.product(*AXES.values()):
        if k <= kc and n * kc * d <= 197 * 4099 * 48 and n * kc * k <= 1_000_000 and (n + kc + d + k) % 4 == 0:
            cases.append((n, kc, d, k))
    return cases


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
    _check(x.float(), c.float(), k, metric, scores, idx, rtol=1e-5 if dtype == torch.float32 else 1e-3)


def test_axes_are_covered():
    cases = _grid()
    for pos, values in enumerate(AXES.values()):
        assert {case[pos] for case in cases} == set(values)


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


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_many_equal_codes_tie_to_lower_index(metric):
    # small integers: every score is exact in fp32, so equal codes really tie
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (7, 16), generator=gen).float()
    c = base.repeat(300, 1).to(DEVICE)  # code j equals code j + 7m
    x = torch.randint(-3, 4, (50, 16), generator=gen).float().to(DEVICE)
    scores, idx = kernel.codebook_topk_forward(x, c, 32, metric)
    full = _brute(x.cpu(), c.cpu(), metric)
    expected = torch.sort(-full if metric == "l2" else full, dim=1, descending=True, stable=True).indices[:, :32]
    assert torch.equal(idx.cpu(), expected)


def test_nan_row_gives_nan_scores_and_valid_indices():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 8, generator=gen)
    x[4, 3] = math.nan
    c = torch.randn(300, 8, generator=gen)
    for metric in ("l2", "ip"):
        scores, idx = kernel.codebook_topk_forward(x.to(DEVICE), c.to(DEVICE), 5, metric)
        assert scores[4].isnan().all() and ((idx[4] >= 0) & (idx[4] < 300)).all()
        keep = torch.arange(9) != 4
        _check(x[keep], c, 5, metric, scores[keep.to(DEVICE)], idx[keep.to(DEVICE)], rtol=1e-5)


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
    sel = c64[idx.cpu()]
    s = ((x64[:, None] - sel) ** 2).sum(-1) if metric == "l2" else (x64[:, None] * sel).sum(-1)
    gx_ref, gc_ref = torch.autograd.grad((s * g.double().cpu()).sum(), (x64, c64))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    runs = [kernel.codebook_topk_backward(g, x, c, idx, metric, deterministic=True) for _ in range(2)]
    atomic = kernel.codebook_topk_backward(g, x, c, idx, metric, deterministic=False)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])  # bitwise
    for gx, gc in (runs[0], atomic):
        assert gx.dtype == dtype and gc.dtype == dtype
        assert (gx.double().cpu() - gx_ref).abs().max() <= tol * gx_ref.abs().max()
        assert (gc.double().cpu() - gc_ref).abs().max() <= tol * gc_ref.abs().max()


def test_model_uses_the_kernel_for_both_searches(monkeypatch, faces64):
    from pacofr.config import load_config
    from pacofr.model import PaCoFR

    calls = []
    real = kernel.codebook_topk_forward

    def spy(x, codebook, k, metric, **kw):
        calls.append(metric)
        return real(x, codebook, k, metric, **kw)

    monkeypatch.setattr(kernel, "codebook_topk_forward", spy)
    monkeypatch.setenv("PACOFR_OPS", "triton")
    torch.manual_seed(0)
    model = PaCoFR(load_config("tiny")).to(DEVICE)
    out = model(faces64[:2].to(DEVICE), generator=torch.Generator(DEVICE).manual_seed(0))
    out["loss"].backward()
    assert "ip" in calls and "l2" in calls  # belief candidates and nearest codes
    assert torch.isfinite(out["loss"]) and model.belief.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("config", kernel.SWEEP, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_every_swept_launch_configuration_is_correct(config):
    """The alternatives gpu_report.py times: other tile shapes change how tiles are merged,
    not the result (against the float64 brute force, both metrics, poisoned outputs)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(197, 48, generator=gen).to(DEVICE, torch.bfloat16)
    c = torch.randn(1000, 48, generator=gen).to(DEVICE, torch.bfloat16)
    for metric in ("l2", "ip"):
        out = (torch.full((197, 8), math.nan, device=DEVICE), torch.full((197, 8), -7, dtype=torch.int64, device=DEVICE))
        scores, idx = kernel.codebook_topk_forward(x, c, 8, metric, out=out, config=config)
        _check(x.float(), c.float(), 8, metric, scores, idx, rtol=2e-4)


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
    x64, c64 = x.double(), c.double()
    full = x64 @ c64.T  # exact: integers
    if metric == "l2":
        full = (x64**2).sum(1, keepdim=True) - 2 * full + (c64**2).sum(1)
    order = torch.sort(-full if metric == "l2" else full, dim=1, descending=True, stable=True)
    assert torch.equal(idx, order.indices[:, :k])
    assert torch.equal(scores.double(), full.gather(1, order.indices[:, :k]))

    # NaN of either sign (the sign bit orders them as integers), infinite scores of either sign
    x[5, 0], c[7, 3], c[9, 0], c[11, 0] = math.nan, math.inf, math.nan, -math.nan
    packed, plain = search(x, c, dict(PACKED=True)), search(x, c, None)
    assert torch.equal(packed[1], plain[1])
    torch.testing.assert_close(packed[0], plain[0], rtol=0, atol=0, equal_nan=True)
    assert packed[0][5].isnan().all() and ((packed[1] >= 0) & (packed[1] < kc)).all()


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
        _check(x.float(), c.float(), 8, metric, scores, idx, rtol=2 * step)
