"""FedIT (Zhang et al., 2024): FedAvg of the LoRA factors A and B, separately.

Every client must use the same rank (per module) and the same scaling; mixed ranks are an
error here (the "bucket effect" is the simulator's job: it holds everyone to one rank).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexlora.aggregation.base import Aggregator, register
from flexlora.errors import InvalidUpdateError
from flexlora.types import ClientUpdate, GlobalUpdate, ModuleDelta


@register
class FedIT(Aggregator):
    """Ā = Σ p_i A_i, B̄ = Σ p_i B_i; the global update is s·B̄·Ā at the common rank."""

    name = "fedit"
    needs_uniform_rank = True

    def check(self, update: ClientUpdate, state: GlobalUpdate | None) -> None:
        """Reject a client whose rank is not the state's (one common rank per module)."""
        if state is None:
            return
        for module, f in update.factors.items():
            if module in state.modules and f.rank != state[module].rank:
                raise InvalidUpdateError(
                    update.client_id,
                    module,
                    "rank",
                    f"fedit needs one rank for all clients: rank {f.rank} here, the global "
                    f"state's is {state[module].rank}",
                )

    def aggregate_module(
        self,
        module: str,
        updates: Sequence[ClientUpdate],
        p: Sequence[float],
        previous: GlobalUpdate | None,
    ) -> ModuleDelta:
        first = updates[0].factors[module]
        for u in updates[1:]:
            f = u.factors[module]
            if f.rank != first.rank:
                raise InvalidUpdateError(
                    u.client_id,
                    module,
                    "rank",
                    f"fedit needs one rank for all clients: rank {f.rank} here, "
                    f"{first.rank} at client {updates[0].client_id} (use flexlora or hetlora)",
                )
            if f.scaling != first.scaling:
                raise InvalidUpdateError(
                    u.client_id,
                    module,
                    "alpha",
                    f"fedit needs one LoRA scaling for all clients: {f.scaling} here, "
                    f"{first.scaling} at client {updates[0].client_id}",
                )
        A = sum(pi * u.factors[module].A.to(self.dtype) for pi, u in zip(p, updates, strict=True))
        B = sum(pi * u.factors[module].B.to(self.dtype) for pi, u in zip(p, updates, strict=True))
        return ModuleDelta(
            U=(first.scaling * B).contiguous(),  # (m, r): scaling folded in
            S=torch.ones(first.rank, dtype=self.dtype),
            Vh=A.contiguous(),  # (r, n)
            truncation="exact",
        )
