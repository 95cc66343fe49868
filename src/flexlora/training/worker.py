"""A process's client side: one base model, its adapter slots, local training and evaluation.

The simulator keeps one :class:`ClientWorker` for all its clients; a Flower ClientApp keeps one
per process. Neither decides who trains when: they are handed a client's examples, its slot,
its starting factors and a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor

from flexlora.config import EvalConfig, LoRASettings, TrainConfig
from flexlora.data.templates import render_prompt
from flexlora.data.types import Example
from flexlora.methods.slora import SparseMask, SparseUpdate
from flexlora.models.prepare import prepare_for_training
from flexlora.training.adapters import AdapterHost
from flexlora.training.batched import ClientJob, train_many
from flexlora.training.client import LocalResult, TokenizedExample, tokenize, train_local
from flexlora.training.pruning import SelfPruning
from flexlora.training.sparse import SparseResult, train_sparse
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors

__all__ = ["ClientJob", "ClientWorker", "LazyTokenized"]


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


class ClientWorker:
    """Trains and evaluates clients on one shared frozen base model.

    ``pruning`` turns on HetLoRA's local rank self-pruning for every client it trains (see
    :mod:`flexlora.training.pruning`); a client trains at the ranks of its start factors.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        lora: LoRASettings,
        slot_ranks: Mapping[str, Mapping[str, int]],
        train: TrainConfig,
        template: Any = "alpaca",
        pruning: SelfPruning | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.train_cfg = train
        self.pruning = pruning
        self.template = template
        prepare_for_training(model, train)  # k-bit preparation, checkpointing: before PEFT
        self.host = AdapterHost(
            model,
            list(lora.target_modules),
            slot_ranks,
            alpha=lora.alpha,
            dropout=lora.dropout,
            use_rslora=lora.use_rslora,
        )
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    def encode(self, example: Example) -> TokenizedExample:
        tc = self.train_cfg
        return tokenize(
            self.tokenizer,
            render_prompt(example, self.template),
            example.output,
            tc.cutoff_len,
            tc.train_on_inputs,
        )

    def train(
        self,
        client: str,
        slot: str,
        start: Mapping[str, LoRAFactors],
        examples: Sequence[Example],
        seed: int,
        train_A: bool = True,
    ) -> tuple[ClientUpdate, LocalResult]:
        """Train ``client`` from ``start`` in ``slot``; its update weighs ``len(examples)``."""
        if not examples:
            raise RuntimeError("client has no training examples")
        result = train_local(
            self.host,
            slot,
            dict(start),
            LazyTokenized(examples, self.encode),
            self.train_cfg,
            seed=seed,
            pad_id=self.pad_id,
            train_A=train_A,
            client=client,
            pruning=self.pruning,
        )
        return _update(client, len(examples), result), result

    def check(self, job: ClientJob) -> None:
        """Raise if ``job`` cannot train: no examples, or start factors that miss its slot."""
        if not job.examples:
            raise RuntimeError("client has no training examples")
        self.host.check_fit(job.slot, job.start, client=job.client)

    def train_many(
        self, jobs: Sequence[ClientJob], train_A: bool = True
    ) -> list[tuple[ClientUpdate, LocalResult]]:
        """Train several clients together in one batched pass (``train.parallel_clients``).

        Each client's result is what :meth:`train` gives it alone (same order, loss weighting,
        clipping, schedule and optimizer state, per client); see :mod:`flexlora.training.batched`.
        """
        if len(jobs) == 1:
            j = jobs[0]
            return [self.train(j.client, j.slot, j.start, j.examples, j.seed, train_A=train_A)]
        tokenized = [
            replace(j, start=dict(j.start), examples=LazyTokenized(j.examples, self.encode))
            for j in jobs
        ]
        results = train_many(
            self.host, tokenized, self.train_cfg, self.pad_id, train_A=train_A, pruning=self.pruning
        )
        return [
            (_update(j.client, len(j.examples), r), r) for j, r in zip(jobs, results, strict=True)
        ]

    def train_sparse(
        self,
        client: str,
        masks: Mapping[str, SparseMask],
        start: Mapping[str, Tensor],
        examples: Sequence[Example],
        seed: int,
        positions: Mapping[str, Tensor] | None = None,
    ) -> tuple[SparseUpdate, SparseResult]:
        """SLoRA's stage 1: train the masked entries from the global ``start`` values.

        ``start`` sits on ``masks`` (the union); ``positions`` picks the entries this client
        trains and sends (its type's sub-mask; ``None``: all of them).
        """
        if not examples:
            raise RuntimeError("client has no training examples")
        result = train_sparse(
            self.host,
            masks,
            start,
            LazyTokenized(examples, self.encode),
            self.train_cfg,
            seed=seed,
            pad_id=self.pad_id,
            client=client,
            positions=positions,
        )
        update = SparseUpdate(
            client_id=client,
            num_examples=len(examples),
            values=result.values,
            metrics={"train_loss": result.train_loss, "tokens": float(result.tokens)},
        )
        return update, result

    def add_slot(self, slot: str, ranks: Mapping[str, int]) -> None:
        """Allocate the adapter slot of one more resource type (a Flower node does so lazily)."""
        self.host.add_slot(slot, ranks)

    def set_base_delta(self, state: GlobalUpdate | None) -> None:
        """Train on ``W0 + ΔW`` (FLoRA's global update, FedEx-LoRA's residual): a frozen float32
        term next to the base weights, never written into them; ``None``: ``W0``."""
        self.host.set_base_delta(state)

    def evaluate(
        self,
        factors: Mapping[str, LoRAFactors] | None,
        sets: Mapping[str, Sequence[Sequence[Example]]],
        cfg: EvalConfig,
        max_prompt_tokens: int,
    ) -> dict[str, float]:
        """Rouge-L of generated text per named set of clients, weighted by example count.

        The global model is the unmodified base with ``factors`` as a float32 LoRA adapter
        (the server chose their ranks: ``eval.global_rank``); ``None`` scores the bare base.
        """
        from flexlora.training.evaluate import evaluate_examples, weighted_mean

        out: dict[str, float] = {}
        with self.host.global_model(factors) as model:
            for kind, clients in sets.items():
                results = []
                for examples in clients:
                    if not examples:
                        continue
                    results.append(
                        evaluate_examples(
                            model,
                            self.tokenizer,
                            [render_prompt(e, self.template) for e in examples],
                            [e.output for e in examples],
                            max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.batch_size,
                            max_prompt_tokens=max_prompt_tokens,
                            stop=cfg.stop,
                        )
                    )
                if results:
                    out[f"rouge_l_{kind}"] = float(weighted_mean(results))
        return out

    def score_client(
        self,
        factors: Mapping[str, LoRAFactors] | None,
        examples: Sequence[Example],
        cfg: EvalConfig,
        max_prompt_tokens: int,
    ) -> float:
        """Rouge-L of one seen client's ``examples`` under ``factors`` (FedSA-LoRA scores each
        seen client with its own model, in the simulator and on a Flower node alike)."""
        return self.evaluate(factors, {"seen": [examples]}, cfg, max_prompt_tokens)["rouge_l_seen"]


def _update(client: str, num_examples: int, result: LocalResult) -> ClientUpdate:
    """The reply of one client's local LoRA training (sequential or batched alike)."""
    return ClientUpdate(
        client_id=client,
        num_examples=num_examples,
        factors=result.factors,
        metrics={"train_loss": result.train_loss, "tokens": float(result.tokens)},
    )
