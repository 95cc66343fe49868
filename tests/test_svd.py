"""The SVD helpers of the server step against numpy's SVD of the formed matrix.

Singular vectors are defined only up to sign (and rotation inside repeated singular values),
so results are compared as reconstructed truncations ``U[:, :k]·diag(S[:k])·Vh[:k]``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.lora.svd import dense_svd, factored_svd, gram_svd, low_rank_sum_svd, randomized_svd
from flexlora.lora.topk import EVR_MIN, FAST_EIG_MIN, refined_core, top_core

# In float32 a rank-k truncation is only well defined to ~eps·σ1/(σk − σk+1) (Davis–Kahan);
# compare truncations only where the spectral gap makes 1e-4 a fair demand.
F32_MIN_GAP = 1e-2


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


def truncate(U: np.ndarray, S: np.ndarray, Vh: np.ndarray, k: int) -> np.ndarray:
    return (U[:, :k] * S[:k]) @ Vh[:k]  # (m, n)


def reference(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(M, full_matrices=False)


def random_stack(
    m: int, n: int, ranks: list[int], seed: int
) -> tuple[list, list, list, np.ndarray]:
    """Client factors, weights and their weighted sum formed term by term in float64."""
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(m, r, generator=g, dtype=torch.float64) for r in ranks]
    As = [torch.randn(r, n, generator=g, dtype=torch.float64) for r in ranks]
    weights = (torch.rand(len(ranks), generator=g, dtype=torch.float64) + 0.1).tolist()
    M = np.zeros((m, n))
    for w, B, A in zip(weights, Bs, As, strict=True):
        for j in range(A.shape[0]):
            M += w * np.outer(B[:, j].numpy(), A[j].numpy())
    return Bs, As, weights, M


shapes = st.tuples(
    st.integers(1, 24),
    st.integers(1, 24),
    st.lists(st.integers(1, 8), min_size=1, max_size=4),
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_factored_equals_dense_truncation_float64(case) -> None:
    m, n, ranks, seed = case
    Bs, As, weights, M = random_stack(m, n, ranks, seed)
    B = torch.cat([w * b for w, b in zip(weights, Bs, strict=True)], dim=1)  # (m, R)
    A = torch.cat(As, dim=0)  # (R, n)
    U, S, Vh = (t.numpy() for t in factored_svd(B, A))
    Ur, Sr, Vhr = reference(M)
    k_max = min(m, n, sum(ranks))
    assert S.shape[0] == k_max
    np.testing.assert_allclose(S, Sr[:k_max], rtol=1e-9, atol=1e-9 * Sr[0])
    assert np.all(np.diff(S) <= 1e-12 * S[0])  # descending
    np.testing.assert_allclose(U.T @ U, np.eye(k_max), atol=1e-10)
    np.testing.assert_allclose(Vh @ Vh.T, np.eye(k_max), atol=1e-10)
    for k in range(1, k_max + 1):
        if k < len(Sr) and Sr[k - 1] - Sr[k] < 1e-9 * Sr[0]:
            continue  # tied singular values: the truncation itself is not unique
        assert rel_err(truncate(U, S, Vh, k), truncate(Ur, Sr, Vhr, k)) <= 1e-5
    assert rel_err(truncate(U, S, Vh, k_max), M) <= 1e-10  # all components: exactly M


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_factored_and_dense_float32_match_float64_reference(case) -> None:
    m, n, ranks, seed = case
    Bs, As, weights, M = random_stack(m, n, ranks, seed)
    Ur, Sr, Vhr = reference(M)
    for method in ("factored", "dense"):
        out = low_rank_sum_svd(Bs, As, weights, method=method, dtype=torch.float32)
        assert out.U.dtype == torch.float32
        U, S, Vh = (t.double().numpy() for t in out)
        for k in range(1, S.shape[0] + 1):
            gap = Sr[k - 1] - (Sr[k] if k < len(Sr) else 0.0)
            if gap >= F32_MIN_GAP * Sr[0]:
                assert rel_err(truncate(U, S, Vh, k), truncate(Ur, Sr, Vhr, k)) <= 1e-4, (method, k)
        assert rel_err(truncate(U, S, Vh, S.shape[0]), M) <= 1e-5, method


@pytest.mark.parametrize(("m", "n", "ranks"), [(30, 20, [2, 3]), (20, 30, [4, 8, 8]), (9, 9, [3])])
def test_auto_is_factored_below_min_dim_and_dense_above(m: int, n: int, ranks: list[int]) -> None:
    Bs, As, weights, M = random_stack(m, n, ranks, seed=5)
    auto = low_rank_sum_svd(Bs, As, weights, dtype=torch.float64)
    expected = "factored" if sum(ranks) < min(m, n) else "dense"
    forced = low_rank_sum_svd(Bs, As, weights, method=expected, dtype=torch.float64)
    for a, b in zip(auto, forced, strict=True):
        assert torch.equal(a, b)
    assert auto.S.shape[0] == min(sum(ranks), m, n)
    assert rel_err(truncate(*(t.numpy() for t in auto), auto.S.shape[0]), M) <= 1e-10


def test_dense_svd_is_thin() -> None:
    M = torch.randn(7, 4, dtype=torch.float64)
    U, S, Vh = dense_svd(M)
    assert (U.shape, S.shape, Vh.shape) == ((7, 4), (4,), (4, 4))
    torch.testing.assert_close((U * S) @ Vh, M)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randomized_matches_dense_on_a_low_rank_matrix(dtype: torch.dtype) -> None:
    torch.manual_seed(0)  # torch.svd_lowrank draws its sketch from the global generator
    Bs, As, weights, M = random_stack(60, 40, [3, 2, 4], seed=8)  # rank 9
    out = low_rank_sum_svd(Bs, As, weights, method="randomized", dtype=dtype, randomized_rank=9)
    assert out.S.shape[0] == 9
    U, S, Vh = (t.double().numpy() for t in out)
    Ur, Sr, Vhr = reference(M)
    np.testing.assert_allclose(S, Sr[:9], rtol=1e-3)
    for k in (3, 9):
        assert rel_err(truncate(U, S, Vh, k), truncate(Ur, Sr, Vhr, k)) <= 1e-3
    # default rank: everything the clients sent (capped by the shape)
    default = low_rank_sum_svd(Bs, As, weights, method="randomized", dtype=dtype)
    assert default.S.shape[0] == 9
    full = randomized_svd(torch.from_numpy(M), rank=50)
    assert full.S.shape[0] == 40  # q is capped by min(m, n)


def test_low_rank_sum_svd_rejects_bad_calls() -> None:
    B, A = torch.ones(3, 1), torch.ones(1, 3)
    with pytest.raises(ValueError, match="svd method"):
        low_rank_sum_svd([B], [A], [1.0], method="qr")
    with pytest.raises(ValueError, match="same positive number"):
        low_rank_sum_svd([], [], [])
    with pytest.raises(ValueError, match="same positive number"):
        low_rank_sum_svd([B, B], [A], [1.0, 1.0])


def test_factored_svd_of_rank_deficient_factors() -> None:
    """A zero B (PEFT's default init) or a repeated client must not break the QR path."""
    g = torch.Generator().manual_seed(2)
    B1 = torch.randn(12, 3, generator=g, dtype=torch.float64)
    A1 = torch.randn(3, 10, generator=g, dtype=torch.float64)
    B = torch.cat([B1, torch.zeros(12, 2, dtype=torch.float64), B1], dim=1)  # (12, 8), rank 3
    A = torch.cat([A1, torch.randn(2, 10, generator=g, dtype=torch.float64), A1], dim=0)
    U, S, Vh = factored_svd(B, A)
    M = (B @ A).numpy()
    assert rel_err(truncate(U.numpy(), S.numpy(), Vh.numpy(), 3), M) <= 1e-10
    assert float(S[3:].abs().max()) <= 1e-10 * float(S[0])


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 12))
def test_gram_svd_top_k_equals_dense_truncation(case, k: int) -> None:
    """The fast path's top-k triplets: ≤1e-5 relative in float64, ≤1e-4 in float32 (gap ok)."""
    m, n, ranks, seed = case
    R = sum(ranks)
    if min(m, n) <= R:
        return
    Bs, As, weights, M = random_stack(m, n, ranks, seed)
    B = torch.cat([w * b for w, b in zip(weights, Bs, strict=True)], dim=1)  # (m, R)
    A = torch.cat(As, dim=0)  # (R, n)
    U0, S0, Vh0 = reference(M)
    k = min(k, R)
    want = truncate(U0, S0, Vh0, k)
    U, S, Vh = (t.numpy() for t in gram_svd(B, A, k))
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert rel_err(truncate(U, S, Vh, k), want) <= 1e-5
    np.testing.assert_allclose(U.T @ U, np.eye(k), atol=1e-8)  # orthonormal
    gap = (S0[k - 1] - (S0[k] if k < S0.shape[0] else 0.0)) / S0[0]
    if gap >= F32_MIN_GAP:
        U, S, Vh = (t.double().numpy() for t in gram_svd(B.float(), A.float(), k))
        assert rel_err(truncate(U, S, Vh, k), want) <= 1e-4


