"""One round's server side, the same for every driver: what is decided once, whatever the
transport.

The simulator trains its clients in process, the Flower ServerApp sends them messages; both
then hand this module the same things (the sampled clients, each client's result, the bytes
each downloaded) and get the same new state and metrics row. What lives here exists once:

1. failure injection (``federation.fail_rate``), keyed on (seed, round);
2. the FLoRA / FedEx-LoRA merge step: what every client adds to its frozen base this round;
3. reading the results: failures, the straggler rule (``federation.client_timeout``),
   replies that could not be read, each with its message and log line;
4. the aggregation (by the :class:`~flexlora.server.Coordinator`), each reply folded as it is
   received (:class:`RoundCollector`; one that arrives ahead of an earlier client waits in a
   :class:`~flexlora.federation.replies.ReplyStore`, bounded in memory), and the row's
   transport keys: ``train_tokens``, ``seconds_train``, ``bytes_down``, per-client bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from flexlora.errors import FlexLoRAError
from flexlora.federation.replies import ReplyStore
from flexlora.methods.slora import SparseUpdate
from flexlora.types import ClientUpdate, GlobalUpdate

if TYPE_CHECKING:
    from flexlora.server import Coordinator

log = logging.getLogger(__name__)

__all__ = [
    "INJECTED_FAILURE",
    "NO_REPLY",
    "ClientResult",
    "RoundCollector",
    "close_round",
    "expected_failure",
    "failure_reason",
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
    upload_bytes: int = 0  # set when the update is folded and dropped


def expected_failure(exc: Exception) -> bool:
    """Whether a client's exception is a failure the code expects: a RuntimeError (out of
    memory among them) or a FlexLoRAError; anything else may be a bug."""
    return isinstance(exc, (RuntimeError, FlexLoRAError))


def failure_reason(exc: Exception, client: str) -> str:
    """A failed client's entry in the row, the same in both drivers: the message of a failure
    the code expects (:func:`expected_failure`); any other exception is named by its type too,
    and its traceback goes to the log (it may be a bug). The round goes on without the client
    either way, as a Flower node's failure does."""
    if not expected_failure(exc):
        log.error("client %s failed: %s", client, type(exc).__name__, exc_info=exc)
        return f"{type(exc).__name__}: {exc}"
    return str(exc) or type(exc).__name__


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


