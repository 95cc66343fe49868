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
        help="flexlora's decomposition path",
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


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_aggregate]


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