def test_gram_svd_falls_back_to_qr_on_rank_deficient_stacks() -> None:
    """Two clients sending the same B: BᵀB is singular; the result is still the exact SVD."""
    g = torch.Generator().manual_seed(0)
    B1 = torch.randn(30, 3, generator=g, dtype=torch.float64)
    A = torch.randn(6, 20, generator=g, dtype=torch.float64)
    B = torch.cat([B1, B1], dim=1)  # (30, 6), rank 3
    U, S, Vh = gram_svd(B, A, 4)
    M = (B @ A).numpy()
    U0, S0, Vh0 = reference(M)
    assert rel_err(truncate(U.numpy(), S.numpy(), Vh.numpy(), 3), truncate(U0, S0, Vh0, 3)) <= 1e-10
    assert abs(float(S[3])) <= 1e-10 * float(S[0])


@pytest.mark.parametrize(("decay", "k"), [(1.0, 12), (1e-3, 12), (1e-8, 30)])
def test_top_core_equals_the_core_svd_top_k(decay: float, k: int) -> None:
    """The eigh route and its SVD fallback (a spectrum spanning more than 1e5) agree with the
    SVD's top-k truncation of the core."""
    from flexlora.lora.topk import top_core

    g = torch.Generator().manual_seed(3)
    R = 40
    Q1, _ = torch.linalg.qr(torch.randn(R, R, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(R, R, generator=g, dtype=torch.float64))
    s = torch.logspace(0, math.log10(decay) if decay < 1 else -0.5, R, dtype=torch.float64)
    core = (Q1 * s) @ Q2.T
    Uc, S, Vc = top_core(core, k)
    T = (Uc * S) @ Vc.T
    ref = (Q1[:, :k] * s[:k]) @ Q2[:, :k].T
    assert torch.linalg.norm(T - ref) <= 1e-10 * torch.linalg.norm(ref)
    torch.testing.assert_close(S, s[:k], rtol=1e-10, atol=0)
    torch.testing.assert_close(Uc.T @ Uc, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)


def test_gram_svd_float32_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float32 stacks: well-conditioned ones take the float32 Grams, near-collinear ones (clients
    that started from the same global B) are redone in float64; both match the float64 SVD."""
    import flexlora.lora.svd as svd

    used: list[bool] = []
    real = svd._gram_factor

    def spy(X: torch.Tensor, fast: bool = False) -> torch.Tensor | None:
        out = real(X, fast)
        used.append(fast and out is not None)
        return out

    monkeypatch.setattr(svd, "_gram_factor", spy)
    g = torch.Generator().manual_seed(5)
    m, n, k = 300, 200, 6
    B0 = torch.randn(m, 8, generator=g, dtype=torch.float64)
    A0 = torch.randn(8, n, generator=g, dtype=torch.float64)
    for spread, fast_expected in ((1.0, True), (1e-3, False)):
        Bs = [B0 + spread * torch.randn(m, 8, generator=g, dtype=torch.float64) for _ in range(4)]
        As = [A0 + spread * torch.randn(8, n, generator=g, dtype=torch.float64) for _ in range(4)]
        B = torch.cat([(i + 1.0) * b for i, b in enumerate(Bs)], dim=1)  # (m, 32), scaled columns
        A = torch.cat(As, dim=0)  # (32, n)
        U0, S0, Vh0 = reference((B @ A).numpy())
        used.clear()
        U, S, Vh = (t.double().numpy() for t in gram_svd(B.float(), A.float(), k))
        assert (used[0] if used else False) == fast_expected
        assert rel_err(truncate(U, S, Vh, k), truncate(U0, S0, Vh0, k)) <= 1e-5


@pytest.mark.parametrize("k", [1, 7, 39])
def test_top_eigh_equals_the_full_eigendecomposition(k: int) -> None:
    """The subset eigensolver's k largest eigenpairs are the full decomposition's, descending."""
    from flexlora.lora.topk import top_eigh

    g = torch.Generator().manual_seed(11)
    X = torch.randn(40, 40, generator=g, dtype=torch.float64)
    M = X @ X.T  # (40, 40) symmetric positive definite, distinct eigenvalues
    lam, Q = top_eigh(M, k)
    lam_all, Q_all = torch.linalg.eigh(M)  # ascending
    torch.testing.assert_close(lam, lam_all.flip(0)[:k], rtol=1e-12, atol=0)
    # eigenvectors up to sign: |<q_i, q_i'>| = 1
    overlap = (Q * Q_all.flip(1)[:, :k]).sum(0).abs()
    torch.testing.assert_close(overlap, torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-10)
    assert lam.shape == (k,) and Q.shape == (40, k)


def test_top_eigh_without_scipy_takes_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without SciPy (a bare source tree) the same eigenpairs come from torch.linalg.eigh."""
    import flexlora.lora.topk as topk

    g = torch.Generator().manual_seed(12)
    X = torch.randn(30, 30, generator=g, dtype=torch.float64)
    M = X @ X.T
    lam, Q = topk.top_eigh(M, 5)
    monkeypatch.setattr(topk, "_HAVE_SCIPY", False)
    lam_t, Q_t = topk.top_eigh(M, 5)
    torch.testing.assert_close(lam_t, lam, rtol=1e-12, atol=0)
    torch.testing.assert_close((Q * Q_t).sum(0).abs(), torch.ones(5, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 30),
    st.integers(1, 12),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_gram_from_the_upper_blocks_equals_the_full_product(
    R: int, rows: int, block: int, dtype: torch.dtype
) -> None:
    """gram's row blocks (upper triangle computed, lower copied) give exactly XᵀX's entries
    up to the gemm's rounding, for stacks as the server holds them (a column-major view of a
    row-major (R, rows) buffer) and for contiguous ones."""
    import flexlora.lora.products as products

    g = torch.Generator().manual_seed(R * 1000 + rows * 10 + block)
    stack = torch.randn(R, rows, generator=g, dtype=dtype)  # (R, rows), as a RowStack holds it
    old = products.GRAM_BLOCK_ROWS
    products.GRAM_BLOCK_ROWS = block  # small blocks, so small shapes reach several blocks
    try:
        for X in (stack.T, stack.T.contiguous()):  # (rows, R)
            G = products.gram(X)
            ref = X.double().T @ X.double()
            assert G.dtype == dtype and G.shape == (R, R)
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(G.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    finally:
        products.GRAM_BLOCK_ROWS = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_sees_every_nan_and_inf_and_no_false_alarm(dtype: torch.dtype) -> None:
    """all_finite is False for one NaN, +Inf or -Inf anywhere (also +Inf and -Inf together,
    whose sum is NaN), True for finite tensors, empty ones and ones whose sum overflows."""
    from flexlora.lora.finite import all_finite

    x = torch.randn(37, 53).to(dtype)
    assert all_finite(x) and all_finite(torch.empty(0, 5, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0), (36, 52), (17, 3)):
            y = x.clone()
            y[where] = bad
            assert not all_finite(y)
    y = x.clone()
    y[1, 1], y[2, 2] = float("inf"), -float("inf")
    assert not all_finite(y)
    huge = torch.full((64, 64), torch.finfo(dtype).max, dtype=dtype)  # finite; its sum is not
    assert all_finite(huge)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 12), st.sampled_from(["none", "duplicate", "near"]))
def test_householder_svd_top_k_equals_dense_truncation(case, k: int, collinear: str) -> None:
    """gram_svd's fallback (reflectors applied to k columns only) gives the dense SVD's top-k
    truncation, orthonormal U and Vh, for independent stacks and for rank-deficient or nearly
    rank-deficient ones (a client repeating another's A rows, as after a shared start)."""
    from flexlora.lora.svd import householder_svd

    m, n, ranks, seed = case
    Bs, As, weights, _ = random_stack(m, n, ranks, seed)
    B = torch.cat([w * b for w, b in zip(weights, Bs, strict=True)], dim=1)  # (m, R)
    A = torch.cat(As, dim=0)  # (R, n)
    R = B.shape[1]
    if min(m, n) < R:
        return
    if collinear != "none" and R >= 2:
        g = torch.Generator().manual_seed(seed)
        half = R // 2
        noise = 0.0 if collinear == "duplicate" else 1e-7
        A[R - half :] = A[:half] + noise * torch.randn(half, n, generator=g, dtype=A.dtype)
    M = (B @ A).numpy()
    U0, S0, Vh0 = reference(M)
    k = min(k, R)
    U, S, Vh = householder_svd(B, A, k)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    scale = max(float(np.linalg.norm(M)), 1e-300)
    err = np.linalg.norm(truncate(U.numpy(), S.numpy(), Vh.numpy(), k) - truncate(U0, S0, Vh0, k))
    gap = (S0[k - 1] - (S0[k] if k < S0.shape[0] else 0.0)) / max(S0[0], 1e-300)
    if gap >= 1e-6:  # a truncation inside a degenerate cluster is not unique
        assert err / scale <= 1e-8
    np.testing.assert_allclose(S.numpy(), S0[:k], rtol=0, atol=1e-10 * max(S0[0], 1e-300))
    np.testing.assert_allclose(U.numpy().T @ U.numpy(), np.eye(k), atol=1e-10)
    np.testing.assert_allclose(Vh.numpy() @ Vh.numpy().T, np.eye(k), atol=1e-10)


def core_with_spectrum(s: torch.Tensor, seed: int) -> torch.Tensor:
    """A square (R, R) float64 core with singular values ``s`` and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    R = s.numel()
    Q1 = torch.linalg.qr(torch.randn(R, R, generator=g, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(R, R, generator=g, dtype=torch.float64))[0]
    return (Q1 * s) @ Q2.T


@pytest.mark.parametrize("R", [FAST_EIG_MIN + 88, EVR_MIN + 40])
def test_refined_core_equals_the_float64_svd(R: int) -> None:
    """Float32 eigenvectors of core·coreᵀ refined by one float64 Rayleigh-Ritz step through the
    core: the top-k singular values to 1e-9·σ1, the core's rank-k part to 1e-5, Uc and Vc
    orthonormal; below and above EVR_MIN (torch's eigensolver, then LAPACK's ssyevr)."""
    k = 120
    s = torch.linspace(1.0, 0.05, R, dtype=torch.float64)
    core = core_with_spectrum(s, 21)
    refined = refined_core(core, k)
    assert refined is not None
    Uc, S, Vc = refined
    U0, S0, Vh0 = torch.linalg.svd(core)
    assert float((S - S0[:k]).abs().max()) <= 1e-9 * float(S0[0])
    ours, ref = (Uc * S) @ Vc.T, (U0[:, :k] * S0[:k]) @ Vh0[:k]
    assert float(torch.linalg.matrix_norm(ours - ref) / torch.linalg.matrix_norm(ref)) <= 1e-5
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(Uc.T @ Uc, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(Vc.T @ Vc, eye, atol=1e-9, rtol=0)
    _, S_top, _ = top_core(core, k, fast=True)  # the same route
    torch.testing.assert_close(S_top, S, rtol=0, atol=0)


def test_refined_core_refuses_a_spectrum_float32_cannot_hold() -> None:
    """σ_k below 1e-2·σ_1: refused, and top_core solves in float64."""
    R, k = FAST_EIG_MIN + 8, 60
    s = torch.linspace(1.0, 0.7, R, dtype=torch.float64)
    s[k - 1 :] *= 1e-3  # σ_k down to 7e-4·σ_1
    core = core_with_spectrum(s, 22)
    assert refined_core(core, k) is None
    _, S, _ = top_core(core, k)
    ref = torch.linalg.svdvals(core)[:k]
    assert float(((S - ref).abs() / ref).max()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lapack_top_eigh_equals_torch_eigh(dtype: torch.dtype) -> None:
    """The ctypes binding of LAPACK's ?syevr: the count largest eigenpairs, ascending, as
    torch's full decomposition gives them, also called from two threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    from flexlora.lora import lapack

    g = torch.Generator().manual_seed(31)
    X = torch.randn(90, 90, generator=g, dtype=torch.float64)
    M = (X @ X.T).to(dtype)  # (90, 90), distinct eigenvalues
    lam_all, Q_all = torch.linalg.eigh(M.double())
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: lapack.top_eigh(M, 17), range(4)))
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    for found in results:
        assert found is not None
        lam, Q = found
        assert lam.dtype == dtype and lam.shape == (17,) and Q.shape == (90, 17)
        torch.testing.assert_close(lam.double(), lam_all[-17:], rtol=tol, atol=0)
        overlap = (Q.double() * Q_all[:, -17:]).sum(0).abs()  # up to sign
        torch.testing.assert_close(overlap, torch.ones(17, dtype=torch.float64), atol=tol, rtol=0)
    assert lapack.top_eigh(M, 0) is None and lapack.top_eigh(M, 91) is None


