"""The in-process simulator: sample -> train -> validate -> aggregate -> redistribute -> evaluate.

One base model is loaded once; every client borrows the adapter slot of its resource type.
All randomness is keyed on (seed, round, client), so every strategy sees the same clients,
ranks and data order, and a resumed run equals an uninterrupted one. Memory is bounded by the
clients of the current round: the population is a list of ids and rank types.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sized
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flexlora.aggregation.base import resolve_device
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
from flexlora.errors import UsageError
from flexlora.federation.replies import remove_spill_folders
from flexlora.federation.round import (
    INJECTED_FAILURE,
    ClientResult,
    RoundCollector,
    expected_failure,
    failure_reason,
    injected_failures,
    round_frozen,
)
from flexlora.lora.peft_io import FROZEN_DELTA
from flexlora.models import (
    TINY_LLAMA,
    build_tiny_llama,
    resolve_targets,
    target_linear_modules,
)
from flexlora.schedule import sample_clients
from flexlora.server import Coordinator, resolve_client_types
from flexlora.simulation.checkpoint import (
    STATE,
    Checkpoint,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from flexlora.simulation.rundir import locked_run_folder
from flexlora.training.batched import check_no_base_dropout
from flexlora.training.capacity import auto_parallel_clients
from flexlora.training.worker import ClientJob, ClientWorker
from flexlora.types import GlobalUpdate, LoRAFactors

log = logging.getLogger(__name__)

__all__ = ["FROZEN_DELTA", "FederatedRun"]


class FederatedRun:
    """One federated fine-tuning run, writing its outputs under ``cfg.output.dir``.

    A thin driver: :class:`~flexlora.server.Coordinator` makes every server decision and
    :class:`~flexlora.training.worker.ClientWorker` does every client's work, in one process.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        dataset: Any | None = None,
        model_and_tokenizer: tuple[Any, Any] | None = None,
        client_types: dict[str, str] | None = None,
    ) -> None:
        """``client_types`` (client -> resource type) replaces the configured draw over the
        seen clients: a Flower ServerApp passes the types its nodes declared."""
        self.cfg = cfg
        self.out = Path(cfg.output.dir)
        self._unexpected: dict[str, Exception] = {}  # this round's clients failed on a surprise
        fed = cfg.federation
        cfg.client_train()  # an optimizer the strategy's method contradicts: refused up front
        resolve_device(fed.server_device)  # a server GPU that is not there: before any load
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
        if not self.data.seen:
            raise UsageError("the dataset has no seen (training) clients")
        given = model_and_tokenizer
        if model_and_tokenizer is None and self.trains_in_process:
            model_and_tokenizer = self._load_model()
        self._model = model_and_tokenizer
        if model_and_tokenizer is not None:
            model: Any = model_and_tokenizer[0]
        else:  # the clients train elsewhere: the shapes come from the config alone
            from flexlora.models.meta import meta_model

            model = meta_model(cfg.model.name)
        cfg.lora.target_modules = resolve_targets(model, cfg.lora.target_modules)
        # tiny-llama exists only in memory: its export saves it (the worker wraps the model).
        # A model the caller gave is saved as given; one the run loads is saved as built, in
        # float32, never quantized or cast: model.dtype / model.quantization apply at load
        self._tiny_base = (
            (copy.deepcopy(given[0]), given[1])
            if given is not None
            and cfg.output.save_adapters
            and cfg.model.name.strip().lower() == TINY_LLAMA
            else None
        )

        # Resource types are fixed per client for the whole run, the same for every strategy.
        # A round's replies kept for the diagnostics spill (beyond REPLY_MEMORY_BYTES) into
        # the run folder, never a system temporary folder: see federation.replies.
        self.server = Coordinator(
            cfg,
            target_linear_modules(model, cfg.lora.target_modules),
            client_types or resolve_client_types(cfg, list(self.data.seen)),
            reply_dir=self.out,
        )
        self._worker: ClientWorker | None = None
        pc = cfg.train.parallel_clients
        self.parallel_clients = 1
        if self.trains_in_process:
            self.parallel_clients = (
                auto_parallel_clients(model, self.server.slot_ranks, cfg)
                if pc == "auto"
                else int(pc)
            )
            _ = self.worker  # the slots are allocated before the first round
            if self.parallel_clients > 1:  # a usage error now, not every client failing later
                check_no_base_dropout(self.worker.host)
        self._eval_sets = self._choose_eval_sets()
        # FedSA-LoRA: the simulated clients' own B's, on disk under the run folder
        self.local = LocalStore(self.out / CLIENT_STATE) if self.server.keeps_local_B else None
        # HetLoRA's self-pruning: each simulated client's own ranks, on disk under the run folder
        pruning = self.server.self_pruning is not None
        self.own_ranks = LocalStore(self.out / CLIENT_RANKS) if pruning else None
        log.info(
            "strategy %s (local %s), %d clients of types %s",
            fed.strategy,
            self.server.optimizer,
            len(self.server.client_type),
            dict(Counter(self.server.client_type.values())),
        )

    #: Whether this driver's clients train in this process (the simulator) or elsewhere (a
    #: Flower ServerApp: then the weights are loaded only to evaluate, with no training slot).
    trains_in_process = True

    def _load_model(self) -> tuple[Any, Any]:
        from flexlora.models import load_model

        t0 = time.perf_counter()
        loaded = load_model(self.cfg.model)
        log.info("model %s loaded (%.1fs)", self.cfg.model.name, time.perf_counter() - t0)
        return loaded

    @property
    def worker(self) -> ClientWorker:
        """The process's client side: the base model with its adapter slots (built once)."""
        if self._worker is None:
            if self._model is None:
                self._model = self._load_model()
            model, tokenizer = self._model
            self._worker = ClientWorker(
                model,
                tokenizer,
                self.cfg.lora,
                self.server.slot_ranks if self.trains_in_process else {},
                self.cfg.client_train(),
                template=getattr(self.data, "template", None) or self.cfg.data.template,
                pruning=self.server.self_pruning,
            )
        return self._worker

    @property
    def client_type(self) -> dict[str, str]:
        return self.server.client_type

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

    def evaluate(self, state: GlobalUpdate | None, round_: int = 0) -> dict[str, Any]:
        """Rouge-L of generated text on the evaluation clients' test sets, after ``round_``.

        The global model is ``state`` as a float32 LoRA adapter at ``eval.global_rank`` on the
        unmodified base (``None``: the base model itself); the row says which ranks. With
        FedSA-LoRA each seen client is scored with its own B instead (:meth:`score_own`).
        """
        cap = self.cfg.eval.max_examples_per_client
        sets = {
            kind: [list(self.data.test(cid))[: cap or None] for cid in clients]
            for kind, clients in self._eval_sets.items()
        }
        own = self.server.keeps_local_B and state is not None and "seen" in sets
        factors = self.server.eval_factors(state) if state is not None else None
        scores = self.worker.evaluate(
            factors,
            {kind: s for kind, s in sets.items() if not (own and kind == "seen")},
            self.cfg.eval,
            max_prompt_tokens=self.cfg.eval_prompt_tokens(),
        )
        if own:
            assert factors is not None
            scored, failed = self.score_own(factors, self._eval_sets["seen"], sets["seen"], round_)
            if scored:
                total = math.fsum(score * n for score, n in scored)
                scores["rouge_l_seen"] = total / sum(n for _, n in scored)
            if failed:
                scores["eval_failed"] = failed
        ranks = self.server.eval_ranks(state) if state is not None else {}
        return {
            **scores,
            "eval_global_rank": self.cfg.eval.global_rank,
            "eval_ranks": sorted(set(ranks.values())),
        }

    def score_own(
        self,
        factors: dict[str, LoRAFactors],
        clients: list[str],
        tests: list[list[Any]],
        round_: int,
    ) -> tuple[list[tuple[float, int]], dict[str, str]]:
        """FedSA-LoRA's protocol: each seen client's Rouge-L with its own B and the shared Ā.

        ``factors`` is the global model (what unseen clients are scored with); a client scores
        :func:`~flexlora.client_state.own_eval_factors` of it with the B it kept after
        ``round_`` (one that never trained: the global factors). Returns (score, test examples)
        per client with a test set, in ``clients``' order, and the clients that could not be
        scored (none here; a Flower node may fail). The simulator's transport: in process.
        """
        assert self.local is not None
        out: list[tuple[float, int]] = []
        for cid, examples in zip(clients, tests, strict=True):
            if not examples:
                continue
            own = self.local.load(cid, before_round=round_ + 1)
            personal = own_eval_factors(cid, factors, own)
            score = self.worker.score_client(
                personal, examples, self.cfg.eval, self.cfg.eval_prompt_tokens()
            )
            out.append((score, len(examples)))
        return out, {}

    def run_round(
        self, state: GlobalUpdate, round_: int, bar: bool
    ) -> tuple[GlobalUpdate, dict[str, Any]]:
        """:meth:`transport_round`, stopped where every client it trained failed on an
        exception the code does not expect: one client's ValueError fails that client, as on
        a Flower node, but the same error in all of them is a bug to show, not a run whose
        rounds all keep the previous state."""
        self._unexpected = {}
        state, row = self.transport_round(state, round_, bar)
        tried = [c for c in row["clients"] if row["failed"].get(c) != INJECTED_FAILURE]
        if tried and not row["aggregated"] and all(c in self._unexpected for c in tried):
            cid = tried[0]
            exc = self._unexpected[cid]
            raise RuntimeError(
                f"round {round_}: every client failed on an unexpected error, first {cid}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return state, row

    def _failure(self, exc: Exception, cid: str) -> str:
        """The row's message for a client that failed on ``exc``; an unexpected one is noted."""
        if not expected_failure(exc):
            self._unexpected[cid] = exc
        return failure_reason(exc, cid)

    def transport_round(
        self, state: GlobalUpdate, round_: int, bar: bool
    ) -> tuple[GlobalUpdate, dict[str, Any]]:
        """Sample, train every sampled client at its rank, aggregate; return state and row.

        The round's protocol (failure injection, the merge step, reading the results, the
        row) is :mod:`flexlora.federation.round`'s, as in the Flower driver; this method is
        only the transport: it trains the clients in process. In SLoRA's sparse stage a
        client trains the masked entries instead of its adapter.
        """
        server = self.server
        sparse = server.sparse_round(round_)
        state = server.round_state(state, round_)  # SLoRA: the SVD initialisation
        clients = server.sample(round_)
        failing = injected_failures(server, round_, clients)
        # released however the round ends: an error or an interrupt while a client trains
        # leaves no spilled update behind
        with RoundCollector(server, state, round_, clients) as collector:
            bytes_down: dict[str, int] = {}
            if sparse:
                for cid in clients:
                    bytes_down[cid] = state.num_bytes()  # the values; the mask is the seed's
                    if cid in failing:
                        collector.offer(ClientResult(cid, error=INJECTED_FAILURE))
                    else:
                        collector.offer(self._train_sparse(cid, state, round_))
                return collector.close(bytes_down)
            self.worker.set_base_delta(round_frozen(server, state, round_))
            started: dict[str, dict[str, int]] = {}
            jobs = self._jobs(state, round_, clients, failing, collector, bytes_down, started)
            for r in self.train_clients(jobs, round_, bar):
                # A client that trained keeps what it trained (FedSA's B, HetLoRA's pruned
                # ranks) even when the server drops its reply as a straggler: a Flower node
                # cannot know.
                if r.update is not None and self.local is not None:
                    B = {n: f.B for n, f in r.update.factors.items()}
                    self.local.save(r.client, round_, B)
                pruned = r.update is not None and r.update.ranks != started.get(r.client)
                if pruned and self.own_ranks is not None:
                    self.own_ranks.save(r.client, round_, rank_tensors(r.update.factors))
                collector.offer(r)  # folded now: the round's updates are never held together
            return collector.close(bytes_down)

    def _jobs(
        self,
        state: GlobalUpdate,
        round_: int,
        clients: list[str],
        failing: set[str],
        collector: RoundCollector,
        bytes_down: dict[str, int],
        started: dict[str, dict[str, int]],
    ) -> Iterator[ClientJob]:
        """Each sampled client's job, prepared only when :meth:`train_clients` asks for it (so
        only one ``train.parallel_clients`` group's start factors, and FedSA's own B's, are in
        memory at a time); its download bytes go to ``bytes_down``, HetLoRA's starting ranks
        to ``started``. A client that cannot start (its own stored B or ranks do not fit its
        slot, no examples, an injected failure) is offered to ``collector`` as failed, with
        the message a Flower node gives: the node applies its own B / ranks first, then the
        injected failure."""
        server = self.server
        for cid in clients:
            start = server.start_factors(state, cid, round_)
            bytes_down[cid] = server.download_bytes(start, state, round_)
            try:
                if self.local is not None:  # FedSA-LoRA: the client's own B, zeros at first
                    start = with_local_B(cid, start, self.local.load(cid, before_round=round_))
                if self.own_ranks is not None:  # a client that pruned cuts them to its ranks
                    own = self.own_ranks.load(cid, before_round=round_)
                    start = with_own_ranks(cid, start, own)
                    started[cid] = {name: f.rank for name, f in start.items()}
                if cid in failing:
                    raise RuntimeError(INJECTED_FAILURE)
                job = ClientJob(
                    cid,
                    server.client_type[cid],
                    start,
                    self.data.train(cid),
                    server.client_seed(round_, cid),
                )
                self.worker.check(job)
            except Exception as exc:  # the client fails, the round goes on (as on Flower)
                collector.offer(ClientResult(cid, error=self._failure(exc, cid)))
                continue
            del start
            yield job
            del job

    def train_clients(
        self, jobs: Iterable[ClientJob], round_: int, bar: bool = False
    ) -> Iterator[ClientResult]:
        """Train the round's clients, ``train.parallel_clients`` at a time in one batched pass,
        yielding each group's results as it finishes; the one place the simulator trains (the
        transport of :class:`~flexlora.federation.round.RoundCollector`). ``jobs`` is read
        one group ahead of the training: an iterator prepares each group when it is due."""
        size = self.parallel_clients
        total = len(jobs) if isinstance(jobs, Sized) else None
        progress = tqdm(total=total, desc=f"round {round_} clients", leave=False, disable=not bar)
        it = iter(jobs)
        first = 0  # the index of the group's first job in the round: its batch number
        try:
            while group := list(islice(it, size)):
                batch = first if len(group) > 1 else None
                first += len(group)
                results = self._train_group(group, batch=batch)
                progress.update(len(group))
                del group  # its start factors go before the next group is prepared
                yield from results
                del results
        finally:
            progress.close()

    def _train_sparse(self, cid: str, state: Any, round_: int) -> ClientResult:
        """SLoRA's stage 1 for one client."""
        try:
            t0 = time.perf_counter()
            update, result = self.worker.train_sparse(
                cid,
                self.server.masks or {},
                state.values(),
                self.data.train(cid),
                seed=self.server.client_seed(round_, cid),
                positions=self.server.sparse_positions_of(cid),
            )
            took = time.perf_counter() - t0
        except Exception as exc:
            return ClientResult(cid, error=self._failure(exc, cid))
        return ClientResult(cid, update, result.seconds, result.tokens, replied_after=took)

    def _train_group(self, jobs: list[ClientJob], batch: int | None) -> list[ClientResult]:
        """Train clients together (one at a time when ``batch`` is ``None``)."""
        if not jobs:
            return []
        try:
            t0 = time.perf_counter()
            trained = self.worker.train_many(jobs, train_A=self.server.trains_A)
            took = time.perf_counter() - t0
        except Exception as exc:
            return [ClientResult(job.client, error=self._failure(exc, job.client)) for job in jobs]
        return [
            ClientResult(
                update.client_id,
                update,
                result.seconds,
                result.tokens,
                # alone: the call's time; batched: the time until the client left the batch
                replied_after=took if len(jobs) == 1 else result.seconds,
                batch=batch,
            )
            for update, result in trained
        ]

    # ---------------------------------------------------------------- the loop
    @locked_run_folder  # a second process writing this folder refuses (simulation.rundir)
    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        cfg = self.cfg
        fed = cfg.federation
        self.out.mkdir(parents=True, exist_ok=True)
        remove_spill_folders(self.out)  # a killed run's spilled replies (we hold the lock)
        ckpt_dir = self.out / "checkpoint"
        metrics_path = self.out / "metrics.jsonl"
        if resume and not (ckpt_dir / STATE).exists():
            log.warning("no checkpoint in %s yet: starting the run from the beginning", self.out)
            resume = False
        if resume:
            ckpt = load_checkpoint(ckpt_dir, self.server.shapes)
            check_resumable(ckpt.config, self._config_dict())
            state = ckpt.global_update or self.server.initial_state()
            first = ckpt.round + 1
            metrics = ckpt.metrics
            best = ckpt.extra.get("best")
            bad = int(ckpt.extra.get("bad_evals", 0))
            stopped = bool(ckpt.extra.get("stopped", False))
            self.server.restore_extra(ckpt.extra)
            log.info("resuming %s after round %d", self.out, ckpt.round)
        else:
            (self.out / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
            state = self.server.initial_state()
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
                row.update(self.evaluate(state, round_))
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
                    **self.server.state_extra(),
                },
                config=self._config_dict(),
            ),
        )

    def _config_dict(self) -> dict[str, Any]:
        """The run's configuration as JSON values (what a resume must find unchanged)."""
        return json.loads(json.dumps(to_dict(self.cfg)))

    def score_harness(self, state: GlobalUpdate) -> dict[str, float]:
        """lm-eval scores of the final global model (``eval.harness_tasks``), as
        ``harness/<task>/<metric>`` keys of the last metrics row."""
        from flexlora.evaluation.harness import flat_scores, score

        ec = self.cfg.eval
        t0 = time.perf_counter()
        # the same global model as the Rouge-L evaluation: eval.global_rank's adapter on W0
        factors = self.server.eval_factors(state)
        with self.worker.host.global_model(factors) as model:
            scores, _ = score(
                model,
                self.worker.tokenizer,
                ec.harness_tasks,
                include_path=ec.harness_include_path or None,
                limit=ec.harness_limit,
                batch_size=ec.harness_batch_size,
            )
        row = flat_scores(scores)
        log.info("lm-eval %s (%.1fs)", row, time.perf_counter() - t0)
        return {**row, "seconds_harness": round(time.perf_counter() - t0, 3)}

    def finish(self, state: GlobalUpdate, metrics: list[dict[str, Any]]) -> None:
        """Write the per-rank-type adapters (with model cards, see :mod:`.export`) and the
        report."""
        from flexlora.simulation.export import export_adapters, save_tiny_base
        from flexlora.simulation.report import write_report

        if self.cfg.eval.harness_tasks and metrics:
            metrics[-1].update(self.score_harness(state))
            _write_metrics(self.out / "metrics.jsonl", metrics)
        if self.cfg.output.save_adapters:
            if self._tiny_base is None and self.cfg.model.name.strip().lower() == TINY_LLAMA:
                self._tiny_base = build_tiny_llama()  # float32, as load_base_model builds it
            if self._tiny_base is not None:
                save_tiny_base(*self._tiny_base, self.out)
            export_adapters(
                self.out,
                self.cfg,
                self.server.export_factors(state),
                self.server.adapter_template(),
                metrics,
            )
            frozen = state.frozen_part()
            if frozen is not None:
                # FedEx-LoRA: the residual the adapters need in the base weights (W0 + U·S·Vh)
                from safetensors.torch import save_file

                tensors, meta = frozen.to_tensors()
                save_file(tensors, str(self.out / "adapters" / FROZEN_DELTA), metadata=meta)
        try:
            write_report(self.out)
        except Exception as exc:  # a plot must never fail a finished run
            log.warning("report.png not written: %s", exc)


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
