"""The ClientApp: one node, one client; trains it at the ranks the server sends.

A node learns who it is from its node config: ``client-id`` (a client of the federated
dataset) or ``partition-id`` (the i-th seen client, which Flower's simulation sets), and its
resource type from ``rank-type`` (what a real device declares it can afford) or, when absent,
from the configured distribution, as the simulator draws it. A process keeps its model, data
and :class:`~flexlora.training.worker.ClientWorker` between messages (a simulation actor
serves many nodes with one of each, like the simulator).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flexlora.aggregation import AGGREGATORS
from flexlora.client_state import (
    CLIENT_RANKS,
    CLIENT_STATE,
    LocalStore,
    own_eval_factors,
    rank_tensors,
    with_local_B,
    with_own_ranks,
)
from flexlora.config import RunConfig
from flexlora.config_io import to_dict
from flexlora.errors import InvalidUpdateError, UsageError
from flexlora.federation.round import INJECTED_FAILURE, failure_reason
from flexlora.flower.records import (
    factors_to_record,
    record_to_factors,
    record_to_state,
    record_to_values,
    values_to_record,
)
from flexlora.flower.settings import load_run_config
from flexlora.methods.slora import SparseMask, make_masks, sub_positions
from flexlora.schedule import module_ranks
from flexlora.server import plan_strategy, resolve_client_types, self_pruning
from flexlora.training.worker import ClientWorker
from flexlora.types import LoRAFactors

log = logging.getLogger(__name__)

__all__ = ["NodeRuntime", "app", "make_client_app"]


class NodeRuntime:
    """What a process keeps between messages: data, base model and worker for one config.

    The model is loaded at the first training message: asking a node who it is needs only
    the data (in a deployment every message runs in a fresh ``flwr-clientapp`` process).
    """

    def __init__(self, cfg: RunConfig) -> None:
        from flexlora.data import load_federated_dataset

        self.cfg = cfg
        if cfg.model.threads > 0:
            torch.set_num_threads(cfg.model.threads)
        self.data = load_federated_dataset(cfg.data)
        self._worker: ClientWorker | None = None
        self._shapes: dict[str, tuple[int, int]] = {}
        self._slot_ranks: dict[str, dict[str, int]] = {}
        self._drawn: dict[str, str] | None = None
        self._masks: tuple[float, dict[str, SparseMask]] | None = None  # (density, masks)
        # FedSA-LoRA: each client's own B stays on its node, in the node's output folder
        chosen = AGGREGATORS.get(plan_strategy(cfg.federation.strategy).aggregator)
        keeps_B = bool(getattr(chosen, "keeps_local_B", False))
        self.local = LocalStore(Path(cfg.output.dir) / CLIENT_STATE) if keeps_B else None
        # HetLoRA's self-pruning: each client's own ranks stay on its node too
        self.pruning = self_pruning(cfg)
        pruned = self.pruning is not None
        self.own_ranks = LocalStore(Path(cfg.output.dir) / CLIENT_RANKS) if pruned else None

    def _load(self) -> ClientWorker:
        from flexlora.models import load_model, resolve_targets, target_linear_modules

        if self._worker is None:
            cfg = self.cfg
            model, tokenizer = load_model(cfg.model)
            cfg.lora.target_modules = resolve_targets(model, cfg.lora.target_modules)
            self._shapes = target_linear_modules(model, cfg.lora.target_modules)
            # Every configured type's ranks; a slot is allocated only for the types this
            # process trains (a node: its own one), at its first message.
            self._slot_ranks = {
                t: module_ranks(list(self._shapes), ranks, cfg.lora.ffn_modules)
                for t, ranks in cfg.federation.rank_types.items()
            }
            self._worker = ClientWorker(
                model,
                tokenizer,
                cfg.lora,
                {},
                cfg.client_train(),
                template=getattr(self.data, "template", None) or cfg.data.template,
                pruning=self.pruning,
            )
        return self._worker

    @property
    def worker(self) -> ClientWorker:
        return self._load()

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Adapted module -> (m, n) of this node's base model."""
        self._load()
        return self._shapes

    @property
    def slot_ranks(self) -> dict[str, dict[str, int]]:
        """Rank type -> module -> rank, for every configured type."""
        self._load()
        return self._slot_ranks

    # ---------------------------------------------------------------- identity
    def client_of(self, node_config: Mapping[str, Any]) -> str:
        """The client this node trains: ``client-id``, else the ``partition-id``-th seen one."""
        seen = self.data.seen
        if "client-id" in node_config:
            cid = str(node_config["client-id"])
            if cid not in seen:
                raise UsageError(f"node config client-id {cid!r} is not a seen client")
            return cid
        if "partition-id" in node_config:
            pid = node_config["partition-id"]
            if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < len(seen):
                raise UsageError(
                    f"node config partition-id={pid!r}: the dataset has {len(seen)} seen "
                    f"clients (0..{len(seen) - 1})"
                )
            return seen[pid]
        raise UsageError("the node config names no client: set partition-id or client-id")

    def rank_type_of(self, client: str, node_config: Mapping[str, Any]) -> str:
        """``rank-type`` from the node config, else the simulator's draw for ``client``."""
        if "rank-type" in node_config:
            declared = str(node_config["rank-type"])
            if declared not in self.cfg.federation.rank_types:
                raise UsageError(
                    f"node config rank-type={declared!r} is not one of "
                    f"{sorted(self.cfg.federation.rank_types)} (federation.rank_types)"
                )
            return declared
        if self._drawn is None:
            self._drawn = resolve_client_types(self.cfg, list(self.data.seen))
        return self._drawn[client]

    # ---------------------------------------------------------------- work
    def check_start(
        self, start: Mapping[str, LoRAFactors], ranks: Mapping[str, int], client: str
    ) -> None:
        """The server's factors must adapt this model's modules at exactly ``ranks``; what
        does not is this client's failure, said as the server's factors against this node."""
        missing = sorted(self.shapes.keys() - start.keys())
        if missing:
            raise InvalidUpdateError(
                client, missing[0], "missing_module", "the server sent no factors for it"
            )
        for name, f in start.items():
            if name not in self.shapes:
                raise InvalidUpdateError(
                    client, name, "extra_module", "the server sent factors this node does not adapt"
                )
            if f.shape != self.shapes[name] or f.rank != ranks[name]:
                raise InvalidUpdateError(
                    client,
                    name,
                    "shape",
                    f"the server sent rank {f.rank} for a {f.shape} weight; this node's model "
                    f"has {self.shapes[name]} at rank {ranks[name]} (not the server's base "
                    "model or rank types?)",
                )

    def train(self, content: RecordDict, client: str) -> RecordDict:
        """Train ``client`` from the message's factors; the reply's arrays and metrics."""
        config = content.config_records["config"]
        if config.get("client-id") != client:
            raise UsageError(
                f"the server addressed client {config.get('client-id')!r}, "
                f"but this node trains {client!r}"
            )
        slot = str(config["rank-type"])
        if slot not in self.slot_ranks:
            raise UsageError(f"the server asked for unknown rank type {slot!r}")
        self.worker.add_slot(slot, self.slot_ranks[slot])
        try:
            if config.get("stage") == "sparse":
                return self.train_sparse(content, client, config)
            return self.train_lora(content, client, config, slot)
        except Exception as exc:
            # a failed client, read by the server as the simulator reads one (federation.round)
            return RecordDict({"failure": ConfigRecord({"reason": failure_reason(exc, client)})})

    def train_lora(
        self, content: RecordDict, client: str, config: ConfigRecord, slot: str
    ) -> RecordDict:
        """Train the client's adapter from the server's factors (on W0 + the merged part)."""
        lora = self.cfg.lora
        start = record_to_factors(
            content.array_records["arrays"], "server", lora.alpha, lora.use_rslora
        )
        self.check_start(start, self.slot_ranks[slot], client)
        base = content.array_records.get("base")
        aggregator = plan_strategy(self.cfg.federation.strategy).aggregator
        round_ = int(config["server-round"])
        if self.local is not None:  # FedSA-LoRA: this node's own B, zeros the first time
            start = with_local_B(client, start, self.local.load(client, before_round=round_))
        if self.own_ranks is not None:  # HetLoRA: the ranks this client pruned itself to
            start = with_own_ranks(client, start, self.own_ranks.load(client, round_))
        self.worker.set_base_delta(record_to_state(base, aggregator) if base else None)
        if config.get("fail"):
            raise RuntimeError(INJECTED_FAILURE)
        update, result = self.worker.train(
            client,
            slot,
            start,
            self.data.train(client),
            seed=int(config["seed"]),
            train_A=bool(config["train-a"]),
        )
        if self.local is not None:  # the client keeps the B it trained
            self.local.save(client, round_, {n: f.B for n, f in update.factors.items()})
        if self.own_ranks is not None and result.pruned:  # and the ranks it pruned to
            self.own_ranks.save(client, round_, rank_tensors(update.factors))
        metrics = _reply_metrics(update.num_examples, result)
        return RecordDict({"arrays": factors_to_record(update.factors), "metrics": metrics})

    def evaluate(self, content: RecordDict, client: str) -> RecordDict:
        """FedSA-LoRA's seen-client evaluation: this node's client with its own B.

        The message carries the global model's factors at ``eval.global_rank`` (Ā and B̄);
        the node scores :func:`~flexlora.client_state.own_eval_factors` of them with the B
        its client kept after ``server-round`` (the global factors if it never trained) on
        its own test examples, exactly as the simulator scores a seen client, and replies
        with the Rouge-L and the number of examples. The B never leaves the node.
        """
        config = content.config_records["config"]
        if config.get("client-id") != client:
            raise UsageError(
                f"the server addressed client {config.get('client-id')!r}, "
                f"but this node trains {client!r}"
            )
        if self.local is None:
            raise UsageError(
                f"strategy {self.cfg.federation.strategy!r} keeps no per-client B: the "
                "server evaluates its global model itself"
            )
        lora = self.cfg.lora
        factors = record_to_factors(
            content.array_records["arrays"], "server", lora.alpha, lora.use_rslora
        )
        for name, f in factors.items():
            if self.shapes.get(name) != f.shape:
                detail = f"adapts {f.shape}; this node's module is {self.shapes.get(name)}"
                raise InvalidUpdateError("server", name, "shape", detail)
        missing = sorted(self.shapes.keys() - factors.keys())
        if missing:
            raise InvalidUpdateError("server", missing[0], "missing_module", "no factors")
        own = self.local.load(client, before_round=int(config["server-round"]) + 1)
        cap = self.cfg.eval.max_examples_per_client
        examples = list(self.data.test(client))[: cap or None]
        score = 0.0
        if examples:
            personal = own_eval_factors(client, factors, own)
            score = self.worker.score_client(
                personal, examples, self.cfg.eval, self.cfg.eval_prompt_tokens()
            )
        metrics = MetricRecord({"rouge-l": float(score), "num-examples": len(examples)})
        return RecordDict({"metrics": metrics})

    def train_sparse(self, content: RecordDict, client: str, config: ConfigRecord) -> RecordDict:
        """SLoRA's stage 1: train the masked entries from the server's values.

        The values sit on the union mask of the server's ``sparse-density``; this node trains
        and sends its own rank type's nested sub-mask (keyed on the same seed and shapes).
        """
        fed = self.cfg.federation
        union = float(config["sparse-density"])
        if self._masks is None or self._masks[0] != union:
            self._masks = (union, make_masks(self.shapes, union, fed.seed))
        masks = self._masks[1]
        own = fed.slora_densities([str(config["rank-type"])])[str(config["rank-type"])]
        if own > union:
            raise UsageError(
                f"rank type {config['rank-type']}: stage-1 density {own} above the server's "
                f"union mask ({union})"
            )
        start = record_to_values(content.array_records["values"], "server")
        if config.get("fail"):
            raise RuntimeError(INJECTED_FAILURE)
        update, result = self.worker.train_sparse(
            client,
            masks,
            start,
            self.data.train(client),
            seed=int(config["seed"]),
            positions=sub_positions(masks, own),
        )
        metrics = _reply_metrics(update.num_examples, result)
        return RecordDict({"values": values_to_record(update.values), "metrics": metrics})


