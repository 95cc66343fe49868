"""Frobenius norms of LoRA updates, from r×r Gram matrices: no m×n product is ever formed.

One home for the norm every part of the server step needs: HetLoRA's sparsity weights, the
validator's ``federation.max_update_norm``, client-level DP's clipping, ``flexlora aggregate``'s
per-adapter weight. Holds nothing; each call holds two r×r Grams at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from flexlora.types import LoRAFactors

__all__ = ["frobenius_norm", "update_norm"]


def frobenius_norm(f: LoRAFactors, dtype: torch.dtype = torch.float64) -> float:
    """‖s·B·A‖_F from two r×r Gram matrices, without forming the m×n product."""
    A = f.A.to(dtype)  # (r, n)
    B = f.B.to(dtype)  # (m, r)
    sq = torch.sum((B.T @ B) * (A @ A.T))  # tr(BᵀB·AAᵀ) = ‖BA‖²_F
    return abs(f.scaling) * float(torch.sqrt(torch.clamp(sq, min=0.0)))


def update_norm(factors: Iterable[LoRAFactors]) -> float:
    """‖ΔW‖_F of a whole update over its modules: sqrt(Σ_m ‖s·B·A‖²_F).

    ``factors`` may be lazy (one module read at a time, as ``flexlora aggregate`` does).
    """
    return math.sqrt(math.fsum(frobenius_norm(f) ** 2 for f in factors))
