"""The in-process simulator: sample -> train -> validate -> aggregate -> redistribute -> evaluate.

One base model is loaded once; every client borrows the adapter slot of its resource type.
All randomness is keyed on (seed, round, client), so every strategy sees the same clients,
ranks and data order, and a resumed run equals an uninterrupted one. Memory is bounded by the
clients of the current round: the population is a list of ids and rank types.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flexlora.aggregation import Aggregator, get_aggregator
from flexlora.aggregation.validation import UpdateValidator
from flexlora.config import RunConfig
from flexlora.errors import FlexLoRAError, UsageError
from flexlora.schedule import assign_rank_types, derive_seed, module_ranks, sample_clients
from flexlora.simulation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from flexlora.training.adapters import AdapterHost
from flexlora.training.client import TokenizedExample, tokenize, train_local
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors

log = logging.getLogger(__name__)

__all__ = ["FederatedRun", "StrategyPlan", "plan_strategy"]


@dataclass(frozen=True)
class StrategyPlan:
    """A strategy name as users write it, resolved to an aggregator and a rank policy."""

    name: str
    aggregator: str
    hold_to: str | None = None  # "min" / "max": every client uses that rank type (FedIT)


def plan_strategy(name: str) -> StrategyPlan:
    if name in ("fedit-min", "fedit-max"):
        return StrategyPlan(name, "fedit", name.split("-")[1])
    return StrategyPlan(name, name)


class LazyTokenized(Sequence[TokenizedExample]):
    """A client's examples, tokenized on first use (a round touches only a few)."""

    def __init__(self, items: Sequence[Any], encode: Callable[[Any], TokenizedExample]) -> None:
        self._items = items
        self._encode = encode
        self._cache: dict[int, TokenizedExample] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> TokenizedExample:  # type: ignore[override]
        if i not in self._cache:
            self._cache[i] = self._encode(self._items[i])
        return self._cache[i]


