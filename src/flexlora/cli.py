"""The ``flexlora`` command line. Exit code 2 for usage and input errors, 1 for other failures."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from flexlora.errors import FlexLoRAError

log = logging.getLogger("flexlora")

EXIT_USAGE = 2


def _add_aggregate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "aggregate",
        help="aggregate PEFT adapter folders of any ranks into PEFT adapters at given ranks",
        description=(
            "Aggregate PEFT LoRA adapter folders (adapter_config.json + "
            "adapter_model.safetensors; ranks may differ) and write OUT/rank-R/ for each R. "
            "No base model and no network are needed."
        ),
    )
    p.add_argument("--strategy", default="flexlora", help="aggregation strategy (default flexlora)")
    p.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="DIR[:WEIGHT]",
        help="an adapter folder, optionally with a positive weight (default 1); repeat",
    )
    p.add_argument(
        "--rank",
        action="append",
        type=int,
        default=[],
        metavar="R",
        help="output rank; repeat for several",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="output lora_alpha (needed when the inputs' alphas differ)",
    )
    p.add_argument(
        "--split",
        choices=("B", "balanced"),
        default="B",
        help="singular values into B (default) or sqrt(S) into each factor",
    )
    p.add_argument(
        "--svd",
        choices=("auto", "factored", "dense", "randomized"),
        default="auto",
        help="flexlora's decomposition path (randomized: approximate, the top max(--rank) only)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="compute dtype of the server step",
    )

    def run(args: argparse.Namespace) -> int:
        from flexlora.aggregate_cmd import run_aggregate

        run_aggregate(
            args.client,
            args.rank,
            args.out,
            strategy=args.strategy,
            alpha=args.alpha,
            split=args.split,
            svd=args.svd,
            dtype=args.dtype,
        )
        return 0

    p.set_defaults(func=run)


def _run_overrides(args: argparse.Namespace) -> list[str]:
    """The named flags of ``run`` as dotted overrides (they win over the file, like --set)."""
    named = {
        "output.dir": args.out,
        "federation.strategy": args.strategy,
        "federation.distribution": args.distribution,
        "federation.rounds": args.rounds,
        "federation.clients_per_round": args.clients_per_round,
        "federation.seed": args.seed,
        "data.seed": args.seed,
    }
    out = [
        f"{k}={v}" if not isinstance(v, str) else f"{k}={v!r}"
        for k, v in named.items()
        if v is not None
    ]
    return [*args.set, *out]


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a federated fine-tuning job (no arguments: the offline embedded default)",
        description=(
            "Simulate federated LoRA fine-tuning in one process. Settings come from the "
            "defaults, then CONFIG.toml, then --set overrides and the named flags."
        ),
    )
    p.add_argument("config", nargs="?", default=None, help="TOML config file")
    p.add_argument("--out", default=None, help="output folder (output.dir)")
    p.add_argument(
        "--strategy",
        default=None,
        help="flexlora, fedit-min, fedit-max, fedit, hetlora, flora, ffa, fedex, fedsa",
    )
    p.add_argument(
        "--distribution",
        default=None,
        help="uniform, heavy-tail-light, heavy-tail-strong, normal, explicit",
    )
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--clients-per-round", type=int, default=None)
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of everything random: sampling, rank draw, init, data split",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="dotted.key=value",
        help="override any config key, e.g. --set train.lr=1e-4; repeat",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as TOML and exit"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run of another config in the output folder (its config.toml, "
        "metrics, checkpoint and adapters are removed); without it such a folder is refused, "
        "and a run of the same config is resumed",
    )

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from flexlora.config import load_config

        cfg = load_config(args.config, _run_overrides(args))
        if args.print_config:
            print(cfg.to_toml(), end="")
            return 0
        from flexlora.simulation.report import format_table
        from flexlora.simulation.rundir import RunLock, prepare_run_folder
        from flexlora.simulation.runner import FederatedRun

        folder = Path(cfg.output.dir)
        with RunLock(folder):  # held from the check to the end of the run
            resume = prepare_run_folder(folder, cfg, overwrite=args.overwrite)
            metrics = FederatedRun(cfg).run(resume=resume)
        print(format_table(metrics))
        print(f"outputs in {cfg.output.dir}")
        return 0

    p.set_defaults(func=run)


def _add_resume(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    p.add_argument("dir", help="the run's output folder (holds config.toml and checkpoint/)")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from flexlora.config import load_config
        from flexlora.simulation.runner import FederatedRun

        folder = Path(args.dir)
        cfg = load_config(folder / "config.toml", [f"output.dir={str(folder)!r}"])
        from flexlora.simulation.report import format_table

        metrics = FederatedRun(cfg).run(resume=True)
        print(format_table(metrics))
        print(f"outputs in {folder}")
        return 0

    p.set_defaults(func=run)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="redraw report.png from a run's metrics.jsonl")
    p.add_argument("dir", help="the run's output folder")

    def run(args: argparse.Namespace) -> int:
        from flexlora.simulation.report import write_report

        print(f"wrote {write_report(args.dir)}")
        return 0

    p.set_defaults(func=run)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="memory a run needs on each client and on the server, before loading anything",
        description=(
            "Estimate the memory of every rank type's client (base weights at the chosen dtype "
            "or quantization, adapter, gradients, optimizer, activations with and without "
            "gradient checkpointing) and of the server, from the model's config on the meta "
            "device: no weight is loaded or downloaded."
        ),
    )
    p.add_argument("config", nargs="?", default=None, help="TOML config file")
    p.add_argument(
        "--device-memory",
        default=None,
        metavar="SIZE",
        help="a device's memory (24GiB, 80GB): say which rank types fit",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="dotted.key=value",
        help="override any config key, as for run; repeat",
    )

    def run(args: argparse.Namespace) -> int:
        from flexlora.config import load_config
        from flexlora.plan import format_plan, parse_size

        cfg = load_config(args.config, args.set)
        size = parse_size(args.device_memory) if args.device_memory is not None else None
        print(format_plan(cfg, size))
        return 0

    p.set_defaults(func=run)


def _add_data(sub: argparse._SubParsersAction) -> None:
    from flexlora.data.cli import add_data_command  # the loader is imported when it runs

    add_data_command(sub)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from flexlora.bench.cli import add_bench_command  # the runner is imported when it runs

    add_bench_command(sub)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from flexlora.evaluation.cli import add_eval_command  # lm-eval is imported when it runs

    add_eval_command(sub)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_aggregate,
    _add_run,
    _add_resume,
    _add_report,
    _add_plan,
    _add_data,
    _add_bench,
    _add_eval,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexlora",
        description="Federated LoRA fine-tuning with heterogeneous client ranks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except FlexLoRAError as exc:
        print(f"flexlora {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"flexlora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
