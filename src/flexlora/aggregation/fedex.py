"""FedEx-LoRA (Singhal et al., 2025): FedAvg of A and B, and the exact remainder in the base.

FedAvg of the factors is not the average of the updates: Σ p_i s_i B_i A_i ≠ s·B̄·Ā. FedEx-LoRA
keeps the averaged factors as the adapter every client starts from and adds the remainder

    R = Σ_i p_i s_i B_i A_i − B̄·Ā        (m, n), rank ≤ Σ r_i + r_max

to the frozen weights, so the global model is exactly W0 + Σ_i p_i ΔW_i, where ΔW_i is client
i's whole update since W0 (the remainder of earlier rounds, which every client held, plus its
adapter). R is kept in factored form, as the thin SVD of the stack
[p_1 s_1 B_1 … p_K s_K B_K, −B̄, U_prev S_prev]·[A_1; …; A_K; Ā; Vh_prev] (exact, ≤ min(m, n)
components), in :attr:`GlobalUpdate.frozen`; it is never written into quantized weights (the
drivers add it as a separate float32 term there, see ``AdapterHost.set_base_delta``).

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

from collections.abc import Sequence

import torch

from flexlora.aggregation.base import Aggregator, check_updates, normalize_weights, register
from flexlora.aggregation.hetlora import padded_average
from flexlora.lora.svd import factored_svd
from flexlora.types import ClientUpdate, FactorState, GlobalUpdate, SVDState


@register
class FedExLoRA(Aggregator):
    """FedAvg of the (padded) factors plus the exact residual, kept frozen outside the adapter."""

    name = "fedex"
    reads_previous = True

    def aggregate(
        self,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float] | None = None,
        previous: GlobalUpdate | None = None,
    ) -> GlobalUpdate:
        """Averaged factors in ``modules``; the cumulative residual in ``frozen``."""
        updates = list(updates)
        shapes = check_updates(updates)
        p = normalize_weights(updates, weights)
        modules: dict[str, FactorState] = {}
        frozen: dict[str, SVDState] = {}
        for name in shapes:
            modules[name] = self.aggregate_module(name, updates, p, previous)
            frozen[name] = self.residual(name, updates, p, modules[name], previous)
        return GlobalUpdate(modules=modules, strategy=self.name, frozen=frozen)

    def aggregate_module(
        self,
        module: str,
        updates: Sequence[ClientUpdate],
        p: Sequence[float],
        previous: GlobalUpdate | None,
    ) -> FactorState:
        factors = [u.factors[module] for u in updates]
        B, A = padded_average(factors, p, self.dtype)  # (m, r_max), (r_max, n)
        return FactorState.of(B, A)

    def residual(
        self,
        module: str,
        updates: Sequence[ClientUpdate],
        p: Sequence[float],
        averaged: FactorState,
        previous: GlobalUpdate | None,
    ) -> SVDState:
        """R_prev + Σ p_i s_i B_i A_i − B̄·Ā as an exact thin SVD, from the stacked factors."""
        factors = [u.factors[module] for u in updates]
        Bs = [pi * f.scaling * f.B.to(self.dtype) for pi, f in zip(p, factors, strict=True)]
        As = [f.A.to(self.dtype) for f in factors]
        Bs.append(-averaged.U.to(self.dtype))  # (m, r_max)
        As.append(averaged.Vh.to(self.dtype))  # (r_max, n)
        if previous is not None and module in previous.frozen:
            prev = previous.frozen[module]
            Bs.append(prev.U.to(self.dtype) * prev.S.to(self.dtype))  # (m, k)
            As.append(prev.Vh.to(self.dtype))  # (k, n)
        U, S, Vh = factored_svd(torch.cat(Bs, dim=1), torch.cat(As, dim=0))
        return SVDState(U=U.contiguous(), S=S.contiguous(), Vh=Vh.contiguous())
