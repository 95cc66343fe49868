"""One round's server side, the same for every driver: what is decided once, whatever the
transport.

The simulator trains its clients in process, the Flower ServerApp sends them messages; both
then hand this module the same things (the sampled clients, each client's result, the bytes
each downloaded) and get the same new state and metrics row. What lives here exists once:

1. failure injection (``federation.fail_rate``), keyed on (seed, round);
2. the FLoRA / FedEx-LoRA merge step: what every client adds to its frozen base this round;
3. reading the results: failures, the straggler rule (``federation.client_timeout``),
   replies that could not be read, each with its message and log line;
4. the aggregation (by the :class:`~flexlora.server.Coordinator`) and the row's transport
   keys: ``train_tokens``, ``seconds_train``, ``bytes_down``, per-client bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from flexlora.types import GlobalUpdate

if TYPE_CHECKING:
    from flexlora.server import Coordinator

log = logging.getLogger(__name__)

__all__ = [
    "INJECTED_FAILURE",
    "NO_REPLY",
    "ClientResult",
    "close_round",
    "injected_failures",
    "round_frozen",
    "straggler_reason",
]

INJECTED_FAILURE = "injected client failure (federation.fail_rate)"
NO_REPLY = "no reply before the round's timeout"


@dataclass(frozen=True)
class ClientResult:
    """How one sampled client's round ended, as its driver saw it.

    ``update`` (a ``ClientUpdate``, or SLoRA's ``SparseUpdate``) when it replied; ``error``
    when it failed; ``rejected`` when its reply could not be read. ``seconds`` is its local
    training time, ``replied_after`` how long the server waited for it (the straggler rule
    reads it; default ``seconds``). Clients trained together in one batched pass share a
    ``batch`` number: their seconds overlap, so a batch counts once in ``seconds_train``.
    """

    client: str
    update: Any = None
    seconds: float = 0.0
    tokens: int = 0
    replied_after: float | None = None
    error: str | None = None
    rejected: str | None = None
    batch: int | None = None


def injected_failures(server: Coordinator, round_: int, clients: Sequence[str]) -> set[str]:
    """The clients ``federation.fail_rate`` makes fail this round (keyed on seed and round)."""
    fail_rate = server.cfg.federation.fail_rate
    if fail_rate <= 0:
        return set()
    n_fail = round(fail_rate * len(clients))
    perm = torch.randperm(len(clients), generator=server.generator(round_, "faults"))
    return {clients[i] for i in perm[:n_fail].tolist()}


def round_frozen(server: Coordinator, state: Any, round_: int) -> GlobalUpdate | None:
    """What every client of ``round_`` adds to its frozen base before training: FLoRA's global
    update, FedEx-LoRA's residual (``None``: nothing, also in SLoRA's sparse stage)."""
    if server.sparse_round(round_):
        return None
    return server.frozen_part(state, initial=round_ == 1)


def straggler_reason(replied_after: float, timeout: float) -> str | None:
    """Why a reply is ignored under ``federation.client_timeout`` (``None``: in time)."""
    if timeout and replied_after > timeout:
        return (
            f"straggler: replied after {replied_after:.2f}s > federation.client_timeout="
            f"{timeout:g}s"
        )
    return None


def close_round(
    server: Coordinator,
    state: Any,
    round_: int,
    clients: Sequence[str],
    results: Sequence[ClientResult],
    bytes_down: Mapping[str, int],
) -> tuple[Any, dict[str, Any]]:
    """Read the results of ``clients``, aggregate the usable updates; the new state and row.

    A sampled client without a result did not reply in time. Updates are aggregated in the
    order of ``clients`` (the population's), so every driver forms the same sum.
    """
    timeout = server.cfg.federation.client_timeout
    by_client = {r.client: r for r in results}
    failures: dict[str, str] = {}
    rejected: dict[str, str] = {}
    accepted: list[ClientResult] = []
    for cid in clients:
        r = by_client.get(cid)
        reason = NO_REPLY if r is None else r.error
        if r is not None and reason is None and r.rejected is None:
            waited = r.seconds if r.replied_after is None else r.replied_after
            reason = straggler_reason(waited, timeout)
        if reason is not None:
            failures[cid] = reason
            log.warning("round %d: client %s dropped: %s", round_, cid, reason)
        elif r is not None and r.rejected is not None:
            rejected[cid] = r.rejected
            log.warning("round %d: update of client %s rejected: %s", round_, cid, r.rejected)
        elif r is not None:
            accepted.append(r)
    updates = [r.update for r in accepted]
    aggregate = server.aggregate_sparse if server.sparse_round(round_) else server.aggregate
    new_state, row = aggregate(state, round_, list(clients), updates, failures)
    row["rejected"] = {**rejected, **row["rejected"]}
    batches: dict[Any, float] = {}
    for i, r in enumerate(accepted):
        key = ("alone", i) if r.batch is None else r.batch
        batches[key] = max(batches.get(key, 0.0), r.seconds)
    row.update(
        {
            "train_tokens": int(sum(r.tokens for r in accepted)),
            "seconds_train": round(sum(batches.values()), 4),
            "bytes_down": sum(bytes_down.values()),
            "bytes_up_per_client": {u.client_id: u.num_bytes() for u in updates},
            "bytes_down_per_client": dict(bytes_down),
        }
    )
    return new_state, row
