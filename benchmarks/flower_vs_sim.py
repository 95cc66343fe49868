"""Round time: Flower's simulation engine vs the in-process simulator, on the same job.

Both drivers run the same configuration on the offline Natural Instructions tasks (55 seen
clients; Flower gets one virtual SuperNode per seen client and one Ray actor with both
cores, so clients train one after another in both). The global update of the two runs is
compared, and the download bytes of the per-node messages are set against a broadcast of the
top-rank factors to every sampled client (what Flower's FedAvg would send).

Jobs (evaluation off: both drivers evaluate with the same server-side code):

- ``tiny``: tiny-llama (seeded, 2 layers), 2 rounds x 4 clients x 2 local steps, the paper's
  four resource types scaled to the tiny model's widths;
- ``default``: the embedded default model (SmolLM2-135M-Instruct, offline) and ranks, reduced
  to 1 round x 2 clients x 2 local steps.

    python benchmarks/flower_vs_sim.py [--jobs tiny default] [--out DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported: no phoning home

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

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
            "rounds": 2,
            "clients_per_round": 4,
            "rank_types": {"8": [2, 2], "30": [4, 4], "30-200": [4, 16], "200": [16, 16]},
        },
    },
    "default": {
        "train": {"local_steps": 2},
        "federation": {"rounds": 1, "clients_per_round": 2},
    },
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


def job_config(name: str, out: Path) -> RunConfig:
    values: dict[str, Any] = {}
    for section in (JOBS[name], NO_EVAL, {"output": {"dir": str(out)}}):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", choices=sorted(JOBS), default=["tiny", "default"])
    parser.add_argument("--out", type=Path, default=None, help="keep the runs' outputs here")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="flower-vs-sim-"))
    results: dict[str, Any] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    for name in args.jobs:
        sim_cfg = job_config(name, root / name / "sim")
        sim = run_simulator(sim_cfg)
        seen = len(load_federated_dataset(sim_cfg.data).seen)
        flower = run_flower(job_config(name, root / name / "flower"), seen)
        rounds = list(zip(sim["round_s"], flower["round_s"], strict=True))
        results[name] = {
            "simulator": sim,
            "flower": flower,
            "ratio_per_round": [f / s for s, f in rounds],
            "max_abs_diff_global_update": max_difference(
                root / name / "sim", root / name / "flower"
            ),
        }
        print(f"\n== {name}: {sim_cfg.model.name}, {seen} nodes, {len(rounds)} round(s)")
        print("round  simulator_s  flower_s  ratio")
        for i, (s, f) in enumerate(rounds, 1):
            print(f"{i:>5}  {s:>11.2f}  {f:>8.2f}  {f / s:>5.2f}")
        print(f"end to end (load, rounds, outputs): simulator {sim['total_s']:.1f}s, ", end="")
        print(f"flower {flower['total_s']:.1f}s")
        for i, b in enumerate(flower["bytes_down"], 1):
            print(
                f"round {i} download: per-node messages {b['per_node']:,} B "
                f"({b['per_node_wire']:,} B serialized) vs one top-rank broadcast "
                f"{b['broadcast']:,} B ({b['broadcast'] / b['per_node']:.2f}x)"
            )
        print(f"max |dW_flower - dW_sim|: {results[name]['max_abs_diff_global_update']:.3g}")
    results["load_average"] = os.getloadavg()
    print(f"\nload average at the end: {results['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
