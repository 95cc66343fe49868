"""FedEx-LoRA (Singhal et al., 2025): FedAvg of A and B, and the exact remainder in the base.

FedAvg of the factors is not the average of the updates: Σ p_i s_i B_i A_i ≠ s·B̄·Ā. FedEx-LoRA
keeps the averaged factors as the adapter every client starts from and adds the remainder

    R = Σ_i p_i s_i B_i A_i − B̄·Ā        (m, n), rank ≤ Σ r_i + r_max

to the frozen weights, so the global model is exactly W0 + Σ_i p_i ΔW_i, where ΔW_i is client
i's whole update since W0 (the remainder of earlier rounds, which every client held, plus its
adapter). R (plus the previous rounds' residual) is kept as an exact thin SVD (≤ min(m, n)
components) in :attr:`GlobalUpdate.frozen`; it is never written into the weights, whatever
their dtype or quantization (the drivers add it as a separate float32 term, see
``AdapterHost.set_base_delta``).

Replies are folded as they arrive (:class:`FedExModule`): per module the server keeps the
running padded sums Σ w_i s_i pad(B_i), Σ w_i pad(A_i) (the FedAvg factors) and the exact
Σ w_i s_i B_i A_i in the smaller of FlexLoRA's two forms (the weighted factor stacks, or a dense
m×n running sum once the stacks would be larger), so its memory is bounded by the module, not
by the number of clients. At the end the residual's SVD comes from the stack
[Bs/W, −B̄, U_prev S_prev]·[As; Ā; Vh_prev] without forming it, or from the dense
Σ/W − B̄·Ā + R_prev; both are exact.

Mixed ranks (not in the paper, which uses one rank): A and B are zero-padded to the round's
largest rank and averaged with the example weights, in update units as in HetLoRA:
B̄ = Σ p_i s_i pad(B_i), Ā = Σ p_i pad(A_i) (so s is folded into B̄ and the residual is in
the units of ΔW). A client of rank r starts from B = B̄[:, :r] / s_r, A = Ā[:r]: its own
``s_r·B·A`` is exactly the prefix B̄[:, :r]·Ā[:r]. The remainder is one matrix for everyone, so
a client of the largest rank starts exactly from the global model and a smaller one from the
global model less the tail B̄[:, r:]·Ā[r:] of the adapter; the global model (evaluated, and
what the residual keeps exact) is W0 + R + B̄·Ā.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexlora.aggregation.base import Aggregator, ModuleAccumulator, register
from flexlora.aggregation.flexlora import FlexLoRAModule
from flexlora.aggregation.hetlora import PaddedSum
from flexlora.lora.svd import dense_svd, factored_svd
from flexlora.types import FactorState, GlobalUpdate, LoRAFactors, ModuleDelta, SVDState


class FedExModule(ModuleAccumulator):
    """One module's FedAvg factors and exact residual, folded one client at a time.

    Holds a :class:`~flexlora.aggregation.hetlora.PaddedSum` (two buffers at the largest rank so
    far), a :class:`~flexlora.aggregation.flexlora.FlexLoRAModule` for Σ w_i s_i B_i A_i
    (stacks while R·(m + n) ≤ m·n, else one dense (m, n) sum), and a reference to the previous
    residual (``previous``, not copied).
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
        self.average = PaddedSum(self.shape, dtype, device)
        self.exact = FlexLoRAModule(module, shape, dtype, device, "auto", None, 0)
        self.previous = previous
        self._frozen: SVDState | None = None

    def fold(self, client_id: str, f: LoRAFactors, weight: float) -> None:
        A, B = self.load(f)
        self.average.add(A, B, f.scaling, weight)
        self.exact.fold(client_id, f, weight)

    def result(self, total_weight: float) -> FactorState:
        B, A = self.average.average(total_weight, self.average.rank)  # (m, r_max), (r_max, n)
        self._frozen = self.residual(B, A, total_weight)
        return FactorState.of(B, A)

    def frozen(self) -> SVDState | None:
        return self._frozen

    def residual(self, B: Tensor, A: Tensor, total_weight: float) -> SVDState:
        """R_prev + Σ w_i s_i B_i A_i / W − B̄·Ā as an exact thin SVD."""
        prev = self.previous
        to = {"device": self.device, "dtype": self.dtype}
        rank = self.exact.total_rank + A.shape[0] + (prev.rank if prev is not None else 0)
        if self.exact.stacked:
            B_sum, A_sum = self.exact.stacks()  # (m, R), (R, n)
            Bs = [B_sum / total_weight, -B]
            As = [A_sum, A]
            if prev is not None:
                Bs.append(prev.U.to(**to) * prev.S.to(**to))  # (m, k)
                As.append(prev.Vh.to(**to))  # (k, n)
            U, S, Vh = factored_svd(torch.cat(Bs, dim=1), torch.cat(As, dim=0))
        else:
            assert self.exact.delta is not None
            delta = self.exact.delta / total_weight - B @ A  # (m, n)
            if prev is not None:
                delta += (prev.U.to(**to) * prev.S.to(**to)) @ prev.Vh.to(**to)
            U, S, Vh = dense_svd(delta)
            U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]  # rank(R) <= the stack's width
        return SVDState(U=U.contiguous(), S=S.contiguous(), Vh=Vh.contiguous())

    def tensors(self) -> list[Tensor]:
        return self.average.tensors() + self.exact.tensors()


@register
class FedExLoRA(Aggregator):
    """FedAvg of the (padded) factors plus the exact residual, kept frozen outside the adapter."""

    name = "fedex"
    reads_previous = True

    def start_module(
        self, module: str, shape: tuple[int, int], previous: GlobalUpdate | None
    ) -> ModuleAccumulator:
        prev = previous.frozen.get(module) if previous is not None else None
        return FedExModule(module, shape, self.dtype, self.device, prev)
