"""The baselines held to what their papers say, through the Coordinator and the simulator.

Strategy-level rejection (one unusable reply drops that client only), FFA-LoRA's frozen A
kept in the server state across rounds without the largest rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flexlora.aggregation import get_aggregator
from flexlora.config import load_config
from flexlora.server import Coordinator
from flexlora.simulation.runner import FederatedRun
from flexlora.training.model import build_tiny_llama
from flexlora.types import ClientUpdate, LoRAFactors
from tests.sim_helpers import make_dataset, tiny_config

Q = "model.layers.0.self_attn.q_proj"
SHAPES = {Q: (6, 8)}


def coordinator(strategy: str, types: list[str], rank_types: dict[str, list[int]]) -> Coordinator:
    cfg = load_config(
        values={
            "lora": {"target_modules": ["q_proj"], "alpha": 8.0},
            "federation": {
                "strategy": strategy,
                "distribution": "explicit",
                "client_types": types,
                "rank_types": rank_types,
                "clients_per_round": len(types),
            },
        }
    )
    return Coordinator(cfg, SHAPES, {f"c{i}": t for i, t in enumerate(types)})


def trained(server: Coordinator, state, cid: str, seed: int, *, train_A: bool) -> ClientUpdate:
    """A reply as a client would train it: B moves, A moves only when ``train_A``."""
    g = torch.Generator().manual_seed(seed)
    start = server.start_factors(state, cid, 1)
    factors = {}
    for name, f in start.items():
        A = f.A + 0.1 * torch.randn(f.A.shape, generator=g) if train_A else f.A.clone()
        factors[name] = LoRAFactors(A, f.B + torch.randn(f.B.shape, generator=g), f.alpha)
    return ClientUpdate(cid, 10 + seed, factors)


def test_fedit_client_below_its_rank_is_dropped_by_name_and_the_others_aggregate() -> None:
    server = coordinator("fedit", ["4", "4", "4"], {"4": [4, 4]})
    state = server.initial_state()
    updates = [trained(server, state, c, i, train_A=True) for i, c in enumerate(["c0", "c1", "c2"])]
    low = updates[1].factors[Q]
    updates[1] = ClientUpdate("c1", 11, {Q: LoRAFactors(low.A[:2], low.B[:, :2], low.alpha)})
    new, row = server.aggregate(state, 1, ["c0", "c1", "c2"], updates)
    assert row["aggregated"] == ["c0", "c2"] and not row["kept_previous_state"]
    assert list(row["rejected"]) == ["c1"] and "[rank]" in row["rejected"]["c1"]
    # the others' FedAvg, weights renormalised over c0 and c2
    p = [10 / 22, 12 / 22]
    A = p[0] * updates[0].factors[Q].A + p[1] * updates[2].factors[Q].A
    B = p[0] * updates[0].factors[Q].B + p[1] * updates[2].factors[Q].B
    assert torch.allclose(new[Q].dense(), (2.0 * B.double() @ A.double()), atol=1e-5)


def test_ffa_rejects_only_the_client_that_moved_A() -> None:
    server = coordinator("ffa", ["2", "8", "4"], {"2": [2, 2], "4": [4, 4], "8": [8, 8]})
    state = server.initial_state()
    cids = ["c0", "c1", "c2"]
    updates = [trained(server, state, c, i, train_A=c == "c1") for i, c in enumerate(cids)]
    new, row = server.aggregate(state, 1, cids, updates)
    assert row["aggregated"] == ["c0", "c2"]
    assert list(row["rejected"]) == ["c1"] and "frozen_A" in row["rejected"]["c1"]
    assert torch.equal(new[Q].Vh, state[Q].Vh)  # the frozen A, still at rank 8


def test_ffa_keeps_the_largest_rank_A_through_a_round_without_that_rank() -> None:
    server = coordinator("ffa", ["2", "4", "8"], {"2": [2, 2], "4": [4, 4], "8": [8, 8]})
    state = server.initial_state()
    assert state[Q].rank == 8
    first = [trained(server, state, c, i, train_A=False) for i, c in enumerate(["c0", "c1"])]
    state1, row1 = server.aggregate(state, 1, ["c0", "c1"], first)
    assert row1["aggregated"] == ["c0", "c1"] and state1[Q].rank == 8
    assert torch.equal(state1[Q].Vh, state[Q].Vh)
    second = [trained(server, state1, c, i, train_A=False) for i, c in enumerate(["c2", "c0"])]
    _state2, row2 = server.aggregate(state1, 2, ["c2", "c0"], second)
    assert row2["aggregated"] == ["c2", "c0"] and not row2["rejected"]


def test_ffa_run_heavy_tail_light_aggregates_every_sampled_client(tmp_path: Path) -> None:
    cfg = tiny_config(
        str(tmp_path / "ffa"),
        train={"local_steps": 1},
        federation={
            "strategy": "ffa",
            "rounds": 8,
            "clients_per_round": 3,
            "distribution": "heavy-tail-light",
            "rank_types": {"8": [2, 2], "30": [4, 4], "30-200": [4, 8], "200": [8, 8]},
        },
        eval={"every": 0, "at_start": False, "unseen": False},
        output={"checkpoint": False, "save_adapters": False},
    )
    sim = FederatedRun(
        cfg, dataset=make_dataset(n_seen=20), model_and_tokenizer=build_tiny_llama(seed=0)
    )
    rows = sim.run()
    assert len(rows) == 8
    assert len(set(sim.client_type.values())) == 4
    for row in rows:
        assert row["aggregated"] == row["clients"] and not row["rejected"], row
    assert {t for r in rows for t in r["client_types"].values()} != {"8"}


def test_hetlora_weighs_each_client_by_its_whole_update_and_every_rank_gets_its_prefix() -> None:
    up = "model.layers.0.mlp.up_proj"
    g = torch.Generator().manual_seed(0)
    shapes = {Q: (5, 6), up: (7, 6)}
    ranks = [1, 4]
    updates = []
    for i, (r, big) in enumerate(zip(ranks, (Q, up), strict=True)):
        factors = {}
        for name, (m, n) in shapes.items():
            A = torch.randn(r, n, generator=g, dtype=torch.float64)
            B = torch.randn(m, r, generator=g, dtype=torch.float64) * (5.0 if name == big else 1)
            factors[name] = LoRAFactors(A, B, 8.0)
        updates.append(ClientUpdate(f"c{i}", 1, factors))
    norms = [
        sum(float(torch.linalg.norm(f.delta())) ** 2 for f in u.factors.values()) ** 0.5
        for u in updates
    ]
    q = [x / sum(norms) for x in norms]
    state = get_aggregator("hetlora", dtype=torch.float64).aggregate(updates)
    per_module = get_aggregator("hetlora", weighting="module", dtype=torch.float64)
    for name, (m, n) in shapes.items():
        B = torch.zeros(m, 4, dtype=torch.float64)
        A = torch.zeros(4, n, dtype=torch.float64)
        for qi, u in zip(q, updates, strict=True):
            f = u.factors[name]
            B[:, : f.rank] += qi * f.scaling * f.B
            A[: f.rank] += qi * f.A
        for r in (1, 2, 4):  # the received s_r·B·A is the rank-r prefix of B̄·Ā at every rank
            got = state[name].factors(r, 8.0)
            assert torch.allclose(got.delta(), B[:, :r] @ A[:r], atol=1e-12)
            assert got.scaling == 8.0 / r
        assert not torch.allclose(per_module.aggregate(updates)[name].dense(), B @ A)


def test_flora_download_counts_the_cumulative_state_a_new_client_receives() -> None:
    server = coordinator("flora", ["2", "4"], {"2": [2, 2], "4": [4, 4]})
    state = server.initial_state()
    fresh = server.start_factors(state, "c0", 1)
    assert server.download_bytes(fresh, state, 1) == sum(f.num_bytes() for f in fresh.values())
    updates = [trained(server, state, c, i, train_A=True) for i, c in enumerate(["c0", "c1"])]
    state1, _ = server.aggregate(state, 1, ["c0", "c1"], updates)
    updates = [trained(server, state, c, i + 5, train_A=True) for i, c in enumerate(["c0", "c1"])]
    state2, _ = server.aggregate(state1, 2, ["c0", "c1"], updates)
    start = server.start_factors(state2, "c1", 3)
    own = sum(f.num_bytes() for f in start.values())
    assert server.download_bytes(start, state2, 3) == own + state2.num_bytes()
    assert state2[Q].rank == 6  # two rounds of ranks 2 + 4 = 12 stacked, SVD-capped at min(m, n)
