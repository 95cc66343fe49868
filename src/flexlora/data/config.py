"""``DataConfig``: where the examples come from and how they are cut into clients."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flexlora.errors import UsageError

__all__ = ["PARTITIONERS", "SOURCES", "UNSEEN_MODES", "DataConfig"]

SOURCES = ("natural-instructions-v1-offline", "natural-instructions", "dolly", "jsonl", "hub")
PARTITIONERS = ("auto", "task", "dirichlet", "meta")
UNSEEN_MODES = ("auto", "official", "fraction")
#: sources whose examples belong to tasks (one client per task by default)
TASK_SOURCES = ("natural-instructions-v1-offline", "natural-instructions")


@dataclass
class DataConfig:
    """Data source, partitioning and splitting; every field has a default and help text."""

    source: str = field(
        default="natural-instructions-v1-offline",
        metadata={
            "help": "natural-instructions-v1-offline (61 NI tasks from the bigbench sdist, "
            "cached at first use) | natural-instructions (a local NI v2 checkout) | dolly "
            "(databricks-dolly-15k.jsonl) | jsonl (field names below) | hub (a datasets name)"
        },
    )
    path: str = field(
        default="",
        metadata={
            "help": "file or folder of the source; for the offline default: empty (the cache, "
            "filled from $FLEXLORA_BIGBENCH_SDIST or PyPI), a bigbench tar.gz, or a folder "
            "of subtask*/task.json"
        },
    )
    partitioner: str = field(
        default="auto",
        metadata={
            "help": "task (one client per task) | dirichlet (category skew, Dirichlet alpha) | "
            "meta (one client per category) | auto (task when examples have tasks, else "
            "dirichlet)"
        },
    )
    dirichlet_alpha: float = field(
        default=0.5,
        metadata={"help": "Dirichlet concentration; small = each client few categories"},
    )
    num_clients: int = field(
        default=100, metadata={"help": "number of clients of the dirichlet partitioner"}
    )
    clients_per_task: int = field(
        default=1,
        metadata={"help": "task partitioner: split each task's examples over this many clients"},
    )
    subsample_fraction: float = field(
        default=1.0,
        metadata={"help": "keep this fraction of each task's examples (seeded), in (0, 1]"},
    )
    max_examples_per_task: int = field(
        default=0, metadata={"help": "cap on each task's examples before splitting (0 = none)"}
    )
    max_train_per_client: int = field(
        default=0, metadata={"help": "cap on each client's training examples (0 = none)"}
    )
    max_test_per_client: int = field(
        default=0,
        metadata={"help": "cap on each client's eval and test examples, for cost (0 = none)"},
    )
    unseen: str = field(
        default="auto",
        metadata={
            "help": "held-out (zero-shot) clients: official (the NI v2 test_tasks.txt) | "
            "fraction (a seeded unseen_fraction of tasks / categories / clients) | auto "
            "(official for natural-instructions, else fraction)"
        },
    )
    unseen_fraction: float = field(
        default=0.1,
        metadata={"help": "share of tasks (or clients) held out when unseen is fraction"},
    )
    split_ratios: tuple[float, float, float] = field(
        default=(0.8, 0.1, 0.1),
        metadata={"help": "train, eval, test shares of each client's examples (sum 1)"},
    )
    template: str = field(
        default="alpaca",
        metadata={"help": "prompt template: alpaca | plain | an alpaca-lora style .json file"},
    )
    positive_examples: int = field(
        default=0,
        metadata={"help": "NI v2: append this many 'Positive Examples' to each definition"},
    )
    instruction_field: str = field(
        default="instruction", metadata={"help": "jsonl/hub: field of the instruction"}
    )
    input_field: str = field(
        default="input", metadata={"help": "jsonl/hub: field of the input ('' = none)"}
    )
    output_field: str = field(
        default="output", metadata={"help": "jsonl/hub: field of the target output"}
    )
    category_field: str = field(
        default="category", metadata={"help": "jsonl/hub: field of the category ('' = none)"}
    )
    task_field: str = field(
        default="", metadata={"help": "jsonl/hub: field of the task ('' = no tasks)"}
    )
    hub_split: str = field(default="train", metadata={"help": "hub: the split to read"})
    seed: int = field(
        default=0, metadata={"help": "seed of subsampling, splits, partitions, held-out set"}
    )

    def __post_init__(self) -> None:
        self.split_ratios = tuple(float(r) for r in self.split_ratios)  # type: ignore[assignment]
        _choice("source", self.source, SOURCES)
        _choice("partitioner", self.partitioner, PARTITIONERS)
        _choice("unseen", self.unseen, UNSEEN_MODES)
        if self.source in ("dolly", "jsonl", "hub") and not self.path:
            raise UsageError(f"source {self.source} needs a path")
        if not (math.isfinite(self.dirichlet_alpha) and self.dirichlet_alpha > 0):
            raise UsageError(f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        for name in ("num_clients", "clients_per_task"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_examples_per_task",
            "max_train_per_client",
            "max_test_per_client",
            "positive_examples",
        ):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0 (0 = no limit), got {getattr(self, name)}")
        if not 0 < self.subsample_fraction <= 1:
            raise UsageError(f"subsample_fraction must be in (0, 1], got {self.subsample_fraction}")
        if not 0 <= self.unseen_fraction < 1:
            raise UsageError(f"unseen_fraction must be in [0, 1), got {self.unseen_fraction}")
        if len(self.split_ratios) != 3 or any(
            not (math.isfinite(r) and r >= 0) for r in self.split_ratios
        ):
            raise UsageError(f"split_ratios must be three shares >= 0, got {self.split_ratios}")
        if self.split_ratios[0] <= 0 or not math.isclose(sum(self.split_ratios), 1.0):
            raise UsageError(
                f"split_ratios must sum to 1 with a positive train share, got {self.split_ratios}"
            )
        if self.unseen == "official" and self.source != "natural-instructions":
            raise UsageError("unseen=official needs source natural-instructions (its split files)")
        partitioner = self.resolved_partitioner()
        if self.unseen == "official" and partitioner != "task":
            raise UsageError("unseen=official holds out tasks: it needs the task partitioner")
        if self.clients_per_task > 1 and partitioner != "task":
            raise UsageError("clients_per_task applies to the task partitioner only")
        if partitioner == "task" and self.source in ("dolly",):
            raise UsageError("dolly has no tasks: use partitioner dirichlet or meta")
        if partitioner == "task" and self.source in ("jsonl", "hub") and not self.task_field:
            raise UsageError(f"source {self.source} without task_field has no tasks")

    def resolved_partitioner(self) -> str:
        """``auto`` -> ``task`` when examples belong to tasks, else ``dirichlet``."""
        if self.partitioner != "auto":
            return self.partitioner
        if self.source in TASK_SOURCES or (self.task_field and self.source in ("jsonl", "hub")):
            return "task"
        return "dirichlet"

    def resolved_unseen(self) -> str:
        """``auto`` -> ``official`` for NI v2, else ``fraction``."""
        if self.unseen != "auto":
            return self.unseen
        if self.source == "natural-instructions" and self.resolved_partitioner() == "task":
            return "official"
        return "fraction"


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
