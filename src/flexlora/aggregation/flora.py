"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' factors, a noise-free exact sum.

B = [s_1 B_1 … s_K B_K] and A = [p_1 A_1; …; p_K A_K] give B·A = Σ p_i s_i B_i A_i exactly, at
rank Σ r_i. Clients add it to their frozen weights and start a fresh adapter each round, so the
global model is the running sum over rounds: given the previous state, the new one is that sum,
kept exact as a thin SVD computed from the stacked factors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexlora.aggregation.base import Aggregator, register
from flexlora.lora.svd import factored_svd
from flexlora.types import ClientUpdate, GlobalUpdate, ModuleDelta


@register
class FLoRA(Aggregator):
    """Stacking aggregation; accumulates over rounds when given the previous state."""

    name = "flora"
    merges_into_base = True

    def aggregate_module(
        self,
        module: str,
        updates: Sequence[ClientUpdate],
        p: Sequence[float],
        previous: GlobalUpdate | None,
    ) -> ModuleDelta:
        factors = [u.factors[module] for u in updates]
        B = torch.cat([f.scaling * f.B.to(self.dtype) for f in factors], dim=1)  # (m, R)
        A = torch.cat(
            [pi * f.A.to(self.dtype) for pi, f in zip(p, factors, strict=True)], dim=0
        )  # (R, n)
        if previous is None or module not in previous.modules:
            return ModuleDelta(
                U=B, S=torch.ones(B.shape[1], dtype=self.dtype), Vh=A, truncation="exact"
            )
        prev = previous[module]
        B_all = torch.cat([prev.U.to(self.dtype) * prev.S.to(self.dtype), B], dim=1)
        A_all = torch.cat([prev.Vh.to(self.dtype), A], dim=0)
        U, S, Vh = factored_svd(B_all, A_all)  # exact; k <= min(m, n) components
        return ModuleDelta(U=U, S=S, Vh=Vh, truncation="svd")
