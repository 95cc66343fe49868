"""The reader protocol every source implements, and the in-memory source of flat files.

A source lists its task names cheaply (from file names) and reads one task at a time, building
:class:`Example` objects only for the indices the caller keeps; at most one task file is parsed
at any moment, which keeps loading 1,600 Natural Instructions tasks memory-lean.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from flexlora.data.types import Example
from flexlora.errors import DataError

__all__ = ["InMemorySource", "KeepFn", "TaskSource", "load_json"]

#: given a task's example count, the sorted indices to materialise
KeepFn = Callable[[int], np.ndarray]


class TaskSource(ABC):
    """A collection of tasks (a source without tasks is one task named "")."""

    name: str

    @abstractmethod
    def task_names(self) -> list[str]:
        """All task names, sorted."""

    @abstractmethod
    def read_task(self, task: str, keep: KeepFn) -> list[Example]:
        """The kept examples of ``task`` (``DataError`` on malformed or empty input)."""

    def official_split(self) -> tuple[list[str], list[str]]:
        """(seen, unseen) task names from the source's own split files."""
        raise DataError(self.name, "this source has no official train/test task split")


class InMemorySource(TaskSource):
    """Examples already read (JSONL, Dolly, hub), grouped by ``Example.task``."""

    def __init__(self, name: str, examples: Sequence[Example]) -> None:
        if not examples:
            raise DataError(name, "no examples")
        self.name = name
        self._by_task: dict[str, list[Example]] = {}
        for e in examples:
            self._by_task.setdefault(e.task, []).append(e)

    def task_names(self) -> list[str]:
        return sorted(self._by_task)

    def read_task(self, task: str, keep: KeepFn) -> list[Example]:
        examples = self._by_task[task]
        return [examples[i] for i in keep(len(examples))]


def load_json(path: Path) -> object:
    """Parse one JSON file; errors name the file, the line and the column."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON (column {exc.colno}): {exc.msg}", exc.lineno) from exc
