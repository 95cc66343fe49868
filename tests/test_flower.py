"""flexlora.flower without a network: records, run config, strategy and apps on a local Grid."""

from __future__ import annotations

import io
import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from flexlora.config import RunConfig
from flexlora.config_io import load_toml
from flexlora.errors import InvalidUpdateError, UsageError
from flexlora.federation import replies as replies_mod
from flexlora.federation.round import NO_REPLY
from flexlora.flower.client_app import NodeRuntime, make_client_app
from flexlora.flower.records import (
    factors_to_record,
    record_bytes,
    record_to_factors,
    record_to_state,
    record_to_values,
    state_to_record,
    values_to_record,
)
from flexlora.flower.server_app import FlowerRun, discover_nodes
from flexlora.flower.settings import (
    FlowerOptions,
    app_config_toml,
    load_run_config,
    to_run_config,
)
from flexlora.flower.strategy import FlexLoRAStrategy
from flexlora.server import Coordinator, resolve_client_types
from flexlora.simulation.checkpoint import load_checkpoint
from flexlora.simulation.runner import FederatedRun
from flexlora.training.worker import ClientWorker
from flexlora.types import GlobalUpdate, ModuleDelta
from tests.conftest import random_factors
from tests.flower_helpers import (
    LocalGrid,
    assert_rows_match,
    assert_same_outputs,
    read_rows,
    strip_timings,
    toy_config,
    write_tasks,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are stamped with the current task's ids, which a real runtime sets."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


# -------------------------------------------------------------------------------- records
def test_factor_and_state_records_round_trip() -> None:
    factors = {
        "layers.0.q_proj": random_factors(6, 5, 2, seed=1, dtype=torch.float32),
        "layers.0.up_proj": random_factors(8, 5, 4, seed=2, dtype=torch.float32),
    }
    back = record_to_factors(factors_to_record(factors), "c1", alpha=16.0)
    assert back.keys() == factors.keys()
    for name, f in factors.items():
        assert torch.equal(back[name].A, f.A) and torch.equal(back[name].B, f.B)
        assert back[name].alpha == 16.0
    g = torch.Generator().manual_seed(0)
    state = GlobalUpdate(
        {
            "a": ModuleDelta(torch.randn(6, 3, generator=g), torch.rand(3), torch.randn(3, 5)),
            "b": ModuleDelta(torch.randn(4, 2), torch.ones(2), torch.randn(2, 5), "prefix"),
        },
        strategy="flexlora",
    )
    again = record_to_state(state_to_record(state), "flexlora")
    for name, d in state.modules.items():
        e = again[name]
        assert e.truncation == d.truncation
        assert torch.equal(e.U, d.U) and torch.equal(e.S, d.S) and torch.equal(e.Vh, d.Vh)


def test_sparse_values_records_round_trip_exactly_and_carry_only_the_values() -> None:
    """SLoRA's stage-1 message: float32 values per module (npy headers aside), nothing else."""
    g = torch.Generator().manual_seed(0)
    values = {"layers.0.q_proj": torch.randn(41, generator=g), "layers.0.up": torch.randn(7)}
    record = values_to_record(values)
    back = record_to_values(record, "c1")
    assert back.keys() == values.keys()
    assert all(torch.equal(back[k], v) for k, v in values.items())
    assert record_bytes(record) - 4 * 48 < 2 * 160  # each npy header is ~128 bytes
    with pytest.raises(InvalidUpdateError, match="ndim"):
        record_to_values(values_to_record({"q": torch.zeros(2, 3)}), "c1")


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> Array:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return Array(dtype=str(arr.dtype), shape=arr.shape, stype="numpy.ndarray", data=buf.getvalue())


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("m.lora_A", Array(np.zeros((2, 5), dtype=np.int64)), "dtype"),
        ("m.lora_A", Array(np.zeros(10, dtype=np.float32)), "ndim"),
        ("m.lora_A", Array(np.zeros((3, 5), dtype=np.float32)), "shape"),  # r=3 vs B's r=2
        ("m.lora_A", _npy(np.array([object()]), allow_pickle=True), "type"),  # a pickle
        ("m.extra", Array(np.zeros((2, 2), dtype=np.float32)), "extra_module"),
    ],
)
def test_bad_factor_records_are_refused_naming_client_and_module(
    key: str, value: Array, reason: str
) -> None:
    record = factors_to_record({"m": random_factors(4, 5, 2, seed=0, dtype=torch.float32)})
    record[key] = value
    with pytest.raises(InvalidUpdateError) as info:
        record_to_factors(record, "client-7", alpha=16.0)
    assert info.value.reason == reason
    assert info.value.client == "client-7"
    assert "client client-7" in str(info.value)


def _npy_bytes(data: bytes) -> Array:
    """An array whose payload is exactly ``data`` (as a hostile node may send)."""
    return Array(dtype="float32", shape=(2, 5), stype="numpy.ndarray", data=data)


