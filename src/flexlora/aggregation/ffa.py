"""FFA-LoRA (Sun et al., ICLR 2024): A is frozen and shared, only B is trained and averaged.

With heterogeneous ranks, one frozen A is drawn at the population's largest rank in round 0
and lives in the server state; a client of rank r receives (and must send back) its first r
rows. The server averages the zero-padded, scaled B's, which is exact:
Σ p_i s_i B_i A[:r_i] = B̄·A.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexlora.aggregation.base import Aggregator, ModuleAccumulator, pad_columns, register
from flexlora.errors import InvalidUpdateError
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors, ModuleDelta


def check_frozen_A(
    client: str,
    module: str,
    A: Tensor,
    frozen: Tensor,
    whose: str,
    atol: float,
    rank: int | None = None,
) -> None:
    """Raise ``frozen_A`` unless ``A`` (r, n) is the first r rows of ``frozen`` (within atol);
    ``rank`` is the client's own rank when ``A`` is a prefix of its A (default r)."""
    r = A.shape[0]
    own = r if rank is None else rank
    frozen = frozen.to(A.device)
    if r > frozen.shape[0] or not torch.allclose(A.to(frozen.dtype), frozen[:r], atol=atol, rtol=0):
        rows = "" if own == r else f" in its first {r} rows"
        raise InvalidUpdateError(
            client,
            module,
            "frozen_A",
            f"ffa needs every client to keep the shared frozen A; this client's A (rank {own}) "
            f"differs from {whose} frozen A (rank {frozen.shape[0]}){rows}",
        )


class FFAModule(ModuleAccumulator):
    """The reference A (r_ref, n) and the running Σ w_i s_i B_i zero-padded (m, r_ref).

    The reference is the previous state's frozen A when there is one (the drivers always pass
    it), else the widest client's A so far (``flexlora aggregate`` on loose adapters): a
    wider A that agrees with it on their common rows replaces it.
    """

    def __init__(
        self,
        module: str,
        shape: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
        atol: float,
        frozen: Tensor | None,
    ) -> None:
        super().__init__(module, shape, dtype, device)
        self.atol = atol
        self.fixed = frozen is not None
        self.whose = "the server's"
        self.A: Tensor | None = None  # (r_ref, n)
        self.B: Tensor | None = None  # (m, r_ref)
        if frozen is not None:
            self.A = frozen.to(device=device, dtype=dtype).clone()
            self.B = torch.zeros(self.shape[0], frozen.shape[0], dtype=dtype, device=device)

    def check(self, client_id: str, f: LoRAFactors) -> None:
        if self.A is None:
            return
        common = self.A[: f.rank] if self.fixed else self.A[: min(f.rank, self.A.shape[0])]
        A = f.A if self.fixed else f.A[: common.shape[0]]
        check_frozen_A(
            client_id, self.module, A.to(self.device), common, self.whose, self.atol, f.rank
        )

    def fold(self, client_id: str, f: LoRAFactors, weight: float) -> None:
        A, B = self.load(f)
        if self.A is None or self.B is None:
            self.A, self.whose = A.clone(), f"client {client_id}'s"
            self.B = torch.zeros(self.shape[0], f.rank, dtype=self.dtype, device=self.device)
        elif f.rank > self.A.shape[0]:  # only without a fixed reference (check refuses it)
            self.A, self.whose = A.clone(), f"client {client_id}'s"
            self.B = pad_columns(self.B, f.rank)  # (m, r_ref)
        self.B[:, : f.rank].add_(B, alpha=weight * f.scaling)

    def result(self, total_weight: float) -> ModuleDelta:
        assert self.A is not None and self.B is not None
        r_ref = self.A.shape[0]
        return ModuleDelta(
            U=self.B / total_weight,  # (m, r_ref)
            S=torch.ones(r_ref, dtype=self.dtype, device=self.device),
            Vh=self.A.contiguous(),  # (r_ref, n)
            truncation="prefix",
        )


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

    def __init__(
        self,
        atol: float = 1e-6,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(dtype, device)
        self.atol = atol

    def check(self, update: ClientUpdate, state: GlobalUpdate | None) -> None:
        """Reject ``update`` if any module's A is not the state's frozen A (its first r rows)."""
        if state is None:
            return
        for module, f in update.factors.items():
            if module in state.modules:
                frozen = state[module].Vh.to(self.dtype)
                check_frozen_A(update.client_id, module, f.A, frozen, "the server's", self.atol)

    def start_module(
        self, module: str, shape: tuple[int, int], previous: GlobalUpdate | None
    ) -> ModuleAccumulator:
        has = previous is not None and module in previous.modules
        frozen = previous[module].Vh if has else None
        return FFAModule(module, shape, self.dtype, self.device, self.atol, frozen)
