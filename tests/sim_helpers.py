"""Shared builders for simulator tests: an in-memory federated dataset and a tiny config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flexlora.config import RunConfig, load_config
from flexlora.config_io import to_dict
from flexlora.data.types import ClientSplit, Example, FederatedDataset

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]


def make_dataset(n_seen: int = 6, n_unseen: int = 2, per_client: int = 12) -> FederatedDataset:
    """Clients with a simple copy-ish task each (``repeat the word``), deterministic."""
    splits = {}
    unseen = []
    for c in range(n_seen + n_unseen):
        cid = f"task{c:03d}"
        exs = [
            Example(
                instruction=f"Repeat the word {c % 3}",
                input=WORDS[(c + i) % len(WORDS)],
                output=WORDS[(c + i) % len(WORDS)],
                category=f"cat{c % 3}",
                task=cid,
                id=f"{cid}-{i}",
            )
            for i in range(per_client)
        ]
        if c >= n_seen:
            unseen.append(cid)
            splits[cid] = ClientSplit(train=(), eval=tuple(exs[:2]), test=tuple(exs[2:6]))
        else:
            splits[cid] = ClientSplit(
                train=tuple(exs[: per_client - 4]), eval=tuple(exs[-4:-2]), test=tuple(exs[-2:])
            )
    return FederatedDataset(splits, unseen=unseen, name="toy")


#: the paper's rank type names (the resource distributions draw them) at tiny ranks
TINY_PAPER_TYPES = {"8": [2, 2], "30": [4, 4], "30-200": [4, 8], "200": [8, 8]}


def tiny_config(out: str, **sections: Any) -> RunConfig:
    """A 2-round, 6-client mixed-rank job on tiny-llama that runs in seconds."""
    values: dict[str, Any] = {
        "model": {"name": "tiny-llama"},
        "lora": {"target_modules": ["q_proj", "v_proj", "up_proj"], "dropout": 0.0},
        "train": {"local_steps": 2, "batch_size": 2, "cutoff_len": 64, "lr": 1e-2},
        "federation": {
            "rounds": 2,
            "clients_per_round": 4,
            "distribution": "explicit",
            "client_types": ["2", "4", "2-8", "8", "2", "4"],
            "rank_types": {"2": [2, 2], "4": [4, 4], "2-8": [2, 8], "8": [8, 8]},
            "seed": 7,
        },
        "eval": {"max_new_tokens": 4, "max_examples_per_client": 2, "batch_size": 4},
        "output": {"dir": out, "progress": False},
    }
    for key, value in sections.items():
        values.setdefault(key, {}).update(value)
    return load_config(values=values)


def write_jsonl_job(folder: Path) -> Path:
    """A JSONL dataset (8 tasks) and a 4-round tiny-llama config that reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tasks.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for t in range(8):
            for i in range(10):
                word = WORDS[(t + i) % len(WORDS)]
                record = {
                    "instruction": f"Repeat the word ({t % 3})",
                    "input": word,
                    "output": word,
                    "category": f"cat{t % 3}",
                    "task": f"task{t}",
                }
                fh.write(json.dumps(record) + "\n")
    values = {
        "model": {"name": "tiny-llama", "threads": 1},
        "data": {
            "source": "jsonl",
            "path": str(data),
            "task_field": "task",
            "unseen_fraction": 0.25,
            "max_test_per_client": 2,
        },
        "train": {"local_steps": 60},
        "federation": {"rounds": 4, "clients_per_round": 3},
        "eval": {"at_start": False, "every": 0},
        "output": {"dir": str(folder / "unused")},
    }
    base = tiny_config("unused")
    merged = {**to_dict(base)}
    for section, value in values.items():
        merged[section] = {**merged.get(section, {}), **value}
    config = folder / "config.toml"
    load_config(values=merged).save(config)
    return config