def _reply_metrics(num_examples: int, result: Any) -> MetricRecord:
    """What every training reply reports besides its arrays."""
    return MetricRecord(
        {
            "num-examples": num_examples,
            "train_loss": float(result.train_loss),
            "tokens": int(result.tokens),
            "seconds": float(result.seconds),
        }
    )


_RUNTIME: dict[str, NodeRuntime] = {}


def runtime_for(cfg: RunConfig) -> NodeRuntime:
    """This process's runtime for ``cfg`` (built once; a new config replaces the old one)."""
    key = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    if key not in _RUNTIME:
        _RUNTIME.clear()
        _RUNTIME[key] = NodeRuntime(cfg)
    return _RUNTIME[key]


def make_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``defaults`` overlaid by Flower's run config."""
    client_app = ClientApp()

    def node(context: Context) -> tuple[NodeRuntime, str]:
        cfg, _ = load_run_config(context.run_config, defaults)
        runtime = runtime_for(cfg)
        return runtime, runtime.client_of(context.node_config)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        """Who this node is: client id, resource type, number of training examples."""
        runtime, cid = node(context)
        info = ConfigRecord(
            {
                "client-id": cid,
                "rank-type": runtime.rank_type_of(cid, context.node_config),
                "num-examples": len(runtime.data.train(cid)),
            }
        )
        return Message(RecordDict({"node": info}), reply_to=msg)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        runtime, cid = node(context)
        return Message(runtime.train(msg.content, cid), reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """FedSA-LoRA: score this node's client with its own B (see NodeRuntime.evaluate)."""
        runtime, cid = node(context)
        return Message(runtime.evaluate(msg.content, cid), reply_to=msg)

    return client_app


app = make_client_app()
