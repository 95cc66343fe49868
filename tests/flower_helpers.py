"""Shared builders for the Flower tests: a JSONL task file, the tiny job, an in-process Grid."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file

from flexlora.config import RunConfig
from flexlora.simulation.checkpoint import load_checkpoint
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


def assert_rows_match(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Same keys and values; floats (losses, scores) within float tolerance."""
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want, strict=True):
        for key, value in w.items():
            if isinstance(value, float) and not math.isnan(value):
                assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
            else:
                assert g[key] == value, key


def assert_same_outputs(got: Path, want: Path) -> None:
    """The global update in the last checkpoint and every exported adapter agree."""
    a = load_checkpoint(got / "checkpoint").global_update
    b = load_checkpoint(want / "checkpoint").global_update
    assert a is not None and b is not None and a.names() == b.names()
    for name in a.names():
        torch.testing.assert_close(a[name].dense(), b[name].dense(), rtol=1e-5, atol=1e-7)
    adapters = sorted(p.name for p in (want / "adapters").iterdir())
    assert adapters and sorted(p.name for p in (got / "adapters").iterdir()) == adapters
    for slot in adapters:
        x = load_file(str(got / "adapters" / slot / "adapter_model.safetensors"))
        y = load_file(str(want / "adapters" / slot / "adapter_model.safetensors"))
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6)


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
        self.pending: dict[str, Message] = {}  # pushed messages' replies not pulled yet
        self.pull_batch = 10**9  # replies one pull returns at most
        self.pull_interval = 0.0
        self.pulls = 0
        self.pulled: list[list[str]] = []  # the message ids each pull asked for

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            reply = self._reply(msg)
            if reply is not None:
                replies.append(reply)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message now; its reply waits for :meth:`pull_messages` (ids 'm<i>';
        a dropped node's message gets none, so nobody waits for it until a timeout)."""
        ids = []
        for msg in messages:
            mid = f"m{len(self.sent)}"
            reply = self._reply(msg)
            if reply is not None:  # a dropped node's message is lost: no id to wait for
                reply.metadata.__dict__["_reply_to_message_id"] = mid  # a tampered one too
                self.pending[mid] = reply
                ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The waiting replies to ``message_ids``, at most ``pull_batch`` per call (removed)."""
        out = []
        message_ids = list(message_ids)
        assert all(isinstance(mid, str) for mid in message_ids), message_ids
        for mid in message_ids:
            if mid in self.pending and len(out) < self.pull_batch:
                out.append(self.pending.pop(mid))
        self.pulls += 1
        self.pulled.append(message_ids)
        return out

    def _reply(self, msg: Message) -> Message | None:
        self.sent.append(msg)
        node = msg.metadata.dst_node_id
        if node in self.drop:
            return None
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
        return self.tamper(node, reply) if self.tamper else reply
