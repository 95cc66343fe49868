"""The baselines held to what their papers say, through the Coordinator and the simulator.

Strategy-level rejection (one unusable reply drops that client only), FFA-LoRA's frozen A
kept in the server state across rounds without the largest rank.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from flexlora.aggregation import get_aggregator
from flexlora.config import load_config
from flexlora.errors import InvalidUpdateError
from flexlora.server import Coordinator
from flexlora.simulation.runner import FederatedRun
from flexlora.training.model import build_tiny_llama, target_linear_modules
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors, ModuleDelta
from tests.sim_helpers import make_dataset, tiny_config
from tests.test_aggregation import (
    UP,
    client_ranks,
    dense,
    make_round,
    probabilities,
    product,
    ref_padded_average,
    ref_sum,
    rel_err,
    rounds,
)

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


# --- FedEx-LoRA -----------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    first=rounds(),
    seed=st.integers(0, 2**31 - 1),
    ranks=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 8)), min_size=1, max_size=4),
)
def test_fedex_global_model_is_w0_plus_the_average_update_exactly(first, seed, ranks) -> None:
    """Σ p_i s_i B_i A_i (dense, float64, one client at a time) = frozen + s·B̄·Ā, ≤ 1e-5."""
    agg = get_aggregator("fedex", dtype=torch.float64)
    state = agg.aggregate(first.updates, first.weights)
    p = probabilities(first.updates, first.weights)
    for module in (Q, UP):
        ref = ref_sum(first.updates, module, p)
        assert rel_err(state.delta(module).numpy(), ref) <= 1e-5
        B, A = ref_padded_average(first.updates, module, p)  # the adapter is FedAvg, padded
        assert np.allclose(state[module].U.numpy(), B) and np.allclose(state[module].Vh.numpy(), A)
        for r in client_ranks(first.updates, module):  # each rank gets its exact prefix
            got = state[module].factors(r, 8.0)
            assert rel_err(dense(got), product(B, A, r)) <= 1e-9
    # a second round on the same modules: the residual of round 1 stays, the new one adds
    shapes = {m: first.updates[0].factors[m].shape for m in (Q, UP)}
    second = make_round(
        seed,
        shapes,
        [{Q: a, UP: b} for a, b in ranks],
        [1 + i for i in range(len(ranks))],
        [8.0] * len(ranks),
    )
    nxt = agg.aggregate(second, previous=state)
    p2 = probabilities(second, None)
    for module in (Q, UP):
        want = state.frozen[module].dense().numpy() + ref_sum(second, module, p2)
        assert rel_err(nxt.delta(module).numpy(), want) <= 1e-5


def test_fedex_two_rounds_by_hand_and_the_state_round_trips() -> None:
    updates = make_round(3, {Q: (5, 7)}, [{Q: 1}, {Q: 3}], [1, 3], [8.0, 8.0])
    agg = get_aggregator("fedex", dtype=torch.float64)
    state = agg.aggregate(updates)
    want = 0.25 * updates[0].factors[Q].delta() + 0.75 * updates[1].factors[Q].delta()
    assert torch.allclose(state.delta(Q), want, atol=1e-12)
    assert state.frozen[Q].rank <= 5  # exact thin SVD of a rank ≤ 1 + 3 + 3 residual
    residual = want - state[Q].dense()
    assert torch.allclose(state.frozen[Q].dense(), residual, atol=1e-12)
    tensors, meta = state.to_tensors()
    back = GlobalUpdate.from_tensors(tensors, meta)
    assert torch.equal(back.frozen[Q].U, state.frozen[Q].U) and back.names() == [Q]
    assert torch.allclose(back.delta(Q), want, atol=1e-12)
    assert back.frozen_part() is not None and back.frozen_part().names() == [Q]


def test_fedex_runs_with_mixed_ranks_and_exports_its_residual(tmp_path: Path) -> None:
    """(Resume: tests/test_checkpoint_resume.py; Flower: tests/test_flower.py.)"""
    cfg = tiny_config(
        str(tmp_path / "fedex"), federation={"strategy": "fedex"}, eval={"at_start": False}
    )
    sim = FederatedRun(cfg, dataset=make_dataset(), model_and_tokenizer=build_tiny_llama(seed=0))
    rows = sim.run()
    assert all(r["aggregated"] == r["clients"] for r in rows)
    assert len({t for r in rows for t in r["client_types"].values()}) > 1
    assert rows[1]["bytes_down"] > rows[0]["bytes_down"]  # round 2 carries the residual
    for r in rows:  # rank-energy diagnostics in every round's row (and in report.png)
        assert set(r["energy_kept"]) == {"2", "4", "2-8", "8"}
        assert 0 <= r["energy_kept"]["2"] <= r["energy_kept"]["8"] <= 1 + 1e-6
        assert set(r["update_survival"]) == set(r["client_types"].values())
        assert set(r["update_survival_per_client"]) == set(r["aggregated"])
        assert r["effective_rank"] >= 1
    assert (tmp_path / "fedex" / "report.png").stat().st_size > 1000
    frozen = load_file(tmp_path / "fedex" / "adapters" / "frozen_delta.safetensors")
    assert {k.split(".")[-1] for k in frozen} == {"U", "S", "Vh"}


def test_a_separate_float32_delta_gives_the_merged_model_and_leaves_the_weights() -> None:
    from flexlora.training.adapters import AdapterHost

    model, _ = build_tiny_llama(seed=0)
    shapes = target_linear_modules(model, ["q_proj", "v_proj"])
    host = AdapterHost(model, ["q_proj", "v_proj"], {"4": dict.fromkeys(shapes, 4)}, 8.0)
    updates = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        factors = {
            name: LoRAFactors(torch.randn(3, n, generator=g), torch.randn(m, 3, generator=g), 8.0)
            for name, (m, n) in shapes.items()
        }
        updates.append(ClientUpdate(f"c{i}", 1 + i, factors))
    state = get_aggregator("fedex").aggregate(updates)
    ids = torch.tensor([[1, 5, 9, 2]])
    before = {n: x.get_base_layer().weight.clone() for n, x in host.layers.items()}
    reference, _ = build_tiny_llama(seed=0)  # the merged model: ΔW written into its weights
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name in state.names():
            modules[name].weight += state.delta(name, torch.float32)  # (m, n)
        merged = reference(input_ids=ids).logits
    with host.adapters_disabled():
        host.set_base_delta(state)
        for name, layer in host.layers.items():
            assert torch.equal(layer.get_base_layer().weight, before[name])  # untouched
        side = model(input_ids=ids).logits
        host.set_base_delta(None)
        bare = model(input_ids=ids).logits
    torch.testing.assert_close(side, merged, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(bare, merged, atol=1e-4)


# --- FedSA-LoRA -----------------------------------------------------------------------------


def ref_fedsa(updates, module, p, previous_A=None):
    """Ā row k: Σ_{i: r_i > k} p_i A_i[k] / Σ_{i: r_i > k} p_i (the previous row if no i)."""
    fs = [u.factors[module] for u in updates]
    n = fs[0].shape[1]
    rank = max([f.rank for f in fs] + ([previous_A.shape[0]] if previous_A is not None else []))
    A = np.zeros((rank, n))
    for k in range(rank):
        have = [(pi, f) for pi, f in zip(p, fs, strict=True) if f.rank > k]
        if have:
            A[k] = sum(pi * f.A[k].double().numpy() for pi, f in have) / sum(pi for pi, _ in have)
        else:
            A[k] = previous_A[k]
    B, _ = ref_padded_average(updates, module, p)
    return B, A


@settings(max_examples=25, deadline=None)
@given(case=rounds(), seed=st.integers(0, 2**31 - 1), extra=st.integers(0, 3))
def test_fedsa_matches_dense_reference(case, seed, extra) -> None:
    agg = get_aggregator("fedsa", dtype=torch.float64)
    state = agg.aggregate(case.updates, case.weights)
    p = probabilities(case.updates, case.weights)
    for module in (Q, UP):
        B, A = ref_fedsa(case.updates, module, p)
        assert np.allclose(state[module].Vh.numpy(), A, atol=1e-12)
        assert np.allclose(state[module].U.numpy(), B, atol=1e-12)
        for r in client_ranks(case.updates, module):  # the rank-r A a client starts from
            assert np.allclose(state[module].factors(r, 8.0).A.numpy(), A[:r], atol=1e-12)
    # a later round with smaller ranks keeps the rows nobody trained
    shapes = {m: case.updates[0].factors[m].shape for m in (Q, UP)}
    small = [{m: 1 for m in (Q, UP)}] * (1 + extra)
    second = make_round(seed, shapes, small, [1] * len(small), [8.0] * len(small))
    nxt = agg.aggregate(second, previous=state)
    for module in (Q, UP):
        _, A = ref_fedsa(second, module, probabilities(second, None), state[module].Vh.numpy())
        assert np.allclose(nxt[module].Vh.numpy(), A, atol=1e-12)


def test_local_store_keeps_two_versions_reads_the_one_before_a_round(tmp_path: Path) -> None:
    from flexlora.client_state import LocalStore

    store = LocalStore(tmp_path)
    odd = "../weird id/é"
    assert store.load(odd, 5) is None
    for round_ in (2, 4, 7):
        store.save(odd, round_, {"m": torch.full((3, 2), float(round_))})
    assert store.versions(odd) == [4, 7]  # 2 is gone; 4 serves a re-run of round 7
    assert store.client_dir(odd).parent == tmp_path  # the id cannot escape the folder
    assert torch.equal(store.load(odd, 7)["m"], torch.full((3, 2), 4.0))
    assert torch.equal(store.load(odd, 8)["m"], torch.full((3, 2), 7.0))
    assert store.load("other", 8) is None
    assert not list(store.client_dir(odd).glob(".tmp-*"))


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 9),
    r=st.integers(1, 6),
    k=st.integers(1, 8),
    alpha=st.sampled_from([4.0, 16.0, 3.5]),
    rslora=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_seen_client_is_scored_with_its_own_B_and_the_shared_A(
    m: int, n: int, r: int, k: int, alpha: float, rslora: bool, seed: int
) -> None:
    """FedSA-LoRA's seen-client model, from the global evaluation factors at rank k (Ā[:k],
    B̄) and the client's own rank-r B: s_r·B·Ā[:r], or its first min(r, k) components when
    the evaluation rank is lower, built the slow way; no B: the global model."""
    from flexlora.client_state import own_eval_factors

    g = torch.Generator().manual_seed(seed)
    A_bar = torch.randn(8, n, generator=g, dtype=torch.float64)  # the state's Ā, rank 8 >= r
    glob = {"w": LoRAFactors(A_bar[:k], torch.randn(m, k, generator=g).double(), alpha, rslora)}
    own = {"w": torch.randn(m, r, generator=g, dtype=torch.float64)}
    got = own_eval_factors("c", glob, own)["w"]
    kk = min(r, k)
    s_r = alpha / (r**0.5 if rslora else r)
    want = sum(s_r * np.outer(own["w"][:, j].numpy(), A_bar[j].numpy()) for j in range(kk))
    assert got.rank == kk and np.allclose(got.delta().numpy(), want, atol=1e-12)
    if kk == r:  # nothing cut: the client's B itself, bit for bit
        assert torch.equal(got.B, own["w"]) and torch.equal(got.A, A_bar[:r])
    assert own_eval_factors("c", glob, None) == glob  # never trained: the global model
    with pytest.raises(InvalidUpdateError, match="client c, module w"):
        own_eval_factors("c", glob, {"w": torch.zeros(m + 1, r, dtype=torch.float64)})


def test_fedsa_clients_start_from_their_own_B_and_the_shared_A(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_config(
        str(tmp_path / "fedsa"),
        federation={"strategy": "fedsa", "rounds": 4, "clients_per_round": 3},
        eval={"at_start": False, "seen": True, "every": 4},
    )
    sim = FederatedRun(cfg, dataset=make_dataset(), model_and_tokenizer=build_tiny_llama(seed=0))
    seen: list[tuple[int, str, dict, dict]] = []  # (round, client, start, returned factors)
    real = sim.worker.train_many
    current = {"round": 0}
    real_round = sim.run_round

    def run_round(state, round_, bar):  # type: ignore[no-untyped-def]
        current["round"] = round_
        current["state"] = state
        new_state, row = real_round(state, round_, bar)
        current["state_after"] = new_state
        return new_state, row

    def train_many(jobs, train_A=True):  # type: ignore[no-untyped-def]
        out = real(jobs, train_A=train_A)
        for job, (update, _) in zip(jobs, out, strict=True):
            seen.append((current["round"], job.client, dict(job.start), dict(update.factors)))
            state = current["state"]
            for name, f in job.start.items():  # the shared Ā (its prefix), every round
                assert torch.equal(f.A, state[name].Vh[: f.rank].to(f.A.dtype))
        return out

    scored: list[dict] = []  # the model each seen client is scored with
    real_evaluate = sim.worker.evaluate

    def evaluate(factors, sets, *args, **kwargs):  # type: ignore[no-untyped-def]
        if "seen" in sets:
            assert len(sets["seen"]) == 1  # one client at a time, each with its own B
            scored.append(dict(factors))
        return real_evaluate(factors, sets, *args, **kwargs)

    monkeypatch.setattr(sim.worker, "train_many", train_many)
    monkeypatch.setattr(sim.worker, "evaluate", evaluate)
    monkeypatch.setattr(sim, "run_round", run_round)
    rows = sim.run()
    assert all(r["aggregated"] == r["clients"] for r in rows)
    last: dict[str, dict] = {}
    again = 0
    for _round, cid, start, factors in seen:
        for name, f in start.items():
            if cid in last:  # its own B from the last round it trained, bit for bit
                assert torch.equal(f.B, last[cid][name].B)
            else:
                assert not f.B.any()  # B = 0 the first time
        again += cid in last
        last[cid] = factors
    assert again > 0 and "rouge_l_seen" in rows[-1] and "rouge_l_unseen" in rows[-1]
    # uploads count A and B (the paper sends A only; B̄ needs B): FedIT's bytes, not half
    for row in rows:
        for cid, sent in row["bytes_up_per_client"].items():
            ranks = sim.server.ranks_of(cid)
            both = sum(ranks[k] * (m + n) * 4 for k, (m, n) in sim.server.shapes.items())
            assert sent == both
        assert row["bytes_up"] == sum(row["bytes_up_per_client"].values()) > 0
    # the paper's protocol: a seen client that trained is scored with its own last B and Ā
    final = sim.server.eval_factors(current["state_after"])
    eval_clients = sim._eval_sets["seen"]
    assert len(scored) == len(eval_clients) and any(c in last for c in eval_clients)
    for cid, factors in zip(eval_clients, scored, strict=True):
        for name, f in factors.items():
            if cid in last:
                assert torch.equal(f.B, last[cid][name].B)
                assert torch.equal(f.A, final[name].A[: f.rank])
            else:  # never trained: the global model, as an unseen client
                assert torch.equal(f.B, final[name].B) and torch.equal(f.A, final[name].A)


# --- rank-energy diagnostics ----------------------------------------------------------------


def ref_projection(B: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal projectors onto col(B) and row(A), from numpy's SVD (rank by tolerance)."""

    def basis(M: np.ndarray) -> np.ndarray:
        U, S, _ = np.linalg.svd(M, full_matrices=False)
        return U[:, 1e-10 * max(S.max(initial=0.0), 1e-300) < S]

    Qb, Qa = basis(B), basis(A.T)
    return Qb @ Qb.T, Qa @ Qa.T


