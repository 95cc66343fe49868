"""Truncated SVD of a sum of low-rank products, without forming it when it is thin.

FlexLoRA's server step needs the SVD of ``ΔW = Σ_i w_i·B_i·A_i`` (m, n). With the client
factors stacked, ``ΔW = Bs·As`` where ``Bs = [w_1 B_1 … w_K B_K]`` is (m, R) and
``As = [A_1; …; A_K]`` is (R, n), ``R = Σ r_i``. When ``R < min(m, n)``:

    Bs = Qb·Rb,  Asᵀ = Qa·Ra          (thin QR, O((m + n)·R²))
    ΔW = Qb·(Rb·Raᵀ)·Qaᵀ              (core is R×R)
    Rb·Raᵀ = Uc·diag(S)·Vcᵀ           (O(R³))
    ΔW = (Qb·Uc)·diag(S)·(Vcᵀ·Qaᵀ)    an exact thin SVD of ΔW

which never materialises the m×n matrix. :func:`gram_svd` gets the same triplets faster, and
only the top ``k`` of them: the R×R Grams ``BsᵀBs`` and ``As·Asᵀ`` (float32 when that is
accurate enough, else float64) give Rb and Ra by Cholesky, the top k eigenpairs of
core·coreᵀ give the core's top triplets, and only ``k`` columns of U and rows of Vh are
formed (two (m, R)·(R, k) products instead of two Householder QRs with their explicit Q).
Otherwise ΔW is formed (streaming over clients) and decomposed densely: its top ``k`` only
from its Gram on the smaller side (:func:`dense_top_svd`), or every triplet, or approximately
with ``torch.svd_lowrank``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from flexlora.lora.products import gram, squared_norm, upper_product
from flexlora.lora.topk import top_core, top_core_eig

__all__ = [
    "SVD",
    "CutSVD",
    "canonical_signs",
    "dense_cut_svd",
    "dense_svd",
    "dense_top_svd",
    "factored_svd",
    "gram",
    "gram_cut_svd",
    "gram_svd",
    "householder_cut_svd",
    "householder_svd",
    "low_rank_sum_svd",
    "randomized_svd",
]

#: gram_svd falls back to Householder QR when the equilibrated Cholesky factor's diagonal
#: spans more than this ratio (cond above ~1e4: the float64 Gram would lose digits a float32
#: result needs)
GRAM_MAX_COND = 1e4

#: float32 Grams are used only below this ratio (their rounding grows with its square), and
#: only if the U_k and Vh_k they give are orthonormal to FAST_ORTHO_TOL
FAST_GRAM_MAX_COND = 30.0
FAST_ORTHO_TOL = 2e-6

SVD_METHODS = ("auto", "factored", "dense", "randomized")

#: dense_cut_svd takes the top-k route (:func:`dense_top_svd`) when k is at most min(m, n)
#: over this, the full SVD otherwise
DENSE_TOP_RATIO = 4


class SVD(NamedTuple):
    U: Tensor  # (m, k)
    S: Tensor  # (k,)
    Vh: Tensor  # (k, n)


class CutSVD(NamedTuple):
    """The top triplets of a product and the whole product's ‖·‖²_F (a float64 sum): what a
    cut leaves out is ``energy − Σ S²``, known without the triplets it did not form."""

    svd: SVD
    energy: float


def canonical_signs(U: Tensor, S: Tensor, Vh: Tensor) -> SVD:
    """The same triplets with each one's sign fixed: the largest-magnitude entry of U's column
    (the first one on a tie) is positive; Vh's row flips with it, so U·diag(S)·Vh is unchanged.

    An SVD is unique only up to a sign per triplet, and each algorithm (Householder QR, the
    Gram route, a dense or randomized SVD) picks its own; with this rule every path hands a
    client the same factors, so results do not depend on ``federation.svd`` or ``keep_rank``.
    U and Vh are flipped in place (the caller owns them): no (m, k) or (k, n) temporary.
    """
    if U.numel() == 0:
        return SVD(U, S, Vh)
    top, bottom = U.amax(dim=0), U.amin(dim=0)  # (k,) each; 6x faster than max() with indices
    negative = -bottom > top  # (k,)
    tied = ((-bottom == top) & (top > 0)).nonzero().flatten()  # rare: first occurrence decides
    if tied.numel():
        cols = U[:, tied]  # (m, t)
        first_top = (cols == top[tied]).int().argmax(dim=0)  # (t,) first index of each
        first_bottom = (cols == bottom[tied]).int().argmax(dim=0)
        negative[tied] = first_bottom < first_top
    sign = torch.where(negative, -1.0, 1.0).to(U.dtype)  # (k,)
    U.mul_(sign)
    Vh.mul_(sign.unsqueeze(1))
    return SVD(U, S, Vh)


def factored_svd(B: Tensor, A: Tensor) -> SVD:
    """Exact thin SVD of ``B·A`` from QR of both factors; ``B: (m, R)``, ``A: (R, n)``."""
    Qb, Rb = torch.linalg.qr(B)  # (m, p), (p, R) with p = min(m, R)
    Qa, Ra = torch.linalg.qr(A.T)  # (n, q), (q, R) with q = min(n, R)
    core = Rb @ Ra.T  # (p, q)
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)  # (p, k), (k,), (k, q)
    U = Qb @ Uc  # (m, k)
    Vh = Vhc @ Qa.T  # (k, n)
    return SVD(U, S, Vh)


def _gram_factor(X: Tensor, fast: bool = False) -> Tensor | None:
    """Upper-triangular Rx with XᵀX = RxᵀRx by Cholesky of the Gram; None if ill-conditioned.

    The Gram and its Cholesky factor are formed in float64 (products of float32 entries are
    exact), or with ``fast`` in X's own float32, 2-3x cheaper: a dot product's rounding is
    relative to its columns' norms, so the loss is governed by the condition of the
    column-equilibrated X, which the Cholesky factor of the equilibrated Gram bounds from
    below; ``fast`` accepts only FAST_GRAM_MAX_COND (the caller also checks the result's
    orthonormality). Rx is in the Gram's precision.
    """
    G = gram(X) if fast else gram(X.double())  # (R, R)
    scale = torch.diagonal(G).sqrt()  # (R,) column norms
    if not bool((scale > 0).all()):
        return None
    # Cholesky commutes with the column equilibration D = diag(scale): chol(G) = D·chol(D⁻¹GD⁻¹)
    # (its rounding errors scale with D too), so the equilibrated factor's diagonal is read off
    # without forming the equilibrated Gram
    L, info = torch.linalg.cholesky_ex(G)  # (R, R) lower
    if int(info) != 0:
        return None
    d = torch.diagonal(L).abs() / scale  # the equilibrated factor's diagonal
    limit = FAST_GRAM_MAX_COND if fast else GRAM_MAX_COND
    if not bool(d.min() * limit > d.max()):
        return None
    return L.T  # (R, R) upper: XᵀX = LLᵀ


def _orthonormal(X: Tensor, tol: float) -> bool:
    """Whether the columns of X (rows, k) are orthonormal to ``tol`` (max |XᵀX − I|)."""
    G = gram(X)  # (k, k)
    G.diagonal().sub_(1.0)
    return bool(G.abs().max() <= tol)


def gram_svd(B: Tensor, A: Tensor, k: int | None = None) -> SVD:
    """The top ``k`` (default all R) triplets of the thin SVD of ``B·A``; ``B: (m, R)``,
    ``A: (R, n)``, R < min(m, n). :func:`gram_cut_svd` without the energy."""
    return gram_cut_svd(B, A, k).svd


def gram_cut_svd(B: Tensor, A: Tensor, k: int | None = None) -> CutSVD:
    """The top ``k`` (default all R) triplets of the thin SVD of ``B·A`` and its ‖B·A‖²_F;
    ``B: (m, R)``, ``A: (R, n)``, R < min(m, n).

    Rb, Ra are Cholesky factors of the Grams BᵀB and AAᵀ, so B = Qb·Rb and Aᵀ = Qa·Ra with
    Qb = B·Rb⁻¹ never formed: core = Rb·Raᵀ = Uc·S·Vcᵀ (R×R) and U_k = B·(Rb⁻¹·Uc[:, :k]),
    Vh_k = (Ra⁻¹·Vc[:, :k])ᵀ·A. The cost is two Gram products (from their upper row blocks,
    :func:`~flexlora.lora.products.gram`), the core's top k triplets
    (:func:`~flexlora.lora.topk.top_core`) and two (·, R)·(R, k) products. Float32 input
    first tries float32 Grams (well-conditioned stacks, and U_k, Vh_k orthonormal to
    FAST_ORTHO_TOL, else redone), then float64 Grams; it falls back to
    :func:`householder_svd` (Householder QR) when either stack is rank-deficient or too
    ill-conditioned for the Gram route (see GRAM_MAX_COND). Holds the two Grams and the R×R
    core besides the inputs and the result.
    """
    R = B.shape[1]
    k = R if k is None else min(k, R)
    tries = (True, False) if B.dtype == torch.float32 and A.dtype == torch.float32 else (False,)
    for fast in tries:
        Rb = _gram_factor(B, fast)
        Ra = _gram_factor(A.T, fast) if Rb is not None else None
        if Rb is None or Ra is None:
            continue
        # (R, R) float64; with float32 Grams from a float32 product, 2.5x faster: its rounding,
        # relative to |Rb|·|Ra|, is that of the float32 inputs themselves
        core = upper_product(Rb, Ra).double()
        Uc, S, Vc = top_core(core, k, fast)  # (R, k), (k,), (R, k)
        energy = squared_norm(core)  # ‖B·A‖²_F = ‖core‖²_F: Qb, Qa are orthonormal
        left = torch.linalg.solve_triangular(Rb.double(), Uc, upper=True)  # (R, k)
        right = torch.linalg.solve_triangular(Ra.double(), Vc, upper=True)  # (R, k)
        U = B @ left.to(B.dtype)  # (m, k)
        Vh = right.T.to(A.dtype) @ A  # (k, n), row-major as the state keeps it
        if fast and not (_orthonormal(U, FAST_ORTHO_TOL) and _orthonormal(Vh.T, FAST_ORTHO_TOL)):
            continue
        return CutSVD(SVD(U, S.to(B.dtype), Vh), energy)
    return householder_cut_svd(B, A, k)


def householder_svd(B: Tensor, A: Tensor, k: int) -> SVD:
    """:func:`householder_cut_svd` without the energy."""
    return householder_cut_svd(B, A, k).svd


def householder_cut_svd(B: Tensor, A: Tensor, k: int) -> CutSVD:
    """The top ``k`` triplets of ``B·A`` and its ‖B·A‖²_F, from Householder QR of both stacks:
    exact for any conditioning (rank-deficient stacks too: clients that start a round from the
    same global factors send nearly collinear ones); ``B: (m, R)``, ``A: (R, n)``, R ≤ min(m, n).

    ``geqrf`` keeps each Q as its reflectors: core = Rb·Raᵀ (R×R), its top k triplets as in
    :func:`gram_svd`, and ``ormqr`` applies Qb and Qa to those k columns only; forming both
    Q explicitly, the full core SVD and two (·, R)·(R, R) products (:func:`factored_svd`)
    took 2x the time for R = 800. Holds the two reflector blocks (copies of the stacks).
    """
    R = B.shape[1]
    hb, tb = torch.geqrf(B)  # (m, R) reflectors below the diagonal, Rb on and above it; (R,)
    ha, ta = torch.geqrf(A.T)  # (n, R), (R,)
    Rb, Ra = hb[:R].triu(), ha[:R].triu()  # (R, R) upper
    core = (Rb @ Ra.T).double()  # in the stacks' precision: its rounding is theirs
    Uc, S, Vc = top_core(core, k, B.dtype == torch.float32)  # (R, k), (k,), (R, k)
    energy = squared_norm(core)  # ‖B·A‖²_F
    Uk = torch.zeros(B.shape[0], Uc.shape[1], dtype=B.dtype, device=B.device)  # (m, k)
    Uk[:R] = Uc.to(B.dtype)
    Vk = torch.zeros(A.shape[1], Vc.shape[1], dtype=A.dtype, device=A.device)  # (n, k)
    Vk[:R] = Vc.to(A.dtype)
    U = torch.ormqr(hb, tb, Uk)  # (m, k) = Qb·[Uc; 0]
    V = torch.ormqr(ha, ta, Vk)  # (n, k) = Qa·[Vc; 0]
    return CutSVD(SVD(U, S.to(B.dtype), V.T), energy)


def dense_svd(delta: Tensor) -> SVD:
    """Thin SVD of a formed matrix (m, n)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # (m, k), (k,), (k, n)
    return SVD(U, S, Vh)