def _garbled(old: bytes, new: bytes) -> Array:
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 5), dtype=np.float32))
    return _npy_bytes(buf.getvalue().replace(old, new, 1))


#: arrays no float tensor comes from: longdouble is kind "f" but torch has no such type
NOT_FLOAT = {
    "longdouble": np.zeros((2, 5), dtype=np.longdouble),
    "big-endian longdouble": np.zeros((2, 5), dtype=np.dtype(np.longdouble).newbyteorder(">")),
    "complex64": np.zeros((2, 5), dtype=np.complex64),
    "int32": np.zeros((2, 5), dtype=np.int32),
    "big-endian int64": np.zeros((2, 5), dtype=">i8"),
    "bool": np.zeros((2, 5), dtype=np.bool_),
    "unicode": np.full((2, 5), "ab"),
    "datetime64": np.zeros((2, 5), dtype="datetime64[s]"),
    "structured": np.zeros((2, 5), dtype=[("x", "<f4"), ("y", "<f4")]),
}


@pytest.mark.parametrize("kind", sorted(NOT_FLOAT))
def test_arrays_of_other_dtypes_are_refused_naming_client_module_and_dtype(kind: str) -> None:
    arr = NOT_FLOAT[kind]
    record = factors_to_record({"m": random_factors(4, 5, 2, seed=0, dtype=torch.float32)})
    record["m.lora_A"] = _npy(arr)
    with pytest.raises(InvalidUpdateError) as info:
        record_to_factors(record, "client-7", alpha=16.0)
    assert (info.value.reason, info.value.client, info.value.module) == ("dtype", "client-7", "m")
    assert "client client-7, module m: m.lora_A has dtype" in str(info.value)
    assert arr.dtype.str in str(info.value)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (_npy_bytes(b""), "cannot be read as an npy array: ValueError: EOF"),
        # a header that is not a closed dict
        (_garbled(b"}", b" "), "cannot be read as an npy array: TokenError"),
        (_garbled(b"'<f4'", b"f(1)"), "cannot be read as an npy array: ValueError"),
        (_npy(np.array([object()]), allow_pickle=True), "holds Python objects (a pickle)"),
    ],
)
def test_unreadable_payloads_are_refused_naming_client_and_module(payload: Array, why: str) -> None:
    record = factors_to_record({"m": random_factors(4, 5, 2, seed=0, dtype=torch.float32)})
    record["m.lora_B"] = payload
    with pytest.raises(InvalidUpdateError) as info:
        record_to_factors(record, "client-7", alpha=16.0)
    assert (info.value.reason, info.value.client, info.value.module) == ("type", "client-7", "m")
    assert str(info.value).startswith("client client-7, module m: m.lora_B")
    assert why in str(info.value)


def _declaring(shape: tuple[int, ...], descr: str, body: bytes, fortran: bool = False) -> Array:
    """An npy payload whose header declares ``shape`` of ``descr`` followed by ``body``."""
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return _npy_bytes(buf.getvalue() + body)


