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

Replies are folded as they arrive (:class:`PaddedSum`, :class:`HetLoRAModule`): per module the
server keeps the running Σ c_i s_i pad(B_i) and Σ c_i pad(A_i) at the largest rank so far
(c_i the client's unnormalised sparsity weight) and Σ c_i, whatever the number of clients, and
divides once at the end.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from flexlora.aggregation.base import (
    Accumulator,
    Aggregator,
    ModuleAccumulator,
    register,
)
from flexlora.errors import UsageError
from flexlora.lora.norms import frobenius_norm, update_norm
from flexlora.types import ClientUpdate, FactorState, GlobalUpdate, LoRAFactors

WEIGHTINGS = ("client", "module")


class PaddedSum:
    """Running Σ c_i s_i pad(B_i) (m, r) and Σ c_i pad(A_i) (r, n), r the largest rank so far.

    Two buffers of the module's size at the largest rank, grown (zero columns / rows) when a
    larger client arrives; nothing per client. Used by HetLoRA and FedEx-LoRA.
    """

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.B: Tensor | None = None  # (m, r)
        self.A: Tensor | None = None  # (r, n)

    @property
    def rank(self) -> int:
        return 0 if self.A is None else int(self.A.shape[0])

    def grow(self, rank: int) -> None:
        """Make room for ``rank`` components (zero padding keeps the sums)."""
        if rank <= self.rank:
            return
        m, n = self.shape
        B = torch.zeros(m, rank, dtype=self.dtype, device=self.device)  # (m, rank)
        A = torch.zeros(rank, n, dtype=self.dtype, device=self.device)  # (rank, n)
        if self.A is not None and self.B is not None:
            B[:, : self.rank] = self.B
            A[: self.rank] = self.A
        self.B, self.A = B, A

    def add(self, A: Tensor, B: Tensor, scaling: float, weight: float) -> None:
        """Add ``weight·(scaling·B, A)`` into the first r components (r = A's rank)."""
        r = int(A.shape[0])
        self.grow(r)
        assert self.A is not None and self.B is not None
        self.B[:, :r].add_(B, alpha=weight * scaling)
        self.A[:r].add_(A, alpha=weight)

    def average(self, total: float, rank: int) -> tuple[Tensor, Tensor]:
        """(Σ c_i s_i pad(B_i), Σ c_i pad(A_i)) / ``total``, at ``rank`` components."""
        self.grow(rank)
        assert self.A is not None and self.B is not None
        return self.B / total, self.A / total

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.B, self.A) if t is not None]


class HetLoRAModule(ModuleAccumulator):
    """One module's sparsity-weighted padded average, folded one client at a time.

    Holds a :class:`PaddedSum` with the clients' unnormalised weights c_i (the update norm, per
    client or per module, times the raw weight with ``by_examples``) and Σ c_i; while every c_i
    so far is zero, also the same sums with the raw example weights (the fallback when every
    update is zero), dropped at the first non-zero c_i. So at most two buffers of the module's
    size at the largest rank, whatever the number of clients.
    """

    def __init__(
        self,
        module: str,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        by_examples: bool,
        client_norms: Mapping[str, float] | None,
    ) -> None:
        super().__init__(module, shape, dtype, device)
        self.by_examples = by_examples
        self.client_norms = client_norms  # None: weigh by this module's own norm
        self.scored = PaddedSum(self.shape, dtype, device)
        self.fallback: PaddedSum | None = PaddedSum(self.shape, dtype, device)
        self.score_total = 0.0
        self.rank = 0

    def fold(self, client_id: str, f: LoRAFactors, weight: float) -> None:
        norm = frobenius_norm(f) if self.client_norms is None else self.client_norms[client_id]
        c = norm * weight if self.by_examples else norm
        A, B = self.load(f)
        self.rank = max(self.rank, f.rank)
        if c > 0:
            self.scored.add(A, B, f.scaling, c)
            self.score_total += c
            self.fallback = None  # some update is non-zero: the fallback can never be used
        elif self.fallback is not None:
            self.fallback.add(A, B, f.scaling, weight)

    def result(self, total_weight: float) -> FactorState:
        if self.score_total > 0:
            B, A = self.scored.average(self.score_total, self.rank)
        else:
            assert self.fallback is not None
            B, A = self.fallback.average(total_weight, self.rank)
        return FactorState.of(B, A)  # (m, r_max), (r_max, n)

    def tensors(self) -> list[Tensor]:
        return self.scored.tensors() + (self.fallback.tensors() if self.fallback else [])


class HetLoRAAccumulator(Accumulator):
    """A HetLoRA round with one weight per client: each reply's whole-update norm is computed
    once, before its modules are folded (held for that reply only)."""

    def __init__(
        self,
        strategy: str,
        shapes: Mapping[str, tuple[int, int]],
        modules: Mapping[str, ModuleAccumulator],
        norms: dict[str, float],
    ) -> None:
        super().__init__(strategy, shapes, modules)
        self.norms = norms  # shared with the module accumulators

    def fold(self, update: ClientUpdate, weight: float) -> None:
        self.norms[update.client_id] = update_norm(update.factors.values())
        try:
            super().fold(update, weight)
        finally:
            del self.norms[update.client_id]


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
        device: torch.device | str = "cpu",
    ):
        super().__init__(dtype, device)
        if weighting not in WEIGHTINGS:
            raise UsageError(f"hetlora weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        self.weight_by_examples = weight_by_examples

    def start(
        self, shapes: Mapping[str, tuple[int, int]], previous: GlobalUpdate | None = None
    ) -> Accumulator:
        if self.weighting == "module":
            return super().start(shapes, previous)
        norms: dict[str, float] = {}
        modules = {
            name: self.start_module(name, shape, previous, client_norms=norms)
            for name, shape in shapes.items()
        }
        return HetLoRAAccumulator(self.name, shapes, modules, norms)

    def start_module(
        self,
        module: str,
        shape: tuple[int, int],
        previous: GlobalUpdate | None,
        client_norms: Mapping[str, float] | None = None,
    ) -> HetLoRAModule:
        """One module's accumulator; with ``weighting="client"`` it needs ``client_norms``
        (client -> ‖ΔW_i‖_F over all its modules) for every client it will fold."""
        if self.weighting == "client" and client_norms is None:
            raise UsageError(
                "hetlora weighs each client by its whole update's norm: fold whole replies "
                "(start()), or pass client_norms to start_module"
            )
        return HetLoRAModule(
            module,
            shape,
            self.dtype,
            self.device,
            self.weight_by_examples,
            client_norms if self.weighting == "client" else None,
        )
