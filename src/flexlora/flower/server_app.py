"""The ServerApp: the simulator's round loop with the clients behind a Flower Grid.

:class:`FlowerRun` is :class:`~flexlora.simulation.runner.FederatedRun` with two methods
replaced: a round sends one message per sampled node through the Grid
(:class:`~flexlora.flower.strategy.FlexLoRAStrategy`) instead of training in process, and
FedSA-LoRA's seen clients are scored on their nodes, with the B's that stay there
(:meth:`FlowerRun.score_own`). Everything else is the simulator's own code: the evaluation of
the global update on the server, early stopping, ``metrics.jsonl`` rows with the same keys,
resumable checkpoints (``flower.resume``), the per-rank-type adapters and the report.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from flexlora.aggregation.base import resolve_device
from flexlora.config import RunConfig
from flexlora.errors import UsageError
from flexlora.flower.settings import FlowerOptions, load_run_config
from flexlora.flower.strategy import FlexLoRAStrategy, RoundPlan, Unsent, not_pushed
from flexlora.server import resolve_client_types
from flexlora.simulation.runner import FederatedRun
from flexlora.types import GlobalUpdate, LoRAFactors

log = logging.getLogger(__name__)

__all__ = [
    "DEPLOYED_PULL_INTERVAL",
    "FlowerRun",
    "NodeInfo",
    "app",
    "discover_nodes",
    "make_server_app",
    "pull_interval",
    "stream_replies",
]

#: seconds between two pulls on a Grid with no ``pull_interval`` of its own: what Flower's
#: deployed Grid (``HttpGrid.send_and_receive``) waits; its in-memory simulation Grid has a
#: ``pull_interval`` attribute (0.1 s), used as it is
DEPLOYED_PULL_INTERVAL = 3.0


@dataclass(frozen=True)
class NodeInfo:
    """What a node said about itself when asked."""

    node_id: int
    client: str
    rank_type: str
    num_examples: int


def _wait_for_nodes(grid: Grid, want: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while len(ids := sorted(grid.get_node_ids())) < want:
        if time.monotonic() > deadline:
            raise UsageError(
                f"only {len(ids)} of {want} SuperNodes connected within {seconds:g}s "
                "(flower.num-nodes, flower.wait-nodes)"
            )
        time.sleep(0.2)
    return ids


def _node_info(reply: Message) -> NodeInfo | str:
    """Who the node is, or why it is left out."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        return f"node {node}: {reply.error.reason}"
    info = reply.content.config_records.get("node")
    values = (info or {}).get("client-id"), (info or {}).get("rank-type")
    num = (info or {}).get("num-examples")
    if not all(isinstance(v, str) and v for v in values) or not isinstance(num, int):
        return f"node {node}: its reply does not say who it is ({info})"
    return NodeInfo(node, str(values[0]), str(values[1]), int(num))


def pull_interval(grid: Grid, setting: float = 0.0) -> float:
    """Seconds between two pulls: ``setting`` (``flower.pull-interval``) when positive, else
    the Grid's own ``pull_interval`` (Flower's in-memory simulation Grid has one), else
    :data:`DEPLOYED_PULL_INTERVAL` (what Flower's deployed Grid waits)."""
    if setting > 0:
        return float(setting)
    own = getattr(grid, "pull_interval", None)
    return float(own) if isinstance(own, (int, float)) and own >= 0 else DEPLOYED_PULL_INTERVAL