def dense_top_svd(delta: Tensor, k: int) -> SVD:
    """The top ``k`` triplets of a formed float32 matrix (m, n), exact to float32, without its
    full SVD: the top k eigenpairs of its Gram on the smaller side
    (:func:`~flexlora.lora.topk.top_core_eig`: a float32 eigensolver refined in float64, else
    a float64 one); where that declines, or for float64 input, :func:`dense_svd`.

    For k ≪ min(m, n), as FlexLoRA's capped state is once a round's stacks outgrow the dense
    sum. Holds the (min, min) Gram with its eigensolver's copy and (max, k + 32) blocks besides
    the result (a float64 copy of ``delta`` only where the float32 eigensolver is refused).
    """
    m, n = delta.shape
    found = None
    if delta.dtype == torch.float32 and k < min(m, n):  # float64 input: the full SVD's digits
        found = top_core_eig(delta if m <= n else delta.T, k, fast=True)  # (small, large)
    if found is None:
        U, S, Vh = dense_svd(delta)
        return SVD(U[:, :k], S[:k], Vh[:k])
    Uc, S, Vc = found  # (small, k), (k,), (large, k)
    U, V = (Uc, Vc) if m <= n else (Vc, Uc)
    dtype = delta.dtype
    return SVD(U.to(dtype).contiguous(), S.to(dtype), V.T.to(dtype).contiguous())