def test_gram_svd_with_a_large_total_rank_equals_the_dense_truncation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """R = Σ r_i >= FAST_EIG_MIN (the refined float32 eigensolver): the rank-k truncation of
    float32 stacks within 1e-5 of a float64 dense SVD's."""
    import flexlora.lora.topk as topk

    used: list[bool] = []
    inner = topk.refined_core

    def spy(core: torch.Tensor, k: int) -> tuple[torch.Tensor, ...] | None:
        out = inner(core, k)
        used.append(out is not None)
        return out

    monkeypatch.setattr(topk, "refined_core", spy)
    m, n, ranks, k = 900, 700, [300, 160, 80], 100
    g = torch.Generator().manual_seed(23)
    decay = torch.linspace(1.0, 0.2, sum(ranks), dtype=torch.float64)
    B = torch.randn(m, sum(ranks), generator=g, dtype=torch.float64) * decay  # (m, R)
    A = torch.randn(sum(ranks), n, generator=g, dtype=torch.float64)  # (R, n)
    U0, S0, Vh0 = reference((B @ A).numpy())
    U, S, Vh = (t.double().numpy() for t in gram_svd(B.float(), A.float(), k))
    assert used and used[-1]
    assert rel_err(truncate(U, S, Vh, k), truncate(U0, S0, Vh0, k)) <= 1e-5


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 25), st.sampled_from([torch.float32, torch.float64]))
def test_upper_product_equals_the_full_product(R: int, block: int, dtype: torch.dtype) -> None:
    """upper_product skips the zero blocks of two upper-triangular factors: P·Qᵀ exactly, up
    to the gemm's rounding, whatever the number of blocks."""
    import flexlora.lora.products as products

    g = torch.Generator().manual_seed(R * 100 + block)
    P = torch.randn(R, R, generator=g, dtype=dtype).triu()
    Q = torch.randn(R, R, generator=g, dtype=dtype).triu()
    old = products.UPPER_BLOCK
    products.UPPER_BLOCK = block  # small blocks, so small shapes reach several of them
    try:
        out = products.upper_product(P, Q)
    finally:
        products.UPPER_BLOCK = old
    ref = P.double() @ Q.double().T
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert out.dtype == dtype and out.shape == (R, R)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(1, 8), st.integers(0, 2**31 - 1), st.booleans())
def test_canonical_signs_makes_the_first_largest_entry_positive(
    m: int, k: int, seed: int, ties: bool
) -> None:
    """Each column's first entry of largest magnitude ends positive (columns of zeros stay),
    Vh's rows flip with U's columns, and the product is unchanged; with small integer entries
    (many ties between a positive and a negative entry) too."""
    from flexlora.lora.svd import canonical_signs

    g = torch.Generator().manual_seed(seed)
    if ties:
        U = torch.randint(-2, 3, (m, k), generator=g).to(torch.float64)
    else:
        U = torch.randn(m, k, generator=g, dtype=torch.float64)
    Vh = torch.randn(k, 6, generator=g, dtype=torch.float64)
    S = torch.rand(k, generator=g, dtype=torch.float64)
    before = (U * S) @ Vh
    U0 = U.clone()
    Uc, _, Vhc = canonical_signs(U, S, Vh)
    for j in range(k):
        column = U0[:, j].tolist()
        first = max(range(m), key=lambda i: (abs(column[i]), -i))  # first of largest |.|
        flip = -1.0 if column[first] < 0 else 1.0
        assert Uc[:, j].tolist() == [flip * x for x in column]
        assert Uc[first, j] >= 0
    torch.testing.assert_close((Uc * S) @ Vhc, before, rtol=0, atol=0)