def _saved(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


#: 128 MiB declared, 40 bytes sent; trailing bytes; the last element cut off
MISMATCHED = {
    "declares more": (_declaring((4096, 4096), "<f8", b"\0" * 40), "too short", 4096 * 4096 * 8),
    "trailing bytes": (_npy_bytes(_saved(np.ones((2, 5), np.float32)) + b"\0" * 8), "too long", 40),
    "truncated": (_npy_bytes(_saved(np.ones((2, 5), np.float32))[:-4]), "too short", 40),
    "negative": (_declaring((-2, -5), "<f4", b"\0" * 40), "negative shape", 40),
}


@pytest.mark.parametrize("kind", sorted(MISMATCHED))
def test_a_payload_its_header_does_not_match_is_refused_before_allocating(kind: str) -> None:
    """The header's size is checked against the bytes that follow before anything is
    allocated: a short message that declares 128 MiB costs the server nothing of that size."""
    import tracemalloc

    payload, why, declared = MISMATCHED[kind]
    record = factors_to_record({"m": random_factors(4, 5, 2, seed=0, dtype=torch.float32)})
    record["m.lora_A"] = payload
    tracemalloc.start()  # numpy reports its data allocations to tracemalloc
    try:
        with pytest.raises(InvalidUpdateError) as info:
            record_to_factors(record, "client-7", alpha=16.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.value.reason, info.value.client, info.value.module) == ("type", "client-7", "m")
    assert str(info.value).startswith("client client-7, module m: m.lora_A: ")
    assert why in str(info.value)
    if why != "negative shape":
        assert f"({declared} bytes) but " in str(info.value)
    assert peak < 1 << 20  # nothing near the declared size (128 MiB for the first)


def test_the_size_check_catches_what_np_load_would_allocate() -> None:
    """The tracemalloc check above sees numpy's allocations: np.load of the same payload
    allocates the declared 128 MiB before it finds the data missing. A calibration of the
    check, not of flexlora: skipped if a numpy release stops allocating first."""
    import tracemalloc

    payload = MISMATCHED["declares more"][0]
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            np.load(io.BytesIO(payload.data), allow_pickle=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if peak < 4096 * 4096 * 8:
        pytest.skip(f"this numpy ({np.__version__}) no longer allocates a header's size first")


@pytest.mark.parametrize("fortran", [False, True])
def test_well_formed_payloads_decode_as_np_load_does(fortran: bool) -> None:
    """Version 1.0 and 2.0 headers, C and Fortran order, big-endian: the same array as
    ``np.load`` gives (the decoder reads the header itself)."""
    g = np.random.default_rng(0)
    A = g.standard_normal((2, 5)).astype(">f4")  # (r, n), big-endian
    B = g.standard_normal((4, 2))  # (m, r), float64
    A = np.asfortranarray(A) if fortran else A
    record = factors_to_record({"m": random_factors(4, 5, 2, seed=0, dtype=torch.float32)})
    record["m.lora_A"] = _npy_bytes(_saved(A))
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asfortranarray(B) if fortran else B, version=(2, 0))
    record["m.lora_B"] = _npy_bytes(buf.getvalue())
    back = record_to_factors(record, "c", alpha=16.0)["m"]
    assert back.A.dtype == torch.float32 and back.B.dtype == torch.float64
    assert np.array_equal(back.A.numpy(), np.load(io.BytesIO(_saved(A))))
    assert np.array_equal(back.B.numpy(), B)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_big_endian_floats_decode_to_the_same_native_tensors(dtype: torch.dtype) -> None:
    """A big-endian host's arrays are the same numbers: converted, not refused."""
    f = random_factors(4, 5, 2, seed=3, dtype=dtype)
    record = factors_to_record({"m": f})
    for key, t in (("m.lora_A", f.A), ("m.lora_B", f.B)):
        swapped = t.numpy().astype(t.numpy().dtype.newbyteorder(">"))
        assert not swapped.dtype.isnative
        record[key] = Array(swapped)
    back = record_to_factors(record, "c", alpha=16.0)["m"]
    assert back.A.dtype == dtype and torch.equal(back.A, f.A) and torch.equal(back.B, f.B)
    back.A.add_(1.0)  # writable, and not a view of the record's bytes
    values = {"q": torch.arange(6, dtype=dtype)}
    big = values_to_record(values)
    big["q.values"] = Array(values["q"].numpy().astype(">f" + str(values["q"].element_size())))
    assert torch.equal(record_to_values(big, "c")["q"], values["q"])


def test_a_factor_without_its_pair_is_refused() -> None:
    record = factors_to_record({"m": random_factors(4, 5, 2, seed=0, dtype=torch.float32)})
    del record["m.lora_B"]
    with pytest.raises(InvalidUpdateError, match=r"module m: no m\.lora_B") as info:
        record_to_factors(record, "c", alpha=16.0)
    assert info.value.reason == "missing_module"


# -------------------------------------------------------------------------------- run config
def test_run_config_maps_onto_the_cli_dataclasses(tmp_path: Path) -> None:
    cfg = RunConfig()
    cfg.federation.rank_types = {"2": [2, 2], "2-8": [2, 8]}
    cfg.federation.client_types = ["2", "2-8"]
    cfg.lora.target_modules = ["q_proj"]
    cfg.train.lr = 1e-5
    cfg.data.split_ratios = (0.7, 0.2, 0.1)
    back, options = load_run_config(to_run_config(cfg))
    assert back == cfg
    assert options == FlowerOptions()

    file = tmp_path / "job.toml"
    file.write_text("[federation]\nrounds = 9\nseed = 5\n", encoding="utf-8")
    cfg2, options2 = load_run_config(
        {
            "config-file": str(file),
            "federation.seed": 11,  # a key beats the file
            "lora.target-modules": "['q_proj', 'v_proj']",
            "federation.rank_types": "{ 'a' = [1, 2] }",
            "flower.num-nodes": 3,
            "flower.resume": True,
        }
    )
    assert (cfg2.federation.rounds, cfg2.federation.seed) == (9, 11)
    assert cfg2.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg2.federation.rank_types == {"a": [1, 2]}
    assert (options2.num_nodes, options2.resume) == (3, True)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rounds": 2}, "neither"),
        ({"federation.roundz": 2}, "unknown config key federation.roundz"),
        ({"federation.rounds": "two"}, "federation.rounds: expected an integer"),
        ({"lora.target_modules": "['q_proj'"}, "not a valid TOML value"),
        ({"flower.num-nodez": 2}, "unknown config key flower.num-nodez"),
        ({"flower.wait-nodes": 0}, "flower.wait-nodes must be positive"),
    ],
)
def test_run_config_errors_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_run_config(values)


