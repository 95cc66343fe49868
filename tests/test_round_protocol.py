"""One round protocol for both drivers (flexlora.federation.round): the simulator and the
Flower ServerApp differ only in transport, so failures, stragglers and rows are the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from flexlora.config import RunConfig
from flexlora.federation.round import (
    INJECTED_FAILURE,
    NO_REPLY,
    ClientResult,
    close_round,
    injected_failures,
)
from flexlora.flower.client_app import NodeRuntime, make_client_app
from flexlora.flower.server_app import FlowerRun
from flexlora.flower.settings import to_run_config
from flexlora.flower.strategy import FlexLoRAStrategy
from flexlora.server import Coordinator, resolve_client_types
from flexlora.simulation.runner import FederatedRun
from flexlora.types import ClientUpdate, GlobalUpdate
from tests.conftest import random_factors
from tests.flower_helpers import (
    LocalGrid,
    assert_rows_match,
    read_rows,
    strip_timings,
    toy_config,
    write_tasks,
)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are stamped with the current task's ids, which a real runtime sets."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("protocol") / "tasks.jsonl")


def update_for(server: Coordinator, cid: str, seed: int) -> ClientUpdate:
    ranks = server.ranks_of(cid)
    factors = {
        name: random_factors(m, n, ranks[name], seed=seed + i, dtype=torch.float32)
        for i, (name, (m, n)) in enumerate(server.shapes.items())
    }
    return ClientUpdate(cid, 4 + seed, factors, {"train_loss": 1.0, "tokens": 10.0})


def test_close_round_reads_every_kind_of_result_once(tasks: Path, tmp_path: Path) -> None:
    cfg = toy_config(tmp_path / "x", tasks, federation={"client_timeout": 30.0})
    runtime = NodeRuntime(cfg)
    server = Coordinator(cfg, runtime.shapes, resolve_client_types(cfg, runtime.data.seen))
    a, b, c, d, e = runtime.data.seen[:5]
    results = [
        ClientResult(a, update_for(server, a, 1), seconds=2.0, tokens=5, batch=0),
        ClientResult(b, update_for(server, b, 2), seconds=3.0, tokens=7, batch=0),
        ClientResult(c, update_for(server, c, 3), seconds=31.0, tokens=9),  # too late
        ClientResult(d, error=INJECTED_FAILURE),
    ]
    state = server.initial_state()
    down = {x: 100 for x in (a, b, c, d, e)}
    new_state, row = close_round(server, state, 1, [a, b, c, d, e], results, down)
    assert row["aggregated"] == [a, b]
    assert row["failed"][c].startswith("straggler: replied after 31.00s")
    assert row["failed"][d] == INJECTED_FAILURE and row["failed"][e] == NO_REPLY
    assert row["seconds_train"] == 3.0  # a and b trained together: their batch counts once
    assert row["train_tokens"] == 12 and row["bytes_down"] == 500
    assert set(row["bytes_up_per_client"]) == {a, b}
    assert new_state is not state
    rejected = [ClientResult(a, rejected="client a: bad arrays")]
    _, row = close_round(server, state, 1, [a], rejected, {a: 1})
    assert row["rejected"] == {a: "client a: bad arrays"} and row["kept_previous_state"]


def run_both_drivers(tasks: Path, tmp_path: Path, sections: dict) -> FederatedRun:
    """The job in the simulator (``tmp_path/sim``) and on an in-process Grid (``/flower``)."""
    sim = FederatedRun(toy_config(tmp_path / "sim", tasks, **sections))
    sim.run()
    flower_cfg = toy_config(tmp_path / "flower", tasks, **sections)
    nodes = {100 + i: {"partition-id": i} for i in range(len(sim.data.seen))}
    FlowerRun(flower_cfg, LocalGrid(make_client_app(to_run_config(flower_cfg)), nodes)).run()
    return sim


@pytest.mark.parametrize("strategy", ["flexlora", "flora"])
def test_failures_and_rows_are_the_same_in_both_drivers(
    tasks: Path, tmp_path: Path, strategy: str
) -> None:
    """fail_rate drops the same clients with the same message; rows equal key for key."""
    small = {
        "eval": {"at_start": False, "unseen": False},
        "federation": {"clients_per_round": 4, "strategy": strategy, "fail_rate": 0.5},
        "output": {"save_adapters": False},
    }
    sim = run_both_drivers(tasks, tmp_path, small)
    sim_rows = strip_timings(read_rows(tmp_path / "sim"))
    assert_rows_match(strip_timings(read_rows(tmp_path / "flower")), sim_rows)
    for r in sim_rows:
        assert len(r["failed"]) == 2 and set(r["failed"].values()) == {INJECTED_FAILURE}
        assert set(r["failed"]) == injected_failures(sim.server, r["round"], r["clients"])


def test_a_fedsa_straggler_keeps_the_B_it_trained_in_both_drivers(
    tasks: Path, tmp_path: Path
) -> None:
    """Every reply comes after ``federation.client_timeout``: the server aggregates nobody,
    but each client trained, and keeps its B (a Flower node cannot know that the server
    dropped it), so round 2 starts from the same own B's and the stores agree bit for bit."""
    from safetensors.torch import load_file

    small = {
        "eval": {"at_start": False, "unseen": False},
        "federation": {"clients_per_round": 3, "strategy": "fedsa", "client_timeout": 1e-9},
        "output": {"save_adapters": False},
    }
    run_both_drivers(tasks, tmp_path, small)

    def rows(out: Path) -> list[dict]:  # the straggler messages hold each run's seconds
        return [{**r, "failed": sorted(r["failed"])} for r in strip_timings(read_rows(out))]

    sim_rows = rows(tmp_path / "sim")
    assert_rows_match(rows(tmp_path / "flower"), sim_rows)
    assert all(not r["aggregated"] and len(r["failed"]) == 3 for r in sim_rows)
    files = sorted(p.relative_to(tmp_path / "sim") for p in tmp_path.glob("sim/client_state/*/*"))
    flower = tmp_path / "flower"
    assert files and files == sorted(p.relative_to(flower) for p in flower.glob("client_state/*/*"))
    for rel in files:
        a, b = load_file(tmp_path / "sim" / rel), load_file(flower / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


def test_a_node_allocates_only_its_own_rank_types_slot(tasks: Path, tmp_path: Path) -> None:
    cfg = toy_config(tmp_path / "x", tasks)
    runtime = NodeRuntime(cfg)
    server = Coordinator(cfg, runtime.shapes, resolve_client_types(cfg, runtime.data.seen))
    strategy = FlexLoRAStrategy(server, {100 + i: c for i, c in enumerate(runtime.data.seen)})
    plan = strategy.plan(server.initial_state(), 1)
    msg = next(strategy.messages(server.initial_state(), plan))
    cid = plan.node_client[msg.metadata.dst_node_id]
    reply = runtime.train(msg.content, cid)
    assert "arrays" in reply.array_records
    assert set(runtime.worker.host.slot_ranks) == {server.client_type[cid]}
    assert len(runtime.slot_ranks) == len(cfg.federation.rank_types)  # ranks known, not built
    # an injected failure comes back as the simulator's message, not as a crash
    msg.content.config_records["config"]["fail"] = True
    failed = runtime.train(msg.content, cid)
    assert failed.config_records["failure"]["reason"] == INJECTED_FAILURE


def test_the_server_app_plans_from_meta_shapes_and_loads_weights_only_to_evaluate(
    tasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flexlora.models import build_tiny_llama, target_linear_modules
    from flexlora.models.meta import meta_model

    meta = meta_model("tiny-llama")
    assert all(p.is_meta for p in meta.parameters())
    targets = ["q_proj", "v_proj", "up_proj"]
    real, tok = build_tiny_llama(seed=0)
    assert target_linear_modules(meta, targets) == target_linear_modules(real, targets)
    real.save_pretrained(tmp_path / "folder")
    tok.save_pretrained(tmp_path / "folder")
    from_folder = target_linear_modules(meta_model(str(tmp_path / "folder")), targets)
    assert from_folder == target_linear_modules(real, targets)

    loads: list[str] = []
    original = FlowerRun._load_model

    def counting(self):  # type: ignore[no-untyped-def]
        loads.append(self.cfg.model.name)
        return original(self)

    monkeypatch.setattr(FlowerRun, "_load_model", counting)
    quiet = {
        "eval": {"at_start": False, "unseen": False},
        "federation": {"clients_per_round": 2, "rounds": 1},
        "output": {"save_adapters": False},
    }
    cfg = toy_config(tmp_path / "noeval", tasks, **quiet)
    nodes = {100 + i: {"partition-id": i} for i in range(6)}
    grid = LocalGrid(make_client_app(to_run_config(cfg)), nodes)
    FlowerRun(cfg, grid).run()
    assert loads == []  # the server planned the round from the meta shapes alone
    scored = toy_config(tmp_path / "eval", tasks, **{**quiet, "eval": {"at_start": False}})
    run = FlowerRun(scored, LocalGrid(make_client_app(to_run_config(scored)), nodes))
    rows = run.run()
    assert loads == ["tiny-llama"] and "rouge_l_unseen" in rows[-1]
    assert run.worker.host.slot_ranks == {}  # the server evaluates; it trains no slot


def state_tensors(state) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{part}": getattr(d, part)
        for name, d in state.modules.items()
        for part in ("U", "S", "Vh")
    }


def test_the_collector_folds_in_population_order_whatever_the_arrival(
    tasks: Path, tmp_path: Path
) -> None:
    """A reply that arrives ahead of an earlier client waits for it, and only for it: the sum
    is the population order's, bit for bit, and nothing is held once the order is complete."""
    from flexlora.federation.round import RoundCollector

    cfg = toy_config(tmp_path / "x", tasks)
    runtime = NodeRuntime(cfg)
    server = Coordinator(cfg, runtime.shapes, resolve_client_types(cfg, runtime.data.seen))
    clients = list(runtime.data.seen[:4])
    results = {
        c: ClientResult(c, update_for(server, c, i), seconds=1.0, tokens=3)
        for i, c in enumerate(clients)
    }
    state = server.initial_state()
    down = dict.fromkeys(clients, 10)
    in_order, row_in_order = close_round(server, state, 1, clients, list(results.values()), down)

    collector = RoundCollector(server, state, 1, clients)
    a, b, c, d = clients
    collector.offer(results[c])  # waits for a and b
    collector.offer(ClientResult(b, error=INJECTED_FAILURE))
    assert collector.held == 1 and not collector.aggregation.folded
    collector.offer(results[a])  # a, then (b failed) c: both folded now
    assert collector.held == 0
    assert [f.client_id for f in collector.aggregation.folded] == [a, c]
    collector.offer(results[d])
    assert [f.client_id for f in collector.aggregation.folded] == [a, c, d]
    assert all(r.update is None for r in collector.accepted)  # folded replies are dropped
    new_state, row = collector.close(down)
    assert row["aggregated"] == [a, c, d] and row["failed"] == {b: INJECTED_FAILURE}

    reference, _ = close_round(
        server,
        state,
        1,
        clients,
        [results[a], ClientResult(b, error="x"), results[c], results[d]],
        down,
    )
    ours, ref = state_tensors(new_state), state_tensors(reference)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours)
    assert row_in_order["aggregated"] == clients and in_order is not state


