"""The same job in the in-process simulator and in Flower's simulation engine (Ray)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flexlora.flower.client_app import make_client_app
from flexlora.flower.server_app import make_server_app
from flexlora.flower.settings import to_run_config
from flexlora.simulation.runner import FederatedRun
from tests.flower_helpers import (
    assert_rows_match,
    assert_same_outputs,
    read_rows,
    strip_timings,
    toy_config,
    write_tasks,
)


@pytest.mark.slow
def test_flower_simulation_equals_the_in_process_simulator(tmp_path: Path) -> None:
    from flwr.simulation import run_simulation

    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # Ray on 127.0.0.1 only
    tasks = write_tasks(tmp_path / "tasks.jsonl")  # 8 tasks: 6 seen clients, 2 unseen
    FederatedRun(toy_config(tmp_path / "sim", tasks)).run()

    values = to_run_config(toy_config(tmp_path / "flwr", tasks))
    run_simulation(
        server_app=make_server_app(values),
        client_app=make_client_app(values),
        num_supernodes=6,  # one per seen client: partition-id i is the i-th one
        backend_config={"client_resources": {"num_cpus": 2}, "init_args": {"num_cpus": 2}},
    )
    sim_rows = strip_timings(read_rows(tmp_path / "sim"))
    flwr_rows = strip_timings(read_rows(tmp_path / "flwr"))
    assert [r["round"] for r in flwr_rows] == [0, 1, 2]
    assert len({t for r in flwr_rows[1:] for t in r["client_types"].values()}) > 1  # mixed
    assert all(r["bytes_down"] > 0 and r["bytes_up"] > 0 for r in flwr_rows[1:])
    assert_rows_match(flwr_rows, sim_rows)
    assert_same_outputs(tmp_path / "flwr", tmp_path / "sim")
