"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' factors, a noise-free exact sum.

B = [s_1 B_1 … s_K B_K] and A = [p_1 A_1; …; p_K A_K] give B·A = Σ p_i s_i B_i A_i exactly, at
rank Σ r_i. Clients add it to their frozen weights and start a fresh adapter each round, so the
global model is the running sum over rounds: given the previous state, the new one is that sum,
kept exact as a thin SVD computed from the stacked factors.

The server holds the stacks as FlexLoRA's does (a
:class:`~flexlora.aggregation.flexlora.FlexLoRAModule`, ``auto``): while R·(m + n) ≤ m·n, and
the running dense (m, n) sum once one more client would make the stacks larger, so the
accumulator's memory is bounded by the adapted weights, not by the number of clients (the
state it returns, a thin SVD of up to min(m, n) triplets, can reach (m + n)·min(m, n)). The
sum is the same either way; from the dense sum the state is its thin SVD (``svd``, rank
≤ min(R, m, n)) instead of the stacked factors themselves (``exact``), which would be larger
than ΔW. ``flexlora aggregate`` writes the whole ΔW at any rank from either form (zero B past
the state's rank).
"""

from __future__ import annotations

import torch

from flexlora.aggregation.base import Aggregator, ModuleAccumulator, register
from flexlora.aggregation.flexlora import FlexLoRAModule
from flexlora.lora.svd import dense_svd, factored_svd
from flexlora.types import GlobalUpdate, LoRAFactors, ModuleDelta


class FLoRAModule(ModuleAccumulator):
    """One module's Σ w_i·s_i·B_i·A_i and a reference to the previous state (not copied).

    The sum is a :class:`~flexlora.aggregation.flexlora.FlexLoRAModule` (``auto``, weights in
    A): the stacks s_i·B_i (m, r_i) and w_i·A_i (r_i, n), R·(m + n) numbers, while they are
    no larger than ΔW, else one running (m, n) sum. So it holds min(R·(m + n), m·n) numbers;
    :meth:`result` adds a copy of the stacks, or one (m, n) matrix and its thin SVD.
    """

    def __init__(
        self,
        module: str,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        previous: GlobalUpdate | None,
    ) -> None:
        super().__init__(module, shape, dtype, device)
        has_previous = previous is not None and module in previous.modules
        self.previous = previous[module] if has_previous else None
        self.sum = FlexLoRAModule(module, shape, dtype, device, "auto", None, 0, weight_in="A")

    def fold(self, client_id: str, f: LoRAFactors, weight: float) -> None:
        self.sum.fold(client_id, f, weight)

    def tensors(self) -> list[torch.Tensor]:
        return self.sum.tensors()

    def work(self) -> float:
        """Stacks: a copy, or with a previous state a factored SVD ((m + n)·(R + k)²);
        dense: an SVD of the (m, n) sum."""
        m, n = self.shape
        R = self.sum.total_rank
        if not self.sum.stacked:
            return float(m * n * min(m, n))
        if self.previous is None:
            return float(R * (m + n))
        return float((m + n) * (R + self.previous.rank) ** 2)

    def result(self, total_weight: float) -> ModuleDelta:
        m, n = self.shape
        prev = self.previous
        if prev is not None:
            to = {"device": self.device, "dtype": self.dtype}
            U, S, Vh = (t.to(**to) for t in (prev.U, prev.S, prev.Vh))  # (m, k), (k,), (k, n)
        if self.sum.stacked:
            B, A = self.sum.stacks()  # (m, R) view, (R, n)
            A = A / total_weight  # (R, n)
            if prev is None:
                S = torch.ones(B.shape[1], dtype=self.dtype, device=self.device)
                U = B.clone(memory_format=torch.contiguous_format)  # (m, R), not a view
                return ModuleDelta(U=U, S=S, Vh=A, truncation="exact")
            B_all = torch.cat([U * S, B], dim=1)  # (m, k + R)
            A_all = torch.cat([Vh, A], dim=0)  # (k + R, n)
            U, S, Vh = factored_svd(B_all, A_all)  # exact; k <= min(m, n) components
            return ModuleDelta(U=U, S=S, Vh=Vh, truncation="svd")
        assert self.sum.delta is not None
        total = self.sum.delta / total_weight  # (m, n), ours: the sum is left as it is
        rank = self.sum.total_rank
        if prev is not None:
            total.addmm_(U * S, Vh)
            rank += prev.rank
        U, S, Vh = dense_svd(total)  # (m, p), (p,), (p, n) with p = min(m, n)
        del total
        k = min(rank, m, n)  # rank(ΔW) <= k: the rest are zeros, cut as the stacked SVD does
        return ModuleDelta(
            U=U[:, :k].contiguous(), S=S[:k].contiguous(), Vh=Vh[:k].contiguous(), truncation="svd"
        )


@register
class FLoRA(Aggregator):
    """Stacking aggregation; accumulates over rounds when given the previous state."""

    name = "flora"
    merges_into_base = True

    def start_module(
        self, module: str, shape: tuple[int, int], previous: GlobalUpdate | None
    ) -> ModuleAccumulator:
        return FLoRAModule(module, shape, self.dtype, self.device, previous)
