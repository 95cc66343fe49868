"""Any flexlora aggregator as a Flower Message-API strategy, mixed ranks included.

Flower's ``FedAvg`` sends one payload to every node and averages arrays key by key; with
heterogeneous ranks neither is right. :class:`FlexLoRAStrategy` asks the
:class:`~flexlora.server.Coordinator` for every decision instead: which clients a round samples
(the simulator's seeded (seed, round) rule, over the nodes' client ids), what each node
receives (the global update cut to *that node's* ranks, one message per node), how replies are
validated (shapes and ranks: Flower only checks keys) and how they are aggregated. A round's
metrics row has the simulator's keys.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flexlora.errors import InvalidUpdateError
from flexlora.federation.round import (
    NO_REPLY,
    ClientResult,
    RoundCollector,
    injected_failures,
    round_frozen,
)
from flexlora.flower.records import (
    factors_to_record,
    record_bytes,
    record_to_factors,
    record_to_state,
    record_to_values,
    state_to_record,
    values_to_record,
)
from flexlora.methods.slora import SparseUpdate
from flexlora.server import Coordinator
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors

log = logging.getLogger(__name__)

__all__ = [
    "FlexLoRAStrategy",
    "RoundPlan",
    "Unsent",
    "decode_eval_reply",
    "decode_reply",
    "decode_sparse_reply",
    "not_pushed",
]


def not_pushed(node: int) -> str:
    """Why a client failed whose round message the Grid did not accept."""
    return f"not sent: the Grid did not accept the message for node {node} (no message id)"


@dataclass(frozen=True)
class Unsent:
    """A round message that never left the server (``Grid.push_messages`` gave it no id):
    its node's client is recorded as failed with ``reason``."""

    node_id: int
    reason: str


@dataclass
class RoundPlan:
    """One round's decisions and what the server needs to read the replies; no messages.

    :meth:`FlexLoRAStrategy.messages` builds the messages from it one at a time (each
    client's factors cut when its message is built) and fills in the byte counts, so a driver
    that pushes a few at a time (:func:`~flexlora.flower.server_app.stream_replies`) never
    holds the round's downloads; the plan keeps only the counts and the pushed ids.
    """

    round: int
    clients: list[str]  # sampled, in the population's order
    node_client: dict[int, str]  # destination node -> its client
    failing: set[str] = field(default_factory=set)  # federation.fail_rate's clients
    config: dict[str, Any] = field(default_factory=dict)  # Flower's train config, if any
    sparse: bool = False  # SLoRA's sparse stage: the messages carry mask values
    bytes_down: dict[str, int] = field(default_factory=dict)  # like the simulator (factors)
    wire_bytes_down: dict[str, int] = field(default_factory=dict)  # arrays sent, npy headers in
    message_ids: dict[str, int] = field(default_factory=dict)  # pushed message id -> node


def _reply_parts(
    content: RecordDict, client: str, arrays_key: str
) -> tuple[ArrayRecord, int, dict[str, float]]:
    """A reply's arrays record, example count and finite metrics (loss, tokens, seconds; the
    last two not negative: they sum into the row, and seconds decide the straggler rule)."""
    arrays = content.array_records.get(arrays_key)
    metrics = content.metric_records.get("metrics")
    if arrays is None or metrics is None:
        raise InvalidUpdateError(
            client, None, "type", f"reply lacks its {arrays_key} or metrics record"
        )
    num = metrics.get("num-examples")
    if isinstance(num, bool) or not isinstance(num, int):
        raise InvalidUpdateError(client, None, "num_examples", f"num-examples is {num!r}")
    values = {k: metrics.get(k) for k in ("train_loss", "tokens", "seconds")}
    for key, value in values.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidUpdateError(client, None, "metrics", f"{key} is {value!r}")
        if key != "train_loss" and value < 0:
            raise InvalidUpdateError(client, None, "metrics", f"{key} is negative: {value!r}")
    return arrays, num, {k: float(v) for k, v in values.items()}  # type: ignore[arg-type]


