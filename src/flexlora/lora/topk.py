"""The top k singular triplets of the server step's R×R core, and the eigensolvers behind them.

:func:`flexlora.lora.svd.gram_svd` reduces ΔW = B·A to a square core (R×R, R = Σ r_i) whose
top k triplets give ΔW's. They come from the top k eigenpairs of core·coreᵀ: several times
cheaper than the core's SVD, and what dominates the server step once R is in the hundreds
(the tridiagonal reduction inside every dense eigensolver is bound by memory traffic). Two
routes, both exact to what a float32 result needs:

- float32 stacks with R ≥ FAST_EIG_MIN (:func:`refined_core`): a float32 eigensolver on
  core·coreᵀ formed in float32 (half the memory traffic), then one float64 Rayleigh-Ritz step
  on its top k + FAST_EIG_OVERSAMPLE eigenvectors done through the core itself (coreᵀ·Q),
  which also gives the right singular vectors; accepted only when the Ritz pairs' residual is
  small and its first-order estimate of the rank-k truncation's error is within
  FAST_EIG_MAX_ERROR (a cut inside a cluster that float32 cannot resolve is refused);
- otherwise (float64 stacks, small R, or a refusal): core·coreᵀ in float64 and a float64
  eigensolver (:func:`top_eigh`).
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import Tensor

from flexlora.lora import lapack
from flexlora.lora.products import gram

__all__ = ["FAST_EIG_MIN", "refined_core", "times64", "top_core", "top_core_eig", "top_eigh"]

_HAVE_SCIPY = (
    importlib.util.find_spec("scipy") is not None
    and importlib.util.find_spec("threadpoolctl") is not None
)

#: top_eigh takes LAPACK's divide and conquer (every eigenvector) up to R = this times k,
#: MRRR for the top k only above it (one thread, two cores: at k = 200, dsyevd 0.007 s against
#: dsyevr's 0.023 s for R = 250, 0.049 against 0.072 s for R = 600, 0.099 against 0.112 s for
#: R = 800; at k = 30 and R = 300 dsyevr is faster, 0.0065 against 0.0087 s)
EVD_MAX_RATIO = 4.0

#: top_core takes refined_core from this R
FAST_EIG_MIN = 512
#: the refinement's extra Ritz vectors beyond k, and what it accepts: the kept pairs' residual
#: block ‖M·X − X·Θ‖_F at most FAST_EIG_RESIDUAL·‖Θ‖_F (the rank-k part of M then moves by about
#: that much, measured: 1.5e-6 for a residual ratio of 1.2e-6 at R = 1,106; a float64
#: eigensolver's is ~1e-15), and θ_k ≥ FAST_EIG_MIN_RATIO·θ_1 (σ_k ≥ 1e-2·σ_1: the squared
#: spectrum's tail keeps its digits in float32)
FAST_EIG_OVERSAMPLE = 32
FAST_EIG_RESIDUAL = 1e-5
FAST_EIG_MIN_RATIO = 1e-4
#: and the rank-k truncation's estimated relative error at most this. The Rayleigh-Ritz step
#: leaves each kept pair's residual r_i orthogonal to the wide subspace Q, so to first order
#: it moves u_i only towards eigenvectors outside Q (eigenvalues ≤ θ_wide): r_i/(θ_i − θ_wide);
#: mixing across the cut inside Q comes from Q's own inexactness, second order:
#: γ²/((θ_{k+1} − θ_wide)(θ_k − θ_{k+1})), γ = the whole block's residual (Davis–Kahan twice,
#: Ritz values for the unknown eigenvalues). Weighted by σ_i against ‖S_k‖ (a mixing angle φ at
#: the cut moves the truncation by ~√2·φ·σ_k). Measured on the LLaMA-7B benchmark's 189
#: refined cores: estimates from 1.2e-6 to 2.7e-4 (median 7.9e-6; three above this bound go
#: to float64) where the true errors checked were 0.5-2.6e-6, 3-10x below their estimates; a
#: cut inside a cluster that reaches past the wide subspace (true errors 5e-4 to 6e-3 there,
#: the Ritz residuals as large as the gap) gives an estimate above 1e3
FAST_EIG_MAX_ERROR = 1e-4
#: the float32 eigensolver is LAPACK's MRRR (ssyevr, the wanted vectors only, GIL released:
#: :mod:`flexlora.lora.lapack`) from this R, torch's divide and conquer below (one thread:
#: ssyevr 67 ms against torch's 93 at R = 800, 39 against 36 at R = 600, 33 against 24 at 448)
EVR_MIN = 700


def _top_vectors32(M: Tensor, count: int) -> Tensor:
    """Eigenvectors of the ``count`` largest eigenvalues of a symmetric float32 M (R, R),
    as (R, count) in ascending order of their eigenvalues."""
    R = M.shape[0]
    if M.device.type == "cpu" and R >= EVR_MIN:
        found = lapack.top_eigh(M, count)
        if found is not None:
            return found[1]
    return torch.linalg.eigh(M)[1][:, R - count :]


#: times64 converts a float32 matrix to float64 this many numbers (32 MiB) at a time
TIMES64_BLOCK = 1 << 22


def times64(X: Tensor, Y: Tensor) -> Tensor:
    """``X·Y`` in float64 for a float64 ``Y`` (rows, p): a float64 ``X`` (rows_x, inner) as it
    is, a float32 one converted a block of rows at a time, so that no float64 copy of it is
    held (the float32 products are exact in float64). Holds the result and one block."""
    if X.dtype == torch.float64:
        return X @ Y
    out = torch.empty(X.shape[0], Y.shape[1], dtype=torch.float64, device=X.device)
    step = max(1, TIMES64_BLOCK // max(1, X.shape[1]))
    for lo in range(0, X.shape[0], step):
        out[lo : lo + step] = X[lo : lo + step].double() @ Y
    return out


def refined_core(core: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """The top ``k`` singular triplets of a ``core`` (R, C), R ≤ C, of float32 numbers (held in
    float32, or in float64 as the Gram route's core): Uc (R, k), S (k,) and Vc (C, k), float64,
    descending, from a float32 eigensolver refined in float64;
    ``None`` when the residual, the spectrum's spread or the estimated truncation error is
    beyond what it accepts (see FAST_EIG_RESIDUAL, FAST_EIG_MAX_ERROR; the caller then solves
    in float64).

    Q = the float32 top k + FAST_EIG_OVERSAMPLE eigenvectors of core·coreᵀ (formed in float32),
    made orthonormal in float64 (CholeskyQR); Z = coreᵀ·Q, so that ZᵀZ = Qᵀ·core·coreᵀ·Q is
    the Rayleigh quotient (never forming core·coreᵀ in float64); its top k eigenpairs (θ, W)
    give Uc = Q·W, S = √θ and Vc = Z·W / S (= coreᵀ·Uc / S). The residuals of every Ritz
    pair, the columns of core·(Z·W) − Q·W·Θ, decide; products with the core are float64
    (:func:`times64`). Holds a float32 copy of a float64 core, two float32 (R, R) matrices
    (core·coreᵀ and LAPACK's working copy) and a few (C, k + 32) blocks.
    """
    R = core.shape[0]
    wide = min(R, k + FAST_EIG_OVERSAMPLE)
    if wide - k < 2:
        return None  # the estimate needs two pairs left out below the cut
    try:  # a float32 eigensolver that does not converge (a huge cluster of tiny σ) declines
        Q = _top_vectors32(gram(core.T.float()), wide).double()  # (R, wide)
    except torch.linalg.LinAlgError:
        return None
    L, info = torch.linalg.cholesky_ex(gram(Q))  # QᵀQ ≈ I: CholeskyQR, exact for so small a cond
    if int(info) != 0:
        return None
    Q = torch.linalg.solve_triangular(L, Q.T, upper=False).T  # (R, wide) orthonormal
    Z = times64(core.T, Q)  # (C, wide)
    try:
        ritz, W = torch.linalg.eigh(gram(Z))  # ascending; (wide,), (wide, wide)
    except torch.linalg.LinAlgError:
        return None
    ritz, W = ritz.flip(0), W.flip(1)  # descending
    theta = ritz[:k]  # (k,) kept
    if not bool(theta[-1] > 0) or not bool(theta[-1] >= FAST_EIG_MIN_RATIO * theta[0]):
        return None
    X = Q @ W  # (R, wide) Ritz vectors
    ZX = Z @ W  # (C, wide) = coreᵀ·X
    residual = times64(core, ZX) - X * ritz  # (R, wide): M·x_i − θ_i·x_i
    r_all = torch.linalg.vector_norm(residual, dim=0)  # (wide,)
    r = r_all[:k]
    if not bool(torch.linalg.vector_norm(r) <= FAST_EIG_RESIDUAL * torch.linalg.vector_norm(theta)):
        return None
    lowest = float(ritz[-1])  # θ_wide
    cut, inside = float(theta[-1] - ritz[k]), float(ritz[k]) - lowest
    if not (cut > 0 and inside > 0):
        return None  # a cut, or a cluster below it, that the wide block cannot resolve
    S = theta.sqrt()
    outside = r / (theta - lowest) * S  # (k,) first order, weighted by σ_i
    across = float(r_all.square().sum()) / (inside * cut) * float(S[-1])  # second order: γ²/…
    estimate = math.sqrt(2.0 * (float(outside.square().sum()) + across**2)) / float(S.norm())
    if not estimate <= FAST_EIG_MAX_ERROR:
        return None
    return X[:, :k], S, ZX[:, :k] / S


def top_eigh(M: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs of a symmetric float64 ``M`` (R, R), descending.

    On the CPU for R > EVD_MAX_RATIO·k, LAPACK's MRRR for the top k only (``dsyevr``,
    :func:`flexlora.lora.lapack.top_eigh`, GIL released so module-parallel workers run side
    by side); otherwise divide and conquer (every eigenpair): inside a module-parallel worker
    (one torch thread: :mod:`flexlora.aggregation.parallel`) ``torch.linalg.eigh``, which
    releases the GIL too, else SciPy's ``dsyevd`` on one BLAS thread. Both spend most of their
    time in the tridiagonal reduction, bound by memory bandwidth; a second OpenBLAS thread
    gained 10-25 % in the eigensolver but its spinning waiters then slowed every torch product
    after it, and torch's own ``syevd`` was 2-3x slower under the package's passive OpenMP
    waiters (0.46 s against 0.15 s for R = 900 on two cores). Elsewhere (a CUDA server, or a
    source tree run without the declared SciPy, as benchmarks/gpu_check.py may be)
    ``torch.linalg.eigh``. Holds M's copy and the eigenvectors kept.
    """
    R = M.shape[0]
    cpu = M.device.type == "cpu"
    if cpu and EVD_MAX_RATIO * k < R:
        found = lapack.top_eigh(M, k)  # ascending
        if found is not None:
            return found[0].flip(0), found[1].flip(1)
    if cpu and _HAVE_SCIPY and torch.get_num_threads() > 1:
        import scipy.linalg
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            lam, Q = scipy.linalg.eigh(M.numpy(), driver="evd", check_finite=False)
        return torch.from_numpy(lam[R - k :]).flip(0), torch.from_numpy(Q[:, R - k :]).flip(1)
    lam, Q = torch.linalg.eigh(M)  # ascending, (R,), (R, R)
    return lam[-k:].flip(0), Q[:, -k:].flip(1)


def top_core(core: Tensor, k: int, fast: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``k`` singular triplets of a float64 ``core`` (R, C), R ≤ C (square on the server
    step's Gram route): Uc (R, k), S (k,) and Vc (C, k).

    For k < R they come from the top k eigenpairs of core·coreᵀ (:func:`top_core_eig`); where
    that route declines, and for k = R, the full SVD of the core is taken.
    """
    found = top_core_eig(core, k, fast) if k < core.shape[0] else None
    if found is not None:
        return found
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)  # (R, R), (R,), (R, C)
    return Uc[:, :k], S[:k], Vhc[:k].T


def top_core_eig(core: Tensor, k: int, fast: bool = False) -> tuple[Tensor, Tensor, Tensor] | None:
    """Top ``k`` < R singular triplets of a ``core`` (R, C), R ≤ C, float64 (or float32 with
    ``fast``, never copied whole to float64 on the refined route), from the top k eigenpairs of
    core·coreᵀ: Uc (R, k), S (k,), Vc (C, k), float64; ``None`` where they would not be exact
    (σ_k < 1e-5·σ_1, or a zero core: the caller takes an SVD).

    With ``fast`` (a core made from float32 numbers, whose result is float32) on the CPU from
    R = FAST_EIG_MIN by :func:`refined_core`, unless it refuses; else by :func:`top_eigh` in
    float64, with Vc = coreᵀ·Uc / S. In float64 the squared spectrum keeps every digit a
    float32 result needs while σ_k ≥ 1e-5·σ_1. Holds core·coreᵀ (R, R) and its eigensolver's
    copy, besides (C, k + 32) blocks.
    """
    R = core.shape[0]
    cpu = core.device.type == "cpu"
    if fast and cpu and FAST_EIG_MIN <= R and k + FAST_EIG_OVERSAMPLE < R:
        refined = refined_core(core, k)
        if refined is not None:
            return refined
    try:
        lam_top, Uc = top_eigh(gram(core.T.double()), k)  # core·coreᵀ from its upper blocks
    except torch.linalg.LinAlgError:  # no convergence: the caller's SVD
        return None
    if bool(lam_top[-1] >= 1e-10 * lam_top[0]) and bool(lam_top[0] > 0):
        S = lam_top.sqrt()
        Vc = times64(core.T, Uc) / S  # (C, k)
        return Uc, S, Vc
    return None
