"""Named bench grids: which strategies, distributions and seeds, and the run settings they use.

A preset's ``values`` are config values (nested like the TOML file) laid over the
:class:`~flexlora.config.RunConfig` defaults; a CONFIG file and ``--set`` overrides go on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flexlora.errors import UsageError

__all__ = [
    "ALL_DISTRIBUTIONS",
    "ALL_STRATEGIES",
    "PAPER_GRID",
    "PRESETS",
    "BenchPreset",
    "get_preset",
]

ALL_STRATEGIES = ("flexlora", "fedit-min", "fedit-max", "hetlora", "flora", "ffa")
#: Strategies ``--strategies`` also accepts beyond the paper's comparison (later baselines).
EXTRA_STRATEGIES = ("fedex", "fedsa")
ALL_DISTRIBUTIONS = ("uniform", "heavy-tail-light", "heavy-tail-strong", "normal")
#: the paper's Table 2 rows: {FedAvg, FedIT, SLoRA} x {homogeneous rank, + FlexLoRA, + HetLoRA}
PAPER_GRID = tuple(
    f"{m}+{a}" for m in ("fedavg", "fedit", "slora") for a in ("homogeneous", "flexlora", "hetlora")
)


@dataclass(frozen=True)
class BenchPreset:
    """A grid and its run settings."""

    name: str
    description: str
    strategies: tuple[str, ...]
    distributions: tuple[str, ...]
    seeds: int
    values: dict[str, Any] = field(default_factory=dict)
    #: dotted keys that must be given a non-empty value (a local dataset path, say)
    requires: tuple[str, ...] = ()


PRESETS: dict[str, BenchPreset] = {
    p.name: p
    for p in (
        BenchPreset(
            name="2core",
            description=(
                "flexlora, fedit-min and hetlora under heavy-tail-light and heavy-tail-strong, "
                "3 seeds, on the offline default (SmolLM2-135M, 61 Natural Instructions "
                "tasks): 18 runs (15 run, 3 copied: fedit-min is the same under both), 55 minutes "
                "on 2 quiet CPU cores with --jobs 2 when all 18 ran"
            ),
            strategies=("flexlora", "fedit-min", "hetlora"),
            distributions=("heavy-tail-light", "heavy-tail-strong"),
            seeds=3,
            values={
                "federation": {"rounds": 3, "clients_per_round": 4},
                "train": {"local_steps": 6, "lr": 1e-3},
                # round 0 (shared by every run) and the last round only
                "eval": {"every": 0, "max_examples_per_client": 16},
            },
        ),
        BenchPreset(
            name="full",
            description=(
                "every strategy under every distribution, 3 seeds, on the offline default: "
                "72 runs (54 run, 18 fedit copies) of 432 training steps (6x the 2core runs) with "
                "Rouge-L every 2 rounds"
            ),
            strategies=ALL_STRATEGIES,
            distributions=ALL_DISTRIBUTIONS,
            seeds=3,
            values={
                "federation": {"rounds": 6, "clients_per_round": 6},
                "train": {"local_steps": 12, "lr": 1e-3},
                "eval": {"every": 2, "max_examples_per_client": 16},
            },
        ),
        BenchPreset(
            name="gpu",
            description=(
                "the full grid (every strategy under every distribution, 3 seeds, 6 rounds of "
                "6 clients x 12 steps, the same data and model) for one CUDA GPU: each round's "
                "6 clients train together in one batched pass (train.parallel_clients = 6, "
                "bf16 autocast), Rouge-L after rounds 3 and 6 with 48 prompts a generation "
                "batch; sized to finish in under 10 minutes with --jobs 2 (an estimate from "
                "its work, 54 runs x 72 batched steps of 24 x 128 tokens: not yet measured)"
            ),
            strategies=ALL_STRATEGIES,
            distributions=ALL_DISTRIBUTIONS,
            seeds=3,
            values={
                "model": {"device": "cuda"},
                "federation": {"rounds": 6, "clients_per_round": 6},
                "train": {
                    "local_steps": 12,
                    "lr": 1e-3,
                    "parallel_clients": 6,
                    "precision": "bf16",
                },
                "eval": {"every": 3, "max_examples_per_client": 16, "batch_size": 48},
            },
        ),
        BenchPreset(
            name="paper-grid",
            description=(
                "the paper's Table 2 grid: FedAvg, FedIT and SLoRA, each at a homogeneous rank, "
                "+ FlexLoRA and + HetLoRA, under the four distributions, 3 seeds, on the "
                "offline default, at the full preset's budget (FedAvg: local SGD, FedIT and "
                "SLoRA: AdamW; SLoRA: 1 of 6 rounds sparse at the reference code's density per "
                "rank type); homogeneous runs repeated across distributions are copies; summary "
                "in Tables 2/3/11's form"
            ),
            strategies=PAPER_GRID,
            distributions=ALL_DISTRIBUTIONS,
            seeds=3,
            values={
                "federation": {
                    "rounds": 6,
                    "clients_per_round": 6,
                    "slora_rounds": 1,
                    "slora_density": "paper",
                },
                "train": {"local_steps": 12, "lr": 1e-3},
                "eval": {"every": 0, "max_examples_per_client": 16},
            },
        ),
        BenchPreset(
            name="paper-grid-2core",
            description=(
                "paper-grid at the smallest budget for 2 shared CPU cores with --jobs 2 (run "
                "one distribution at a time there): 2 seeds, 2 rounds (SLoRA: 1 sparse + 1 "
                "LoRA) x 2 clients x 1 local step of 4 examples <= 64 tokens, 2 test examples "
                "per unseen client, 12 new tokens; a smoke test of the grid, too small to rank "
                "methods"
            ),
            strategies=PAPER_GRID,
            distributions=ALL_DISTRIBUTIONS,
            seeds=2,
            values={
                "federation": {
                    "rounds": 2,
                    "clients_per_round": 2,
                    "slora_rounds": 1,
                    "slora_density": "paper",
                },
                "train": {"local_steps": 1, "lr": 1e-3, "cutoff_len": 64},
                "eval": {"every": 0, "max_examples_per_client": 2, "max_new_tokens": 12},
            },
        ),
        BenchPreset(
            name="flowertune-general-nlp",
            description=(
                "the FlowerTune LLM leaderboard's general-NLP setting for one CUDA GPU and the "
                "hub: Mistral-7B-v0.3 on a 4-bit NF4 base, vicgalle/alpaca-gpt4 in 20 IID "
                "clients, 2 (10 %) a round, 200 rounds of 10 steps x 16 examples of 512 tokens, "
                "LoRA on q_proj/v_proj with alpha 64 and dropout 0.075, scored on MMLU (STEM, "
                "social sciences, humanities) through lm-eval at the end; fedit-max is the "
                "leaderboard's FedAvg at r = 32, the other strategies train at ranks 8-32 by the "
                "distribution; documented, not run here"
            ),
            strategies=("fedit-max", "fedit-min", "flexlora", "hetlora", "flora", "ffa"),
            distributions=("uniform", "heavy-tail-light"),
            seeds=1,
            values={
                "model": {
                    "name": "mistralai/Mistral-7B-v0.3",
                    "quantization": "4bit",
                    "bnb_4bit_quant_type": "nf4",
                    "dtype": "bfloat16",
                    "device": "cuda",
                },
                "lora": {"target_modules": ["q_proj", "v_proj"], "alpha": 64, "dropout": 0.075},
                "data": {
                    "source": "hub",
                    "path": "vicgalle/alpaca-gpt4",
                    "partitioner": "dirichlet",  # one category: 20 equal random (IID) shards
                    "num_clients": 20,
                    "unseen_fraction": 0.0,
                    "max_test_per_client": 8,
                },
                "federation": {
                    "rounds": 200,
                    "clients_per_round": 2,
                    # the leaderboard's r = 32 is the largest type; the others train less
                    "rank_types": {
                        "8": [8, 8],
                        "30": [16, 16],
                        "30-200": [16, 32],
                        "200": [32, 32],
                    },
                },
                "train": {
                    "local_steps": 10,
                    "batch_size": 16,
                    "cutoff_len": 512,
                    "lr": 5e-5,
                    "precision": "bf16",
                    "gradient_checkpointing": True,
                },
                "eval": {
                    "at_start": False,
                    "every": 0,
                    "unseen": False,
                    "seen": True,
                    "max_examples_per_client": 8,
                    "harness_tasks": ["mmlu_stem", "mmlu_social_sciences", "mmlu_humanities"],
                    "harness_batch_size": 16,
                },
            },
        ),
        BenchPreset(
            name="paper",
            description=(
                "the paper's scale: Natural Instructions v2 from a local checkout "
                "(--set data.path=...), one client per task (the paper's 1,613 clients) with "
                "the official unseen test tasks, 80 clients a round, the paper's rank types; "
                "a template for a large machine (clients train on the GPU when torch sees "
                "one; --set model.name=... for a larger base model)"
            ),
            strategies=ALL_STRATEGIES,
            distributions=ALL_DISTRIBUTIONS,
            seeds=3,
            values={
                "data": {
                    "source": "natural-instructions",
                    "unseen": "official",
                    "max_test_per_client": 100,
                },
                "federation": {"rounds": 20, "clients_per_round": 80},
                "train": {"local_steps": 0, "local_epochs": 1.0, "cutoff_len": 512, "lr": 3e-4},
                "eval": {"every": 5, "max_examples_per_client": 0, "max_new_tokens": 64},
            },
            requires=("data.path",),
        ),
    )
}


def get_preset(name: str) -> BenchPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(
            f"unknown bench preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None
