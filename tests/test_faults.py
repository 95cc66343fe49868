"""Dropouts and stragglers in the simulator: the round goes on with the clients that answered
and the aggregation weights renormalise over them."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import torch

from flexlora.data.types import ClientSplit, Example, FederatedDataset
from flexlora.simulation.runner import FederatedRun
from flexlora.training.model import build_tiny_llama
from tests.reliability_helpers import one_torch_thread  # noqa: F401 (fixture)
from tests.sim_helpers import WORDS, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_EVAL = {"at_start": False, "every": 0, "unseen": False, "seen": False}


def varied_dataset(n: int = 12) -> FederatedDataset:
    """Seen clients with 3, 4, 5, ... training examples, so example-count weights differ."""
    splits = {}
    for c in range(n):
        cid = f"c{c:02d}"
        exs = tuple(
            Example(f"Repeat {c % 3}", WORDS[(c + i) % 10], WORDS[(c + i) % 10], "x", cid, f"{i}")
            for i in range(3 + c + 2)
        )
        splits[cid] = ClientSplit(train=exs[:-2], eval=exs[-2:-1], test=exs[-1:])
    return FederatedDataset(splits, unseen=[], name="varied")


def spy_rounds(sim: FederatedRun) -> list[dict[str, Any]]:
    """Record what every round's aggregation received (each reply the driver added) and
    returned: the drivers fold replies into ``Coordinator.open_round``'s aggregation."""
    calls: list[dict[str, Any]] = []
    original = sim.server.open_round

    def open_round(state, round_, clients, failed=()):  # type: ignore[no-untyped-def]
        agg = original(state, round_, clients, failed)
        call: dict[str, Any] = {"updates": []}
        calls.append(call)
        add, close = agg.add, agg.close

        def spy_add(update, label=None):  # type: ignore[no-untyped-def]
            call["updates"].append(update)
            return add(update, label)

        def spy_close(failures=None):  # type: ignore[no-untyped-def]
            call["state"], call["row"] = close(failures)
            return call["state"], call["row"]

        agg.add, agg.close = spy_add, spy_close  # type: ignore[method-assign]
        return agg

    sim.server.open_round = open_round  # type: ignore[method-assign]
    return calls


def run_sim(tmp_path: Path, name: str, **federation: Any) -> tuple[FederatedRun, list, list]:
    fed = {
        "clients_per_round": 10,
        "client_types": ["2", "4", "2-8", "8"],
        "rounds": 2,
        **federation,
    }
    cfg = tiny_config(str(tmp_path / name), federation=fed, eval=NO_EVAL, train={"local_steps": 1})
    sim = FederatedRun(cfg, dataset=varied_dataset(), model_and_tokenizer=build_tiny_llama(seed=0))
    calls = spy_rounds(sim)
    return sim, sim.run(), calls


def dense_mean(updates: list, weights: list[float], module: str) -> torch.Tensor:
    """Σ w_i·s_i·B_i·A_i in float64: the reference FlexLoRA aggregate (before the SVD)."""
    return sum(
        w * u.factors[module].delta(torch.float64) for w, u in zip(weights, updates, strict=True)
    )


def test_thirty_percent_failing_clients_every_round(tmp_path: Path) -> None:
    # keep_rank="all": the state is the whole ΔW, so it can be held to the dense mean
    sim, rows, calls = run_sim(tmp_path, "faults", fail_rate=0.3, keep_rank="all")
    assert [r["round"] for r in rows] == [1, 2]
    counts = {cid: len(sim.data.train(cid)) for cid in sim.data.seen}
    for row, call in zip(rows, calls, strict=True):
        failed = set(row["failed"])
        assert len(row["clients"]) == 10 and len(failed) == 3  # round(0.3 * 10)
        assert all("injected client failure" in why for why in row["failed"].values())
        assert not row["kept_previous_state"] and not row["rejected"]
        assert sorted(row["aggregated"]) == sorted(set(row["clients"]) - failed)
        survivors = call["updates"]
        assert {u.client_id for u in survivors} == set(row["aggregated"])
        # weights renormalise over the clients that answered: n_i / Σ_answered n_j
        total = sum(counts[u.client_id] for u in survivors)
        p = [counts[u.client_id] / total for u in survivors]
        everyone = sum(counts[c] for c in row["clients"])
        not_renormalised = [counts[u.client_id] / everyone for u in survivors]
        for module in sim.server.shapes:
            got = call["state"][module].dense()
            want = dense_mean(survivors, p, module)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
            wrong = dense_mean(survivors, not_renormalised, module)
            assert not torch.allclose(got, wrong, rtol=1e-3, atol=0)
    assert rows[0]["failed"].keys() != rows[1]["failed"].keys()  # keyed on (seed, round)
    assert (tmp_path / "faults" / "adapters" / "rank-8" / "adapter_model.safetensors").is_file()


def test_too_few_answers_keep_the_state_and_say_so(tmp_path: Path, caplog) -> None:
    with caplog.at_level("WARNING"):
        sim, rows, calls = run_sim(
            tmp_path, "few", fail_rate=0.3, clients_per_round=4, min_clients=4, rounds=1
        )
    initial = sim.server.initial_state()
    for row, call in zip(rows, calls, strict=True):
        assert len(row["failed"]) == 1 and row["kept_previous_state"] and row["aggregated"] == []
        for module, delta in call["state"].modules.items():
            assert torch.equal(delta.U, initial[module].U) and torch.equal(
                delta.Vh, initial[module].Vh
            )
    assert "3 valid updates < min_clients=4; the global state is unchanged" in caplog.text


def test_a_straggler_reply_is_discarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With federation.client_timeout, a client whose training takes longer is dropped.

    The runner's clock is replaced by one that only moves when the straggler trains, so the
    test does not depend on how busy the machine is.
    """
    import flexlora.simulation.runner as runner

    now = [0.0]
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    cfg = tiny_config(
        str(tmp_path / "slow"),
        federation={"clients_per_round": 4, "rounds": 2, "client_timeout": 30.0},
        eval=NO_EVAL,
    )
    sim = FederatedRun(cfg, dataset=varied_dataset(6), model_and_tokenizer=build_tiny_llama(seed=0))
    slow = sim.server.sample(1)[1]
    train = sim.worker.train

    def maybe_slow(client, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = train(client, *args, **kwargs)
        now[0] += 31.0 if client == slow else 1.0
        return out

    monkeypatch.setattr(sim.worker, "train", maybe_slow)
    calls = spy_rounds(sim)
    rows = sim.run()
    for row, call in zip(rows, calls, strict=True):
        if slow in row["clients"]:
            assert row["failed"][slow].startswith("straggler: replied after 31.00s")
            assert slow not in row["aggregated"]
            assert slow not in {u.client_id for u in call["updates"]}
        assert not row["kept_previous_state"]
        assert len(row["aggregated"]) == len(row["clients"]) - len(row["failed"])
    assert slow in rows[0]["failed"]