def decode_reply(
    content: RecordDict, client: str, alpha: float, use_rslora: bool
) -> tuple[ClientUpdate, float]:
    """A reply's ``arrays`` + ``metrics`` -> (update, seconds of local training)."""
    arrays, num, values = _reply_parts(content, client, "arrays")
    update = ClientUpdate(
        client_id=client,
        num_examples=num,
        factors=record_to_factors(arrays, client, alpha, use_rslora),
        metrics={"train_loss": values["train_loss"], "tokens": values["tokens"]},
    )
    return update, values["seconds"]


def decode_sparse_reply(content: RecordDict, client: str) -> tuple[SparseUpdate, float]:
    """A stage-1 reply's ``values`` + ``metrics`` -> (sparse update, seconds of training)."""
    arrays, num, values = _reply_parts(content, client, "values")
    update = SparseUpdate(
        client_id=client,
        num_examples=num,
        values=record_to_values(arrays, client),
        metrics={"train_loss": values["train_loss"], "tokens": values["tokens"]},
    )
    return update, values["seconds"]


def decode_eval_reply(reply: Message) -> tuple[float, int]:
    """A node's evaluation reply -> (Rouge-L in [0, 1], number of test examples); a reply
    that says anything else raises ``ValueError``."""
    if reply.has_error():
        raise ValueError(reply.error.reason)
    metrics = reply.content.metric_records.get("metrics")
    score = None if metrics is None else metrics.get("rouge-l")
    count = None if metrics is None else metrics.get("num-examples")
    if not isinstance(score, float) or not 0.0 <= score <= 1.0:
        raise ValueError(f"rouge-l is {score!r}, not a number in [0, 1]")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"num-examples is {count!r}")
    return score, count