def test_refined_core_refuses_a_cut_float32_cannot_resolve() -> None:
    """A cut inside a cluster that reaches past the refinement's wide subspace (σ_{k+1} = … =
    σ_R just below σ_k: float32's eigenvectors there are any basis of the cluster, and the
    refined truncation was 5e-4 to 6e-3 off): the estimated error is beyond
    FAST_EIG_MAX_ERROR, the refinement refuses, and top_core's float64 route gives the SVD's
    truncation; the same spectrum with a decaying tail is accepted."""
    R, k = 720, 100
    s = torch.logspace(0, -6, R, dtype=torch.float64)  # σ_k ≈ 0.15·σ_1
    assert refined_core(core_with_spectrum(s, 40), k) is not None
    s[k:] = s[k - 1] - 9e-6 * s[0]  # the whole tail one value just below the cut
    core = core_with_spectrum(s, 40)
    assert refined_core(core, k) is None
    Uc, S, Vc = top_core(core, k, fast=True)
    U0, S0, Vh0 = torch.linalg.svd(core)
    ref = (U0[:, :k] * S0[:k]) @ Vh0[:k]
    err = torch.linalg.matrix_norm((Uc * S) @ Vc.T - ref) / torch.linalg.matrix_norm(ref)
    assert float(err) <= 1e-8


