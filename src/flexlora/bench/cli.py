"""``flexlora bench [CONFIG]``: the paper's comparison on your model and data, in one command.

Importing this module stays cheap: torch and the simulator are imported when the command runs.
"""

from __future__ import annotations

import argparse

from flexlora.bench.presets import (
    ALL_DISTRIBUTIONS,
    ALL_STRATEGIES,
    EXTRA_STRATEGIES,
    PRESETS,
    get_preset,
)
from flexlora.errors import UsageError

__all__ = ["add_bench_command", "parse_list", "parse_seeds"]

DESCRIPTION = (
    "Run every strategy under every client-resource distribution for several seeds (each a "
    "simulated federated run), then write DIR/results.csv, DIR/summary.md (final zero-shot "
    "Rouge-L, mean ± 95 % CI over seeds, and the paired gain over fedit-min) and plots. "
    "Settings: the defaults, then the preset, then CONFIG.toml, then --set. Seed s sets "
    "federation.seed (sampling, rank draw, initialisation), so every strategy of a seed sees "
    "the same clients, ranks and data; the data split (the unseen tasks) is the same in every "
    "seed unless --vary-data. Finished runs are skipped when the command is repeated."
)


def parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise UsageError(f"--{what} needs at least one name")
    return items


def parse_seeds(text: str) -> list[int]:
    """``3`` -> seeds 0, 1, 2; ``4,7`` (or ``7,``) -> exactly those seeds."""
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise UsageError(f"--seeds must be >= 1, got {n}")
            return list(range(n))
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--seeds expects N or a comma list of integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds lists no seed or one twice: {text!r}")
    return seeds


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` on the top-level subparsers."""
    p = sub.add_parser(
        "bench",
        help="compare strategies across resource distributions and seeds (tables, plots)",
        description=DESCRIPTION,
    )
    p.add_argument("config", nargs="?", default=None, help="TOML config file (RunConfig keys)")
    p.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        # argparse %-formats help strings: a description's "10 %" must reach it as "10 %%"
        help="; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()).replace("%", "%%"),
    )
    p.add_argument(
        "--strategies",
        default=None,
        help=(
            f"comma list of {','.join(ALL_STRATEGIES + EXTRA_STRATEGIES)} (default: the "
            f"preset's, else {','.join(ALL_STRATEGIES)})"
        ),
    )
    p.add_argument(
        "--distributions",
        default=None,
        help=f"comma list (default: the preset's, else {','.join(ALL_DISTRIBUTIONS)})",
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="N for seeds 0..N-1, or a comma list of seeds (default: the preset's, else 3)",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/bench-<preset>)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs in parallel worker processes, one torch thread each (default 1)",
    )
    p.add_argument(
        "--reference",
        default="fedit-min",
        help="strategy the gains are measured against (default fedit-min)",
    )
    p.add_argument(
        "--vary-data",
        action="store_true",
        help="seed s also sets data.seed: each seed splits the data and holds out other "
        "unseen tasks (default: the config's data.seed in every seed)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="dotted.key=value",
        help="override any config key for every run, e.g. --set train.lr=1e-3; repeat",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from flexlora.bench.runner import base_config, run_bench
    from flexlora.simulation.rundir import RunLock

    preset = get_preset(args.preset) if args.preset else None
    strategies = parse_list(args.strategies, "strategies") if args.strategies else None
    distributions = parse_list(args.distributions, "distributions") if args.distributions else None
    seeds = parse_seeds(args.seeds) if args.seeds else None
    out = args.out or f"runs/bench-{preset.name if preset else 'default'}"
    base = base_config(args.config, preset, args.set)
    with RunLock(out):  # one bench writes a bench folder at a time
        result = run_bench(
            strategies or (preset.strategies if preset else ALL_STRATEGIES),
            distributions or (preset.distributions if preset else ALL_DISTRIBUTIONS),
            seeds or list(range(preset.seeds if preset else 3)),
            out,
            base=base,
            jobs=args.jobs,
            reference=args.reference,
            vary_data=args.vary_data,
        )
    print(f"outputs in {result.out}: " + ", ".join(f.name for f in result.files))
    if result.failed:
        print(f"{len(result.failed)} run(s) failed; repeat the command to retry them")
        return 1
    return 0
