"""Natural Instructions readers: v2 (the official ``tasks/`` + ``splits/`` layout) and v1 as
shipped inside the bigbench sdist (``subtaskNNN_*/task.json``). One task is one client.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from flexlora.data.sources import KeepFn, TaskSource, load_json
from flexlora.data.types import Example
from flexlora.errors import DataError

__all__ = ["NaturalInstructionsV1", "NaturalInstructionsV2", "v1_category"]

_V2_FILE = re.compile(r"^task(\d+)_\S+\.json$")
_V1_DIR = re.compile(r"^subtask(\d+)_\S+$")
V2_SPLIT_DIR = Path("splits") / "default"


def _index_by_number(paths: Sequence[Path], pattern: re.Pattern[str], where: Path) -> list[Path]:
    """Paths whose names match ``pattern``; the same task number twice is an error."""
    by_number: dict[int, Path] = {}
    for p in sorted(paths):
        m = pattern.match(p.name)
        if m is None:
            continue
        number = int(m.group(1))
        if number in by_number:
            raise DataError(
                where, f"task number {number} appears twice: {by_number[number].name}, {p.name}"
            )
        by_number[number] = p
    return list(by_number.values())


def _first_target(value: object, path: Path, where: str) -> str:
    """NI targets are lists of acceptable strings (v1 also allows one string): the first."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0]
    raise DataError(path, f"{where}: the output must be a string or a non-empty list of strings")


def _materialise(
    path: Path,
    data: dict,
    list_key: str,
    target_key: str,
    keep: KeepFn,
    instruction: str,
    category: str,
    task: str,
    id_key: str | None = None,
) -> list[Example]:
    """Check every record of ``data[list_key]``, then build Examples for the kept ones only.

    All records are checked (cheap next to parsing) so a malformed file fails whatever the
    subsample; only the kept ones become Examples, sharing one instruction string.
    """
    records = data.get(list_key)
    if records is None:
        raise DataError(path, f"missing field {list_key!r}")
    if not isinstance(records, list):
        raise DataError(path, f"{list_key!r} must be a list")
    if not records:
        raise DataError(path, f"empty task: {list_key!r} is empty")
    targets = []
    for i, rec in enumerate(records):
        where = f"{list_key}[{i}]"
        if not isinstance(rec, dict):
            raise DataError(path, f"{where} must be an object")
        for key in ("input", target_key):
            if key not in rec:
                raise DataError(path, f"{where}: missing field {key!r}")
        if not isinstance(rec["input"], str):
            raise DataError(path, f"{where}: 'input' must be a string")
        targets.append(_first_target(rec[target_key], path, where))
    return [
        Example(
            instruction,
            records[i]["input"],
            targets[i],
            category,
            task,
            str(records[i].get(id_key, f"{task}-{i}")) if id_key else f"{task}-{i}",
        )
        for i in keep(len(records))
    ]