class RoundCollector:
    """One round's results as a driver receives them, folded in the order of ``clients``.

    :meth:`offer` reads a result at once: a failure, a straggler (``federation.client_timeout``)
    or a reply that could not be read is recorded with its message and log line; an update
    is folded into the round's aggregation (:meth:`Coordinator.open_round`) as soon as every
    client before it in ``clients`` has been resolved, so that every driver forms the same sum
    bit for bit. In process (the simulator) results come in that order and nothing waits; on
    Flower a reply that arrives ahead of an earlier client's is held until that client
    replies, fails or the round closes. :meth:`close` treats a client without a result as one
    that did not reply and returns the new state and the row.

    Holds the aggregation (bounded by the adapted weights, plus the updates its reply store
    keeps for the diagnostics), a few numbers per client, and the held-back updates in a
    :class:`~flexlora.federation.replies.ReplyStore`: at most ``held_budget`` bytes of them in
    memory (default :data:`~flexlora.federation.replies.REPLY_MEMORY_BYTES`), the others in
    safetensors files in the server's ``reply_dir``, each read back when its turn to be folded
    comes. A slow or silent first client therefore costs disk, not memory, whatever the number
    of clients.

    A driver uses it in a ``with`` block: a round abandoned before :meth:`close` (an error
    while a client trains or a reply is pulled, an interrupt) is then released
    (:meth:`release`), and every update it or its aggregation spilled to disk is deleted at
    once; :meth:`close` releases it too, also when it raises.
    """

    def __init__(
        self,
        server: Coordinator,
        state: Any,
        round_: int,
        clients: Sequence[str],
        held_budget: int | None = None,
    ):
        self.server = server
        self.round = round_
        self.clients = list(clients)
        self.timeout = server.cfg.federation.client_timeout
        self.aggregation = server.open_round(state, round_, self.clients)
        self.failures: dict[str, str] = {}
        self.accepted: list[ClientResult] = []  # their updates dropped once folded
        self._results: dict[str, ClientResult | None] = {}  # client -> held result (None: done)
        self._next = 0  # the first client of ``clients`` not folded or passed over yet
        self._held_budget = held_budget
        self._store: ReplyStore | None = None  # the held updates (created when one waits)
        self._keys: dict[str, int] = {}  # client -> its held update's key in the store
        self._closed = False

    def __enter__(self) -> RoundCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """End the round without a result (after :meth:`close`: nothing to do): drop the
        held updates and release the aggregation (its spilled files deleted)."""
        self._closed = True
        self._results = {cid: None for cid in self._results}
        self._keys.clear()
        if self._store is not None:
            self._store.close()
            self._store = None
        self.aggregation.release()

    @property
    def held(self) -> int:
        """Updates that arrived and wait for an earlier client."""
        return sum(1 for r in self._results.values() if r is not None)

    @property
    def held_bytes(self) -> int:
        """Bytes of the held updates that are in memory (at most the store's budget)."""
        return self._store.held if self._store is not None else 0

    @property
    def spilled(self) -> int:
        """Held updates written to disk (beyond the budget)."""
        return self._store.spilled if self._store is not None else 0

    def offer(self, result: ClientResult) -> None:
        """Read one client's result.

        A client's first result counts; a later one (whatever it says) is rejected as a
        ``duplicate`` (:meth:`RoundAggregation.duplicate`) and never folded, whether the first
        was folded, is held, failed or was unreadable. A client not in the round: logged,
        ignored.
        """
        assert not self._closed, "the round is closed"
        cid = result.client
        if cid not in self.clients:
            log.warning("round %d: result of client %s (not in the round) ignored", self.round, cid)
            return
        if cid in self._results:
            self.aggregation.duplicate(cid, result.update)
            return
        reason = result.error
        if reason is None and result.rejected is None:
            waited = result.seconds if result.replied_after is None else result.replied_after
            reason = straggler_reason(waited, self.timeout)
        if reason is not None:
            self.failures[cid] = reason
            log.warning("round %d: client %s dropped: %s", self.round, cid, reason)
            self._results[cid] = None
        elif result.rejected is not None:
            self.aggregation.reject(cid, result.rejected)  # logged there
            self._results[cid] = None
        else:
            self._hold(result)
        self._drain()

    def close(self, bytes_down: Mapping[str, int]) -> tuple[Any, dict[str, Any]]:
        """Fold what is held, aggregate; the new state and the row (with transport keys).
        The round is released afterwards, also when this raises."""
        assert not self._closed, "the round is closed"
        try:
            return self._result(bytes_down)
        finally:
            self.release()

    def _result(self, bytes_down: Mapping[str, int]) -> tuple[Any, dict[str, Any]]:
        for cid in self.clients:
            if cid not in self._results:
                self.failures[cid] = NO_REPLY
                log.warning("round %d: client %s dropped: %s", self.round, cid, NO_REPLY)
                self._results[cid] = None
        self._drain()
        self._closed = True
        new_state, row = self.aggregation.close(self.failures)
        batches: dict[Any, float] = {}
        for i, r in enumerate(self.accepted):
            key = ("alone", i) if r.batch is None else r.batch
            batches[key] = max(batches.get(key, 0.0), r.seconds)
        row.update(
            {
                "train_tokens": int(sum(r.tokens for r in self.accepted)),
                "seconds_train": round(sum(batches.values()), 4),
                "bytes_down": sum(bytes_down.values()),
                "bytes_up_per_client": {r.client: r.upload_bytes for r in self.accepted},
                "bytes_down_per_client": dict(bytes_down),
            }
        )
        return new_state, row

    def _hold(self, result: ClientResult) -> None:
        """Keep a reply until it is folded: as it is when it is next in ``clients`` (folded at
        once), else its update in the store (memory up to the budget, then disk)."""
        cid = result.client
        waits = cid != self.clients[self._next]
        if waits and isinstance(result.update, (ClientUpdate, SparseUpdate)):
            if self._store is None:
                self._store = ReplyStore(self._held_budget, self.server.reply_dir)
            self._keys[cid] = self._store.put(result.update)
            result = replace(result, update=None)
        self._results[cid] = result

    def _drain(self) -> None:
        """Fold the held updates whose predecessors in ``clients`` are all resolved."""
        while self._next < len(self.clients) and self.clients[self._next] in self._results:
            cid = self.clients[self._next]
            r = self._results[cid]
            if r is not None:
                if cid in self._keys:
                    assert self._store is not None
                    r = replace(r, update=self._store.take(self._keys.pop(cid)))
                self.aggregation.add(r.update)
                self.accepted.append(_spent(r))
                self._results[cid] = None
            self._next += 1


def _spent(r: ClientResult) -> ClientResult:
    """``r`` without its update (folded: only its counts stay for the row)."""
    size = r.update.num_bytes() if hasattr(r.update, "num_bytes") else 0
    return replace(r, update=None, upload_bytes=size)


def close_round(
    server: Coordinator,
    state: Any,
    round_: int,
    clients: Sequence[str],
    results: Sequence[ClientResult],
    bytes_down: Mapping[str, int],
) -> tuple[Any, dict[str, Any]]:
    """Read the results of ``clients``, aggregate the usable updates; the new state and row.

    A :class:`RoundCollector` offered every result, then closed: a sampled client without a
    result did not reply in time, and updates are aggregated in the order of ``clients``
    (the population's), so every driver forms the same sum.
    """
    with RoundCollector(server, state, round_, clients) as collector:
        for r in results:
            collector.offer(r)
        return collector.close(bytes_down)
