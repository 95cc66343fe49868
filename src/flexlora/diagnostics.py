"""Rank-energy diagnostics of a round's redistribution ("rank collapse" of heterogeneous LoRA).

With heterogeneous ranks, a client of rank r receives only a rank-r piece of the global update.
Three numbers per round say how much that costs, computed from the global state (its singular
values, or the thin SVD of its factors) and the round's client factors, never from a formed ΔW:

- ``energy_kept[type]``: the fraction of ‖ΔW‖²_F (the adapter part of the global update) that a
  client of that rank type receives, Σ over modules of ‖ΔW_r‖²_F over Σ of ‖ΔW‖²_F. For an SVD
  state it is Σ_{k≤r} σ_k² / Σ_k σ_k² (Eckart–Young: no rank-r piece keeps more); for a prefix
  state (HetLoRA, FFA, FedEx, FedSA) it is ‖B[:, :r]·A[:r]‖²_F / ‖B·A‖²_F. A state a
  ``keep_rank`` cap cut carries the ‖·‖²_F it left out (``cut_energy``), which the total
  counts: the shares are of the round's whole ΔW either way.
- ``effective_rank``: exp of the entropy of the normalised squared spectrum of ΔW, p_k = σ_k² /
  Σ σ², averaged over modules (Roy & Vetterli, 2007, use σ_k / Σ σ; we use the energy so that it
  matches ``energy_kept``): 1 when one direction carries everything, k for k equal directions;
  of the state's own spectrum (a capped state's kept σ_k).
- ``update_survival[type]``: for each client of the round, ‖P(ΔW_i)‖_F / ‖ΔW_i‖_F, where P
  projects onto the subspace of the factors its rank type receives (P(X) = Q_B Q_Bᵀ X Q_A Q_Aᵀ,
  Q_B and Q_A orthonormal bases of the received B's columns and A's rows), every module
  together; the mean over the type's clients (``update_survival_per_client`` keeps each).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from flexlora.lora.svd import factored_svd
from flexlora.types import ClientUpdate, GlobalUpdate, ModuleDelta

__all__ = ["effective_rank", "rank_energy"]

F64 = torch.float64


def effective_rank(S: torch.Tensor) -> float:
    """exp(H(p)) with p_k = σ_k² / Σ σ² (0 for a zero spectrum)."""
    energy = S.to(F64) ** 2
    total = float(energy.sum())
    if total <= 0:
        return 0.0
    p = energy[energy > 0] / total
    return math.exp(float(-(p * torch.log(p)).sum()))


def _spectrum(d: ModuleDelta) -> torch.Tensor:
    """Singular values of the state's ΔW (from S, or a thin SVD of its factors)."""
    if d.truncation == "svd":
        return d.S.to(F64)
    return factored_svd(d.U.to(F64) * d.S.to(F64), d.Vh.to(F64)).S


def _received(d: ModuleDelta, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (m, r') and (r', n) factors whose product a rank-r client receives (scaling in B)."""
    k = min(r, d.rank)
    return d.U[:, :k].to(F64) * d.S[:k].to(F64), d.Vh[:k].to(F64)


def _sq_norm(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖²_F from two small Gram matrices."""
    return max(0.0, float(torch.sum((B.T @ B) * (A @ A.T))))


def rank_energy(
    state: GlobalUpdate,
    slot_ranks: Mapping[str, Mapping[str, int]],
    updates: Iterable[ClientUpdate],
    client_type: Mapping[str, str],
) -> dict[str, Any]:
    """The round's ``energy_kept``, ``effective_rank`` and ``update_survival`` (see above).

    ``updates`` is read once, one update at a time (a spilling store's iterator will do).
    """
    kept = {t: 0.0 for t in slot_ranks}
    total = 0.0
    ranks: list[float] = []
    bases: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for name, d in state.modules.items():
        # the state's own ΔW, and what a keep_rank cap left out of it (FlexLoRA's default):
        # the shares are of the round's whole ΔW
        total += _sq_norm(d.U.to(F64) * d.S.to(F64), d.Vh.to(F64)) + d.cut_energy
        ranks.append(effective_rank(_spectrum(d)))
        for t, per_module in slot_ranks.items():
            B, A = _received(d, per_module[name])
            kept[t] += _sq_norm(B, A)
            bases[t, name] = (torch.linalg.qr(B)[0], torch.linalg.qr(A.T)[0])  # (m, k), (n, k)
    survival: dict[str, float] = {}
    for u in updates:
        t = client_type[u.client_id]
        inside = whole = 0.0
        for name, f in u.factors.items():
            if (t, name) not in bases:
                continue
            Qb, Qa = bases[t, name]
            B = f.scaling * f.B.to(F64)  # (m, r_i)
            A = f.A.to(F64)  # (r_i, n)
            inside += _sq_norm(Qb.T @ B, A @ Qa)  # ‖Q_Bᵀ ΔW_i Q_A‖²_F
            whole += _sq_norm(B, A)
        if whole > 0:
            survival[u.client_id] = math.sqrt(inside / whole)
    by_type: dict[str, list[float]] = {}
    for cid, value in survival.items():
        by_type.setdefault(client_type[cid], []).append(value)
    return {
        "energy_kept": {t: (k / total if total > 0 else None) for t, k in kept.items()},
        "effective_rank": (sum(ranks) / len(ranks)) if ranks else None,
        "update_survival": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
        "update_survival_per_client": survival,
    }