def test_example_app_declares_every_key_and_only_flwr_as_dependency() -> None:
    """Flower lets --run-config override only the keys the app declares: all of them."""
    project = load_toml(ROOT / "examples" / "flower-app" / "pyproject.toml")
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "flexlora.flower.server_app:app",
        "clientapp": "flexlora.flower.client_app:app",
    }
    generated = app_config_toml(RunConfig()).splitlines()
    missing = [x for x in generated if x.startswith('"') and x.split('"')[1] not in app["config"]]
    assert not missing, "add to [tool.flwr.app.config]:\n" + "\n".join(missing)
    stale = set(app["config"]) - {x.split('"')[1] for x in generated if x.startswith('"')}
    assert not stale, f"keys flexlora does not know: {sorted(stale)}"
    load_run_config(app["config"])  # every value parses
    assert [d.split(">")[0].split("[")[0] for d in project["project"]["dependencies"]] == ["flwr"]


# -------------------------------------------------------------------------------- strategy
@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, dict, NodeRuntime]:
    """The tiny 6-client job, its Flower run config and one node runtime (model + data)."""
    tmp = tmp_path_factory.mktemp("flower")
    cfg = toy_config(tmp / "out", write_tasks(tmp / "tasks.jsonl"))
    values = to_run_config(cfg)
    return cfg, values, NodeRuntime(cfg)


def _strategy(cfg: RunConfig, runtime: NodeRuntime) -> tuple[FlexLoRAStrategy, dict[int, dict]]:
    seen = list(runtime.data.seen)
    types = resolve_client_types(cfg, seen)
    coordinator = Coordinator(cfg, runtime.shapes, types)
    nodes = {100 + i: cid for i, cid in enumerate(seen)}
    return FlexLoRAStrategy(coordinator, nodes), {n: {"partition-id": n - 100} for n in nodes}


def test_each_node_gets_the_global_update_at_its_own_ranks(job) -> None:
    cfg, _values, runtime = job
    strategy, _ = _strategy(cfg, runtime)
    server = strategy.coordinator
    plan = strategy.plan(server.initial_state(), 1)
    assert plan.clients == server.sample(1)  # the simulator's seeded draw
    messages = list(strategy.messages(server.initial_state(), plan))
    assert len(messages) == cfg.federation.clients_per_round
    broadcast = 0
    for msg in messages:
        cid = plan.node_client[msg.metadata.dst_node_id]
        ranks = server.ranks_of(cid)
        arrays = msg.content.array_records["arrays"]
        for name, (m, n) in runtime.shapes.items():
            assert tuple(arrays[name + ".lora_A"].shape) == (ranks[name], n)
            assert tuple(arrays[name + ".lora_B"].shape) == (m, ranks[name])
        assert msg.content.config_records["config"]["rank-type"] == server.client_type[cid]
        assert plan.bytes_down[cid] == sum(
            f.num_bytes() for f in server.start_factors(server.initial_state(), cid, 1).values()
        )
        assert plan.wire_bytes_down[cid] == record_bytes(arrays)
        top = server.max_ranks()
        broadcast += sum(4 * top[k] * (m + n) for k, (m, n) in runtime.shapes.items())
    # mixed ranks: per-node messages carry less than one top-rank payload for everyone
    assert sum(plan.bytes_down.values()) < broadcast