def one_round_config(out: Path, tasks: Path, **train: object) -> RunConfig:
    """One round of 3 clients writing to ``out``, no evaluation, no exports (``train`` keys)."""
    return toy_config(
        out,
        tasks,
        eval={"at_start": False, "unseen": False},
        federation={"clients_per_round": 3, "rounds": 1},
        train=train,
        output={"save_adapters": False},
    )


def test_the_simulator_folds_each_client_before_training_the_next(
    tasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process a round never holds its updates together: each one is folded into the
    aggregation as its client finishes, before the next client trains."""
    from flexlora.server import RoundAggregation

    events: list[str] = []
    add, train = RoundAggregation.add, FederatedRun._train_group

    def spy_add(self, update, label=None):
        events.append(f"fold {update.client_id}")
        return add(self, update, label)

    def spy_train(self, jobs, batch):
        events.extend(f"train {j.client}" for j in jobs)
        return train(self, jobs, batch)

    monkeypatch.setattr(RoundAggregation, "add", spy_add)
    monkeypatch.setattr(FederatedRun, "_train_group", spy_train)
    FederatedRun(one_round_config(tmp_path / "sim", tasks)).run()
    clients = [e.split()[1] for e in events if e.startswith("train")]
    assert len(clients) == 3
    assert events == [f"{kind} {c}" for c in clients for kind in ("train", "fold")]


def test_the_flower_server_folds_replies_as_they_are_pulled(
    tasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ServerApp pulls replies and folds each before pulling the next (one per pull
    here), and the run is the simulator's, row for row."""
    from flexlora.server import RoundAggregation

    pulls_at_fold: list[int] = []
    add = RoundAggregation.add
    grids: list[LocalGrid] = []

    def spy_add(self, update, label=None):
        pulls_at_fold.append(grids[0].pulls if grids else -1)
        return add(self, update, label)

    monkeypatch.setattr(RoundAggregation, "add", spy_add)
    sim = FederatedRun(one_round_config(tmp_path / "sim", tasks))
    sim.run()
    flower_cfg = one_round_config(tmp_path / "flower", tasks)
    nodes = {100 + i: {"partition-id": i} for i in range(len(sim.data.seen))}
    grid = LocalGrid(make_client_app(to_run_config(flower_cfg)), nodes)
    grid.pull_batch = 1
    grids.append(grid)
    pulls_at_fold.clear()
    FlowerRun(flower_cfg, grid).run()
    flower_folds = pulls_at_fold[-3:]
    assert flower_folds == sorted(set(flower_folds)) and len(set(flower_folds)) == 3
    assert_rows_match(
        strip_timings(read_rows(tmp_path / "flower")), strip_timings(read_rows(tmp_path / "sim"))
    )


def toy_results(
    tasks: Path, tmp_path: Path, count: int
) -> tuple[Coordinator, GlobalUpdate, list[str], list[ClientResult], dict[str, int]]:
    """A toy round's server, start state, first ``count`` clients, one trained-looking result
    each (in the clients' order) and their download bytes."""
    cfg = toy_config(tmp_path / "x", tasks)
    runtime = NodeRuntime(cfg)
    server = Coordinator(cfg, runtime.shapes, resolve_client_types(cfg, runtime.data.seen))
    clients = list(runtime.data.seen[:count])
    results = [
        ClientResult(c, update_for(server, c, i), seconds=1.0, tokens=3)
        for i, c in enumerate(clients)
    ]
    return server, server.initial_state(), clients, results, dict.fromkeys(clients, 10)


def test_replies_held_for_a_slow_first_client_stay_within_the_memory_budget(
    tasks: Path, tmp_path: Path
) -> None:
    """The first client replies last: the others wait for it, but only ``held_budget`` bytes
    of them in memory (the rest on disk, read back in turn), and the fold is the population
    order's, bit for bit."""
    from flexlora.federation.round import RoundCollector

    server, state, clients, results, down = toy_results(tasks, tmp_path, 5)
    reference, row_in_order = close_round(server, state, 1, clients, results, down)

    budget = min(r.update.num_bytes() for r in results[1:])  # room for one held update
    collector = RoundCollector(server, state, 1, clients, held_budget=budget)
    for r in reversed(results[1:]):
        collector.offer(r)
        assert collector.held_bytes <= budget
    assert collector.held == len(clients) - 1 and not collector.aggregation.folded
    assert collector.spilled >= len(clients) - 2  # at most one fits the budget
    folder = collector._store._folder  # the spilled files' temporary folder
    assert folder is not None and len(list(folder.iterdir())) == collector.spilled
    collector.offer(results[0])  # the first client at last: everything is folded in order
    assert collector.held == 0 and collector.held_bytes == 0 and collector.spilled == 0
    assert [f.client_id for f in collector.aggregation.folded] == clients
    new_state, row = collector.close(down)
    assert not folder.exists()  # the store is closed with the round
    ours, ref = state_tensors(new_state), state_tensors(reference)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours)
    assert strip_timings([row]) == strip_timings([row_in_order])