def test_float64_stacks_never_take_the_float32_eigensolver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 refinement is for float32 results: float64 stacks with R >= FAST_EIG_MIN
    are decomposed in float64 throughout, to float64 accuracy."""
    import flexlora.lora.topk as topk

    calls: list[int] = []
    monkeypatch.setattr(topk, "refined_core", lambda core, k: calls.append(k))
    g = torch.Generator().manual_seed(41)
    m, n, R, k = 900, 800, FAST_EIG_MIN + 40, 60
    B = torch.randn(m, R, generator=g, dtype=torch.float64)
    A = torch.randn(R, n, generator=g, dtype=torch.float64)
    U, S, Vh = (t.numpy() for t in gram_svd(B, A, k))
    assert not calls
    U0, S0, Vh0 = reference((B @ A).numpy())
    assert rel_err(truncate(U, S, Vh, k), truncate(U0, S0, Vh0, k)) <= 1e-10


@pytest.mark.parametrize(
    ("m", "n", "rank", "k"),
    [(40, 30, 30, 5), (30, 70, 25, 6), (700, 560, 560, 40), (560, 900, 300, 64), (50, 40, 3, 8)],
)
def test_dense_top_svd_is_the_dense_truncation(m: int, n: int, rank: int, k: int) -> None:
    """The top k of a formed float32 matrix from its Gram on the smaller side (the refined
    float32 eigensolver from 512 rows, float64 below), both orientations; a matrix of rank
    below k falls back to the full SVD."""
    from flexlora.lora.svd import dense_top_svd

    g = torch.Generator().manual_seed(m + n + k)
    spread = torch.logspace(0, -2, rank, dtype=torch.float64)
    B = torch.randn(m, rank, generator=g, dtype=torch.float64) * spread
    delta = (B @ torch.randn(rank, n, generator=g, dtype=torch.float64)).float()  # (m, n)
    U, S, Vh = dense_top_svd(delta, k)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    Ud, Sd, Vhd = torch.linalg.svd(delta.double(), full_matrices=False)
    best = (Ud[:, :k] * Sd[:k]) @ Vhd[:k]
    ours = (U.double() * S.double()) @ Vh.double()
    assert float(torch.linalg.norm(ours - best) / torch.linalg.norm(best)) <= 1e-5
    torch.testing.assert_close(S.double(), Sd[:k], rtol=1e-5, atol=1e-6 * float(Sd[0]))
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(U.double().T @ U.double(), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh.double() @ Vh.double().T, eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("m", "n", "k"), [(40, 60, 5), (60, 40, 10), (40, 60, 30), (40, 60, None)])
def test_dense_cut_svd_gives_the_truncation_and_the_whole_energy(
    m: int, n: int, k: int | None
) -> None:
    """The capped state of a formed matrix: its top k triplets (from the Gram for a small k,
    from the full SVD otherwise, every triplet for None) and its whole ‖·‖²_F in float64."""
    from flexlora.lora.svd import DENSE_TOP_RATIO, dense_cut_svd

    g = torch.Generator().manual_seed(m * n)
    delta = torch.randn(m, n, generator=g) * torch.logspace(0, -1, n)  # (m, n) float32
    (U, S, Vh), energy = dense_cut_svd(delta, k)
    kept = min(m, n) if k is None else k
    assert U.shape == (m, kept) and S.shape == (kept,) and Vh.shape == (kept, n)
    want = float(delta.double().square().sum())
    assert energy == pytest.approx(want, rel=1e-6)  # the full SVD: Σ S² of float32 S
    Ud, Sd, Vhd = torch.linalg.svd(delta.double(), full_matrices=False)
    best = (Ud[:, :kept] * Sd[:kept]) @ Vhd[:kept]
    ours = (U.double() * S.double()) @ Vh.double()
    assert float(torch.linalg.norm(ours - best) / torch.linalg.norm(best)) <= 1e-5
    if k is not None and DENSE_TOP_RATIO * k <= min(m, n):  # the Gram route: S² < energy
        assert float(S.double().square().sum()) < energy


def test_times64_converts_a_float32_matrix_a_block_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """X·Y in float64 whatever X's dtype, with blocks that do not divide its rows."""
    from flexlora.lora import topk

    monkeypatch.setattr(topk, "TIMES64_BLOCK", 7 * 10)  # 7 rows of 10 a block
    g = torch.Generator().manual_seed(0)
    X = torch.randn(23, 10, generator=g)
    Y = torch.randn(10, 4, generator=g, dtype=torch.float64)
    want = X.double() @ Y
    for x in (X, X.double(), X.T.contiguous().T):
        got = topk.times64(x, Y)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-14)


