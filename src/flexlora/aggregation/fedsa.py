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
- **Clients upload B as well as A** (the paper uploads A only; the drivers count both in
  ``bytes_up``). The server keeps B̄ = Σ p_i s_i pad(B_i), the example-weighted average of the
  round's B's in update units, for clients that have no B of their own: the unseen (zero-shot)
  clients are evaluated on W0 + B̄·Ā, the average seen client's update under the shared A,
  and the exported adapters hold it. The paper evaluates seen clients only, which need no B̄.
  Seen clients are evaluated with their own B and Ā (the paper's protocol,
  :func:`flexlora.client_state.own_eval_factors`): in process by the simulator, on its node by
  the Flower ServerApp (an EVALUATE message; the B never leaves the node).

Replies are folded as they arrive (:class:`FedSAModule`): per module the server keeps the
running Σ w_i s_i pad(B_i) and Σ w_i pad(A_i) at the largest rank so far and, per row k, the
weight Σ w_i of the clients that have row k; nothing per client. It divides once at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexlora.aggregation.base import Aggregator, ModuleAccumulator, register
from flexlora.aggregation.hetlora import PaddedSum
from flexlora.types import FactorState, GlobalUpdate, LoRAFactors, ModuleDelta


class FedSAModule(ModuleAccumulator):
    """One module's row-wise average of A and B̄, folded one client at a time.

    Holds a :class:`~flexlora.aggregation.hetlora.PaddedSum` (Σ w_i s_i pad(B_i) (m, r) and
    Σ w_i pad(A_i) (r, n), r the largest rank so far), the row weights Σ_{i: r_i > k} w_i
    (r,), and a reference to the previous state's module (``previous``, not copied) for the
    rows nobody trains this round.
    """

    def __init__(
        self,
        module: str,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        previous: ModuleDelta | None,
    ) -> None:
        super().__init__(module, shape, dtype, device)
        self.sums = PaddedSum(self.shape, dtype, device)
        self.mass = torch.zeros(0, dtype=dtype, device=device)  # (r,): weight of each row
        self.previous = previous

    def fold(self, client_id: str, f: LoRAFactors, weight: float) -> None:
        A, B = self.load(f)
        self.sums.add(A, B, f.scaling, weight)
        if self.mass.shape[0] < f.rank:
            self.mass = torch.nn.functional.pad(self.mass, (0, f.rank - self.mass.shape[0]))
        self.mass[: f.rank] += weight

    def result(self, total_weight: float) -> FactorState:
        r_round = self.sums.rank
        prev = self.previous
        rank = max(r_round, prev.rank if prev is not None else 0)
        assert self.sums.A is not None and self.sums.B is not None  # one reply at least
        m, n = self.shape
        A = torch.zeros(rank, n, dtype=self.dtype, device=self.device)  # (rank, n)
        # every row below r_round has the largest client: its weight is > 0
        A[:r_round] = self.sums.A / self.mass[:, None]
        if prev is not None and rank > r_round:  # rows nobody trained this round
            A[r_round:] = prev.Vh[r_round:rank].to(device=self.device, dtype=self.dtype)
        B = torch.zeros(m, rank, dtype=self.dtype, device=self.device)  # (m, rank)
        B[:, :r_round] = self.sums.B / total_weight  # B̄ = Σ p_i s_i pad(B_i)
        return FactorState.of(B, A)

    def tensors(self) -> list[Tensor]:
        return [*self.sums.tensors(), self.mass]


@register
class FedSALoRA(Aggregator):
    """Ā row by row over the clients that have the row; B̄ for clients without a B."""

    name = "fedsa"
    keeps_local_B = True
    reads_previous = True

    def start_module(
        self, module: str, shape: tuple[int, int], previous: GlobalUpdate | None
    ) -> FedSAModule:
        prev = previous[module] if previous is not None and module in previous.modules else None
        return FedSAModule(module, shape, self.dtype, self.device, prev)
