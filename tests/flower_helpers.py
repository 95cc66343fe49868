"""Shared builders for the Flower tests: a JSONL task file, the tiny job, an in-process Grid."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from flexlora.config import RunConfig
from tests.sim_helpers import WORDS, tiny_config

#: metrics-row keys whose values are wall-clock times (they differ run to run)
TIMING_KEYS = ("seconds_train", "seconds_aggregate", "seconds_eval")


def write_tasks(path: Path, n_tasks: int = 8, per_task: int = 12) -> Path:
    """A JSONL file of ``n_tasks`` copy-the-word tasks (one client per task), deterministic."""
    lines = []
    for c in range(n_tasks):
        for i in range(per_task):
            word = WORDS[(c + i) % len(WORDS)]
            record = {
                "instruction": f"Repeat the word {c % 3}",
                "input": word,
                "output": word,
                "category": f"cat{c % 3}",
                "task": f"task{c:03d}",
            }
            lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def toy_config(out: Path, tasks: Path, unseen_fraction: float = 0.25, **sections: Any) -> RunConfig:
    """``tiny_config``'s job (tiny-llama, mixed ranks, 2 rounds) on the JSONL tasks."""
    data = {"source": "jsonl", "path": str(tasks), "task_field": "task"}
    data["unseen_fraction"] = unseen_fraction  # type: ignore[assignment]
    return tiny_config(str(out), data=data, **sections)


def strip_timings(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def read_rows(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines]


class LocalGrid:
    """A Grid stand-in that hands each message to an in-process ClientApp (no network).

    ``drop`` nodes never reply; ``tamper(node, reply)`` may replace a reply, as a faulty
    or malicious node would. A ClientApp that raises answers with an error, as Flower does.
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: Mapping[int, Mapping[str, Any]],
        run_config: Mapping[str, Any] | None = None,
        drop: Iterable[int] = (),
        tamper: Callable[[int, Message], Message] | None = None,
    ) -> None:
        self.client_app = client_app
        self.node_configs = {n: dict(c) for n, c in node_configs.items()}
        self.run_config = dict(run_config or {})
        self.drop = set(drop)
        self.tamper = tamper
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.drop:
                continue
            context = Context(
                run_id=1,
                node_id=node,
                node_config=dict(self.node_configs[node]),
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
            try:
                reply = self.client_app(msg, context)
            except Exception as exc:
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            replies.append(self.tamper(node, reply) if self.tamper else reply)
        return replies