def test_held_replies_are_spilled_and_folded_when_the_round_closes(
    tasks: Path, tmp_path: Path
) -> None:
    """The first client never replies: what waited for it is folded at :meth:`close`, from
    disk, and the temporary files go with the round."""
    from flexlora.federation.round import RoundCollector

    server, state, clients, results, down = toy_results(tasks, tmp_path, 4)
    reference, row_ref = close_round(server, state, 1, clients, results[1:], down)
    collector = RoundCollector(server, state, 1, clients, held_budget=0)  # all to disk
    for r in reversed(results[1:]):
        collector.offer(r)
    assert collector.held_bytes == 0 and collector.spilled == 3
    folder = collector._store._folder
    new_state, row = collector.close(down)
    assert not folder.exists() and row["failed"] == {clients[0]: NO_REPLY}
    ours, ref = state_tensors(new_state), state_tensors(reference)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert strip_timings([row]) == strip_timings([row_ref])


def flower_round(tasks: Path, out: Path, grid_type: type = LocalGrid, **options: Any):
    """One round of 3 clients on an in-process Grid; the run, its grid and its row."""
    from flexlora.flower.settings import FlowerOptions

    cfg = toy_config(
        out,
        tasks,
        eval={"at_start": False, "unseen": False},
        federation={"clients_per_round": 3, "rounds": 1},
        output={"save_adapters": False},
    )
    nodes = {100 + i: {"partition-id": i} for i in range(6)}
    grid = grid_type(make_client_app(to_run_config(cfg)), nodes)
    run = FlowerRun(cfg, grid, FlowerOptions(**options))
    return run, grid, run.run()[-1]