class FederatedRun:
    """One federated fine-tuning run, writing its outputs under ``cfg.output.dir``."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        dataset: Any | None = None,
        model_and_tokenizer: tuple[Any, Any] | None = None,
    ) -> None:
        from flexlora.data.templates import render_prompt

        self.cfg = cfg
        self.out = Path(cfg.output.dir)
        self.render_prompt = render_prompt
        fed = cfg.federation
        self.plan = plan_strategy(fed.strategy)
        options: dict[str, Any] = {"svd": fed.svd} if self.plan.aggregator == "flexlora" else {}
        self.aggregator: Aggregator = get_aggregator(self.plan.aggregator, **options)
        if cfg.model.threads > 0:
            torch.set_num_threads(cfg.model.threads)

        t0 = time.perf_counter()
        if dataset is None:
            from flexlora.data import load_federated_dataset

            dataset = load_federated_dataset(cfg.data)
        self.data = dataset
        log.info(
            "data: %d seen and %d unseen clients (%.1fs)",
            len(self.data.seen),
            len(self.data.unseen),
            time.perf_counter() - t0,
        )
        self.template = getattr(self.data, "template", None) or cfg.data.template
        if not self.data.seen:
            raise UsageError("the dataset has no seen (training) clients")
        if model_and_tokenizer is None:
            from flexlora.training.model import load_base_model

            t0 = time.perf_counter()
            model_and_tokenizer = load_base_model(cfg.model.name, dtype=cfg.model.dtype)
            log.info("model %s loaded (%.1fs)", cfg.model.name, time.perf_counter() - t0)
        self.model, self.tokenizer = model_and_tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0

        # Resource types: fixed per client for the whole run, the same for every strategy.
        self.client_type = assign_rank_types(
            list(self.data.seen), fed.distribution, fed.seed, fed.rank_types, fed.client_types
        )
        if self.plan.hold_to is not None:
            used = sorted(set(self.client_type.values()), key=lambda t: sum(fed.rank_types[t]))
            held = used[0] if self.plan.hold_to == "min" else used[-1]
            self.client_type = dict.fromkeys(self.client_type, held)
        elif self.aggregator.needs_uniform_rank and len(set(self.client_type.values())) > 1:
            raise UsageError(
                f"strategy {fed.strategy} needs one rank for every client but distribution "
                f"{fed.distribution} mixes types; use fedit-min or fedit-max"
            )
        slot_types = sorted(set(self.client_type.values()), key=lambda t: sum(fed.rank_types[t]))
        probe = _target_names(self.model, cfg.lora.target_modules)
        self.host = AdapterHost(
            self.model,
            cfg.lora.target_modules,
            {t: module_ranks(probe, fed.rank_types[t], cfg.lora.ffn_modules) for t in slot_types},
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            use_rslora=cfg.lora.use_rslora,
        )
        self.shapes = self.host.shapes()
        self.validator = UpdateValidator(
            shapes=self.shapes,
            max_norm=fed.max_update_norm,
        )
        self._eval_sets = self._choose_eval_sets()
        self._last_stack_rank: dict[str, int] = {}

    # ---------------------------------------------------------------- helpers
    def ranks_of(self, client: str) -> dict[str, int]:
        return self.host.slot_ranks[self.client_type[client]]

    def _max_ranks(self) -> dict[str, int]:
        return {m: max(r[m] for r in self.host.slot_ranks.values()) for m in self.host.modules}

    def _generator(self, *keys: int | str) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.cfg.federation.seed, *keys))

    def initial_state(self) -> GlobalUpdate:
        return self.aggregator.initial_state(
            self.shapes, self._max_ranks(), self._generator("init")
        )

    def start_factors(
        self, state: GlobalUpdate, client: str, round_: int
    ) -> dict[str, LoRAFactors]:
        """What the server sends ``client`` at the start of ``round_``, at its own ranks."""
        ranks = self.ranks_of(client)
        if self.aggregator.merges_into_base:
            # FLoRA: the global ΔW is in the frozen weights; the adapter starts afresh.
            fresh = self.aggregator.initial_state(
                self.shapes, ranks, self._generator(round_, client, "fresh")
            )
            return fresh.factors(ranks, self.cfg.lora.alpha, use_rslora=self.cfg.lora.use_rslora)
        return state.factors(
            ranks,
            self.cfg.lora.alpha,
            use_rslora=self.cfg.lora.use_rslora,
            split=self.cfg.federation.split,
            pad=self._generator(round_, client, "pad"),
            dtype=torch.float32,
        )

    def _encode(self, example: Any) -> TokenizedExample:
        tc = self.cfg.train
        return tokenize(
            self.tokenizer,
            self.render_prompt(example, self.template),
            example.output,
            tc.cutoff_len,
            tc.train_on_inputs,
        )

    def _choose_eval_sets(self) -> dict[str, list[str]]:
        ec = self.cfg.eval
        sets: dict[str, list[str]] = {}
        for kind, wanted, pool in (
            ("unseen", ec.unseen, list(self.data.unseen)),
            ("seen", ec.seen, list(self.data.seen)),
        ):
            if not wanted or not pool:
                continue
            if ec.max_clients and len(pool) > ec.max_clients:
                pool = sample_clients(pool, ec.max_clients, self.cfg.federation.seed, -1)
            sets[kind] = pool
        return sets

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, state: GlobalUpdate | None) -> dict[str, float]:
        """Rouge-L of generated text with the global ΔW merged into the base weights."""
        from flexlora.training.evaluate import evaluate_examples, weighted_mean

        ec = self.cfg.eval
        out: dict[str, float] = {}
        self.host.set_base_delta(state)
        try:
            with self.host.adapters_disabled():
                for kind, clients in self._eval_sets.items():
                    results = []
                    for cid in clients:
                        examples = list(self.data.test(cid))
                        if ec.max_examples_per_client:
                            examples = examples[: ec.max_examples_per_client]
                        if not examples:
                            continue
                        prompts = [self.render_prompt(e, self.template) for e in examples]
                        refs = [e.output for e in examples]
                        results.append(
                            evaluate_examples(
                                self.host.model,
                                self.tokenizer,
                                prompts,
                                refs,
                                max_new_tokens=ec.max_new_tokens,
                                batch_size=ec.batch_size,
                            )
                        )
                    if results:
                        out[f"rouge_l_{kind}"] = float(weighted_mean(results))
        finally:
            self.host.set_base_delta(state if self.aggregator.merges_into_base else None)
        return out

    # ---------------------------------------------------------------- one round
    def run_round(self, state: GlobalUpdate, round_: int, bar: bool) -> tuple[GlobalUpdate, dict]:
        fed = self.cfg.federation
        clients = sample_clients(list(self.data.seen), fed.clients_per_round, fed.seed, round_)
        failing = set()
        if fed.fail_rate > 0:
            n_fail = round(fed.fail_rate * len(clients))
            rng = self._generator(round_, "faults")
            failing = {
                clients[i] for i in torch.randperm(len(clients), generator=rng)[:n_fail].tolist()
            }
        updates: list[ClientUpdate] = []
        failures: dict[str, str] = {}
        bytes_down = bytes_up = 0
        seconds_train = 0.0
        losses: list[tuple[float, int]] = []
        tokens = 0
        for cid in tqdm(clients, desc=f"round {round_} clients", leave=False, disable=not bar):
            start = self.start_factors(state, cid, round_)
            bytes_down += self._download_bytes(start)
            train_examples = self.data.train(cid)
            try:
                if cid in failing:
                    raise RuntimeError("injected client failure (federation.fail_rate)")
                if not train_examples:
                    raise RuntimeError("client has no training examples")
                result = train_local(
                    self.host,
                    self.client_type[cid],
                    start,
                    LazyTokenized(train_examples, self._encode),
                    self.cfg.train,
                    seed=derive_seed(fed.seed, round_, cid, "train"),
                    pad_id=self.pad_id,
                    train_A=not self.aggregator.freeze_lora_A,
                    client=cid,
                )
            except (RuntimeError, FlexLoRAError) as exc:
                failures[cid] = str(exc)
                log.warning("round %d: client %s dropped: %s", round_, cid, exc)
                continue
            seconds_train += result.seconds
            tokens += result.tokens
            update = ClientUpdate(
                client_id=cid,
                num_examples=len(train_examples),
                factors=result.factors,
                metrics={"train_loss": result.train_loss},
            )
            bytes_up += update.num_bytes()
            losses.append((result.train_loss, len(train_examples)))
            updates.append(update)

        expected = {cid: self.ranks_of(cid) for cid in clients if cid not in failures}
        valid, rejected = self.validator.split(updates, expected)
        for cid, reason in rejected.items():
            log.warning("round %d: update of client %s rejected: %s", round_, cid, reason)
        t0 = time.perf_counter()
        kept_previous = len(valid) < fed.min_clients
        if kept_previous:
            log.warning(
                "round %d: %d valid updates < min_clients=%d; the global state is unchanged",
                round_,
                len(valid),
                fed.min_clients,
            )
            new_state = state
        else:
            previous = state if self.aggregator.merges_into_base and round_ > 1 else None
            new_state = self.aggregator.aggregate(valid, previous=previous)
            if self.aggregator.merges_into_base:
                self.host.set_base_delta(new_state)
                self._last_stack_rank = {
                    m: sum(u.factors[m].rank for u in valid) for m in self.shapes
                }
        seconds_aggregate = time.perf_counter() - t0
        total_w = sum(w for _, w in losses)
        row: dict[str, Any] = {
            "round": round_,
            "strategy": fed.strategy,
            "clients": clients,
            "client_types": {cid: self.client_type[cid] for cid in clients},
            "aggregated": [u.client_id for u in valid],
            "failed": failures,
            "rejected": rejected,
            "kept_previous_state": kept_previous,
            "train_loss": (sum(x * w for x, w in losses) / total_w) if total_w else None,
            "train_tokens": tokens,
            "seconds_train": round(seconds_train, 4),
            "seconds_aggregate": round(seconds_aggregate, 4),
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
        }
        return new_state, row

    def _download_bytes(self, start: dict[str, LoRAFactors]) -> int:
        if self.aggregator.merges_into_base:
            # FLoRA sends last round's stacked factors (rank = sum of its clients' ranks);
            # the client merges them into its weights and starts a fresh adapter.
            return sum(
                r * (self.shapes[m][0] + self.shapes[m][1]) * 4
                for m, r in self._last_stack_rank.items()
            )
        return sum(f.num_bytes() for f in start.values())

    # ---------------------------------------------------------------- the loop
    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        cfg = self.cfg
        fed = cfg.federation
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt_dir = self.out / "checkpoint"
        metrics_path = self.out / "metrics.jsonl"
        if resume:
            ckpt = load_checkpoint(ckpt_dir)
            state = ckpt.global_update or self.initial_state()
            first = ckpt.round + 1
            metrics = ckpt.metrics
            best = ckpt.extra.get("best")
            bad = int(ckpt.extra.get("bad_evals", 0))
            stopped = bool(ckpt.extra.get("stopped", False))
            self._last_stack_rank = dict(ckpt.extra.get("last_stack_rank", {}))
            if self.aggregator.merges_into_base and ckpt.round > 0:
                self.host.set_base_delta(state)
            log.info("resuming %s after round %d", self.out, ckpt.round)
        else:
            (self.out / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
            state = self.initial_state()
            first, metrics, best, bad, stopped = 1, [], None, 0, False
        _write_metrics(metrics_path, metrics)

        if not resume and cfg.eval.at_start and fed.rounds >= 0:
            row = {"round": 0, "strategy": fed.strategy, "clients": []}
            t0 = time.perf_counter()
            row.update(self.evaluate(None))
            row["seconds_eval"] = round(time.perf_counter() - t0, 3)
            metrics.append(row)
            _append_metrics(metrics_path, row)
            log.info("[ROUND 0/%d] %s", fed.rounds, _summary(row))
            self._checkpoint(ckpt_dir, 0, None, metrics, best, bad, stopped)

        bar = cfg.output.progress
        for round_ in tqdm(
            range(first, fed.rounds + 1),
            desc="rounds",
            initial=first - 1,
            total=fed.rounds,
            disable=not bar,
        ):
            if stopped:
                break
            state, row = self.run_round(state, round_, bar)
            due = (cfg.eval.every and round_ % cfg.eval.every == 0) or round_ == fed.rounds
            if due and self._eval_sets:
                t0 = time.perf_counter()
                row.update(self.evaluate(state))
                row["seconds_eval"] = round(time.perf_counter() - t0, 3)
                score = row.get("rouge_l_unseen", row.get("rouge_l_seen"))
                if score is not None:
                    if best is None or score > best:
                        best, bad = score, 0
                    else:
                        bad += 1
                    if cfg.eval.patience and bad >= cfg.eval.patience:
                        stopped = True
                        row["early_stopped"] = True
                        log.info(
                            "early stop after round %d (no gain in %d evaluations)", round_, bad
                        )
            metrics.append(row)
            _append_metrics(metrics_path, row)
            log.info("[ROUND %d/%d] %s", round_, fed.rounds, _summary(row))
            if cfg.output.checkpoint:
                self._checkpoint(ckpt_dir, round_, state, metrics, best, bad, stopped)
        self.finish(state, metrics)
        return metrics

    def _checkpoint(
        self,
        folder: Path,
        round_: int,
        state: GlobalUpdate | None,
        metrics: list[dict],
        best: float | None,
        bad: int,
        stopped: bool,
    ) -> None:
        save_checkpoint(
            folder,
            Checkpoint(
                round=round_,
                global_update=state,
                metrics=metrics,
                extra={
                    "best": best,
                    "bad_evals": bad,
                    "stopped": stopped,
                    "strategy": self.cfg.federation.strategy,
                    "last_stack_rank": self._last_stack_rank,
                },
            ),
        )

    def finish(self, state: GlobalUpdate, metrics: list[dict[str, Any]]) -> None:
        """Write the per-rank-type adapters and the report."""
        from flexlora.lora.peft_io import write_adapters_atomically
        from flexlora.simulation.report import write_report

        if self.cfg.output.save_adapters and state is not None:
            adapters = {}
            for slot, ranks in self.host.slot_ranks.items():
                try:
                    adapters[f"rank-{slot}"] = state.factors(
                        ranks,
                        self.cfg.lora.alpha,
                        use_rslora=self.cfg.lora.use_rslora,
                        split=self.cfg.federation.split,
                        pad=self._generator("export", slot),
                        dtype=torch.float32,
                    )
                except FlexLoRAError as exc:
                    log.warning("no adapter for rank type %s: %s", slot, exc)
            template = {
                "base_model_name_or_path": _base_name(self.cfg.model.name),
                "target_modules": list(self.cfg.lora.target_modules),
                "lora_dropout": self.cfg.lora.dropout,
                "task_type": "CAUSAL_LM",
            }
            write_adapters_atomically(self.out / "adapters", adapters, template)
        try:
            write_report(self.out)
        except Exception as exc:  # a plot must never fail a finished run
            log.warning("report.png not written: %s", exc)


def _base_name(name: str) -> str:
    """What adapter_config.json names as the base model: the hub id where we know it."""
    from flexlora.training.model import SMOLLM2

    return "HuggingFaceTB/SmolLM2-135M-Instruct" if name.strip().lower() == SMOLLM2 else name


def _target_names(model: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    leaves = set(targets)
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in leaves
    ]


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _summary(row: dict[str, Any]) -> str:
    parts = []
    if row.get("clients"):
        parts.append(f"clients={len(row['aggregated'])}/{len(row['clients'])}")
    for key, fmt in (
        ("train_loss", "{:.4f}"),
        ("rouge_l_unseen", "{:.4f}"),
        ("rouge_l_seen", "{:.4f}"),
        ("seconds_train", "{:.1f}s"),
        ("seconds_aggregate", "{:.3f}s"),
        ("seconds_eval", "{:.1f}s"),
    ):
        value = row.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(f"{key}={fmt.format(value)}")
    for key in ("bytes_up", "bytes_down"):
        if key in row:
            parts.append(f"{key}={row[key] / 2**20:.2f}MiB")
    return " ".join(parts)
