"""The top k singular triplets of the server step's R×R core, and the eigensolvers behind them.

:func:`flexlora.lora.svd.gram_svd` reduces ΔW = B·A to a square core (R×R, R = Σ r_i) whose
top k triplets give ΔW's. They come from the top k eigenpairs of core·coreᵀ: several times
cheaper than the core's SVD, and what dominates the server step once R is in the hundreds
(the tridiagonal reduction inside every dense eigensolver is bound by memory traffic). Two
routes, both exact to what a float32 result needs:

- R ≥ FAST_EIG_MIN (:func:`refined_core`): a float32 eigensolver on core·coreᵀ formed in
  float32 (half the memory traffic), then one float64 Rayleigh-Ritz step on its top
  k + FAST_EIG_OVERSAMPLE eigenvectors done through the core itself (coreᵀ·Q), which also
  gives the right singular vectors; accepted only when the Ritz pairs' residual is small;
- otherwise, or when that refuses (a spectrum float32 cannot hold): core·coreᵀ in float64 and
  a float64 eigensolver (:func:`top_eigh`).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from flexlora.lora import lapack
from flexlora.lora.products import gram

__all__ = ["FAST_EIG_MIN", "refined_core", "top_core", "top_eigh"]

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


def refined_core(core: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """The top ``k`` singular triplets of a float64 ``core`` (R, R): Uc, Vc (R, k) and S (k,),
    descending, from a float32 eigensolver refined in float64; ``None`` when the residual or
    the spectrum's spread is beyond what it accepts (see FAST_EIG_RESIDUAL; the caller then
    solves in float64).

    Q = the float32 top k + FAST_EIG_OVERSAMPLE eigenvectors of core·coreᵀ (formed in float32),
    made orthonormal in float64 (CholeskyQR); Z = coreᵀ·Q, so that ZᵀZ = Qᵀ·core·coreᵀ·Q is
    the Rayleigh quotient (never forming core·coreᵀ in float64); its top k eigenpairs (θ, W)
    give Uc = Q·W, S = √θ and Vc = Z·W / S (= coreᵀ·Uc / S). The residual ‖core·coreᵀ·Uc −
    Uc·Θ‖_F = ‖core·(Z·W) − Uc·Θ‖_F decides. Holds a float32 (R, R) copy and a few (R, k + 32).
    """
    R = core.shape[0]
    wide = min(R, k + FAST_EIG_OVERSAMPLE)
    Q = _top_vectors32(gram(core.T.float()), wide).double()  # (R, wide)
    L, info = torch.linalg.cholesky_ex(gram(Q))  # QᵀQ ≈ I: CholeskyQR, exact for so small a cond
    if int(info) != 0:
        return None
    Q = torch.linalg.solve_triangular(L, Q.T, upper=False).T  # (R, wide) orthonormal
    Z = core.T @ Q  # (R, wide)
    theta, W = torch.linalg.eigh(gram(Z))  # ascending; (wide,), (wide, wide)
    theta, W = theta[wide - k :].flip(0), W[:, wide - k :].flip(1)  # (k,), (wide, k)
    if not bool(theta[-1] > 0) or not bool(theta[-1] >= FAST_EIG_MIN_RATIO * theta[0]):
        return None
    Uc = Q @ W  # (R, k) Ritz vectors
    ZW = Z @ W  # (R, k) = coreᵀ·Uc
    residual = torch.linalg.matrix_norm(core @ ZW - Uc * theta)  # ‖M·Uc − Uc·Θ‖_F
    if not bool(residual <= FAST_EIG_RESIDUAL * torch.linalg.vector_norm(theta)):
        return None
    S = theta.sqrt()
    return Uc, S, ZW / S


def top_eigh(M: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs of a symmetric float64 ``M`` (R, R), descending.

    Inside a module-parallel worker (one torch thread: :mod:`flexlora.aggregation.parallel`)
    ``torch.linalg.eigh``, which releases the GIL so that the workers' eigensolvers run side
    by side; else, on the CPU, LAPACK through SciPy on one BLAS thread: ``dsyevd`` (all
    eigenpairs, divide and conquer) while R ≤ EVD_MAX_RATIO·k, else ``dsyevr`` with
    ``subset_by_index``, which forms only the k eigenvectors (MRRR). Both spend most of their
    time in the tridiagonal reduction, bound by memory bandwidth; a second OpenBLAS thread
    gained 10-25 % in the eigensolver but its spinning waiters then slowed every torch product
    after it, and torch's own ``syevd`` was 2-3x slower under the package's passive OpenMP
    waiters (0.46 s against 0.15 s for R = 900 on two cores). Elsewhere (a CUDA server, or a
    source tree run without the declared SciPy, as benchmarks/gpu_check.py may be)
    ``torch.linalg.eigh``. Holds M's copy and the eigenvectors kept.
    """
    R = M.shape[0]
    if M.device.type == "cpu" and _HAVE_SCIPY and torch.get_num_threads() > 1:
        import scipy.linalg
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            if EVD_MAX_RATIO * k >= R:
                lam, Q = scipy.linalg.eigh(M.numpy(), driver="evd", check_finite=False)
                lam, Q = lam[R - k :], Q[:, R - k :]
            else:
                lam, Q = scipy.linalg.eigh(
                    M.numpy(), subset_by_index=(R - k, R - 1), driver="evr", check_finite=False
                )
        return torch.from_numpy(lam).flip(0), torch.from_numpy(Q).flip(1)
    lam, Q = torch.linalg.eigh(M)  # ascending, (R,), (R, R)
    return lam[-k:].flip(0), Q[:, -k:].flip(1)


def top_core(core: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``k`` singular triplets of a square float64 ``core`` (R, R): Uc, Vc (R, k) and S.

    For k < R they come from the top k eigenpairs of core·coreᵀ: on the CPU from R =
    FAST_EIG_MIN by :func:`refined_core`, unless it refuses; else by :func:`top_eigh` in
    float64, with Vc = coreᵀ·Uc / S. In float64 the squared spectrum keeps every digit a
    float32 result needs while σ_k ≥ 1e-5·σ_1; below that (or for k = R) the full SVD of the
    core is taken instead.
    """
    R = core.shape[0]
    if k < R:
        if core.device.type == "cpu" and FAST_EIG_MIN <= R and k + FAST_EIG_OVERSAMPLE < R:
            refined = refined_core(core, k)
            if refined is not None:
                return refined
        lam_top, Uc = top_eigh(gram(core.T), k)  # core·coreᵀ from its upper blocks
        if bool(lam_top[-1] >= 1e-10 * lam_top[0]) and bool(lam_top[0] > 0):
            S = lam_top.sqrt()
            Vc = (core.T @ Uc) / S  # (R, k)
            return Uc, S, Vc
    Uc, S, Vhc = torch.linalg.svd(core)  # (R, R), (R,), (R, R)
    return Uc[:, :k], S[:k], Vhc[:k].T
