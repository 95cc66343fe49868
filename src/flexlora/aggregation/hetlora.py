"""HetLoRA (Cho et al., 2024): zero-pad to the largest rank, sparsity-weighted average, truncate.

The paper's server step: every client's B_i, A_i are zero-padded to the round's largest rank,
client i weighs ``‖ΔW_i‖_F / Σ_j ‖ΔW_j‖_F`` (its "sparsity": one weight per client, the norm
of its whole reconstructed update), B and A are averaged separately with those weights, and a
client of rank r receives the first r columns of B̄ and rows of Ā ("truncation").

Where we differ from the paper, and why:

- **Scaling.** The paper writes ΔW_i = B_i A_i (no LoRA scaling). With PEFT's ``s = alpha/r``
  and one alpha for all ranks, the same factors mean an update 25x larger at rank 8 than at
  rank 200, so averaging raw factors would mix updates of different units. We average in
  update units: B̄ = Σ q_i s_i pad(B_i), Ā = Σ q_i pad(A_i), and a client of rank r receives
  B = B̄[:, :r] / s_r, A = Ā[:r], so its own ``s_r·B·A`` is exactly B̄[:, :r]·Ā[:r], the
  rank-r truncation of the global product, at every rank. (The price: the first columns a
  rank-200 client receives are larger than its own initialisation, by s_8/s_200 = 25 for
  what rank-8 clients learned; that is what keeps their update unchanged.) The norms are
  those of ``s_i·B_i·A_i``, the update the client really made.
- ``weighting="module"`` (not the paper) weighs each module by its own norm.
- ``weight_by_examples`` (not the paper) multiplies the norm weights by the example weights.
- The paper's local rank self-pruning is an option of the clients (``hetlora.self_pruning``,
  off by default; :mod:`flexlora.training.pruning`, where its own deviations are stated). The
  server needs nothing for it: a pruned client's reply has lower ranks and is zero-padded like
  any other; the round's state has the largest rank among the replies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flexlora.aggregation.base import Aggregator, pad_columns, pad_rows, register
from flexlora.errors import UsageError
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors, ModuleDelta

WEIGHTINGS = ("client", "module")


def frobenius_norm(f: LoRAFactors, dtype: torch.dtype = torch.float64) -> float:
    """‖s·B·A‖_F from two r×r Gram matrices, without forming the m×n product."""
    A = f.A.to(dtype)
    B = f.B.to(dtype)
    sq = torch.sum((B.T @ B) * (A @ A.T))  # tr(BᵀB·AAᵀ) = ‖BA‖²_F
    return abs(f.scaling) * float(torch.sqrt(torch.clamp(sq, min=0.0)))


def update_norm(update: ClientUpdate) -> float:
    """‖ΔW_i‖_F of a client's whole update: sqrt of Σ over modules of ‖s·B·A‖²_F."""
    return math.sqrt(math.fsum(frobenius_norm(f) ** 2 for f in update.factors.values()))


def sparsity_weights(norms: Sequence[float], p: Sequence[float], by_examples: bool) -> list[float]:
    """q_i ∝ norm_i (times p_i when ``by_examples``); p itself when every norm is zero."""
    raw = [n * pi for n, pi in zip(norms, p, strict=True)] if by_examples else list(norms)
    total = math.fsum(raw)
    return [w / total for w in raw] if total > 0 else list(p)


def padded_average(
    factors: Sequence[LoRAFactors], q: Sequence[float], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ q_i s_i pad(B_i), Σ q_i pad(A_i)) at the largest rank: B in update units."""
    r_max = max(f.rank for f in factors)
    m, n = factors[0].shape
    B = torch.zeros(m, r_max, dtype=dtype)  # (m, r_max)
    A = torch.zeros(r_max, n, dtype=dtype)  # (r_max, n)
    for qi, f in zip(q, factors, strict=True):
        B += qi * f.scaling * pad_columns(f.B.to(dtype), r_max)
        A += qi * pad_rows(f.A.to(dtype), r_max)
    return B, A


@register
class HetLoRA(Aggregator):
    """Zero-padding with sparsity-weighted aggregation.

    Parameters
    ----------
    weighting:
        ``client`` (the paper: one weight per client, the norm of its whole update) or
        ``module`` (each module weighted by its own norms).
    weight_by_examples:
        Multiply the norm weights by the clients' example weights (off: the norms alone, as
        in HetLoRA). When every update is zero the example weights are used.
    """

    name = "hetlora"

    def __init__(
        self,
        weighting: str = "client",
        weight_by_examples: bool = False,
        dtype: torch.dtype | str = torch.float32,
    ):
        super().__init__(dtype)
        if weighting not in WEIGHTINGS:
            raise UsageError(f"hetlora weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        self.weight_by_examples = weight_by_examples

    def client_weights(self, updates: Sequence[ClientUpdate], p: list[float]) -> list[float]:
        if self.weighting != "client":
            return p
        return sparsity_weights([update_norm(u) for u in updates], p, self.weight_by_examples)

    def aggregate_module(
        self,
        module: str,
        updates: Sequence[ClientUpdate],
        p: Sequence[float],
        previous: GlobalUpdate | None,
    ) -> ModuleDelta:
        factors = [u.factors[module] for u in updates]
        if self.weighting == "module":
            q = sparsity_weights([frobenius_norm(f) for f in factors], p, self.weight_by_examples)
        else:
            q = list(p)  # already the clients' sparsity weights (client_weights)
        B, A = padded_average(factors, q, self.dtype)  # (m, r_max), (r_max, n)
        return ModuleDelta(
            U=B, S=torch.ones(A.shape[0], dtype=self.dtype), Vh=A, truncation="prefix"
        )