def stream_replies(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
    *,
    per_call: int = 4,
    interval: float = 0.0,
    sent: dict[str, int] | None = None,
) -> Iterator[Message | Unsent]:
    """Push ``messages`` and yield each reply as soon as it is pulled, until every message has
    its reply or ``timeout`` seconds have passed (``None``: no limit).

    ``Grid.send_and_receive``'s loop (push, then pull every :func:`pull_interval` seconds),
    ``per_call`` messages at a time: ``messages`` is read (an iterator: built) only
    ``per_call`` messages ahead of the push, and no message is kept once pushed; each poll
    pulls the waiting replies ``per_call`` message ids at a time and yields them one by one,
    so that the caller folds a few replies before the next ones are pulled instead of holding
    every reply that landed since the last poll. ``sent`` receives message id -> destination
    node. A message the Grid did not accept (``push_messages`` gives ``None`` for its id) is
    yielded as an :class:`Unsent` naming its node, and never pulled. A grid without
    ``push_messages`` / ``pull_messages``: its ``send_and_receive``.
    """
    push = getattr(grid, "push_messages", None)
    pull = getattr(grid, "pull_messages", None)
    if push is None or pull is None:
        yield from grid.send_and_receive(list(messages), timeout=timeout)
        return
    sent = {} if sent is None else sent
    order: list[str] = []
    for chunk in _chunks(messages, per_call):
        nodes = [msg.metadata.dst_node_id for msg in chunk]
        ids = list(push(chunk))  # a list: Flower's deployed Grid reads it twice
        del chunk
        pairs: list[tuple[int | None, str | None]]
        if len(ids) == len(nodes):  # Flower's contract: one id per message, None if not pushed
            pairs = list(zip(nodes, ids, strict=True))
        else:  # ids for some messages only: wait for those, the others end as not replied
            pairs = [(None, mid) for mid in ids]
        for node, mid in pairs:
            if mid is not None:
                order.append(mid)
                if node is not None:
                    sent[mid] = node
            elif node is not None:
                log.warning("round message for node %d not pushed: no message id", node)
                yield Unsent(node, not_pushed(node))
    waiting = set(order)
    end = None if timeout is None else time.monotonic() + timeout
    pause = pull_interval(grid, interval)
    while waiting:
        pending = [mid for mid in order if mid in waiting]  # in the order sent
        for start in range(0, len(pending), per_call):
            replies = list(pull(pending[start : start + per_call]))
            replies.reverse()
            while replies:  # each reply dropped here once the caller has it
                reply = replies.pop()
                waiting.discard(reply.metadata.reply_to_message_id)
                yield reply
        if not waiting or (end is not None and time.monotonic() >= end):
            return
        time.sleep(pause)


def _chunks(items: Iterable[Message], size: int) -> Iterator[list[Message]]:
    """``items`` ``size`` at a time, each list built only when it is asked for."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
        del chunk  # not kept while the next one is built


def discover_nodes(
    grid: Grid, options: FlowerOptions, seen: Sequence[str], timeout: float
) -> list[NodeInfo]:
    """Wait for the nodes, ask each who it is; return them in the dataset's client order."""
    want = options.num_nodes or len(seen)
    ids = _wait_for_nodes(grid, want, options.wait_nodes)
    content = RecordDict({"config": ConfigRecord({})})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in ids]
    nodes, problems = [], []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        info = _node_info(reply)
        if isinstance(info, str):
            log.warning("left out: %s", info)
            problems.append(info)
        else:
            nodes.append(info)
    by_client: dict[str, NodeInfo] = {}
    for n in nodes:
        if n.client in by_client:
            raise UsageError(
                f"nodes {by_client[n.client].node_id} and {n.node_id} both train client "
                f"{n.client!r}; give each node its own partition-id or client-id"
            )
        by_client[n.client] = n
    if not by_client:
        first = f"; {problems[0]}" if problems else ""
        raise UsageError(f"none of the {len(ids)} connected nodes can train a client{first}")
    order = {c: i for i, c in enumerate(seen)}
    return sorted(by_client.values(), key=lambda n: (order.get(n.client, len(order)), n.client))


