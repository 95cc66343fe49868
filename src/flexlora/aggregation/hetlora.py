"""HetLoRA (Cho et al., 2024): zero-pad to the largest rank, sparsity-weighted average, truncate.

Each client's factors are zero-padded to the round's largest rank; clients are weighted by the
Frobenius norm of their update ‖s_i·B_i·A_i‖_F (per module), A and B are averaged separately,
and a client of rank r gets the first r components back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexlora.aggregation.base import Aggregator, pad_columns, pad_rows, register
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors, ModuleDelta


def frobenius_norm(f: LoRAFactors, dtype: torch.dtype = torch.float64) -> float:
    """‖s·B·A‖_F from two r×r Gram matrices, without forming the m×n product."""
    A = f.A.to(dtype)
    B = f.B.to(dtype)
    sq = torch.sum((B.T @ B) * (A @ A.T))  # tr(BᵀB·AAᵀ) = ‖BA‖²_F
    return abs(f.scaling) * float(torch.sqrt(torch.clamp(sq, min=0.0)))


@register
class HetLoRA(Aggregator):
    """Zero-padding with sparsity-weighted aggregation.

    Parameters
    ----------
    weight_by_examples:
        Multiply the norm weights by the clients' example weights (off: the norms alone, as
        in HetLoRA). When every update is zero the example weights are used.
    """

    name = "hetlora"

    def __init__(self, weight_by_examples: bool = False, dtype: torch.dtype | str = torch.float32):
        super().__init__(dtype)
        self.weight_by_examples = weight_by_examples

    def aggregate_module(
        self,
        module: str,
        updates: Sequence[ClientUpdate],
        p: Sequence[float],
        previous: GlobalUpdate | None,
    ) -> ModuleDelta:
        factors = [u.factors[module] for u in updates]
        norms = [frobenius_norm(f) for f in factors]
        raw = [n * pi for n, pi in zip(norms, p, strict=True)] if self.weight_by_examples else norms
        total = sum(raw)
        q = [w / total for w in raw] if total > 0 else list(p)
        r_max = max(f.rank for f in factors)
        m, n = factors[0].shape
        B = torch.zeros(m, r_max, dtype=self.dtype)  # (m, r_max)
        A = torch.zeros(r_max, n, dtype=self.dtype)  # (r_max, n)
        for qi, f in zip(q, factors, strict=True):
            B += qi * f.scaling * pad_columns(f.B.to(self.dtype), r_max)
            A += qi * pad_rows(f.A.to(self.dtype), r_max)
        return ModuleDelta(U=B, S=torch.ones(r_max, dtype=self.dtype), Vh=A, truncation="prefix")
