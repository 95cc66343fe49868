"""Round time: Flower's simulation engine vs the in-process simulator, on the same job.

Both drivers run the same configuration on the offline Natural Instructions tasks (55 seen
clients; Flower gets one virtual SuperNode per seen client and one Ray actor with both
cores, so clients train one after another in both). The global update of the two runs is
compared, and the download bytes of the per-node messages are set against a broadcast of the
top-rank factors to every sampled client (what Flower's FedAvg would send).

Jobs (evaluation off: both drivers evaluate with the same server-side code):

- ``tiny``: tiny-llama (seeded, 2 layers), 3 rounds x 4 clients x 2 local steps, the paper's
  four resource types scaled to the tiny model's widths;
- ``default``: the embedded default model (SmolLM2-135M-Instruct, offline) and ranks, reduced
  to 1 round x 2 clients x 2 local steps;
- ``default-full``: the embedded default unreduced (3 rounds x 4 clients x 8 local steps).

Each driver's "overhead" is its round time minus the clients' own training and the
aggregation (messages, serialization, scheduling): the machine's load disturbs it far less.

    python benchmarks/flower_vs_sim.py [--jobs tiny default] [--repeat N] [--threads T]
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported: no phoning home

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from flexlora.config import RunConfig, load_config
from flexlora.data import load_federated_dataset
from flexlora.flower.client_app import make_client_app
from flexlora.flower.server_app import FlowerRun
from flexlora.flower.settings import load_run_config, to_run_config
from flexlora.simulation.checkpoint import load_checkpoint
from flexlora.simulation.runner import FederatedRun
from flexlora.types import GlobalUpdate

JOBS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"name": "tiny-llama"},
        "train": {"local_steps": 2},
        "federation": {
            "rounds": 3,
            "clients_per_round": 4,
            "rank_types": {"8": [2, 2], "30": [4, 4], "30-200": [4, 16], "200": [16, 16]},
        },
    },
    "default": {
        "train": {"local_steps": 2},
        "federation": {"rounds": 1, "clients_per_round": 2},
    },
    # the embedded default as `make run` runs it: 3 rounds x 4 clients x 8 local steps
    "default-full": {},
}
NO_EVAL = {"eval": {"at_start": False, "unseen": False}, "output": {"progress": False}}


#: what the timed drivers record during one run (reset before each)
MEASURED: dict[str, list[Any]] = {"round_s": [], "bytes_down": []}


class RoundTimer:
    """Records the wall time of every ``run_round`` (train + aggregate, no evaluation)."""

    def run_round(self, state: GlobalUpdate, round_: int, bar: bool) -> Any:
        t0 = time.perf_counter()
        out = super().run_round(state, round_, bar)  # type: ignore[misc]
        MEASURED["round_s"].append(time.perf_counter() - t0)
        self.on_round(out[1])
        return out

    def on_round(self, row: dict[str, Any]) -> None:
        pass


class TimedSimulator(RoundTimer, FederatedRun):
    pass


class TimedFlower(RoundTimer, FlowerRun):
    def on_round(self, row: dict[str, Any]) -> None:
        """Download bytes: per-node messages (accounted, serialized) vs a broadcast."""
        plan, server = self.last_plan, self.server
        assert plan is not None
        top = server.max_ranks()
        per_client = sum(4 * top[k] * (m + n) for k, (m, n) in server.shapes.items())
        MEASURED["bytes_down"].append(
            {
                "per_node": row["bytes_down"],
                "per_node_wire": sum(plan.wire_bytes_down.values()),
                "broadcast": per_client * len(plan.clients),
            }
        )


def _reset() -> None:
    for values in MEASURED.values():
        values.clear()


def job_config(name: str, out: Path, threads: int = 0) -> RunConfig:
    values: dict[str, Any] = {}
    extra = {"output": {"dir": str(out)}, "model": {"threads": threads}}
    for section in (JOBS[name], NO_EVAL, extra):
        for key, table in section.items():
            values.setdefault(key, {}).update(table)
    return load_config(values=values)


def run_simulator(cfg: RunConfig) -> dict[str, Any]:
    _reset()
    t0 = time.perf_counter()
    TimedSimulator(cfg).run()
    return {"total_s": time.perf_counter() - t0, "round_s": list(MEASURED["round_s"])}


def run_flower(cfg: RunConfig, num_nodes: int) -> dict[str, Any]:
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    values = to_run_config(cfg)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg, options = load_run_config(context.run_config, values)
        TimedFlower(run_cfg, grid, options).run()

    _reset()
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=make_client_app(values),
        num_supernodes=num_nodes,
        backend_config={"client_resources": {"num_cpus": 2}, "init_args": {"num_cpus": 2}},
    )
    return {
        "total_s": time.perf_counter() - t0,
        "round_s": list(MEASURED["round_s"]),
        "bytes_down": list(MEASURED["bytes_down"]),
    }


def max_difference(a: Path, b: Path) -> float:
    x = load_checkpoint(a / "checkpoint").global_update
    y = load_checkpoint(b / "checkpoint").global_update
    assert x is not None and y is not None
    return max(float((x[m].dense() - y[m].dense()).abs().max()) for m in x.names())


def overheads(out: Path, round_s: list[float]) -> list[float]:
    """Round time minus the clients' own training and the aggregation: the driver's cost
    (messages, serialization, scheduling), which the machine's load disturbs far less."""
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [r for r in map(json.loads, lines) if r["round"] >= 1]
    return [
        t - r["seconds_train"] - r["seconds_aggregate"] for t, r in zip(round_s, rows, strict=True)
    ]