class NaturalInstructionsV2(TaskSource):
    """A local Natural Instructions v2 checkout: ``tasks/taskNNN_*.json`` and
    ``splits/default/{train,test}_tasks.txt``.

    The instruction is the task's ``Definition`` (plus ``positive_examples`` of its
    ``Positive Examples``); the target is the first of each instance's acceptable outputs; the
    category is the first of its ``Categories``.
    """

    def __init__(self, root: str | Path, positive_examples: int = 0) -> None:
        root = Path(root)
        if (root / "tasks").is_dir():
            self.root, self.tasks_dir = root, root / "tasks"
        elif root.is_dir() and root.name == "tasks":
            self.root, self.tasks_dir = root.parent, root
        else:
            raise DataError(root, "not a Natural Instructions v2 folder (no tasks/ inside)")
        self.name = str(self.root)
        self.positive_examples = positive_examples
        files = _index_by_number(list(self.tasks_dir.glob("*.json")), _V2_FILE, self.tasks_dir)
        if not files:
            raise DataError(self.tasks_dir, "no taskNNN_*.json files")
        self._files = {p.stem: p for p in files}

    def task_names(self) -> list[str]:
        return sorted(self._files)

    def official_split(self) -> tuple[list[str], list[str]]:
        seen: dict[str, tuple[Path, int]] = {}
        out: list[list[str]] = []
        for fname in ("train_tasks.txt", "test_tasks.txt"):
            path = self.root / V2_SPLIT_DIR / fname
            names = []
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise DataError(path, f"cannot read split file: {exc.strerror}") from exc
            for lineno, line in enumerate(lines, 1):
                name = line.strip().removesuffix(".json")
                if not name or name.startswith("#"):
                    continue
                if name not in self._files:
                    raise DataError(path, f"task {name!r} is not in {self.tasks_dir}", lineno)
                if name in seen:
                    first, first_line = seen[name]
                    raise DataError(
                        path, f"task {name!r} appears twice (also {first}:{first_line})", lineno
                    )
                seen[name] = (path, lineno)
                names.append(name)
            out.append(names)
        return out[0], out[1]

    def read_task(self, task: str, keep: KeepFn) -> list[Example]:
        path = self._files[task]
        data = load_json(path)
        if not isinstance(data, dict):
            raise DataError(path, "a task file must hold a JSON object")
        instruction = self._instruction(data, path)
        categories = data.get("Categories") or ["uncategorized"]
        if not (isinstance(categories, list) and isinstance(categories[0], str)):
            raise DataError(path, "'Categories' must be a list of strings")
        category = categories[0]
        return _materialise(
            path, data, "Instances", "output", keep, instruction, category, task, id_key="id"
        )

    def _instruction(self, data: dict, path: Path) -> str:
        definition = data.get("Definition")
        if definition is None:
            raise DataError(path, "missing field 'Definition'")
        if isinstance(definition, str):
            definition = [definition]
        if not (isinstance(definition, list) and all(isinstance(d, str) for d in definition)):
            raise DataError(path, "'Definition' must be a list of strings")
        text = "\n".join(definition).strip()
        shots = data.get("Positive Examples") or []
        for j, ex in enumerate(shots[: self.positive_examples], 1):
            if not (isinstance(ex, dict) and isinstance(ex.get("input"), str)):
                raise DataError(path, f"Positive Examples[{j - 1}] needs 'input' and 'output'")
            output = _first_target(ex.get("output"), path, f"Positive Examples[{j - 1}]")
            text += f"\n\nPositive Example {j}:\nInput: {ex['input']}\nOutput: {output}"
        return text


def v1_category(task: str) -> str:
    """The source dataset named in a v1 task name: ``subtask001_quoref_...`` -> ``quoref``
    (the three spellings of "miscellaneous" in the release become ``misc``)."""
    parts = task.split("_")
    head = parts[1] if len(parts) > 1 else task
    if head == "essential":  # the one two-word dataset name: essential_terms
        return "essential_terms"
    return "misc" if head.startswith("misc") else head


class NaturalInstructionsV1(TaskSource):
    """Natural Instructions v1 in bigbench's format: ``subtaskNNN_*/task.json`` with
    ``task_prefix`` (the definition) and ``examples`` (``input``, ``target``).

    The category is the source dataset in the task name (quoref, mctaco, drop, ...), since v1
    files carry no category field.
    """

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(folder, "not a folder")
        self.name = str(folder)
        dirs = _index_by_number(
            [p.parent for p in folder.glob("subtask*/task.json")], _V1_DIR, folder
        )
        if not dirs:
            raise DataError(folder, "no subtaskNNN_*/task.json files")
        self._files = {d.name: d / "task.json" for d in dirs}

    def task_names(self) -> list[str]:
        return sorted(self._files)

    def read_task(self, task: str, keep: KeepFn) -> list[Example]:
        path = self._files[task]
        data = load_json(path)
        if not isinstance(data, dict):
            raise DataError(path, "a task file must hold a JSON object")
        if not isinstance(data.get("task_prefix"), str):
            raise DataError(path, "missing string field 'task_prefix' (the task definition)")
        instruction = data["task_prefix"].strip()
        return _materialise(
            path, data, "examples", "target", keep, instruction, v1_category(task), task
        )