def test_the_flower_server_pulls_a_few_replies_at_a_time(
    tasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies that are all ready are still pulled ``flower.messages-per-call`` ids at a
    time, each chunk folded before the next is pulled."""
    from flexlora.server import RoundAggregation

    grids: list[LocalGrid] = []
    pulls_at_fold: list[int] = []
    add = RoundAggregation.add

    def spy_add(self, update, label=None):
        pulls_at_fold.append(len(grids[0].pulled))
        return add(self, update, label)

    class Grid(LocalGrid):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            grids.append(self)

    monkeypatch.setattr(RoundAggregation, "add", spy_add)
    _, grid, row = flower_round(tasks, tmp_path / "flower", Grid, messages_per_call=2)
    train_pulls = grid.pulled[-2:]  # the node discovery used send_and_receive
    assert [len(ids) for ids in train_pulls] == [2, 1]
    first = len(grid.pulled) - 1  # the pulls done when the first chunk is folded
    assert pulls_at_fold == [first, first, first + 1]
    assert len(row["aggregated"]) == 3


def test_a_message_the_grid_did_not_accept_fails_its_client_and_is_never_pulled(
    tasks: Path, tmp_path: Path
) -> None:
    """``push_messages`` gives ``None`` for a message it could not push (Flower keeps the
    order): that node's client fails with a message naming it, its download is not counted,
    the others go on."""
    from flexlora.flower.strategy import not_pushed

    refused: list[int] = []

    class Grid(LocalGrid):
        def push_messages(self, messages):
            messages = list(messages)
            ids: list[str | None] = []
            for msg in messages:
                if msg.metadata.message_type == "train" and not refused:
                    refused.append(msg.metadata.dst_node_id)
                    ids.append(None)  # not delivered
                else:
                    ids.extend(super().push_messages([msg]))
            return ids

    run, grid, row = flower_round(tasks, tmp_path / "flower", Grid)
    client = {n.node_id: n.client for n in run.nodes}[refused[0]]
    assert row["failed"] == {client: not_pushed(refused[0])}
    assert len(row["aggregated"]) == 2 and client not in row["aggregated"]
    assert all(None not in ids for ids in grid.pulled)  # LocalGrid asserts it, too
    assert client not in row["bytes_down_per_client"]  # nothing reached its node
    assert row["bytes_down"] == sum(row["bytes_down_per_client"].values())


def test_the_pull_interval_is_flowers_unless_set(
    tasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Grid with no pull_interval of its own (Flower's deployed one) is polled every 3 s,
    as its send_and_receive does, not every 0.1 s; one that has one (Flower's simulation
    Grid) at that; ``flower.pull-interval`` overrides both."""
    import types as pytypes

    from flexlora.flower import server_app
    from flexlora.flower.server_app import DEPLOYED_PULL_INTERVAL, pull_interval

    class Deployed:  # push/pull only, like flwr's HttpGrid
        def __init__(self) -> None:
            self.polls = 0

        def push_messages(self, messages):
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):
            self.polls += 1
            if self.polls < 3:
                return []
            return [
                pytypes.SimpleNamespace(metadata=pytypes.SimpleNamespace(reply_to_message_id=i))
                for i in ids
            ]

    assert DEPLOYED_PULL_INTERVAL == 3.0
    assert pull_interval(Deployed()) == 3.0
    assert pull_interval(pytypes.SimpleNamespace(pull_interval=0.1)) == 0.1
    assert pull_interval(Deployed(), 0.5) == 0.5
    slept: list[float] = []
    monkeypatch.setattr(server_app.time, "sleep", slept.append)
    msg = pytypes.SimpleNamespace(metadata=pytypes.SimpleNamespace(dst_node_id=1))
    replies = list(server_app.stream_replies(Deployed(), [msg], None))
    assert len(replies) == 1 and slept == [3.0, 3.0]


