"""FedSA-LoRA (Guo et al., ICLR 2025): A is shared and aggregated, each client keeps its own B.

The paper's finding: A learns what is general across clients, B what is client-specific. The
server averages A (FedAvg with the example weights); every client keeps its B across rounds
(``keeps_local_B``: the drivers keep it in a per-client store on disk, see
:mod:`flexlora.client_state`) and starts each round from the new Ā and its own B (B = 0 the
first time, the shared initial A in round 1).

Where we differ from the paper, and why:

- **Mixed ranks** (the paper uses one rank): row k of Ā averages the clients whose rank
  exceeds k, their weights renormalised (zero-padding would shrink the rows only large clients
  train toward zero); a row no client of the round has keeps the previous state's row.
- **The server also receives B** (the paper uploads A only) and keeps B̄ = Σ p_i s_i pad(B_i),
  the example-weighted average of the round's B's in update units. It is used for clients that
  have no B of their own: the unseen (zero-shot) clients are evaluated on W0 + B̄·Ā, the average
  seen client's update under the shared A, and the exported adapters hold it. Seen clients are
  evaluated with their own B (the paper's protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexlora.aggregation.base import Aggregator, register
from flexlora.aggregation.hetlora import padded_average
from flexlora.types import ClientUpdate, FactorState, GlobalUpdate


@register
class FedSALoRA(Aggregator):
    """Ā row by row over the clients that have the row; B̄ for clients without a B."""

    name = "fedsa"
    keeps_local_B = True
    reads_previous = True

    def aggregate_module(
        self,
        module: str,
        updates: Sequence[ClientUpdate],
        p: Sequence[float],
        previous: GlobalUpdate | None,
    ) -> FactorState:
        factors = [u.factors[module] for u in updates]
        B, _ = padded_average(factors, p, self.dtype)  # (m, r_round) in update units
        prev = previous[module] if previous is not None and module in previous.modules else None
        r_round = B.shape[1]
        rank = max(r_round, prev.rank if prev is not None else 0)
        m, n = factors[0].shape
        A = torch.zeros(rank, n, dtype=self.dtype)  # (rank, n)
        mass = torch.zeros(rank, dtype=self.dtype)  # (rank,): weight of the clients of each row
        for pi, f in zip(p, factors, strict=True):
            A[: f.rank] += pi * f.A.to(self.dtype)
            mass[: f.rank] += pi
        A[:r_round] /= mass[:r_round, None]  # every row below r_round has the largest client
        if prev is not None and rank > r_round:
            A[r_round:] = prev.Vh[r_round:rank].to(self.dtype)  # rows nobody trained this round
        B_full = torch.zeros(m, rank, dtype=self.dtype)  # (m, rank)
        B_full[:, :r_round] = B
        return FactorState.of(B_full, A)
