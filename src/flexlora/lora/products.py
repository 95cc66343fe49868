"""Matrix products of the server step that skip what their structure makes redundant.

torch exposes neither a symmetric rank-k update (SYRK) nor a triangular product (TRMM), and
OpenBLAS's ``ssyrk`` ran at 57-84 % of the gemm's rate on two cores. Both products here are a
few gemms over blocks instead, each large enough to run at the gemm's rate. Measured on one
thread of the benchmark machine (AMD EPYC, AVX2), float32:

- :func:`gram` of an (11008, 1,106) stack: 604 ms as one product, 349 ms from 3 row blocks,
  252 ms from 8 (the blocks' rows near GRAM_BLOCK_ROWS);
- :func:`upper_product` of two 1,106² upper-triangular factors: 65 ms as one product, 25 ms
  from 5 × 5 blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "GRAM_BLOCK_ROWS",
    "GRAM_MAX_BLOCKS",
    "gram",
    "low_rank_output",
    "squared_norm",
    "upper_product",
]

#: gram's row blocks have about this many rows (96-160 ran at the gemm's rate), at most
#: GRAM_MAX_BLOCKS of them
GRAM_BLOCK_ROWS = 128
GRAM_MAX_BLOCKS = 12
#: upper_product's blocks have about this many rows and columns
UPPER_BLOCK = 220


def _cuts(size: int, blocks: int) -> list[int]:
    return [size * i // blocks for i in range(blocks + 1)]


def gram(X: Tensor) -> Tensor:
    """``XᵀX`` (R, R) for X (rows, R) in X's dtype, from the upper block triangle only.

    With b row blocks of ``Xᵀ`` the product takes b(b + 1)/2 of the b² block products a full
    gemm does; the lower blocks are transposed copies. Holds the (R, R) result.
    """
    Y = X.T  # (R, rows); row-major when X is a column-major view, as the stacks are
    R = Y.shape[0]
    blocks = max(1, min(GRAM_MAX_BLOCKS, round(R / GRAM_BLOCK_ROWS)))
    if blocks == 1:
        return Y @ Y.T
    cuts = _cuts(R, blocks)
    G = torch.empty(R, R, dtype=X.dtype, device=X.device)
    for i in range(blocks):
        lo, hi = cuts[i], cuts[i + 1]
        G[lo:hi, lo:] = Y[lo:hi] @ Y[lo:].T  # (hi - lo, R - lo)
    for i in range(1, blocks):
        lo = cuts[i]
        G[lo:, :lo] = G[:lo, lo:].T
    return G


def upper_product(P: Tensor, Q: Tensor) -> Tensor:
    """``P·Qᵀ`` (R, R) for upper-triangular P and Q (R, R), their zero blocks skipped.

    Entry (i, j) sums P[i, l]·Q[j, l] over l ≥ max(i, j) only: with b × b blocks the product
    takes about a third of a full gemm's work for large b. Holds the (R, R) result.
    """
    R = P.shape[0]
    blocks = max(1, min(8, round(R / UPPER_BLOCK)))
    if blocks == 1:
        return P @ Q.T
    cuts = _cuts(R, blocks)
    out = torch.empty(R, R, dtype=P.dtype, device=P.device)
    for i in range(blocks):
        for j in range(blocks):
            start = cuts[max(i, j)]
            rows, cols = slice(cuts[i], cuts[i + 1]), slice(cuts[j], cuts[j + 1])
            out[rows, cols] = P[rows, start:] @ Q[cols, start:].T
    return out


def low_rank_output(x: Tensor, output: Tensor, B: Tensor, A: Tensor) -> Tensor:
    """``output + x·Aᵀ·Bᵀ`` computed in float32 and returned in ``output``'s dtype: a layer's
    output plus a low-rank ΔW = B·A (m, k)·(k, n) beside its frozen weights, whatever their
    dtype or quantization (x: (..., n), output: (..., m)). Never forms ΔW."""
    return output + ((x.to(torch.float32) @ A.T) @ B.T).to(output.dtype)


def squared_norm(t: Tensor) -> float:
    """‖t‖²_F accumulated in float64, with no float64 copy of ``t``: the whole energy of a
    state whose cut leaves triplets out (the R×R core's, or a dense sum's)."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