@pytest.mark.parametrize("strategy", ["flexlora", "hetlora", "fedex", "fedit"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_rank_energy_matches_a_dense_reference(strategy: str, data) -> None:
    from flexlora.diagnostics import rank_energy

    case = data.draw(rounds(uniform=strategy == "fedit"))
    state = get_aggregator(strategy, dtype=torch.float64).aggregate(case.updates, case.weights)
    types = {u.client_id: f"t{i}" for i, u in enumerate(case.updates)}
    slots = {types[u.client_id]: u.ranks for u in case.updates}
    got = rank_energy(state, slots, case.updates, types)
    kept = dict.fromkeys(slots, 0.0)
    total, eff = 0.0, []
    recv = {}
    for module in (Q, UP):
        W = state[module].dense().numpy()  # the adapter part, formed
        total += float((W**2).sum())
        S = np.linalg.svd(W, compute_uv=False)
        p = S**2 / max((S**2).sum(), 1e-300)
        p = p[p > 0]
        eff.append(float(np.exp(-(p * np.log(p)).sum())) if (S**2).sum() > 0 else 0.0)
        for t, ranks in slots.items():
            f = state[module].factors(min(ranks[module], state[module].rank), 8.0)
            kept[t] += float((dense(f) ** 2).sum())
            recv[t, module] = ref_projection(f.B.double().numpy(), f.A.double().numpy())
    for t in slots:
        assert got["energy_kept"][t] == pytest.approx(kept[t] / total, rel=1e-6, abs=1e-9)
    assert got["effective_rank"] == pytest.approx(sum(eff) / 2, rel=1e-6, abs=1e-6)
    for u in case.updates:
        t = types[u.client_id]
        inside = sum(
            float(((recv[t, m][0] @ dense(u.factors[m]) @ recv[t, m][1]) ** 2).sum())
            for m in (Q, UP)
        )
        whole = sum(float((dense(u.factors[m]) ** 2).sum()) for m in (Q, UP))
        assert got["update_survival_per_client"][u.client_id] == pytest.approx(
            (inside / whole) ** 0.5, rel=1e-6, abs=1e-9
        )


def test_rank_energy_by_hand() -> None:
    """ΔW = diag(3, 2, 1): rank 1 keeps 9/14, rank 2 13/14; a rank-1 client along e_2 keeps 0."""
    from flexlora.diagnostics import effective_rank, rank_energy

    U = torch.eye(3, dtype=torch.float64)
    state = GlobalUpdate({Q: ModuleDelta(U, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), U)})
    e2 = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    client = ClientUpdate("c", 1, {Q: LoRAFactors(e2, e2.T, 1.0)})
    got = rank_energy(state, {"1": {Q: 1}, "2": {Q: 2}}, [client], {"c": "1"})
    assert got["energy_kept"] == pytest.approx({"1": 9 / 14, "2": 13 / 14})
    assert got["update_survival"] == {"1": pytest.approx(0.0)}
    assert effective_rank(torch.ones(4)) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([1.0, 0.0])) == pytest.approx(1.0)


