"""What loading a dataset read, kept and dropped, and why (``flexlora data stats``).

:func:`~flexlora.data.loader.load_federated_dataset` fills a :class:`LoadAccount` when given
one: per task, the examples read and those the seeded subsample kept; per client, the split
sizes before and after the caps, and the training part an unseen client loses. Nothing is
dropped anywhere else: malformed or empty records are errors, and examples longer than
``train.cutoff_len`` are truncated when training, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "DROP_LABELS",
    "ClientCount",
    "DropReasons",
    "LoadAccount",
    "TaskCount",
    "format_account",
]


@dataclass
class TaskCount:
    """Examples of one task in the source, and those the subsample kept."""

    read: int = 0
    subsampled: int = 0


@dataclass
class ClientCount:
    """One client's split: kept counts and what each rule dropped."""

    task: str  # the task it comes from ("" for pooled partitioners)
    seen: bool
    train: int = 0
    eval: int = 0
    test: int = 0
    unseen_train: int = 0  # the train part of an unseen client (held out)
    train_cap: int = 0  # data.max_train_per_client
    test_cap: int = 0  # data.max_test_per_client (eval and test)

    @property
    def kept(self) -> int:
        return self.train + self.eval + self.test


#: each drop rule and the config keys that drive it
DROP_LABELS = {
    "subsample": "subsampling (data.subsample_fraction, data.max_examples_per_task)",
    "unseen_train": "training part of unseen clients (held out for zero-shot evaluation)",
    "train_cap": "training examples over data.max_train_per_client",
    "test_cap": "eval/test examples over data.max_test_per_client",
}


@dataclass(frozen=True)
class DropReasons:
    """Examples dropped, by rule (the labels say which config key drives each)."""

    subsample: int = 0
    unseen_train: int = 0
    train_cap: int = 0
    test_cap: int = 0

    @property
    def total(self) -> int:
        return self.subsample + self.unseen_train + self.train_cap + self.test_cap

    def items(self) -> list[tuple[str, int]]:
        return [(label, getattr(self, k)) for k, label in DROP_LABELS.items()]


@dataclass
class LoadAccount:
    """Filled while a dataset loads (see the module doc)."""

    source: str = ""
    tasks: dict[str, TaskCount] = field(default_factory=dict)
    clients: dict[str, ClientCount] = field(default_factory=dict)
    #: tasks of the source in neither official split file (never read)
    not_in_split: int = 0

    def read_task(self, task: str, read: int, kept: int) -> None:
        count = self.tasks.setdefault(task, TaskCount())
        count.read += read
        count.subsampled += read - kept

    @property
    def read(self) -> int:
        return sum(t.read for t in self.tasks.values())

    @property
    def kept(self) -> int:
        return sum(c.kept for c in self.clients.values())

    def drops(self, task: str | None = None) -> DropReasons:
        """Dropped examples over all tasks, or of one task (task partitioner)."""
        tasks = [t for name, t in self.tasks.items() if task is None or name == task]
        clients = [c for c in self.clients.values() if task is None or c.task == task]
        return DropReasons(
            subsample=sum(t.subsampled for t in tasks),
            unseen_train=sum(c.unseen_train for c in clients),
            train_cap=sum(c.train_cap for c in clients),
            test_cap=sum(c.test_cap for c in clients),
        )


def format_account(acc: LoadAccount, per_task: bool | None = None) -> str:
    """Read / kept / dropped-by-reason totals, and a per-task table (default: <= 12 tasks)."""
    drops = acc.drops()
    kept_splits = [sum(getattr(c, k) for c in acc.clients.values()) for k in ("train", "eval")]
    test = sum(c.test for c in acc.clients.values())
    lines = [
        f"read: {acc.read:,} examples from {len(acc.tasks):,} task(s) of {acc.source}",
        f"kept: {acc.kept:,} (train {kept_splits[0]:,}, eval {kept_splits[1]:,}, test {test:,})",
        f"dropped: {drops.total:,}",
    ]
    lines += [f"  {label}: {n:,}" for label, n in drops.items() if n]
    if acc.not_in_split:
        lines.append(f"  tasks in neither official split file (not read): {acc.not_in_split:,}")
    if acc.read != acc.kept + drops.total:  # cannot happen: every drop has a rule above
        lines.append(f"  unaccounted: {acc.read - acc.kept - drops.total:,}")
    by_task = any(c.task for c in acc.clients.values())
    if per_task is None:
        per_task = by_task and len(acc.tasks) <= 12
    if per_task and by_task:
        body = []
        for name, t in acc.tasks.items():
            clients = [c for c in acc.clients.values() if c.task == name]
            d = acc.drops(name)
            body.append(
                [
                    name,
                    "seen" if all(c.seen for c in clients) else "unseen",
                    f"{t.read:,}",
                    f"{sum(c.kept for c in clients):,}",
                    f"{d.subsample:,}",
                    f"{d.unseen_train:,}",
                    f"{d.train_cap + d.test_cap:,}",
                ]
            )
        header = ["task", "split", "read", "kept", "subsampled", "unseen train", "capped"]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines += ["", "per task:"]
        for row in [header, *body]:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [x.rjust(w) for x, w in zip(row[2:], widths[2:], strict=True)]
            lines.append("  " + "  ".join(cells).rstrip())
    elif by_task:
        lines.append(f"({len(acc.tasks):,} tasks: --per-task lists each)")
    return "\n".join(lines)
