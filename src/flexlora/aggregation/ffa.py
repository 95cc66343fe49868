"""FFA-LoRA (Sun et al., ICLR 2024): A is frozen and shared, only B is trained and averaged.

With heterogeneous ranks, clients share one frozen A at the largest rank and a client of rank r
uses its first r rows; the server averages the (zero-padded, scaled) B's, which is exact:
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
    """Average B only; A must be the same frozen matrix (prefix) at every client."""

    name = "ffa"
    freeze_lora_A = True

    def __init__(self, atol: float = 1e-6, dtype: torch.dtype | str = torch.float32) -> None:
        super().__init__(dtype)
        self.atol = atol

    def aggregate_module(
        self,
        module: str,
        updates: Sequence[ClientUpdate],
        p: Sequence[float],
        previous: GlobalUpdate | None,
    ) -> ModuleDelta:
        factors = [u.factors[module] for u in updates]
        widest = max(range(len(factors)), key=lambda i: factors[i].rank)
        A = factors[widest].A.to(self.dtype)  # (r_max, n)
        r_max = A.shape[0]
        for u, f in zip(updates, factors, strict=True):
            if not torch.allclose(f.A.to(self.dtype), A[: f.rank], atol=self.atol, rtol=0):
                raise InvalidUpdateError(
                    u.client_id,
                    module,
                    "frozen_A",
                    "ffa needs every client to keep the shared frozen A; this client's A "
                    f"differs from client {updates[widest].client_id}'s",
                )
        B = torch.zeros(factors[0].shape[0], r_max, dtype=self.dtype)  # (m, r_max)
        for pi, f in zip(p, factors, strict=True):
            B += pi * f.scaling * pad_columns(f.B.to(self.dtype), r_max)
        return ModuleDelta(
            U=B, S=torch.ones(r_max, dtype=self.dtype), Vh=A.contiguous(), truncation="prefix"
        )