def test_an_eigensolver_that_does_not_converge_falls_back_to_the_svd() -> None:
    """A float32 matrix with a huge cluster of tiny singular values (550 collinear columns:
    σ_51 = 4e-6, σ_52 = 5e-11 of σ_1 = 6e2) made LAPACK's float32 eigensolver fail to
    converge, which raised out of the server step; the eigen route now declines and the SVD
    gives the truncation, on the dense route and the stacks' Householder route alike."""
    from flexlora.lora.svd import dense_top_svd, householder_svd

    g = torch.Generator().manual_seed(0)
    B = torch.randn(700, 600, generator=g)
    A = torch.randn(600, 900, generator=g) / 30
    B[:, 50:] = B[:, :1]
    hb, _ = torch.geqrf(B)
    ha, _ = torch.geqrf(A.T)
    D = hb[:600].triu() @ ha[:600].triu().T  # (600, 600) float32
    Ur, Sr, Vr = torch.linalg.svd(D.double())
    ref = (Ur[:, :100] * Sr[:100]) @ Vr[:100]
    U, S, Vh = dense_top_svd(D, 100)
    assert float(((U.double() * S.double()) @ Vh.double() - ref).norm() / ref.norm()) <= 1e-5
    Ur, Sr, Vr = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    ref = (Ur[:, :100] * Sr[:100]) @ Vr[:100]
    U, S, Vh = householder_svd(B, A, 100)
    assert float(((U.double() * S.double()) @ Vh.double() - ref).norm() / ref.norm()) <= 1e-5