class FlexLoRAStrategy(Strategy):
    """A Flower strategy that drives a :class:`~flexlora.server.Coordinator`.

    Parameters
    ----------
    coordinator:
        The server step (aggregator, ranks, sampling, validation).
    nodes:
        Node id -> the client id that node trains (from the nodes' own configs).
    """

    def __init__(self, coordinator: Coordinator, nodes: Mapping[int, str]) -> None:
        self.coordinator = coordinator
        self.node_of = {cid: node for node, cid in nodes.items()}
        if len(self.node_of) != len(nodes):
            raise ValueError("two nodes claim the same client")
        # The population in the coordinator's order (the dataset's), so that sampling is
        # the simulator's whenever every client has a node.
        self.pool = [c for c in coordinator.client_type if c in self.node_of]
        self._pending: tuple[GlobalUpdate, RoundPlan] | None = None

    # ---------------------------------------------------------------- one round
    def injected_failures(self, round_: int, clients: Sequence[str]) -> set[str]:
        """The clients ``federation.fail_rate`` makes fail, drawn as the simulator does."""
        return injected_failures(self.coordinator, round_, clients)

    def plan(
        self, state: GlobalUpdate, round_: int, config: ConfigRecord | None = None
    ) -> RoundPlan:
        """Sample the round's clients (and who fails); the messages come from
        :meth:`messages`."""
        server = self.coordinator
        clients = server.sample(round_, self.pool)
        return RoundPlan(
            round_,
            clients,
            {self.node_of[cid]: cid for cid in clients},
            failing=self.injected_failures(round_, clients),
            config=dict(config or {}),
            sparse=server.sparse_round(round_),
        )

    def messages(self, state: GlobalUpdate, plan: RoundPlan) -> Iterator[Message]:
        """One message per sampled node, at that node's ranks, built as it is asked for (its
        byte counts recorded in ``plan``): nothing here keeps a message once it is yielded."""
        # FLoRA's global ΔW, FedEx-LoRA's residual: the clients add it to their frozen base
        # (one record, shared by every message of the round).
        frozen = round_frozen(self.coordinator, state, plan.round)
        base = state_to_record(frozen) if frozen is not None else None
        for cid in plan.clients:
            yield self._message(state, plan, cid, base)

    def _message(self, state: Any, plan: RoundPlan, cid: str, base: ArrayRecord | None) -> Message:
        """``cid``'s TRAIN message of ``plan``'s round."""
        server, round_, sparse = self.coordinator, plan.round, plan.sparse
        if sparse:  # SLoRA's stage 1: the global values at the shared mask
            arrays = values_to_record(state.values())
            down = state.num_bytes()
        else:
            start = server.start_factors(state, cid, round_)
            arrays = factors_to_record(start)
            down = server.download_bytes(start, state, round_)
            del start
        settings = ConfigRecord(dict(plan.config))
        settings.update(
            {
                "server-round": round_,
                "client-id": cid,
                "rank-type": server.client_type[cid],
                "seed": server.client_seed(round_, cid),
                "train-a": server.trains_A,
                "fail": cid in plan.failing,
                "stage": "sparse" if sparse else "lora",
            }
        )
        if sparse:  # the union mask's density: the node rebuilds the masks from it
            settings["sparse-density"] = server.union_density
        content = RecordDict({"values" if sparse else "arrays": arrays, "config": settings})
        if base is not None:
            content["base"] = base
        plan.bytes_down[cid] = down
        plan.wire_bytes_down[cid] = record_bytes(arrays) + (record_bytes(base) if base else 0)
        node = self.node_of[cid]
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)

    def collect(
        self, state: GlobalUpdate, plan: RoundPlan, replies: Iterable[Message | Unsent]
    ) -> tuple[GlobalUpdate, dict[str, Any]]:
        """Validate the replies, aggregate with the flexlora math; the new state and its row.

        Each reply is decoded and offered to a :class:`RoundCollector` as ``replies`` yields
        it, so an iterator that pulls replies as they arrive (:func:`stream_replies`) folds
        them then: the decoded updates are not held until the round ends. An
        :class:`Unsent` is its client's failure.
        """
        server = self.coordinator
        lora = server.cfg.lora
        round_ = plan.round
        # released however the round ends: a grid error or an interrupt while replies are
        # pulled leaves no spilled update behind
        with RoundCollector(server, state, round_, plan.clients) as collector:
            for reply in replies:
                if isinstance(reply, Unsent):
                    if (cid := plan.node_client.get(reply.node_id)) is not None:
                        collector.offer(ClientResult(cid, error=reply.reason))
                        plan.bytes_down.pop(cid, None)  # nothing reached the node
                        plan.wire_bytes_down.pop(cid, None)
                    continue
                # the node the message went to (a Grid's own error reply comes from elsewhere)
                node = plan.message_ids.get(reply.metadata.reply_to_message_id)
                node = reply.metadata.src_node_id if node is None else node
                cid = plan.node_client.get(node)
                if cid is None:
                    log.warning("round %d: unexpected reply from node %d ignored", round_, node)
                    continue
                # a second reply of a node is the collector's to reject (a duplicate)
                alpha, rslora = lora.alpha, lora.use_rslora
                collector.offer(self._read_reply(reply, cid, plan.sparse, alpha, rslora))
            return collector.close(plan.bytes_down)

    @staticmethod
    def _read_reply(
        reply: Message, cid: str, sparse: bool, alpha: float, use_rslora: bool
    ) -> ClientResult:
        """One TRAIN reply as the client's result: its update, error or why it is unreadable.

        Nothing in a reply's content aborts the round: a decoding error that is not an
        :class:`InvalidUpdateError` (a case the decoders missed) rejects this reply as
        ``type``, logged with its traceback."""
        if reply.has_error():
            return ClientResult(cid, error=reply.error.reason)
        failure = reply.content.config_records.get("failure")
        if failure is not None:
            reason = str(failure.get("reason") or "").strip()
            return ClientResult(cid, error=reason or "the node reported a failure, no reason given")
        try:
            if sparse:
                update, seconds = decode_sparse_reply(reply.content, cid)
            else:
                update, seconds = decode_reply(reply.content, cid, alpha, use_rslora)
        except InvalidUpdateError as exc:
            return ClientResult(cid, rejected=str(exc))
        except Exception as exc:  # a decoder's blind spot: still this reply's fault alone
            log.exception("reply of client %s could not be decoded; rejected", cid)
            detail = f"the reply cannot be decoded: {type(exc).__name__}: {exc}"
            return ClientResult(cid, rejected=str(InvalidUpdateError(cid, None, "type", detail)))
        return ClientResult(cid, update, seconds, int(update.metrics["tokens"]))

    # ---------------------------------------------------------------- FedSA's own-B evaluation
    def plan_evaluate(
        self, factors: Mapping[str, LoRAFactors], clients: Sequence[str], round_: int
    ) -> tuple[list[Message], dict[int, str]]:
        """One evaluation message per client with a node, and node -> client: the global
        model's ``factors`` (what unseen clients are scored with), which each node scores
        with its client's own B."""
        arrays = factors_to_record(factors)
        messages: list[Message] = []
        node_client: dict[int, str] = {}
        for cid in clients:
            node = self.node_of.get(cid)
            if node is None:
                continue
            config = ConfigRecord({"server-round": round_, "client-id": cid})
            content = RecordDict({"arrays": arrays, "config": config})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE))
            node_client[node] = cid
        return messages, node_client

    def collect_evaluate(
        self, round_: int, node_client: Mapping[int, str], replies: Iterable[Message]
    ) -> tuple[dict[str, tuple[float, int]], dict[str, str]]:
        """Each asked client's (Rouge-L, test examples), and why the others have none."""
        scored: dict[str, tuple[float, int]] = {}
        failed: dict[str, str] = {}
        for reply in replies:
            cid = node_client.get(reply.metadata.src_node_id)
            if cid is None or cid in scored or cid in failed:
                log.warning("round %d: unexpected evaluation reply ignored", round_)
                continue
            try:
                scored[cid] = decode_eval_reply(reply)
            except ValueError as exc:
                failed[cid] = str(exc)
        for cid in node_client.values():
            if cid not in scored and cid not in failed:
                failed[cid] = NO_REPLY
        for cid, reason in failed.items():
            log.warning("round %d: client %s not evaluated: %s", round_, cid, reason)
        return scored, failed

    # ---------------------------------------------------------------- Flower's Strategy API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node, holding the global update at that node's ranks.

        A list: Flower's own loop (``Strategy.start``) sends them with
        ``Grid.send_and_receive``, whose deployed Grid reads them twice; the ServerApp
        (:class:`~flexlora.flower.server_app.FlowerRun`) builds them a few at a time instead.
        """
        state = record_to_state(arrays, self.coordinator.aggregator.name)
        plan = self.plan(state, server_round, config)
        self._pending = (state, plan)
        return list(self.messages(state, plan))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global update and the round's numeric metrics."""
        if self._pending is None or self._pending[1].round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train")
        state, plan = self._pending
        self._pending = None
        new_state, row = self.collect(state, plan, replies)
        numbers = {
            k: v
            for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        return state_to_record(new_state), MetricRecord(numbers)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """None: the ServerApp evaluates the global update itself, as the simulator does
        (FedSA-LoRA's seen clients through :meth:`plan_evaluate` / :meth:`collect_evaluate`)."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        server = self.coordinator
        log.info(
            "FlexLoRAStrategy: %s over %d nodes, %d clients per round, rank types %s",
            server.cfg.federation.strategy,
            len(self.pool),
            server.cfg.federation.clients_per_round,
            sorted(set(server.client_type[c] for c in self.pool)),
        )
