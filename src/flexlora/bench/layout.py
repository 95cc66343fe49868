"""A bench folder on disk: where each run lives, the marker of a finished run, the call log.

``DIR/runs/<distribution>/<strategy>/seed-<s>/`` holds one run; ``DONE.json`` in it (written
last, atomically) says it finished and with which config; ``DIR/invocations.jsonl`` has one
line per call of the command on the folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MARKER", "RunKey", "log_invocation", "read_json", "write_json"]

MARKER = "DONE.json"


@dataclass(frozen=True, order=True)
class RunKey:
    """One cell of the grid."""

    seed: int
    distribution: str
    strategy: str

    def folder(self, out: Path) -> Path:
        return out / "runs" / self.distribution / self.strategy / f"seed-{self.seed}"

    def label(self) -> str:
        return f"{self.distribution} {self.strategy} seed {self.seed}"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` atomically: a crash leaves the old file or the new one, never half."""
    from flexlora.simulation.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))


def log_invocation(out: Path, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Append this call to ``DIR/invocations.jsonl``; return every call recorded there."""
    path = out / "invocations.jsonl"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    history = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash: the others still count
        if isinstance(item, dict):
            history.append(item)
    return history