def measure(name: str, root: Path, repeat: int, threads: int) -> dict[str, Any]:
    """``repeat`` runs of each driver, alternating which goes first."""
    runs: dict[str, list[dict[str, Any]]] = {"simulator": [], "flower": []}
    seen = len(load_federated_dataset(job_config(name, root).data).seen)
    for k in range(repeat):
        order = ("simulator", "flower") if k % 2 == 0 else ("flower", "simulator")
        for driver in order:
            out = root / name / f"{driver}-{k}"
            cfg = job_config(name, out, threads)
            run = run_simulator(cfg) if driver == "simulator" else run_flower(cfg, seen)
            run["overhead_s"] = overheads(out, run["round_s"])
            run["load_average"] = os.getloadavg()[0]
            runs[driver].append(run)
    diff = max_difference(root / name / "simulator-0", root / name / "flower-0")
    return {"model": job_config(name, root).model.name, "nodes": seen, **runs, "max_diff": diff}


def _median(values: list[float]) -> float:
    return statistics.median(values)


def report(name: str, result: dict[str, Any]) -> None:
    sim, flower = result["simulator"], result["flower"]
    n_rounds = len(sim[0]["round_s"])
    head = f"{result['model']}, {result['nodes']} nodes, {n_rounds} round(s)"
    print(f"\n== {name}: {head}, ", end="")
    print(f"median of {len(sim)} run(s) each")
    print("round  simulator_s  flower_s  ratio  | driver overhead: simulator_s  flower_s")
    for i in range(n_rounds):
        s = _median([r["round_s"][i] for r in sim])
        f = _median([r["round_s"][i] for r in flower])
        so = _median([r["overhead_s"][i] for r in sim])
        fo = _median([r["overhead_s"][i] for r in flower])
        print(f"{i + 1:>5}  {s:>11.2f}  {f:>8.2f}  {f / s:>5.2f}  | {so:>28.2f}  {fo:>8.2f}")
    s_total = _median([r["total_s"] for r in sim])
    f_total = _median([r["total_s"] for r in flower])
    print(f"end to end (loading, rounds, outputs): simulator {s_total:.1f}s, flower {f_total:.1f}s")
    for i, b in enumerate(flower[0]["bytes_down"], 1):
        print(
            f"round {i} download: per-node messages {b['per_node']:,} B "
            f"({b['per_node_wire']:,} B serialized) vs one top-rank broadcast "
            f"{b['broadcast']:,} B ({b['broadcast'] / b['per_node']:.2f}x)"
        )
    loads = [r["load_average"] for r in sim + flower]
    print(f"max |dW_flower - dW_sim|: {result['max_diff']:.3g}; ", end="")
    print(f"1-min load average after the runs: {min(loads):.1f}-{max(loads):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=["tiny", "default"])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each driver (median)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in both drivers (model.threads; 0: torch's default). With 2 "
        "threads on a 2-core machine that other processes share, every parallel op waits for "
        "a descheduled thread and timings swing by orders of magnitude",
    )
    parser.add_argument("--out", type=Path, default=None, help="keep the runs' outputs here")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="flower-vs-sim-"))
    results: dict[str, Any] = {"cpus": os.cpu_count(), "threads": args.threads}
    for name in args.jobs:
        results[name] = measure(name, root, args.repeat, args.threads)
        report(name, results[name])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