def dense_cut_svd(delta: Tensor, k: int | None) -> CutSVD:
    """The top ``k`` (``None``: every) triplets of a formed matrix (m, n) and its ‖·‖²_F.

    For a capped state (FlexLoRA's dense sum, DP's noised one): only the kept triplets, from
    the Gram (:func:`dense_top_svd`), when DENSE_TOP_RATIO·k ≤ min(m, n), several times
    cheaper than the full SVD, which is taken otherwise. Holds what those hold.
    """
    m, n = delta.shape
    if k is not None and DENSE_TOP_RATIO * k <= min(m, n):
        return CutSVD(dense_top_svd(delta, k), squared_norm(delta))
    U, S, Vh = dense_svd(delta)  # (m, p), (p,), (p, n), p = min(m, n)
    whole = float(S.double().square().sum())
    if k is not None:
        U, S, Vh = U[:, :k], S[:k], Vh[:k]
    return CutSVD(SVD(U, S, Vh), whole)


def randomized_svd(delta: Tensor, rank: int, niter: int = 4, oversample: int = 10) -> SVD:
    """Approximate top-``rank`` SVD of a formed matrix with ``torch.svd_lowrank``."""
    m, n = delta.shape
    q = min(rank + oversample, m, n)
    U, S, V = torch.svd_lowrank(delta, q=q, niter=niter)  # (m, q), (q,), (n, q)
    k = min(rank, q)
    return SVD(U[:, :k].contiguous(), S[:k].contiguous(), V[:, :k].T.contiguous())


