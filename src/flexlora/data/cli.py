"""``flexlora data stats [PATH]``: load a federated dataset and print its summary.

The options are generated from :class:`DataConfig`'s fields (``--dirichlet-alpha``, ...), so
the command and the config never disagree. Importing this module stays cheap: the loader is
imported when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from flexlora.data.config import PARTITIONERS, SOURCES, UNSEEN_MODES, DataConfig
from flexlora.errors import UsageError

__all__ = ["add_data_command", "guess_source"]

log = logging.getLogger(__name__)


def add_data_command(sub: argparse._SubParsersAction) -> None:
    """Register ``data`` (with its ``stats`` subcommand) on the top-level subparsers."""
    p = sub.add_parser("data", help="inspect federated datasets", description=__doc__)
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    stats = data_sub.add_parser(
        "stats",
        help="print clients, examples per client, categories, seen/unseen counts",
        description=(
            "Load a federated dataset and print its summary. Without PATH (or with --source "
            "natural-instructions-v1-offline) it uses the offline default, extracting it into "
            "the cache at first use. With PATH and no --source the kind is guessed."
        ),
    )
    stats.add_argument("path", nargs="?", default="", metavar="PATH", help="data file or folder")
    stats.add_argument(
        "--per-task",
        action="store_true",
        default=None,
        help="list read / kept / dropped for every task (default: when there are <= 12)",
    )
    _add_config_options(stats)
    stats.set_defaults(func=_run_stats)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    choices = {"source": SOURCES, "partitioner": PARTITIONERS, "unseen": UNSEEN_MODES}
    for f in dataclasses.fields(DataConfig):
        if f.name == "path":
            continue
        default = f.default
        if f.name == "split_ratios":
            kind, metavar, shown = _ratios, "TRAIN,EVAL,TEST", ",".join(f"{x:g}" for x in default)
        else:
            kind, metavar, shown = type(default), _METAVARS[type(default)], default
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=None,
            choices=choices.get(f.name),
            metavar=metavar if f.name not in choices else "{" + ",".join(choices[f.name]) + "}",
            help=f"{f.metadata['help']} (default: {shown!s})",
        )


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected three numbers like 0.8,0.1,0.1: {text}"
        ) from None


def guess_source(path: str) -> str:
    """The source kind of ``path`` from its layout (used when ``--source`` is not given)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "tasks").is_dir() or p.name == "tasks":
            return "natural-instructions"
        if any(p.glob("subtask*/task.json")) or any(p.glob("**/natural_instructions")):
            return "natural-instructions-v1-offline"
    elif p.is_file():
        if p.name.endswith((".tar.gz", ".tgz")):
            return "natural-instructions-v1-offline"
        if p.suffix == ".jsonl":
            return "dolly" if _looks_like_dolly(p) else "jsonl"
    raise UsageError(f"cannot tell what kind of data {path} is; pass --source")


def _looks_like_dolly(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(record, dict) and {"context", "response"} <= record.keys()
    return False


def _run_stats(args: argparse.Namespace) -> int:
    from flexlora.data.accounting import LoadAccount, format_account
    from flexlora.data.loader import load_federated_dataset
    from flexlora.data.stats import dataset_stats, format_stats

    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(DataConfig)
        if f.name != "path" and getattr(args, f.name, None) is not None
    }
    if args.path and "source" not in overrides:
        overrides["source"] = guess_source(args.path)
        log.info("reading %s as --source %s", args.path, overrides["source"])
    cfg = DataConfig(path=args.path, **overrides)
    account = LoadAccount()
    data = load_federated_dataset(cfg, account)
    print(format_account(account, args.per_task))
    print()
    print(format_stats(dataset_stats(data)))
    return 0
