"""Flat instruction files: generic JSONL with configurable field names, Dolly-15K, and an
optional Hugging Face hub path (only when ``datasets`` is installed)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flexlora.data.types import Example
from flexlora.errors import DataError, UsageError

__all__ = ["DOLLY_FIELDS", "FieldMap", "read_hub", "read_jsonl"]

NO_CATEGORY = "default"


@dataclass(frozen=True)
class FieldMap:
    """Record keys of each example field; ``""`` for input / category / task means absent."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    category: str = "category"
    task: str = ""


#: databricks-dolly-15k.jsonl: the context is the input, the response the output
DOLLY_FIELDS = FieldMap("instruction", "context", "response", "category")


def _text(record: Mapping[str, object], key: str, where: str, line: int, *, target: bool) -> str:
    if key not in record:
        raise DataError(where, f"missing field {key!r}", line)
    value = record[key]
    if target and isinstance(value, list) and value and isinstance(value[0], str):
        return value[0]  # a list of acceptable outputs: the first is the target
    if not isinstance(value, str):
        raise DataError(where, f"field {key!r} must be a string, got {type(value).__name__}", line)
    return value


def to_example(record: object, fields: FieldMap, where: str, line: int, stem: str) -> Example:
    """One record -> Example; errors name ``where`` (file or hub name) and the line / row."""
    if not isinstance(record, Mapping):
        raise DataError(where, "a record must be a JSON object", line)
    return Example(
        instruction=_text(record, fields.instruction, where, line, target=False),
        input=_text(record, fields.input, where, line, target=False) if fields.input else "",
        output=_text(record, fields.output, where, line, target=True),
        category=(
            _text(record, fields.category, where, line, target=False)
            if fields.category
            else NO_CATEGORY
        ),
        task=_text(record, fields.task, where, line, target=False) if fields.task else "",
        id=f"{stem}-{line}",
    )


def read_jsonl(path: str | Path, fields: FieldMap) -> list[Example]:
    """Every non-blank line of ``path`` as an Example (errors name the file and the line)."""
    path = Path(path)
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        path, f"invalid JSON (column {exc.colno}): {exc.msg}", lineno
                    ) from exc
                out.append(to_example(record, fields, str(path), lineno, path.stem))
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text: {exc.reason}") from exc
    if not out:
        raise DataError(path, "no records")
    return out


def read_hub(name: str, split: str, fields: FieldMap) -> list[Example]:
    """A Hugging Face hub dataset (needs ``datasets`` and a reachable hub; never the default)."""
    try:
        import datasets  # optional dependency
    except ImportError:
        raise UsageError(
            "source hub needs the 'datasets' package (pip install datasets); "
            "or download the data and use source jsonl/dolly with a local path"
        ) from None
    try:
        rows: Iterable[object] = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, unknown name, bad split: all surface the same way
        raise DataError(name, f"cannot load from the hub: {exc}") from exc
    stem = name.replace("/", "_")
    return [to_example(row, fields, name, i, stem) for i, row in enumerate(rows, 1)]
