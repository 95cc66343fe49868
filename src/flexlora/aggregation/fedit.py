"""FedIT (Zhang et al., 2024): FedAvg of the LoRA factors A and B, separately.

Every client must use the same rank (per module) and the same scaling; mixed ranks are an
error here (the "bucket effect" is the simulator's job: it holds everyone to one rank).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexlora.aggregation.base import Aggregator, ModuleAccumulator, register
from flexlora.errors import InvalidUpdateError
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors, ModuleDelta


class FedITModule(ModuleAccumulator):
    """Running Σ w_i A_i (r, n) and Σ w_i B_i (m, r): one client's size, whatever the count.

    The first client folded fixes the rank and scaling; a later client with another is
    rejected in :meth:`check`.
    """

    def __init__(
        self, module: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__(module, shape, dtype, device)
        self.first: tuple[str, int, float] | None = None  # (client, rank, scaling)
        self.A: Tensor | None = None  # (r, n)
        self.B: Tensor | None = None  # (m, r)

    def check(self, client_id: str, f: LoRAFactors) -> None:
        if self.first is None:
            return
        owner, rank, scaling = self.first
        if f.rank != rank:
            raise InvalidUpdateError(
                client_id,
                self.module,
                "rank",
                f"fedit needs one rank for all clients: rank {f.rank} here, "
                f"{rank} at client {owner} (use flexlora or hetlora)",
            )
        if f.scaling != scaling:
            raise InvalidUpdateError(
                client_id,
                self.module,
                "alpha",
                f"fedit needs one LoRA scaling for all clients: {f.scaling} here, "
                f"{scaling} at client {owner}",
            )

    def fold(self, client_id: str, f: LoRAFactors, weight: float) -> None:
        A, B = self.load(f)
        if self.A is None or self.B is None:
            self.first = (client_id, f.rank, f.scaling)
            self.A = weight * A  # (r, n)
            self.B = weight * B  # (m, r)
        else:
            self.A.add_(A, alpha=weight)
            self.B.add_(B, alpha=weight)

    def result(self, total_weight: float) -> ModuleDelta:
        assert self.A is not None and self.B is not None and self.first is not None
        rank, scaling = self.first[1], self.first[2]
        return ModuleDelta(
            U=(self.B * (scaling / total_weight)).contiguous(),  # (m, r): scaling folded in
            S=torch.ones(rank, dtype=self.dtype, device=self.device),
            Vh=(self.A / total_weight).contiguous(),  # (r, n)
            truncation="exact",
        )


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

    def start_module(
        self, module: str, shape: tuple[int, int], previous: GlobalUpdate | None
    ) -> ModuleAccumulator:
        return FedITModule(module, shape, self.dtype, self.device)
