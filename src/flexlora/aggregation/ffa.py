"""FFA-LoRA (Sun et al., ICLR 2024): A is frozen and shared, only B is trained and averaged.

With heterogeneous ranks, one frozen A is drawn at the population's largest rank in round 0
and lives in the server state; a client of rank r receives (and must send back) its first r
rows. The server averages the zero-padded, scaled B's, which is exact:
Σ p_i s_i B_i A[:r_i] = B̄·A.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexlora.aggregation.base import Aggregator, pad_columns, register
from flexlora.errors import InvalidUpdateError
from flexlora.types import ClientUpdate, GlobalUpdate, ModuleDelta


@register
class FFALoRA(Aggregator):
    """Average B only; A is the server state's frozen matrix (a prefix of it at every client).

    Given the previous state (the drivers always pass it), its A is the reference: a client
    whose A differs from the first r rows of it is rejected by :meth:`check`, by name, and the
    round goes on with the others. Without a state (``flexlora aggregate`` on loose adapters),
    the widest client's A is the reference.
    """

    name = "ffa"
    freeze_lora_A = True
    reads_previous = True

    def __init__(self, atol: float = 1e-6, dtype: torch.dtype | str = torch.float32) -> None:
        super().__init__(dtype)
        self.atol = atol

    def check(self, update: ClientUpdate, state: GlobalUpdate | None) -> None:
        """Reject ``update`` if any module's A is not the state's frozen A (its first r rows)."""
        if state is None:
            return
        for module, f in update.factors.items():
            if module in state.modules:
                self._check_A(update.client_id, module, f.A, state[module].Vh, "the server's")

    def _check_A(
        self, client: str, module: str, A: torch.Tensor, frozen: torch.Tensor, whose: str
    ) -> None:
        r = A.shape[0]
        if r > frozen.shape[0] or not torch.allclose(
            A.to(self.dtype), frozen[:r].to(self.dtype), atol=self.atol, rtol=0
        ):
            raise InvalidUpdateError(
                client,
                module,
                "frozen_A",
                f"ffa needs every client to keep the shared frozen A; this client's A (rank {r}) "
                f"differs from {whose} frozen A (rank {frozen.shape[0]})",
            )

    def aggregate_module(
        self,
        module: str,
        updates: Sequence[ClientUpdate],
        p: Sequence[float],
        previous: GlobalUpdate | None,
    ) -> ModuleDelta:
        factors = [u.factors[module] for u in updates]
        if previous is not None and module in previous.modules:
            A = previous[module].Vh.to(self.dtype)  # (r_state, n): the frozen A of round 0
            whose = "the server's"
        else:
            widest = max(range(len(factors)), key=lambda i: factors[i].rank)
            A = factors[widest].A.to(self.dtype)  # (r_max, n)
            whose = f"client {updates[widest].client_id}'s"
        for u, f in zip(updates, factors, strict=True):
            self._check_A(u.client_id, module, f.A, A, whose)
        r_state = A.shape[0]
        B = torch.zeros(factors[0].shape[0], r_state, dtype=self.dtype)  # (m, r_state)
        for pi, f in zip(p, factors, strict=True):
            B += pi * f.scaling * pad_columns(f.B.to(self.dtype), r_state)
        return ModuleDelta(
            U=B, S=torch.ones(r_state, dtype=self.dtype), Vh=A.contiguous(), truncation="prefix"
        )