class FlowerRun(FederatedRun):
    """A federated run whose clients are Flower nodes; the rest is the simulator's loop.

    The server reads the adapted shapes from the model's config on the meta device and loads
    the weights only when it evaluates (then with the evaluation adapter alone, no training
    slot); it loads the data configuration for the population order and the held-out
    evaluation clients.
    """

    trains_in_process = False

    def __init__(
        self,
        cfg: RunConfig,
        grid: Grid,
        options: FlowerOptions | None = None,
        *,
        dataset: Any | None = None,
        model_and_tokenizer: tuple[Any, Any] | None = None,
    ) -> None:
        self.grid = grid
        self.options = options or FlowerOptions()
        fed = cfg.federation
        # federation.client_timeout bounds a round's wait (nodes train in parallel).
        self.timeout = fed.client_timeout or self.options.round_timeout
        resolve_device(fed.server_device)  # a server GPU that is not there: before the nodes
        if dataset is None:
            from flexlora.data import load_federated_dataset

            dataset = load_federated_dataset(cfg.data)
        self.nodes = discover_nodes(grid, self.options, dataset.seen, self.timeout)
        declared = {n.client: n.rank_type for n in self.nodes}
        super().__init__(
            cfg,
            dataset=dataset,
            model_and_tokenizer=model_and_tokenizer,
            client_types=resolve_client_types(cfg, list(declared), declared=declared),
        )
        self.strategy = FlexLoRAStrategy(self.server, {n.node_id: n.client for n in self.nodes})
        # FedSA-LoRA: the clients' own B's live on their nodes; the server never reads them
        # and asks the nodes to score their seen clients instead (score_own).
        self.local = None
        self.strategy.summary()
        self.last_plan: RoundPlan | None = None  # the last round's byte counts and message ids

    def score_own(
        self,
        factors: dict[str, LoRAFactors],
        clients: list[str],
        tests: list[list[Any]],
        round_: int,
    ) -> tuple[list[tuple[float, int]], dict[str, str]]:
        """FedSA-LoRA's seen-client evaluation with the B's on the nodes: one EVALUATE message
        per client with a node, carrying the global model's factors; each node scores its
        client with its own B (:meth:`NodeRuntime.evaluate`), as the simulator does in
        process. A client without a node never trained: scored here on the global factors,
        as in the simulator. A node that fails or does not answer within the round's timeout
        is left out of ``rouge_l_seen`` and named in the row's ``eval_failed``."""
        asked = [c for c, examples in zip(clients, tests, strict=True) if examples]
        messages, node_client = self.strategy.plan_evaluate(factors, asked, round_)
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        scored, failed = self.strategy.collect_evaluate(round_, node_client, replies)
        out: list[tuple[float, int]] = []
        for cid, examples in zip(clients, tests, strict=True):
            if not examples or cid in failed:
                continue
            if cid in scored:
                out.append(scored[cid])
                continue
            score = self.worker.score_client(
                factors, examples, self.cfg.eval, self.cfg.eval_prompt_tokens()
            )
            out.append((score, len(examples)))
        return out, failed

    def run_round(
        self, state: GlobalUpdate, round_: int, bar: bool
    ) -> tuple[GlobalUpdate, dict[str, Any]]:
        """Send one message per sampled node, wait for the replies, aggregate.

        The messages are built a few at a time as they are pushed and dropped after
        (:func:`stream_replies`); the plan keeps their byte counts and ids only."""
        state = self.server.round_state(state, round_)  # SLoRA: the SVD initialisation
        plan = self.last_plan = self.strategy.plan(state, round_)
        replies = stream_replies(
            self.grid,
            self.strategy.messages(state, plan),
            self.timeout,
            per_call=self.options.messages_per_call,
            interval=self.options.pull_interval,
            sent=plan.message_ids,
        )
        new_state, row = self.strategy.collect(state, plan, replies)  # folded as they come
        log.debug(
            "round %d: %d bytes of arrays sent (%d accounted)",
            round_,
            sum(plan.wire_bytes_down.values()),
            row["bytes_down"],
        )
        return new_state, row


def _log_to_stderr() -> None:
    """Show flexlora's INFO lines (``[ROUND r/R]``) when nobody configured logging."""
    root = logging.getLogger()
    ours = logging.getLogger("flexlora")
    if not root.handlers and not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False  # a handler the runtime adds to the root later would repeat it


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``defaults`` overlaid by Flower's run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_to_stderr()
        cfg, options = load_run_config(context.run_config, defaults)
        FlowerRun(cfg, grid, options).run(resume=options.resume)

    return server_app


app = make_server_app()
