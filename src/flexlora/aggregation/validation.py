"""Validation of client updates before anything touches the global state.

The server knows what it asked for: which clients are in the round, each one's ranks per
module, and each module's shape. An update that does not fit is rejected with its reason
and the round goes on with the others. Nothing here mutates an update or the global state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flexlora.aggregation.hetlora import frobenius_norm
from flexlora.errors import InvalidUpdateError
from flexlora.types import ClientUpdate

__all__ = ["UpdateValidator"]

ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class UpdateValidator:
    """Checks updates against the round's expectations.

    Parameters
    ----------
    shapes:
        Module name -> (m, n) of the adapted weight.
    max_norm:
        Reject an update whose ``‖s·B·A‖_F`` exceeds this in any module (0: no bound).
    """

    shapes: Mapping[str, tuple[int, int]]
    max_norm: float = 0.0

    def check(self, update: ClientUpdate, expected_ranks: Mapping[str, int] | None) -> None:
        """Raise :class:`InvalidUpdateError` (with client, module, reason) if ``update`` is bad."""
        cid = update.client_id
        if expected_ranks is None:
            raise InvalidUpdateError(cid, None, "unknown_client", "client is not in this round")
        missing = [m for m in self.shapes if m not in update.factors]
        if missing:
            raise InvalidUpdateError(
                cid, missing[0], "missing_module", f"{len(missing)} module(s) missing"
            )
        extra = [m for m in update.factors if m not in self.shapes]
        if extra:
            raise InvalidUpdateError(cid, extra[0], "extra_module", "module is not adapted here")
        for name, f in update.factors.items():
            m, n = self.shapes[name]
            for label, t in (("A", f.A), ("B", f.B)):
                if t.dtype not in ALLOWED_DTYPES:
                    raise InvalidUpdateError(
                        cid, name, "dtype", f"lora_{label} has dtype {t.dtype}"
                    )
            if f.shape != (m, n):
                raise InvalidUpdateError(
                    cid,
                    name,
                    "shape",
                    f"B {tuple(f.B.shape)} / A {tuple(f.A.shape)} do not adapt a {m}x{n} weight",
                )
            if f.rank > expected_ranks[name]:
                raise InvalidUpdateError(
                    cid,
                    name,
                    "rank",
                    f"rank {f.rank} is above the client's assigned rank {expected_ranks[name]}",
                )
            for label, t in (("A", f.A), ("B", f.B)):
                if not bool(torch.isfinite(t).all()):
                    raise InvalidUpdateError(
                        cid, name, "nonfinite", f"lora_{label} holds NaN or Inf values"
                    )
            if self.max_norm > 0:
                norm = frobenius_norm(f)
                if not math.isfinite(norm) or norm > self.max_norm:
                    raise InvalidUpdateError(
                        cid,
                        name,
                        "norm",
                        f"||s*B*A||_F = {norm:.4g} exceeds the bound {self.max_norm:.4g}",
                    )

    def split(
        self,
        updates: Sequence[ClientUpdate],
        expected: Mapping[str, Mapping[str, int]],
    ) -> tuple[list[ClientUpdate], dict[str, str]]:
        """Partition ``updates`` into the valid ones and ``{client: reason}`` for the rest.

        ``expected`` maps each client of the round to its assigned ranks per module. A
        second update from the same client is rejected.
        """
        valid: list[ClientUpdate] = []
        rejected: dict[str, str] = {}
        seen: set[str] = set()
        for u in updates:
            try:
                if u.client_id in seen:
                    raise InvalidUpdateError(u.client_id, None, "duplicate", "second update")
                self.check(u, expected.get(u.client_id))
            except InvalidUpdateError as exc:
                rejected[str(u.client_id)] = str(exc)
                continue
            seen.add(u.client_id)
            valid.append(u)
        return valid, rejected