# --- state types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "kind", "truncation"),
    [
        ("flexlora", "SVDState", "svd"),
        ("hetlora", "FactorState", "prefix"),
        ("ffa", "FactorState", "prefix"),
        ("fedex", "FactorState", "prefix"),
        ("fedsa", "FactorState", "prefix"),
        ("fedit", "FactorState", "exact"),
        ("flora", "FactorState", "exact"),  # round 1: the stacked factors themselves
    ],
)
def test_each_kind_of_state_has_its_own_type_through_a_checkpoint(
    strategy: str, kind: str, truncation: str
) -> None:
    from flexlora.types import FactorState, SVDState

    ranks = [{Q: 2}, {Q: 2 if strategy == "fedit" else 3}]
    # 16x24: FLoRA's stacks (5·40 numbers) are smaller than ΔW (384), so they are its state
    updates = make_round(4, {Q: (16, 24)}, ranks, [1, 2], [8.0, 8.0], shared_A=strategy == "ffa")
    state = get_aggregator(strategy, dtype=torch.float64).aggregate(updates)
    back = GlobalUpdate.from_tensors(*state.to_tensors())
    for d in (state[Q], back[Q]):
        assert type(d).__name__ == kind and d.truncation == truncation
        assert isinstance(d, ModuleDelta) and isinstance(d, SVDState)  # old name still works
    if isinstance(state[Q], FactorState):
        assert torch.equal(state[Q].B, state[Q].U) and torch.equal(state[Q].A, state[Q].Vh)
        assert torch.allclose(state[Q].dense(), state[Q].B @ state[Q].A)
    if strategy == "fedex":
        assert type(state.frozen[Q]).__name__ == "SVDState"