def test_bad_replies_are_rejected_failures_recorded_and_the_rest_aggregated(
    job, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, values, runtime = job
    strategy, node_configs = _strategy(cfg, runtime)
    server = strategy.coordinator
    state = server.initial_state()
    plan = strategy.plan(state, 1)
    messages = list(strategy.messages(state, plan))
    nodes = [m.metadata.dst_node_id for m in messages]
    bad, dropped, broken = nodes[0], nodes[1], nodes[2]
    module = next(iter(runtime.shapes))

    def tamper(node: int, reply: Message) -> Message:
        if node == bad:  # a rank-1 A where the client's rank is higher
            arrays = reply.content.array_records["arrays"]
            arrays[module + ".lora_A"] = Array(np.zeros((1, 3), dtype=np.float32))
        return reply

    node_configs[broken]["partition-id"] = 99  # this node cannot find its client
    grid = LocalGrid(make_client_app(values), node_configs, drop=[dropped], tamper=tamper)
    caplog.set_level(logging.WARNING, logger="flexlora")
    new_state, row = strategy.collect(state, plan, grid.send_and_receive(messages))
    cid = plan.node_client
    assert set(row["rejected"]) == {cid[bad]}
    assert module in row["rejected"][cid[bad]]
    assert set(row["failed"]) == {cid[dropped], cid[broken]}
    assert "partition-id=99" in row["failed"][cid[broken]]
    assert row["aggregated"] == [cid[n] for n in nodes[3:]]
    assert new_state is not state
    assert f"update of client {cid[bad]} rejected" in caplog.text
    assert set(row["bytes_up_per_client"]) == {cid[bad], *row["aggregated"]} - {cid[bad]}


def first_round_replies(cfg, values, runtime):  # type: ignore[no-untyped-def]
    """Round 1 planned and answered by every node of a LocalGrid: the strategy, the start
    state, the plan, the replies and the client of each reply, in the replies' order."""
    strategy, node_configs = _strategy(cfg, runtime)
    state = strategy.coordinator.initial_state()
    plan = strategy.plan(state, 1)
    replies = LocalGrid(make_client_app(values), node_configs).send_and_receive(
        list(strategy.messages(state, plan))
    )
    cid = [plan.node_client[r.metadata.src_node_id] for r in replies]
    return strategy, state, plan, replies, cid


def test_replies_with_unreadable_arrays_are_rejected_and_the_round_goes_on(
    job, caplog: pytest.LogCaptureFixture
) -> None:
    """One node sends an array no tensor comes from (each kind in turn), another a
    big-endian one: the first is rejected by client and module, the round aggregates the
    others, the big-endian reply exactly as its native twin."""
    cfg, values, runtime = job
    strategy, state, plan, replies, cid = first_round_replies(cfg, values, runtime)
    module = next(iter(runtime.shapes))
    bad_arrays = replies[0].content.array_records["arrays"]
    big_arrays = replies[1].content.array_records["arrays"]
    bad_arrays[module + ".lora_B"] = Array(np.zeros((2, 2), dtype=np.int8))
    want, want_row = strategy.collect(state, plan, replies)  # reference: node 1 native
    assert want_row["aggregated"] == cid[1:]
    for key in list(big_arrays):
        native = big_arrays[key].numpy()
        big_arrays[key] = Array(native.astype(native.dtype.newbyteorder(">")))
    caplog.set_level(logging.WARNING, logger="flexlora")
    kinds = {
        "longdouble": np.zeros((2, 2), dtype=np.longdouble),
        "complex": np.zeros((2, 2), dtype=np.complex128),
        "int": np.zeros((2, 2), dtype=np.int64),
    }
    for kind, arr in [*kinds.items(), ("object", None)]:
        payload = _npy(np.array([object()]), allow_pickle=True) if arr is None else Array(arr)
        bad_arrays[module + ".lora_B"] = payload
        new_state, row = strategy.collect(state, plan, replies)
        assert set(row["rejected"]) == {cid[0]}, kind
        message = row["rejected"][cid[0]]
        assert f"client {cid[0]}, module {module}: {module}.lora_B" in message, kind
        assert message.endswith("[type]" if arr is None else "[dtype]"), kind
        if arr is not None:
            assert arr.dtype.str in message, kind
        assert row["aggregated"] == cid[1:], kind
        for name in want.names():
            assert torch.equal(new_state[name].dense(), want[name].dense()), (kind, name)
    assert f"update of client {cid[0]} rejected" in caplog.text


def test_a_reply_the_decoder_chokes_on_is_rejected_not_the_round(
    job, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever a decoder misses (here: a TypeError it should never raise) rejects that
    reply as ``type``, with its traceback logged; the round aggregates the others."""
    from flexlora.flower import strategy as strategy_mod

    cfg, values, runtime = job
    strategy, state, plan, replies, cid = first_round_replies(cfg, values, runtime)
    decode = strategy_mod.decode_reply

    def choking(content, client, alpha, use_rslora):  # type: ignore[no-untyped-def]
        if client == cid[0]:
            raise TypeError("can't convert np.ndarray of type numpy.weird")
        return decode(content, client, alpha, use_rslora)

    monkeypatch.setattr(strategy_mod, "decode_reply", choking)
    caplog.set_level(logging.WARNING, logger="flexlora")
    _, row = strategy.collect(state, plan, replies)
    assert set(row["rejected"]) == {cid[0]}
    assert row["rejected"][cid[0]] == (
        f"client {cid[0]}: the reply cannot be decoded: TypeError: can't convert np.ndarray "
        "of type numpy.weird [type]"
    )
    assert row["aggregated"] == cid[1:]
    assert "Traceback" in caplog.text


def test_a_grid_error_mid_round_leaves_no_spilled_update(
    job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grid fails after two replies were folded (and spilled): collect raises, and the
    spilled updates are deleted with the round, not left for good."""
    cfg, values, runtime = job
    strategy, node_configs = _strategy(cfg, runtime)
    monkeypatch.setattr(replies_mod, "REPLY_MEMORY_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a Coordinator spills
    state = strategy.coordinator.initial_state()
    plan = strategy.plan(state, 1)
    replies = LocalGrid(make_client_app(values), node_configs).send_and_receive(
        list(strategy.messages(state, plan))
    )
    spilled: list[Path] = []

    def pulled() -> Iterator[Message]:
        yield from replies[:2]
        spilled.extend(tmp_path.glob("flexlora-replies-*/*.safetensors"))
        raise ConnectionError("the grid went away")

    with pytest.raises(ConnectionError, match="the grid went away"):
        strategy.collect(state, plan, pulled())
    assert len(spilled) == 2
    assert not list(tmp_path.glob("flexlora-replies-*"))


def test_the_stock_strategy_loop_reaches_the_simulators_global_update(job, tmp_path: Path) -> None:
    """Flower's own Strategy.start with FlexLoRAStrategy == the in-process simulator."""
    cfg, values, runtime = job
    small = {"eval": {"at_start": False, "unseen": False}, "federation": {"clients_per_round": 2}}
    server_cfg = toy_config(tmp_path / "sim", Path(cfg.data.path), **small)
    FederatedRun(server_cfg).run()
    expected = load_checkpoint(tmp_path / "sim" / "checkpoint").global_update
    strategy, node_configs = _strategy(server_cfg, runtime)
    # the nodes keep the job's config: what differs is the server's business
    grid = LocalGrid(make_client_app(values), node_configs)
    result = strategy.start(
        grid, state_to_record(strategy.coordinator.initial_state()), num_rounds=2
    )
    got = record_to_state(result.arrays, "flexlora")
    assert expected is not None and got.names() == expected.names()
    for name in got.names():
        torch.testing.assert_close(got[name].dense(), expected[name].dense(), rtol=1e-5, atol=1e-7)
    assert result.train_metrics_clientapp[2]["bytes_up"] > 0


class CrashingGrid(LocalGrid):
    """A LocalGrid whose ServerApp dies while sending the ``crash_at``-th round."""

    def __init__(self, *args, crash_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds_left = crash_at

    def push_messages(self, messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.rounds_left -= 1
            if self.rounds_left == 0:
                raise KeyboardInterrupt("the ServerApp process is killed")
        return super().push_messages(messages)


def test_a_killed_server_app_resumes_from_its_checkpoint_like_an_uninterrupted_run(
    job, tmp_path: Path
) -> None:
    cfg, values, runtime = job
    nodes = {100 + i: {"partition-id": i} for i in range(len(runtime.data.seen))}
    small = {"eval": {"at_start": False, "unseen": False}, "federation": {"clients_per_round": 2}}

    def flower_run(out: str, grid: LocalGrid, resume: bool) -> FlowerRun:
        run_cfg = toy_config(tmp_path / out, Path(cfg.data.path), **small)
        run = FlowerRun(run_cfg, grid, FlowerOptions(resume=resume))
        run.run(resume=resume)
        return run

    flower_run("whole", LocalGrid(make_client_app(values), nodes), resume=False)
    with pytest.raises(KeyboardInterrupt):
        flower_run("killed", CrashingGrid(make_client_app(values), nodes, crash_at=2), False)
    assert [r["round"] for r in read_rows(tmp_path / "killed")] == [1]
    flower_run("killed", LocalGrid(make_client_app(values), nodes), resume=True)
    assert_rows_match(
        strip_timings(read_rows(tmp_path / "killed")), strip_timings(read_rows(tmp_path / "whole"))
    )
    assert_same_outputs(tmp_path / "killed", tmp_path / "whole")


#: SLoRA with a stage-1 density per rank type (nested masks, a union sent to every node)
TYPED_DENSITY = {"2": 0.02, "4": 0.05, "2-8": 0.1, "8": 0.2}


@pytest.mark.parametrize(
    ("strategy", "density"),
    [
        ("flora", None),
        ("fedit-min", None),
        ("hetlora", None),
        ("ffa", None),
        ("fedex", None),
        ("fedsa", None),
        ("fedavg+flexlora", None),
        ("slora+flexlora", None),
        ("slora+flexlora", TYPED_DENSITY),
    ],
    ids=lambda v: "per-type" if isinstance(v, dict) else ("" if v is None else v),
)
def test_every_strategy_trains_on_flower_as_in_the_simulator(
    job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str, density: dict | None
) -> None:
    """FLoRA (its nodes merge the global ΔW), FedIT held to one rank, HetLoRA, FFA-LoRA,
    FedEx-LoRA (its nodes hold the residual in their frozen weights), FedSA-LoRA (its nodes
    keep their own B on disk and score their seen clients with it, as the simulator does in
    process), FedAvg + FlexLoRA (its nodes train with SGD) and SLoRA + FlexLoRA (a sparse
    first round, one density or one per rank type, then mixed-rank LoRA from its SVD)."""
    cfg, _values, runtime = job
    fed: dict[str, object] = {"clients_per_round": 2, "strategy": strategy}
    if density is not None:
        fed.update(slora_density=density, clients_per_round=4)  # mixed types in round 1
    small = {
        "eval": {"at_start": False, "unseen": False, "seen": strategy == "fedsa"},
        "federation": fed,
        "output": {"save_adapters": False},
    }
    seen_models: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    real_evaluate = ClientWorker.evaluate

    def evaluate(worker, factors, sets, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Record the model each seen client is scored with, wherever it is scored."""
        if "seen" in sets:
            for _ in sets["seen"]:
                seen_models.append({m: (f.A.clone(), f.B.clone()) for m, f in factors.items()})
        return real_evaluate(worker, factors, sets, *args, **kwargs)

    monkeypatch.setattr(ClientWorker, "evaluate", evaluate)
    sim_cfg = toy_config(tmp_path / "sim", Path(cfg.data.path), **small)
    FederatedRun(sim_cfg).run()
    sim_models, seen_models[:] = list(seen_models), []
    flower_cfg = toy_config(tmp_path / "flower", Path(cfg.data.path), **small)
    nodes = {100 + i: {"partition-id": i} for i in range(len(runtime.data.seen))}
    node_values = to_run_config(flower_cfg)  # the nodes need the strategy (FLoRA's base)
    FlowerRun(flower_cfg, LocalGrid(make_client_app(node_values), nodes)).run()
    sim_rows = strip_timings(read_rows(tmp_path / "sim"))
    assert_rows_match(strip_timings(read_rows(tmp_path / "flower")), sim_rows)
    if strategy == "fedsa":  # each seen client scored with the same model: its own B and Ā
        assert all("rouge_l_seen" in r for r in sim_rows)
        assert len(seen_models) == len(sim_models) > 0
        for got, want in zip(seen_models, sim_models, strict=True):
            assert got.keys() == want.keys()
            for m, (A, B) in want.items():
                assert torch.equal(got[m][0], A) and torch.equal(got[m][1], B), m
    assert all(r["aggregated"] for r in sim_rows)
    if density is not None:  # some node sent only its own type's share of the union mask
        first = sim_rows[0]
        assert first["stage"] == "sparse"
        assert first["bytes_up"] < 4 * first["sparse_nnz"] * len(first["aggregated"])
    got = load_checkpoint(tmp_path / "flower" / "checkpoint").global_update
    want = load_checkpoint(tmp_path / "sim" / "checkpoint").global_update
    assert got is not None and want is not None
    for name in want.names():
        torch.testing.assert_close(got.delta(name), want.delta(name), rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------- nodes
def test_a_node_is_its_partition_or_client_id_with_its_declared_rank_type(job) -> None:
    cfg, _values, runtime = job
    seen = runtime.data.seen
    assert runtime.client_of({"partition-id": 2}) == seen[2]
    assert runtime.client_of({"client-id": seen[4], "partition-id": 0}) == seen[4]
    drawn = resolve_client_types(cfg, list(seen))
    assert runtime.rank_type_of(seen[1], {}) == drawn[seen[1]]
    assert runtime.rank_type_of(seen[1], {"rank-type": 8}) == "8"
    for bad, message in (
        ({}, "partition-id or client-id"),
        ({"partition-id": len(seen)}, f"has {len(seen)} seen clients"),
        ({"client-id": "nope"}, "'nope' is not a seen client"),
    ):
        with pytest.raises(UsageError, match=message):
            runtime.client_of(bad)
    with pytest.raises(UsageError, match="rank-type='3' is not one of"):
        runtime.rank_type_of(seen[0], {"rank-type": "3"})


def test_a_node_refuses_starting_factors_that_do_not_fit_its_slot(job) -> None:
    *_, runtime = job
    ranks = runtime.slot_ranks["2-8"]
    start = {
        name: random_factors(m, n, ranks[name], seed=i, dtype=torch.float32)
        for i, (name, (m, n)) in enumerate(runtime.shapes.items())
    }
    runtime.check_start(start, ranks, "c0")  # fits
    name = next(iter(start))
    for bad, says in (
        ({**start, name: random_factors(*runtime.shapes[name], ranks[name] + 1, seed=9)}, "rank"),
        ({k: v for k, v in start.items() if k != name}, "the server sent no factors"),
    ):
        # the node's client is named (it was "client server"), and what the server sent
        with pytest.raises(InvalidUpdateError, match=f"client c0, module {name}: .*{says}"):
            runtime.check_start(bad, ranks, "c0")


def test_fedsa_evaluation_messages_and_replies(job) -> None:
    """One EVALUATE message per seen client with a node, carrying the global factors; a
    reply's score is read, and a node that errs, answers nonsense or stays silent is named."""
    cfg, _values, runtime = job
    strategy, _ = _strategy(cfg, runtime)
    seen = list(runtime.data.seen)[:4]
    factors = {
        name: random_factors(m, n, 2, seed=i, dtype=torch.float32)
        for i, (name, (m, n)) in enumerate(runtime.shapes.items())
    }
    messages, node_client = strategy.plan_evaluate(factors, [*seen, "no-node"], 3)
    assert node_client == {strategy.node_of[c]: c for c in seen}  # "no-node" has none
    assert [m.metadata.message_type for m in messages] == ["evaluate"] * 4
    config = messages[0].content.config_records["config"]
    assert (config["client-id"], config["server-round"]) == (seen[0], 3)
    sent = record_to_factors(messages[0].content.array_records["arrays"], "server", 16.0)
    assert all(
        torch.equal(sent[m].B, f.B) and torch.equal(sent[m].A, f.A) for m, f in factors.items()
    )

    def reply(msg: Message, score: object) -> Message:
        metrics = MetricRecord({"rouge-l": score, "num-examples": 2})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    replies = [
        reply(messages[0], 0.5),
        Message(Error(code=0, reason="out of memory"), reply_to=messages[1]),
        reply(messages[2], 7.0),
    ]  # the fourth node never answers
    scored, failed = strategy.collect_evaluate(3, node_client, replies)
    assert scored == {seen[0]: (0.5, 2)}
    assert failed[seen[1]] == "out of memory" and "rouge-l is 7.0" in failed[seen[2]]
    assert failed[seen[3]] == NO_REPLY and len(failed) == 3
    # a node scores only its own client, and only for a strategy that keeps a B per client
    with pytest.raises(UsageError, match="but this node trains"):
        runtime.evaluate(messages[0].content, seen[1])
    with pytest.raises(UsageError, match="keeps no per-client B"):
        runtime.evaluate(messages[0].content, seen[0])


def test_discovery_refuses_two_nodes_that_train_one_client(job) -> None:
    _cfg, values, runtime = job
    seen = runtime.data.seen
    configs = {1: {"partition-id": 0, "rank-type": "8"}, 2: {"partition-id": 1}}
    nodes = discover_nodes(
        LocalGrid(make_client_app(values), configs), FlowerOptions(num_nodes=2), seen, 10.0
    )
    assert [(n.node_id, n.client, n.rank_type) for n in nodes] == [
        (1, seen[0], "8"),
        (2, seen[1], resolve_client_types(_cfg, list(seen))[seen[1]]),
    ]
    configs[2] = {"client-id": seen[0]}
    with pytest.raises(UsageError, match=f"nodes 1 and 2 both train client '{seen[0]}'"):
        discover_nodes(
            LocalGrid(make_client_app(values), configs), FlowerOptions(num_nodes=2), seen, 10.0
        )
    with pytest.raises(UsageError, match="only 2 of 3 SuperNodes connected"):
        discover_nodes(
            LocalGrid(make_client_app(values), configs),
            FlowerOptions(num_nodes=3, wait_nodes=0.3),
            seen,
            10.0,
        )


def test_flwr_is_imported_only_by_flexlora_flower() -> None:
    src = ROOT / "src" / "flexlora"
    importers = {
        p.relative_to(src).parts[0]
        for p in src.rglob("*.py")
        if "import flwr" in (text := p.read_text(encoding="utf-8")) or "from flwr" in text
    }
    assert importers == {"flower"}
    assert "flwr" in sys.modules  # this test module did import it (sanity)


def test_hetlora_self_pruning_on_flower_equals_the_simulator(job, tmp_path: Path) -> None:
    """Nodes keep their pruned ranks in their own store and cut the server's factors to them."""
    cfg, _values, runtime = job
    small = {
        "eval": {"at_start": False, "unseen": False},
        # FedAvg's local SGD: the penalty shrinks the tails steadily (AdamW's steps are ~lr)
        "federation": {"clients_per_round": 3, "strategy": "fedavg+hetlora", "rounds": 3},
        "hetlora": {"self_pruning": True, "reg_weight": 5.0, "gamma": 0.5},
        "train": {"lr": 0.1},
    }
    FederatedRun(toy_config(tmp_path / "sim", Path(cfg.data.path), **small)).run()
    flower_cfg = toy_config(tmp_path / "flower", Path(cfg.data.path), **small)
    nodes = {100 + i: {"partition-id": i} for i in range(len(runtime.data.seen))}
    node_values = to_run_config(flower_cfg)
    FlowerRun(flower_cfg, LocalGrid(make_client_app(node_values), nodes)).run()
    sim_rows = strip_timings(read_rows(tmp_path / "sim"))
    assert any(r["client_ranks"] for r in sim_rows[1:])  # someone pruned, and trained again
    assert_rows_match(strip_timings(read_rows(tmp_path / "flower")), sim_rows)
    assert_same_outputs(tmp_path / "flower", tmp_path / "sim")


def test_negative_tokens_or_seconds_are_rejected_and_a_silent_failure_is_named(job) -> None:
    """Tokens and seconds sum into the row and seconds decide the straggler rule: a node that
    reports them negative is rejected by name; a failure record with an empty reason reads as
    one (it went into the row as '')."""
    from flwr.app import ConfigRecord

    cfg, values, runtime = job
    strategy, state, plan, replies, cid = first_round_replies(cfg, values, runtime)
    replies[0].content.metric_records["metrics"]["tokens"] = -1000
    replies[1].content.metric_records["metrics"]["seconds"] = -5.0
    replies[2].content.config_records["failure"] = ConfigRecord({"reason": ""})
    _, row = strategy.collect(state, plan, replies)
    assert set(row["rejected"]) == {cid[0], cid[1]}
    assert "tokens is negative" in row["rejected"][cid[0]]
    assert "seconds is negative" in row["rejected"][cid[1]]
    assert row["failed"] == {cid[2]: "the node reported a failure, no reason given"}
    assert row["aggregated"] == cid[3:] and row["train_tokens"] >= 0
