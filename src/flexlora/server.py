"""The server side of a federated round, with no model and no network.

:class:`Coordinator` holds what the server decides: each client's resource type and ranks,
which clients a round samples, what each client receives, how replies are validated and
aggregated, and what a round's metrics row says. The in-process simulator and the Flower
ServerApp both drive this one object, so they cannot drift apart.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexlora.aggregation import Aggregator, get_aggregator
from flexlora.aggregation.validation import UpdateValidator, payload_bytes
from flexlora.config import RunConfig
from flexlora.diagnostics import rank_energy
from flexlora.errors import FlexLoRAError, InvalidUpdateError, UsageError
from flexlora.federation.replies import ReplyStore
from flexlora.methods.compose import StrategyPlan, parse_strategy
from flexlora.methods.slora import (
    SparseAverage,
    SparseMask,
    SparseState,
    SparseUpdate,
    make_masks,
    sub_masks,
    sub_positions,
    svd_init,
    validate_sparse,
)
from flexlora.privacy import DP_STRATEGIES, ClientDP
from flexlora.schedule import (
    assign_rank_types,
    derive_seed,
    module_ranks,
    sample_clients,
    unused_ffn_ranks,
)
from flexlora.training.pruning import SelfPruning
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors, lora_scaling

log = logging.getLogger(__name__)

__all__ = [
    "Coordinator",
    "Folded",
    "RoundAggregation",
    "StrategyPlan",
    "plan_strategy",
    "resolve_client_types",
]


def plan_strategy(name: str) -> StrategyPlan:
    """``METHOD+AGGREGATION`` or a single strategy name, resolved (see flexlora.methods)."""
    return parse_strategy(name)


def keep_ranks(cfg: RunConfig, max_ranks: Mapping[str, int] | None) -> int | dict[str, int] | None:
    """``federation.keep_rank`` resolved: per module, a number, or ``None`` (keep all).

    ``max`` needs ``max_ranks`` (module -> the largest rank a client receives there); without
    them (a config check before the model is known) it resolves to ``None``.
    """
    keep = cfg.federation.keep_rank
    if keep == "all":
        return None
    if keep == "max":
        return dict(max_ranks) if max_ranks is not None else None
    return int(keep)


def build_aggregator(cfg: RunConfig, max_ranks: Mapping[str, int] | None = None) -> Aggregator:
    """The run's aggregator; ``max_ranks`` (module -> largest client rank) caps FlexLoRA's state.

    The server step computes on ``federation.server_device``.
    """
    fed = cfg.federation
    plan = plan_strategy(fed.strategy)
    options: dict[str, Any] = {}
    if plan.aggregator == "flexlora":
        options = {"svd": fed.svd, "keep_rank": keep_ranks(cfg, max_ranks)}
    if fed.server_device != "cpu":
        options["device"] = fed.server_device
    return get_aggregator(plan.aggregator, **options)


def resolve_client_types(
    cfg: RunConfig, clients: Sequence[str], declared: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Each client's resource type for the whole run.

    ``declared`` (a real deployment: each device says what it can afford) wins; otherwise the
    configured distribution draws them. ``fedit-min`` / ``fedit-max`` then hold everyone to the
    smallest / largest type present.
    """
    fed = cfg.federation
    if declared is not None:
        types = {c: declared[c] for c in clients}
        for c, t in types.items():
            if t not in fed.rank_types:
                raise UsageError(f"client {c}: rank type {t!r} is not in federation.rank_types")
    else:
        types = assign_rank_types(
            list(clients), fed.distribution, fed.seed, fed.rank_types, fed.client_types
        )
    plan = plan_strategy(fed.strategy)
    if plan.hold_to is not None and types:
        used = sorted(set(types.values()), key=lambda t: sum(fed.rank_types[t]))
        held = used[0] if plan.hold_to == "min" else used[-1]
        types = dict.fromkeys(types, held)
    return types


def stack_factors(
    a: LoRAFactors, b: LoRAFactors, alpha: float, use_rslora: bool = False
) -> LoRAFactors:
    """One adapter of rank ``r_a + r_b`` whose ``s·B·A`` is the sum of both (exact)."""
    s = lora_scaling(alpha, a.rank + b.rank, use_rslora)
    B = torch.cat([a.B * (a.scaling / s), b.B.to(a.B.dtype) * (b.scaling / s)], dim=1)  # (m, r)
    A = torch.cat([a.A, b.A.to(a.A.dtype)], dim=0)  # (r, n)
    return LoRAFactors(A=A, B=B, alpha=alpha, use_rslora=use_rslora)