def low_rank_sum_svd(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    weights: Sequence[float],
    *,
    method: str = "auto",
    dtype: torch.dtype = torch.float32,
    randomized_rank: int | None = None,
    niter: int = 4,
) -> SVD:
    """SVD of ``Σ_i weights[i]·Bs[i]·As[i]``.

    ``auto`` uses the factored path when ``R = Σ r_i < min(m, n)`` and a dense SVD otherwise;
    ``factored`` and ``dense`` force a path; ``randomized`` forms ΔW and keeps the top
    ``randomized_rank`` triplets (approximate).
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd method must be one of {SVD_METHODS}, got {method!r}")
    if not Bs or len(Bs) != len(As) or len(Bs) != len(weights):
        raise ValueError("need the same positive number of B factors, A factors and weights")
    m = Bs[0].shape[0]
    n = As[0].shape[1]
    total_rank = sum(int(a.shape[0]) for a in As)
    if method == "auto":
        method = "factored" if total_rank < min(m, n) else "dense"
    if method == "factored":
        B = torch.cat([w * b.to(dtype) for w, b in zip(weights, Bs, strict=True)], dim=1)  # (m, R)
        A = torch.cat([a.to(dtype) for a in As], dim=0)  # (R, n)
        return factored_svd(B, A)
    delta = torch.zeros(m, n, dtype=dtype)  # (m, n), a running sum: one client at a time
    for w, b, a in zip(weights, Bs, As, strict=True):
        delta.addmm_(b.to(dtype), a.to(dtype), alpha=float(w))
    if method == "dense":
        return dense_svd(delta)
    rank = randomized_rank if randomized_rank is not None else min(total_rank, m, n)
    return randomized_svd(delta, rank, niter=niter)