def test_bench_runs_fedex_and_fedsa_beside_the_reference(tmp_path: Path) -> None:
    """``flexlora bench``'s grid takes both new strategies: each run finishes (mixed ranks,
    heavy-tail-light) and lands in results.csv and the summary."""
    import csv

    from flexlora.bench.runner import run_bench
    from tests.test_bench import _model, _tiny_base

    out = tmp_path / "bench"
    strategies = ["fedex", "fedsa", "fedit-min"]
    result = run_bench(
        strategies,
        ["heavy-tail-light"],
        [0],
        out,
        base=_tiny_base(out),
        dataset=make_dataset(),
        model_factory=_model,
        echo=lambda line: None,
    )
    assert not result.failed and set(result.status.values()) == {"ran"}
    with (out / "results.csv").open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["round"] == "1"]
    assert sorted(r["strategy"] for r in rows) == sorted(strategies)
    assert all(r["rouge_l_unseen"] != "" and int(r["bytes_up"]) > 0 for r in rows)
    assert "| fedex |" in result.summary and "| fedsa |" in result.summary


def test_fedsa_own_Bs_survive_a_crash_and_flexlora_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flexlora run --strategy fedsa`` dies at the start of round 3; ``flexlora resume``
    finishes it: every client's stored B's, the rows (seen clients scored with their own B)
    and the adapters are the uninterrupted run's, bit for bit."""
    from flexlora.cli import main
    from tests.sim_helpers import write_jsonl_job
    from tests.test_checkpoint_resume import Interrupt, assert_same_adapters, comparable

    config = write_jsonl_job(tmp_path / "job")
    args = ["--strategy", "fedsa", "--rounds", "3", "--set", "train.local_steps=2"]
    args += ["--set", "eval.seen=true", "--set", "eval.every=1"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(["run", str(config), "--out", str(whole), *args]) == 0
    real_round = FederatedRun.run_round

    def run_round(self, state, round_, bar):  # type: ignore[no-untyped-def]
        if round_ == 3:
            raise Interrupt
        return real_round(self, state, round_, bar)

    monkeypatch.setattr(FederatedRun, "run_round", run_round)
    with pytest.raises(Interrupt):
        main(["run", str(config), "--out", str(broken), *args])
    monkeypatch.setattr(FederatedRun, "run_round", real_round)
    assert main(["resume", str(broken)]) == 0
    files = sorted(p.relative_to(whole) for p in whole.glob("client_state/*/*.safetensors"))
    assert files == sorted(p.relative_to(broken) for p in broken.glob("client_state/*/*"))
    assert files
    for rel in files:
        a, b = load_file(whole / rel), load_file(broken / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    rows = [json.loads(x) for x in (broken / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert comparable(rows) == comparable(want) and all("rouge_l_seen" in r for r in rows)
    assert_same_adapters(whole, broken)


def test_bench_and_run_help_list_the_new_strategies(capsys) -> None:
    from flexlora.cli import main

    for command in ("bench", "run"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "fedex" in text and "fedsa" in text, command


@pytest.mark.parametrize(
    ("strategy", "names"),
    [
        ("fedit", "fedit-min or fedit-max"),
        ("fedavg", "fedavg+homogeneous or fedavg+homogeneous-max"),
    ],
)
def test_a_one_rank_strategy_on_mixed_types_names_its_own_alternatives(
    strategy: str, names: str
) -> None:
    from flexlora.config import load_config
    from flexlora.errors import UsageError
    from flexlora.server import Coordinator

    cfg = load_config(values={"federation": {"strategy": strategy}})
    shapes = {"model.layers.0.self_attn.q_proj": (8, 8)}
    with pytest.raises(UsageError, match=rf"mix types \['200', '8'\]; use {re.escape(names)}$"):
        Coordinator(cfg, shapes, {"a": "8", "b": "200"})


@pytest.mark.parametrize("svd", ["auto", "dense", "randomized"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rank_energy_of_a_capped_state_is_that_of_the_whole_update(
    svd: str, dtype: torch.dtype
) -> None:
    """keep_rank = the largest client rank (the default) leaves triplets out of the state; the
    shares each rank type keeps are still of the round's whole ΔW, as with keep_rank = all
    (the largest type keeps less than 1)."""
    from flexlora.diagnostics import rank_energy

    shapes = {Q: (40, 30), UP: (50, 30)}
    ranks = [{Q: 4, UP: 6}, {Q: 2, UP: 3}, {Q: 5, UP: 2}]
    updates = make_round(4, shapes, ranks, [3, 1, 2], [8.0, 16.0, 4.0], dtype=dtype)
    types = {u.client_id: f"t{i}" for i, u in enumerate(updates)}
    slots = {types[u.client_id]: u.ranks for u in updates}
    cap = {name: max(r[name] for r in ranks) for name in shapes}
    full = get_aggregator("flexlora", svd=svd, keep_rank="all", dtype=dtype).aggregate(updates)
    capped = get_aggregator("flexlora", svd=svd, keep_rank=cap, dtype=dtype).aggregate(updates)
    assert all(capped[name].rank == cap[name] < full[name].rank for name in shapes)
    want = rank_energy(full, slots, updates, types)["energy_kept"]
    got = rank_energy(capped, slots, updates, types)["energy_kept"]
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert got == pytest.approx(want, rel=tol, abs=tol)
    assert max(got.values()) < 1 - 1e-3