def test_the_flower_server_builds_each_message_just_before_pushing_it(
    tasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round's messages are built ``flower.messages-per-call`` at a time as they are
    pushed, and none is alive once pushed (nor while the next round is planned): the server
    never holds the round's downloads, only their byte counts and ids."""
    import gc
    import weakref

    events: list[str] = []
    build = FlexLoRAStrategy._message

    def spy_build(self, state, plan, cid, base):
        events.append("build")
        return build(self, state, plan, cid, base)

    class Grid(LocalGrid):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.pushed: list[weakref.ref] = []
            self.alive_at_push: list[int] = []

        def push_messages(self, messages):
            messages = list(messages)
            if messages[0].metadata.message_type == "train":
                gc.collect()
                self.alive_at_push.append(sum(r() is not None for r in self.pushed))
                self.pushed.extend(weakref.ref(m) for m in messages)
                events.append(f"push {len(messages)}")
            ids = super().push_messages(messages)
            self.sent.clear()  # the test grid's own record would keep them alive
            return ids

    monkeypatch.setattr(FlexLoRAStrategy, "_message", spy_build)
    run, grid, row = flower_round(tasks, tmp_path / "flower", Grid, messages_per_call=2)
    assert events == ["build", "build", "push 2", "build", "push 1"]
    assert grid.alive_at_push == [0, 0]  # the first chunk is gone before the second push
    gc.collect()
    assert not any(r() for r in grid.pushed)
    plan = run.last_plan
    assert plan is not None and not hasattr(plan, "messages")
    assert set(plan.bytes_down) == set(plan.clients) == set(row["bytes_down_per_client"])
    assert sorted(plan.message_ids.values()) == sorted(plan.node_client)
    assert sum(plan.bytes_down.values()) == row["bytes_down"]


def test_a_grid_error_in_place_of_a_reply_fails_the_client_it_was_for(
    tasks: Path, tmp_path: Path
) -> None:
    """Flower's Grid may answer a message with an error of its own, sent from the SuperLink
    (say, reply objects that could not be pulled): the reply is matched to its message by
    id, so the client fails with that reason instead of waiting for the round's end."""
    from flwr.app import Error, Message

    spoiled: list[int] = []

    class Grid(LocalGrid):
        def pull_messages(self, message_ids):
            out = []
            for reply in super().pull_messages(message_ids):
                if not spoiled and reply.metadata.message_type == "train":
                    spoiled.append(reply.metadata.src_node_id)
                    error = Message(Error(code=3, reason="objects unavailable"), reply_to=reply)
                    error.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own
                    error.metadata.__dict__["_reply_to_message_id"] = (
                        reply.metadata.reply_to_message_id
                    )
                    reply = error
                out.append(reply)
            return out

    run, _, row = flower_round(tasks, tmp_path / "flower", Grid)
    client = {n.node_id: n.client for n in run.nodes}[spoiled[0]]
    assert row["failed"] == {client: "objects unavailable"}
    assert len(row["aggregated"]) == 2


def test_the_simulator_prepares_one_group_of_clients_at_a_time(
    tasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's start factors are cut when its ``train.parallel_clients`` group is due,
    not for the whole round before anyone trains; the groups are the same as before."""
    events: list[str] = []
    start_factors, train = Coordinator.start_factors, FederatedRun._train_group

    def spy_start(self, state, client, round_):
        events.append(f"prepare {client}")
        return start_factors(self, state, client, round_)

    def spy_train(self, jobs, batch):
        events.append(f"train {' '.join(j.client for j in jobs)} ({batch})")
        return train(self, jobs, batch)

    monkeypatch.setattr(Coordinator, "start_factors", spy_start)
    monkeypatch.setattr(FederatedRun, "_train_group", spy_train)
    sim = FederatedRun(one_round_config(tmp_path / "sim", tasks, parallel_clients=2))
    a, b, c = sim.server.sample(1)
    rows = sim.run()
    assert events == [
        f"prepare {a}",
        f"prepare {b}",
        f"train {a} {b} (0)",
        f"prepare {c}",
        f"train {c} (None)",
    ]
    assert rows[-1]["aggregated"] == [a, b, c]


def test_a_stored_B_that_does_not_fit_fails_its_client_in_both_drivers(
    tasks: Path, tmp_path: Path
) -> None:
    """FedSA-LoRA: a client whose own stored B does not fit its slot fails the round with the
    same message in the simulator as on its Flower node, instead of crashing the simulator."""
    from flexlora.client_state import CLIENT_STATE, LocalStore

    sections = {
        "eval": {"at_start": False, "unseen": False},
        "federation": {"clients_per_round": 3, "strategy": "fedsa", "rounds": 1},
        "output": {"save_adapters": False},
    }
    sim = FederatedRun(toy_config(tmp_path / "sim", tasks, **sections))
    victim = sim.server.sample(1)[1]
    module, (m, _) = next(iter(sim.server.shapes.items()))
    bad = {module: torch.zeros(m, sim.server.ranks_of(victim)[module] + 1)}
    for out in ("sim", "flower"):
        LocalStore(tmp_path / out / CLIENT_STATE).save(victim, 0, bad)
    sim.run()
    flower_cfg = toy_config(tmp_path / "flower", tasks, **sections)
    nodes = {100 + i: {"partition-id": i} for i in range(len(sim.data.seen))}
    FlowerRun(flower_cfg, LocalGrid(make_client_app(to_run_config(flower_cfg)), nodes)).run()
    sim_rows = strip_timings(read_rows(tmp_path / "sim"))
    assert_rows_match(strip_timings(read_rows(tmp_path / "flower")), sim_rows)
    row = sim_rows[-1]
    assert list(row["failed"]) == [victim] and "own B" in row["failed"][victim]
    assert victim not in row["aggregated"] and len(row["aggregated"]) == 2


def test_a_clients_first_result_counts_and_later_ones_are_rejected_as_duplicates(
    tasks: Path, tmp_path: Path
) -> None:
    """One rule, whatever the first result was and wherever it is: folded, held back for an
    earlier client, or a failure. Later copies are rejected as ``duplicate`` (their bytes
    count) and never folded nor listed in ``aggregated``."""
    from flexlora.federation.round import RoundCollector

    cfg = toy_config(tmp_path / "x", tasks)
    runtime = NodeRuntime(cfg)
    server = Coordinator(cfg, runtime.shapes, resolve_client_types(cfg, runtime.data.seen))
    a, b, c, d = clients = list(runtime.data.seen[:4])
    results = {
        x: ClientResult(x, update_for(server, x, i), seconds=1.0, tokens=3)
        for i, x in enumerate(clients)
    }
    state = server.initial_state()
    down = dict.fromkeys(clients, 10)
    failed_b = ClientResult(b, error=INJECTED_FAILURE)
    reference, ref_row = close_round(
        server, state, 1, clients, [results[a], failed_b, results[c], results[d]], down
    )

    collector = RoundCollector(server, state, 1, clients)
    collector.offer(results[c])  # held: waits for a and b
    collector.offer(results[c])  # a copy of a held reply
    collector.offer(results[a])  # folded at once
    collector.offer(ClientResult(a, update_for(server, a, 9), seconds=1.0, tokens=3))
    collector.offer(failed_b)  # then c is folded
    collector.offer(results[b])  # a reply after its failure
    collector.offer(results[d])
    new_state, row = collector.close(down)

    assert row["aggregated"] == [a, c, d] and row["failed"] == {b: INJECTED_FAILURE}
    assert set(row["rejected"]) == {a, b, c}
    assert all(m.endswith("[duplicate]") for m in row["rejected"].values()), row["rejected"]
    ours, ref = state_tensors(new_state), state_tensors(reference)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    extra = sum(results[x].update.num_bytes() for x in (a, b, c))  # the copies' bytes count
    assert row["bytes_up"] == ref_row["bytes_up"] + extra
    assert row["train_tokens"] == ref_row["train_tokens"]

    # the batch form, the same rule: the first copy counts
    updates = [results[a].update, results[c].update, results[a].update, results[d].update]
    _, batch_row = server.aggregate(state, 1, clients, updates)
    assert batch_row["aggregated"] == [a, c, d] and set(batch_row["rejected"]) == {a}


def test_a_duplicate_reply_is_rejected_the_same_way_in_both_drivers(
    tasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first client's result reaches the round twice, in process and over the Grid: the
    rows agree, the client aggregated once and its second copy rejected as a duplicate."""
    train = FederatedRun._train_group

    def twice(self, jobs, batch):
        out = train(self, jobs, batch)
        if not getattr(self, "_doubled", False):
            self._doubled = True
            out = [*out, out[0]]
        return out

    monkeypatch.setattr(FederatedRun, "_train_group", twice)
    doubled: list[str] = []

    class Grid(LocalGrid):
        def pull_messages(self, message_ids):
            out = list(super().pull_messages(message_ids))
            if out and not doubled and out[0].metadata.message_type == "train":
                doubled.append(out[0].metadata.reply_to_message_id)
                out.insert(1, out[0])
            return out

    sim = FederatedRun(one_round_config(tmp_path / "sim", tasks))
    sim.run()
    flower_cfg = one_round_config(tmp_path / "flower", tasks)
    nodes = {100 + i: {"partition-id": i} for i in range(len(sim.data.seen))}
    FlowerRun(flower_cfg, Grid(make_client_app(to_run_config(flower_cfg)), nodes)).run()
    assert doubled
    sim_rows = strip_timings(read_rows(tmp_path / "sim"))
    assert_rows_match(strip_timings(read_rows(tmp_path / "flower")), sim_rows)
    row = sim_rows[-1]
    first = row["clients"][0]
    assert row["aggregated"] == row["clients"]
    assert list(row["rejected"]) == [first] and row["rejected"][first].endswith("[duplicate]")


def test_an_unexpected_error_in_one_client_fails_that_client_in_both_drivers(
    tasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client whose training raises what the code does not expect (a ValueError, say) is
    that client's failure, named by type in the row, and the round goes on: the simulator
    used to abort the run naming no client, while a Flower node's failure was recorded."""
    import zlib

    from flexlora.training.worker import ClientWorker

    original = ClientWorker.train

    def victim(client: str) -> bool:
        return zlib.crc32(client.encode()) % 2 == 0

    def train(self: ClientWorker, client: str, *args: Any, **kwargs: Any) -> Any:
        if victim(client):
            raise ValueError("bad value on purpose")
        return original(self, client, *args, **kwargs)

    monkeypatch.setattr(ClientWorker, "train", train)
    small = {
        "eval": {"at_start": False, "unseen": False},
        "federation": {"clients_per_round": 4},
        "output": {"save_adapters": False},
    }
    run_both_drivers(tasks, tmp_path, small)
    sim_rows = strip_timings(read_rows(tmp_path / "sim"))
    assert_rows_match(strip_timings(read_rows(tmp_path / "flower")), sim_rows)
    failed = {c: m for r in sim_rows for c, m in r["failed"].items()}
    assert failed and all(victim(c) for c in failed)
    assert set(failed.values()) == {"ValueError: bad value on purpose"}
    assert all(not victim(c) for r in sim_rows for c in r["aggregated"])
    assert any(r["aggregated"] for r in sim_rows)


def test_the_same_unexpected_error_in_every_client_stops_the_simulator(
    tasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that fails every client (a TypeError in each) is shown, not turned into a run
    whose every round keeps the previous state; the error names the round and a client."""
    from flexlora.training.worker import ClientWorker

    def train(self: ClientWorker, client: str, *args: Any, **kwargs: Any) -> Any:
        return 1 + "a"  # type: ignore[operator]

    monkeypatch.setattr(ClientWorker, "train", train)
    small = {
        "eval": {"at_start": False, "unseen": False},
        "federation": {"clients_per_round": 4, "fail_rate": 0.25},
        "output": {"save_adapters": False},
    }
    sim = FederatedRun(toy_config(tmp_path / "sim", tasks, **small))
    with pytest.raises(RuntimeError, match=r"round 1: every client failed .* TypeError") as info:
        sim.run()
    assert isinstance(info.value.__cause__, TypeError)