def _client_dp(cfg: RunConfig, population: int) -> ClientDP | None:
    """The client-level DP mechanism when ``federation.dp_clip`` > 0; refuses what it can't do."""
    fed = cfg.federation
    if fed.dp_clip > 0 and plan_strategy(fed.strategy).sparse_first:
        raise UsageError("client-level DP does not cover SLoRA's sparse stage; use flexlora")
    if fed.dp_clip <= 0:
        if fed.dp_noise_multiplier > 0:
            raise UsageError("federation.dp_noise_multiplier needs federation.dp_clip > 0")
        return None
    if plan_strategy(fed.strategy).aggregator not in DP_STRATEGIES:
        raise UsageError(
            f"client-level DP (federation.dp_clip > 0) is supported by {', '.join(DP_STRATEGIES)} "
            f"only, not {fed.strategy}: its aggregate is not ΔW, so clipping ΔW_i bounds nothing"
        )
    if fed.dp_noise_multiplier == 0:
        log.warning("federation.dp_clip without dp_noise_multiplier clips but gives no DP bound")
    return ClientDP(
        clip=fed.dp_clip,
        noise_multiplier=fed.dp_noise_multiplier,
        delta=fed.dp_delta,
        cohort=min(fed.clients_per_round, population),
        population=population,
    )


def self_pruning(cfg: RunConfig) -> SelfPruning | None:
    """HetLoRA's local rank self-pruning when ``hetlora.self_pruning`` is on (else ``None``).

    The clients do it (:mod:`flexlora.training.pruning`); the drivers keep each client's
    pruned ranks on its side (:mod:`flexlora.client_state`). Only the hetlora aggregation
    zero-pads replies of any rank the way the paper does, so other strategies refuse it.
    """
    het = cfg.hetlora
    if not het.self_pruning:
        return None
    if plan_strategy(cfg.federation.strategy).aggregator != "hetlora":
        raise UsageError(
            f"hetlora.self_pruning needs the hetlora aggregation, not {cfg.federation.strategy}"
        )
    return SelfPruning(weight=het.reg_weight, gamma=het.gamma, min_rank=het.min_rank)


