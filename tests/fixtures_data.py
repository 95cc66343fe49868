"""Writers of small synthetic data files in the real formats (NI v2, NI v1 / bigbench, the
bigbench sdist tarball, Dolly JSONL). The contents are made up; only the layouts are real."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

DOLLY_CATEGORIES = ("open_qa", "classification", "closed_qa", "brainstorming", "summarization")


def ni_v2_task(name: str, n: int, category: str = "Question Answering") -> dict:
    """A task file's content as in the NI v2 repository (only the fields we read, plus some)."""
    return {
        "Contributors": ["synthetic"],
        "Source": ["synthetic"],
        "Categories": [category],
        "Definition": [f"Definition of {name}: answer with the word after 'say'."],
        "Positive Examples": [
            {"input": "say alpha", "output": "alpha", "explanation": "copied"},
            {"input": "say beta", "output": "beta", "explanation": "copied"},
        ],
        "Negative Examples": [],
        "Instances": [
            {"id": f"{name}-{i}", "input": f"say w{i}", "output": [f"w{i}", f"W{i}"]}
            for i in range(n)
        ],
    }


def write_ni_v2(
    root: Path,
    tasks: Mapping[str, int],
    *,
    train: Sequence[str] | None = None,
    test: Sequence[str] = (),
    categories: Mapping[str, str] | None = None,
) -> Path:
    """``root/tasks/<name>.json`` and ``root/splits/default/{train,test}_tasks.txt``."""
    (root / "tasks").mkdir(parents=True)
    for name, n in tasks.items():
        cat = (categories or {}).get(name, "Question Answering")
        (root / "tasks" / f"{name}.json").write_text(json.dumps(ni_v2_task(name, n, cat)))
    (root / "tasks" / "README.md").write_text("not a task\n")
    splits = root / "splits" / "default"
    splits.mkdir(parents=True)
    train = [t for t in tasks if t not in test] if train is None else train
    (splits / "train_tasks.txt").write_text("".join(f"{t}\n" for t in train))
    (splits / "test_tasks.txt").write_text("".join(f"{t}\n" for t in test))
    return root


def bigbench_task(name: str, n: int, list_targets: bool = True) -> dict:
    """A natural_instructions subtask's task.json as in the bigbench sdist."""
    return {
        "name": name,
        "keywords": ["synthetic"],
        "metrics": ["rouge", "bleu"],
        "preferred_score": "rougeLsum",
        "description": f"Definition: {name}.",
        "canary": "SYNTHETIC FIXTURE",
        "task_prefix": f"Definition: copy the word for {name}. Prompt: copy it. ",
        "examples": [
            {"input": f"word {i}", "target": [f"t{i}"] if list_targets else f"t{i}"}
            for i in range(n)
        ],
    }


def write_ni_v1(folder: Path, tasks: Mapping[str, int]) -> Path:
    """``folder/subtaskNNN_x/task.json`` (bigbench's natural_instructions layout)."""
    for k, (name, n) in enumerate(tasks.items()):
        (folder / name).mkdir(parents=True)
        data = bigbench_task(name, n, list_targets=k % 2 == 0)
        (folder / name / "task.json").write_text(json.dumps(data))
    return folder


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_bigbench_sdist(path: Path, tasks: Mapping[str, int]) -> Path:
    """A small ``bigbench-1.0.0.tar.gz`` laid out like the PyPI sdist, with distractors."""
    base = "bigbench-1.0.0/bigbench/benchmark_tasks"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "bigbench-1.0.0/PKG-INFO", b"Name: bigbench\nVersion: 1.0.0\n")
        _add(tar, f"{base}/natural_instructions/task.json", b'{"name": "natural_instructions"}')
        _add(tar, f"{base}/natural_instructions/README.md", b"# NI\n")
        _add(tar, f"{base}/arithmetic/task.json", b'{"name": "arithmetic"}')
        _add(tar, f"{base}/other/subtask001_not_ni/task.json", b"{}")
        for name, n in tasks.items():
            body = json.dumps(bigbench_task(name, n)).encode()
            _add(tar, f"{base}/natural_instructions/{name}/task.json", body)
    return path


def write_dolly(path: Path, per_category: Mapping[str, int]) -> Path:
    """``databricks-dolly-15k.jsonl``-style lines (every other one without context)."""
    with open(path, "w", encoding="utf-8") as f:
        k = 0
        for cat, n in per_category.items():
            for i in range(n):
                record = {
                    "instruction": f"{cat} question {i}?",
                    "context": f"context {i}" if k % 2 else "",
                    "response": f"{cat} answer {i}",
                    "category": cat,
                }
                f.write(json.dumps(record) + "\n")
                k += 1
    return path
