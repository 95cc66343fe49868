"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' factors, a noise-free exact sum.

B = [s_1 B_1 … s_K B_K] and A = [p_1 A_1; …; p_K A_K] give B·A = Σ p_i s_i B_i A_i exactly, at
rank Σ r_i. Clients add it to their frozen weights and start a fresh adapter each round, so the
global model is the running sum over rounds: given the previous state, the new one is that sum,
kept exact as a thin SVD computed from the stacked factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexlora.aggregation.base import Aggregator, ModuleAccumulator, register
from flexlora.lora.svd import factored_svd
from flexlora.types import GlobalUpdate, LoRAFactors, ModuleDelta


class FLoRAModule(ModuleAccumulator):
    """The stacks s_i·B_i (m, r_i) and w_i·A_i (r_i, n): the result itself has rank Σ r_i."""

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
        self.Bs: list[Tensor] = []
        self.As: list[Tensor] = []

    def fold(self, client_id: str, f: LoRAFactors, weight: float) -> None:
        A, B = self.load(f)
        self.Bs.append(f.scaling * B)  # (m, r_i)
        self.As.append(weight * A)  # (r_i, n)

    def result(self, total_weight: float) -> ModuleDelta:
        B = torch.cat(self.Bs, dim=1)  # (m, R)
        A = torch.cat(self.As, dim=0) / total_weight  # (R, n)
        if self.previous is None:
            S = torch.ones(B.shape[1], dtype=self.dtype, device=self.device)
            return ModuleDelta(U=B, S=S, Vh=A, truncation="exact")
        prev = self.previous
        U, S, Vh = (t.to(device=self.device, dtype=self.dtype) for t in (prev.U, prev.S, prev.Vh))
        B_all = torch.cat([U * S, B], dim=1)
        A_all = torch.cat([Vh, A], dim=0)
        U, S, Vh = factored_svd(B_all, A_all)  # exact; k <= min(m, n) components
        return ModuleDelta(U=U, S=S, Vh=Vh, truncation="svd")


@register
class FLoRA(Aggregator):
    """Stacking aggregation; accumulates over rounds when given the previous state."""

    name = "flora"
    merges_into_base = True

    def start_module(
        self, module: str, shape: tuple[int, int], previous: GlobalUpdate | None
    ) -> ModuleAccumulator:
        return FLoRAModule(module, shape, self.dtype, self.device, previous)