class Coordinator:
    """Server-side logic of every round, shared by all drivers.

    Parameters
    ----------
    cfg:
        The run configuration.
    shapes:
        Adapted module name -> (m, n) of its weight.
    client_types:
        Client id -> resource type (see :func:`resolve_client_types`).
    reply_dir:
        Where a round's :class:`~flexlora.federation.replies.ReplyStore` instances spill the
        updates they keep (the diagnostics' second pass, and the replies a
        :class:`~flexlora.federation.round.RoundCollector` holds for an earlier client; a
        ``flexlora-replies-*`` folder each, removed with the round): the drivers give their
        run folder; ``None``, the system's temporary folder.
    """

    def __init__(
        self,
        cfg: RunConfig,
        shapes: Mapping[str, tuple[int, int]],
        client_types: Mapping[str, str],
        *,
        reply_dir: str | Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.reply_dir = reply_dir
        fed = cfg.federation
        self.plan = plan_strategy(fed.strategy)
        self.optimizer = cfg.client_train().optimizer  # refuses one the method contradicts
        self.shapes = dict(shapes)
        self.client_type = dict(client_types)
        used = sorted(set(self.client_type.values()), key=lambda t: sum(fed.rank_types[t]))
        modules = list(self.shapes)
        self.slot_ranks: dict[str, dict[str, int]] = {
            t: module_ranks(modules, fed.rank_types[t], cfg.lora.ffn_modules) for t in used
        }
        _warn_if_no_ffn_module(modules, {t: fed.rank_types[t] for t in used}, cfg.lora.ffn_modules)
        if self.slot_ranks and self.plan.aggregator == "flexlora":
            _warn_if_keep_rank_below_clients(fed.keep_rank, self.max_ranks())
        self.aggregator = build_aggregator(cfg, self.max_ranks() if self.slot_ranks else None)
        if self.aggregator.needs_uniform_rank and len(set(self.client_type.values())) > 1:
            raise UsageError(
                f"strategy {fed.strategy} needs one rank for every client but the clients mix "
                f"types {sorted(set(self.client_type.values()))}; use {_held_names(self.plan)}"
            )
        self.validator = UpdateValidator(
            shapes=self.shapes,
            max_norm=fed.max_update_norm,
            alpha=cfg.lora.alpha,
            use_rslora=cfg.lora.use_rslora,
        )
        self.dp = _client_dp(cfg, len(self.client_type))
        self.self_pruning = self_pruning(cfg)
        #: SLoRA: the union of the types' masks (the global update's), each present type's
        #: density and where its nested sub-masks sit in the union (None: all of it)
        self.masks: dict[str, SparseMask] | None = None
        self.sparse_density: dict[str, float] = {}
        self.type_positions: dict[str, dict[str, torch.Tensor] | None] = {}
        if self.plan.sparse_first:
            if fed.slora_rounds < 1:
                raise UsageError(f"strategy {fed.strategy} needs federation.slora_rounds >= 1")
            self.sparse_density = fed.slora_densities(used)
            self.masks = make_masks(self.shapes, self.union_density, fed.seed)
            for t, d in self.sparse_density.items():
                self.type_positions[t] = sub_positions(self.masks, d)

    # ------------------------------------------------------------------ decisions
    @property
    def merges_into_base(self) -> bool:
        return self.aggregator.merges_into_base

    @property
    def trains_A(self) -> bool:
        return not self.aggregator.freeze_lora_A

    @property
    def keeps_local_B(self) -> bool:
        """Each client keeps its own B across rounds (FedSA-LoRA): the drivers store it."""
        return self.aggregator.keeps_local_B

    def ranks_of(self, client: str) -> dict[str, int]:
        return self.slot_ranks[self.client_type[client]]

    def generator(self, *keys: int | str) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.cfg.federation.seed, *keys))

    def max_ranks(self) -> dict[str, int]:
        return {m: max(r[m] for r in self.slot_ranks.values()) for m in self.shapes}

    def initial_state(self) -> GlobalUpdate | SparseState:
        """Round-0 global state: ΔW = 0 with a shared, seeded A (see the aggregator).

        SLoRA starts from a zero sparse update at the shared masks instead.
        """
        if self.masks is not None:
            return SparseState.zeros(self.masks, self.cfg.federation.strategy)
        return self.aggregator.initial_state(self.shapes, self.max_ranks(), self.generator("init"))

    # ------------------------------------------------------------------ SLoRA's sparse stage
    @property
    def union_density(self) -> float:
        """The largest stage-1 density of the run's types: that of the union mask."""
        return max(self.sparse_density.values())

    def type_masks(self, rank_type: str) -> dict[str, SparseMask]:
        """The entries a client of ``rank_type`` trains in stage 1: its nested sub-masks
        (built on demand, O(nnz) each: the server keeps only their positions)."""
        assert self.masks is not None
        return sub_masks(self.masks, self.sparse_density[rank_type])

    def sparse_masks_of(self, client: str) -> dict[str, SparseMask]:
        """The entries ``client`` trains in stage 1 (its type's sub-masks)."""
        return self.type_masks(self.client_type[client])

    def sparse_positions_of(self, client: str) -> dict[str, torch.Tensor] | None:
        """Where ``client``'s entries sit in the union mask (``None``: it trains all of it)."""
        return self.type_positions[self.client_type[client]]

    def sparse_round(self, round_: int) -> bool:
        """Whether ``round_`` belongs to SLoRA's sparse first stage."""
        return self.masks is not None and round_ <= self.cfg.federation.slora_rounds

    def lora_state(self, state: GlobalUpdate | SparseState) -> GlobalUpdate:
        """The state LoRA rounds start from: a sparse update becomes its truncated SVD.

        Kept at the largest client rank; each client then takes its own rank's prefix, the
        best rank-r approximation of the accumulated sparse update (see flexlora.methods.slora).
        """
        if not isinstance(state, SparseState):
            return state
        fed = self.cfg.federation
        return svd_init(
            state,
            self.max_ranks(),
            dtype=self.aggregator.dtype,
            randomized=fed.svd == "randomized",
            generator=self.generator("slora-svd"),
            strategy=fed.strategy,
        )

    def round_state(self, state: GlobalUpdate | SparseState, round_: int) -> Any:
        """The state ``round_`` works on (the SVD initialisation on the first LoRA round).

        A sparse state (say, from a checkpoint) must sit on this run's masks.
        """
        if isinstance(state, SparseState):
            assert self.masks is not None, "a sparse state in a run without SLoRA"
            for name, mask in self.masks.items():
                if name not in state.modules or not torch.equal(state[name].mask.index, mask.index):
                    raise UsageError(f"module {name}: the sparse state is not on this run's mask")
        return state if self.sparse_round(round_) else self.lora_state(state)

    def aggregate_sparse(
        self,
        state: SparseState,
        round_: int,
        clients: Sequence[str],
        updates: Sequence[SparseUpdate],
        failures: Mapping[str, str] | None = None,
    ) -> tuple[SparseState, dict[str, Any]]:
        """Validate stage-1 replies and average their values (∝ examples): every reply of
        ``updates`` through :meth:`open_round`, then closed with ``failures``."""
        return self._aggregate_all(state, round_, clients, updates, failures)

    def sample(self, round_: int, clients: Sequence[str] | None = None) -> list[str]:
        pool = list(clients) if clients is not None else list(self.client_type)
        return sample_clients(
            pool, self.cfg.federation.clients_per_round, self.cfg.federation.seed, round_
        )

    def client_seed(self, round_: int, client: str) -> int:
        """The seed of a client's local work in a round (data order, dropout)."""
        return derive_seed(self.cfg.federation.seed, round_, client, "train")

    def start_factors(
        self, state: GlobalUpdate, client: str, round_: int
    ) -> dict[str, LoRAFactors]:
        """What the server sends ``client`` at the start of ``round_``, at its own ranks."""
        ranks = self.ranks_of(client)
        lora = self.cfg.lora
        if self.merges_into_base:
            # FLoRA: the global ΔW is in the frozen weights; the adapter starts afresh.
            fresh = self.aggregator.initial_state(
                self.shapes, ranks, self.generator(round_, client, "fresh")
            )
            return fresh.factors(ranks, lora.alpha, use_rslora=lora.use_rslora)
        return state.factors(
            ranks,
            lora.alpha,
            use_rslora=lora.use_rslora,
            split=self.cfg.federation.split,
            pad=self.generator(round_, client, "pad"),
            dtype=torch.float32,
        )

    def download_bytes(
        self, start: Mapping[str, LoRAFactors], state: GlobalUpdate | None = None, round_: int = 0
    ) -> int:
        """Bytes a client downloads at the start of ``round_``: what a node really receives.

        FLoRA and FedEx-LoRA: a node that has not merged the earlier rounds (a new client, as
        every sampled client may be) receives the cumulative :meth:`frozen_part` too (what the
        Flower app sends), besides its adapter.
        """
        own = sum(f.num_bytes() for f in start.values())
        frozen = self.frozen_part(state, initial=round_ <= 1) if state is not None else None
        return own + (frozen.num_bytes() if frozen is not None else 0)

    def frozen_part(self, state: GlobalUpdate, *, initial: bool = False) -> GlobalUpdate | None:
        """What every client holds in (or next to) its frozen weights, outside its adapter.

        FLoRA: the whole state (nothing while ``state`` is still the initial one); FedEx-LoRA:
        the residual; other strategies: nothing.
        """
        if self.merges_into_base:
            return None if initial else state
        return state.frozen_part()

    # ------------------------------------------------------------------ aggregation
    def aggregate(
        self,
        state: GlobalUpdate,
        round_: int,
        clients: Sequence[str],
        updates: Sequence[ClientUpdate],
        failures: Mapping[str, str] | None = None,
    ) -> tuple[GlobalUpdate, dict[str, Any]]:
        """Validate the replies, aggregate the valid ones; return the new state and its row.

        The batch form of :meth:`open_round`: the updates are added in order, so a client id
        that occurs more than once is counted once, by its first update, and each later one is
        rejected as a ``duplicate`` (:meth:`RoundAggregation.add`). With fewer than
        ``min_clients`` valid updates the previous state is kept.
        """
        return self._aggregate_all(state, round_, clients, updates, failures)

    def _aggregate_all(
        self,
        state: Any,
        round_: int,
        clients: Sequence[str],
        updates: Sequence[Any],
        failures: Mapping[str, str] | None,
    ) -> tuple[Any, dict[str, Any]]:
        with self.open_round(state, round_, clients, failed=failures or ()) as agg:
            for u in updates:
                agg.add(u)
            return agg.close(failures)

    def open_round(
        self, state: Any, round_: int, clients: Sequence[str], failed: Iterable[str] = ()
    ) -> RoundAggregation:
        """An empty aggregation of ``round_`` to add the replies of ``clients`` to as they
        arrive (see :class:`RoundAggregation`); a reply from a ``failed`` client is refused.

        Use it in a ``with`` block (or call :meth:`RoundAggregation.release` when the round
        is abandoned): the updates it spills to disk go when it closes or is released."""
        return RoundAggregation(self, state, round_, clients, failed=failed)

    def diagnostics(self, state: GlobalUpdate, valid: Iterable[ClientUpdate]) -> dict[str, Any]:
        """Rank-energy diagnostics of what each rank type receives (:mod:`flexlora.diagnostics`).

        Not for FLoRA (every client merges all of ΔW) nor FedSA-LoRA (clients keep their own B;
        they receive only Ā).
        """
        if not self.has_diagnostics or not isinstance(state, GlobalUpdate):
            return {}
        try:
            return rank_energy(state, self.slot_ranks, valid, self.client_type)
        except (RuntimeError, KeyError, ValueError) as exc:  # a diagnostic never fails a round
            log.warning("rank-energy diagnostics skipped: %s", exc)
            return {}

    @property
    def has_diagnostics(self) -> bool:
        """Whether LoRA rounds' rows carry the rank-energy diagnostics (they need the round's
        updates once more after the aggregation)."""
        return not (self.merges_into_base or self.keeps_local_B)

    def dp_keep_ranks(self) -> dict[str, int]:
        """Triplets the DP state keeps per module: ``federation.keep_rank`` as resolved."""
        keep = keep_ranks(self.cfg, self.max_ranks())
        return {
            m: min(m_n) if keep is None else keep if isinstance(keep, int) else keep[m]
            for m, m_n in self.shapes.items()
        }

    def _row(
        self,
        round_: int,
        clients: Sequence[str],
        valid: Sequence[ClientUpdate | SparseUpdate],
        failures: Mapping[str, str],
        rejected: Mapping[str, str],
        kept_previous: bool,
        seconds_aggregate: float,
    ) -> dict[str, Any]:
        """A round's metrics row, what every stage and strategy shares."""
        weights = [(u.metrics.get("train_loss"), u.num_examples) for u in valid]
        weights = [(x, w) for x, w in weights if x is not None]
        total = sum(w for _, w in weights)
        return {
            "round": round_,
            "strategy": self.cfg.federation.strategy,
            "clients": list(clients),
            "client_types": {cid: self.client_type[cid] for cid in clients},
            "aggregated": [u.client_id for u in valid] if not kept_previous else [],
            "failed": dict(failures),
            "rejected": dict(rejected),
            "kept_previous_state": kept_previous,
            "train_loss": (sum(x * w for x, w in weights) / total) if total else None,
            "seconds_aggregate": round(seconds_aggregate, 4),
            # what an evaluation of this round's model scores (eval.global_rank), on every
            # row; a row that was evaluated also has the ranks it used (eval_ranks)
            "eval_global_rank": self.cfg.eval.global_rank,
        }

    # ------------------------------------------------------------------ evaluation
    def eval_ranks(self, state: GlobalUpdate | SparseState) -> dict[str, int]:
        """Per module, the rank at which the global update is evaluated (``eval.global_rank``).

        ``max``: the largest rank any client receives (the top exported adapter's ranks);
        ``full``: everything the state holds; an integer: that rank. One rule for every
        strategy, each per module at most the state's own rank (more would only add zero
        columns). A frozen part (FedEx-LoRA's residual) is always evaluated whole, besides.
        """
        state = self.lora_state(state)
        rule = self.cfg.eval.global_rank
        top = self.max_ranks()
        out: dict[str, int] = {}
        for name, delta in state.modules.items():
            want = delta.rank if rule == "full" else top[name] if rule == "max" else int(rule)
            out[name] = min(want, delta.rank)
        clamped = [m for m, r in out.items() if isinstance(rule, int) and r < rule]
        if clamped:
            log.info(
                "eval.global_rank=%d: %d module(s) hold fewer components and are evaluated "
                "whole (e.g. %s at rank %d)",
                rule,
                len(clamped),
                clamped[0],
                out[clamped[0]],
            )
        return out

    def eval_factors(self, state: GlobalUpdate | SparseState) -> dict[str, LoRAFactors]:
        """The global model as float32 LoRA factors: the update at :meth:`eval_ranks`, with
        the frozen part (if any) stacked on at its full rank, so ``s·B·A`` is all of ΔW.

        SLoRA's sparse stage is evaluated as the LoRA stage starts from it: its SVD at the
        largest client rank (:meth:`lora_state`)."""
        state = self.lora_state(state)
        factors = self.cut(state, self.eval_ranks(state))
        frozen = state.frozen_part()
        if frozen is None:
            return factors
        whole = self.cut(frozen, {m: d.rank for m, d in frozen.modules.items()})
        lora = self.cfg.lora
        return {
            m: stack_factors(f, whole[m], lora.alpha, lora.use_rslora) if m in whole else f
            for m, f in factors.items()
        }

    def cut(
        self, state: GlobalUpdate, ranks: Mapping[str, int], pad: torch.Generator | None = None
    ) -> dict[str, LoRAFactors]:
        """The update at per-module ``ranks`` (float32), by each module's truncation rule.

        An ``exact`` module (FLoRA's first-round stack, FedIT's average) asked for fewer
        components than it stores is first brought to its thin SVD: the cut is then the best
        approximation instead of an error.
        """
        lora = self.cfg.lora
        modules = {name: d.for_rank(ranks[name]) for name, d in state.modules.items()}
        return GlobalUpdate(modules, state.strategy).factors(
            dict(ranks),
            lora.alpha,
            use_rslora=lora.use_rslora,
            split=self.cfg.federation.split,
            pad=pad,
            dtype=torch.float32,
        )

    # ------------------------------------------------------------------ outputs
    def export_factors(
        self, state: GlobalUpdate | SparseState
    ) -> dict[str, dict[str, LoRAFactors]]:
        """``rank-<type>`` -> the global update at that resource type's ranks."""
        state = self.lora_state(state)
        out: dict[str, dict[str, LoRAFactors]] = {}
        for slot, ranks in self.slot_ranks.items():
            try:
                out[f"rank-{slot}"] = self.cut(state, ranks, pad=self.generator("export", slot))
            except FlexLoRAError as exc:
                log.warning("no adapter for rank type %s: %s", slot, exc)
        return out

    def adapter_template(self) -> dict[str, Any]:
        """Fields of the exported ``adapter_config.json`` besides ranks and alphas.

        ``base_model_name_or_path`` is the configured name; the simulator's export replaces
        it with the folder or hub id the model was loaded from (``simulation.export``).
        """
        return {
            "base_model_name_or_path": self.cfg.model.name,
            "target_modules": list(self.cfg.lora.target_modules),
            "lora_dropout": self.cfg.lora.dropout,
            "task_type": "CAUSAL_LM",
        }

    def state_extra(self) -> dict[str, Any]:
        """Server state besides the global update that a checkpoint keeps (none today)."""
        return {}

    def restore_extra(self, extra: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_extra`; older checkpoints' keys are ignored."""


def _label(update: object, index: int) -> str:
    """How a rejection names an update: its client id, else its position."""
    cid = getattr(update, "client_id", None)
    return cid if isinstance(cid, str) and cid else f"<update #{index}>"


@dataclass(frozen=True)
class Folded:
    """What a round's row needs of one folded reply once its factors are gone."""

    client_id: str
    num_examples: int
    metrics: Mapping[str, float]
    ranks: Mapping[str, int]


class RoundAggregation:
    """One round's replies, validated and folded one at a time as a driver receives them.

    :meth:`add` checks a reply (the validator, the strategy's own check, SLoRA's masks) and
    folds it at once into the strategy's accumulator (client-level DP: the clipped sum, as
    stacks or dense per module; SLoRA's first stage: the sparse average), or records why it
    was refused; :meth:`close` takes the result and builds the round's row. Holds the
    accumulator (bounded by the adapted weights, whatever the number of clients), a
    :class:`Folded` summary per reply, and for the rank-energy diagnostics, which read every
    folded update once more after the SVD, a :class:`~flexlora.federation.replies.ReplyStore`
    (in memory up to its budget, then spilled to disk, in the server's ``reply_dir``).
    Replies are summed in the order they are added.

    :meth:`close` releases the store (its files included) whether or not it succeeds; a round
    abandoned before it (an error, an interrupt) is released by :meth:`release`, which a
    ``with`` block calls on leaving.

    Duplicates, one rule for every driver: a client's first reply counts (folded, or rejected
    for what is wrong with it); each later one is rejected as a ``duplicate`` (:meth:`add`,
    or :meth:`duplicate` when the driver still holds the first one back) and never folded,
    so the client is listed once in ``aggregated`` at most, and its later copies under
    ``rejected``.
    """

    def __init__(
        self,
        server: Coordinator,
        state: Any,
        round_: int,
        clients: Sequence[str],
        replies: ReplyStore | None = None,
        failed: Iterable[str] = (),
    ) -> None:
        self.server = server
        self.state = state
        self.round = round_
        self.clients = list(clients)
        self.sparse = server.sparse_round(round_)
        dropped = set(failed)
        self.expected = {c: server.ranks_of(c) for c in self.clients if c not in dropped}
        self.rejected: dict[str, str] = {}
        self.folded: list[Folded] = []
        self.bytes_up = 0
        self.seconds = 0.0
        self._seen: set[str] = set()
        self._index = 0
        self._closed = False
        fed = server.cfg.federation
        self.acc: Any
        if self.sparse:
            assert server.masks is not None
            self.acc = SparseAverage(server.masks, previous=state)
        elif server.dp is not None:
            dtype = server.aggregator.dtype
            self.acc = server.dp.start(server.shapes, server.dp_keep_ranks(), dtype)
        else:
            reads = server.aggregator.reads_previous or (server.merges_into_base and round_ > 1)
            self.acc = server.aggregator.start(server.shapes, state if reads else None)
        wants = server.has_diagnostics and not self.sparse
        self.replies: ReplyStore | None = None
        if wants:
            self.replies = (
                replies if replies is not None else ReplyStore(directory=server.reply_dir)
            )
        self.min_clients = fed.min_clients

    def __enter__(self) -> RoundAggregation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """End the round without a result (again, or after :meth:`close`: nothing to do):
        drop the accumulator and the kept updates, delete the spilled files."""
        self._closed = True
        self.acc = None
        if self.replies is not None:
            self.replies.close()

    def duplicate(self, client: str, update: object = None) -> None:
        """Record a later reply of ``client`` as a ``duplicate`` without reading it (its bytes
        count): the client's first reply is the one that counts, folded or not."""
        assert not self._closed, "the round is closed"
        self._index += 1
        self._count_bytes(update)
        detail = "a later reply from this client; its first one counts"
        self._reject(client, str(InvalidUpdateError(client, None, "duplicate", detail)))

    def reject(self, label: str, message: str) -> None:
        """Record a reply the driver could not read as rejected with ``message``."""
        assert not self._closed, "the round is closed"
        self._reject(label, message)

    def add(self, update: object, label: str | None = None) -> bool:
        """Check one reply and fold it; False (and the reason recorded) if it is refused.

        A reply from a client that already sent one is a :meth:`duplicate`: the first one
        stands, whether it was folded or refused.
        """
        assert not self._closed, "the round is closed"
        cid = getattr(update, "client_id", None)
        if isinstance(cid, str) and cid in self._seen:
            self.duplicate(cid, update)
            return False
        label = label or _label(update, self._index)
        self._index += 1
        self._count_bytes(update)
        if isinstance(cid, str):
            self._seen.add(cid)
        if self.sparse and (problem := self._check_sparse(update)) is not None:
            self._reject(label, problem)
            return False
        try:
            if not self.sparse:
                expected = self.expected.get(cid) if isinstance(cid, str) else None
                self.server.validator.check(update, expected)
                self.server.aggregator.check(update, self.state)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            try:
                if self.sparse:
                    self.acc.add(update, positions=self.server.sparse_positions_of(cid))
                else:
                    self.acc.add(update)
            finally:
                self.seconds += time.perf_counter() - t0
        except InvalidUpdateError as exc:
            self._reject(label, str(exc))
            return False
        assert isinstance(cid, str)
        u: Any = update
        ranks = u.ranks if not self.sparse else {}
        self.folded.append(Folded(cid, int(u.num_examples), dict(u.metrics), ranks))
        if self.replies is not None:
            self.replies.put(u)
        return True

    def close(self, failures: Mapping[str, str] | None = None) -> tuple[Any, dict[str, Any]]:
        """The new state (the previous one if too few replies were folded) and the row; the
        round is released afterwards, also when this raises."""
        assert not self._closed, "the round is closed"
        self._closed = True
        try:
            return self._result(failures)
        finally:
            self.release()

    def _result(self, failures: Mapping[str, str] | None) -> tuple[Any, dict[str, Any]]:
        server, round_ = self.server, self.round
        failures = dict(failures or {})
        kept_previous = len(self.folded) < self.min_clients
        new_state = self.state
        dp_clipped: int | None = None
        t0 = time.perf_counter()
        if kept_previous:
            log.warning(
                "round %d: %d valid updates < min_clients=%d; the global state is unchanged",
                round_,
                len(self.folded),
                self.min_clients,
            )
        elif self.sparse:
            new_state = self.acc.result(server.cfg.federation.strategy)
        elif server.dp is not None:
            new_state, dp_clipped = self.acc.result(server.generator(round_, "dp-noise"))
        else:
            try:
                new_state = self.acc.result()
            except FlexLoRAError as exc:
                log.warning("round %d: aggregation failed, state unchanged: %s", round_, exc)
                new_state, kept_previous = self.state, True
        self.seconds += time.perf_counter() - t0
        self.acc = None  # the accumulator's memory goes before the diagnostics' pass
        row = server._row(
            round_, self.clients, self.folded, failures, self.rejected, kept_previous, self.seconds
        )
        row["bytes_up"] = self.bytes_up
        if self.sparse:
            assert server.masks is not None
            row["stage"] = "sparse"
            row["sparse_nnz"] = sum(k.nnz for k in server.masks.values())  # the union's
            return new_state, row
        if server.self_pruning is not None:  # clients below their type's ranks, by module
            row["client_ranks"] = {
                f.client_id: dict(f.ranks)
                for f in self.folded
                if dict(f.ranks) != server.ranks_of(f.client_id)
            }
        if self.replies is not None and not kept_previous:
            row.update(server.diagnostics(new_state, self.replies))
        if server.dp is not None:
            assert server.dp is not None
            eps = server.dp.epsilon(round_)  # every round so far counts, also a kept one
            row.update(
                dp_clip=server.dp.clip,
                dp_noise_multiplier=server.dp.noise_multiplier,
                dp_delta=server.dp.delta,
                dp_epsilon=eps if math.isfinite(eps) else None,  # None: no noise, no bound
                dp_clipped=dp_clipped,
            )
        return new_state, row

    def _check_sparse(self, update: object) -> str | None:
        """Why a stage-1 reply is refused (its type's masks, see validate_sparse), or None."""
        server = self.server
        assert server.masks is not None
        cid = getattr(update, "client_id", None)
        known = isinstance(cid, str) and cid in self.expected
        own = server.type_masks(server.client_type[cid]) if known else None
        _, rejected = validate_sparse(
            [update], server.masks, list(self.expected), {cid: own} if own is not None else None
        )
        return next(iter(rejected.values()), None)

    def _count_bytes(self, update: object) -> None:
        if self.sparse:
            self.bytes_up += update.num_bytes() if isinstance(update, SparseUpdate) else 0
        else:
            self.bytes_up += payload_bytes(update)

    def _reject(self, label: str, message: str) -> None:
        log.warning("round %d: update of client %s rejected: %s", self.round, label, message)
        earlier = self.rejected.get(label)
        self.rejected[label] = message if earlier is None else f"{earlier}; {message}"


def _warn_if_keep_rank_below_clients(keep: int | str, max_ranks: Mapping[str, int]) -> None:
    """A numeric ``federation.keep_rank`` below a client's rank silently replaces that
    client's top components by fresh ones every round: say so (``max`` never does)."""
    if not isinstance(keep, int):
        return
    short = {m: r for m, r in max_ranks.items() if r > keep}
    if short:
        module, rank = max(short.items(), key=lambda item: item[1])
        warnings.warn(
            f"federation.keep_rank = {keep} is below the rank clients receive at "
            f"{len(short)} module(s) (e.g. {module}: {rank}): those clients get only the "
            f"best rank-{keep} approximation of the update, the rest of their rank freshly "
            "initialised each round; keep_rank = 'max' gives every client its best "
            "approximation at its own rank",
            UserWarning,
            stacklevel=3,
        )


def _warn_if_no_ffn_module(
    modules: Sequence[str], rank_types: Mapping[str, Sequence[int]], ffn_modules: Sequence[str]
) -> None:
    """A rank type with its own FFN rank means nothing if no target is feed-forward: say so."""
    message = unused_ffn_ranks(modules, rank_types, ffn_modules)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=3)


def _held_names(plan: StrategyPlan) -> str:
    """The strategy names that hold every client to one rank type, for this plan's method."""
    if plan.method == "fedit":
        return "fedit-min or fedit-max"
    method = plan.method if plan.method in ("fedavg", "slora") else "fedit"
    return f"{method}+homogeneous or {method}+homogeneous-max"
