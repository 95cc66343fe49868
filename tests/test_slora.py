"""SLoRA: masks, the sparse stage against a dense reference, the SVD initialisation, messages,
and composed strategy names (METHOD+AGGREGATION) against their parts run by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from flexlora.aggregation import FlexLoRA
from flexlora.config import PAPER_SLORA_DENSITIES, FederationConfig
from flexlora.errors import UsageError
from flexlora.methods.compose import local_optimizer, parse_strategy
from flexlora.methods.slora import (
    SparseAverage,
    SparseDelta,
    SparseMask,
    SparseState,
    SparseUpdate,
    make_masks,
    mask_nnz,
    sub_masks,
    sub_positions,
    svd_init,
    validate_sparse,
)
from flexlora.server import Coordinator, resolve_client_types
from flexlora.simulation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from flexlora.simulation.runner import FederatedRun
from flexlora.training.client import collate, example_order
from flexlora.training.model import build_tiny_llama
from flexlora.training.sparse import sparse_linear
from flexlora.training.worker import ClientWorker
from flexlora.types import ClientUpdate
from tests.sim_helpers import make_dataset, tiny_config

SHAPES = {"q": (12, 10), "v": (6, 10), "up": (20, 6)}


def _updates(masks, n_clients: int = 4, seed: int = 0) -> list[SparseUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [
        SparseUpdate(
            f"c{i}",
            int(torch.randint(1, 50, (1,), generator=g)),
            {name: torch.randn(k.nnz, generator=g) for name, k in masks.items()},
        )
        for i in range(n_clients)
    ]


def _slow_average(
    name: str,
    replies: list[tuple[SparseUpdate, dict[str, SparseMask]]],
    shape: tuple[int, int],
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """The example-weighted average of the clients' dense (m, n) models, entry by entry: each
    is ``start`` (zeros) with the client's values put in at its own mask's entries."""
    m, n = shape
    total = sum(u.num_examples for u, _ in replies)
    want = torch.zeros(m, n, dtype=torch.float64)
    for u, masks in replies:
        model = torch.zeros(m, n, dtype=torch.float64) if start is None else start.clone()
        for k, flat in enumerate(masks[name].index.tolist()):
            model[flat // n, flat % n] = float(u.values[name][k])
        want += (u.num_examples / total) * model
    return want


# ------------------------------------------------------------------------- masks
def test_masks_are_fixed_by_the_seed_distinct_sorted_and_of_the_asked_density() -> None:
    masks = make_masks(SHAPES, 0.1, seed=3)
    again = make_masks(SHAPES, 0.1, seed=3)
    other = make_masks(SHAPES, 0.1, seed=4)
    for name, (m, n) in SHAPES.items():
        idx = masks[name].index
        assert idx.numel() == round(0.1 * m * n)
        assert torch.equal(idx, torch.unique(idx))  # sorted and distinct
        assert int(idx.min()) >= 0 and int(idx.max()) < m * n
        assert torch.equal(idx, again[name].index)
    assert any(not torch.equal(masks[k].index, other[k].index) for k in SHAPES)
    full = make_masks(SHAPES, 1.0, seed=3)
    assert all(full[k].nnz == m * n for k, (m, n) in SHAPES.items())
    with pytest.raises(UsageError, match="slora_density"):
        make_masks(SHAPES, 0.0, seed=3)


# ------------------------------------------------------------------------- the sparse stage
def test_sparse_average_equals_the_masked_dense_average_computed_the_slow_way() -> None:
    masks = make_masks(SHAPES, 0.2, seed=1)
    updates = _updates(masks)
    acc = SparseAverage(masks)
    for u in updates:
        acc.add(u)
    got = acc.result()
    for name, (m, n) in SHAPES.items():
        want = _slow_average(name, [(u, masks) for u in updates], (m, n))
        torch.testing.assert_close(got[name].dense(), want, rtol=1e-6, atol=1e-7)
        outside = torch.ones(m * n, dtype=torch.bool)
        outside[masks[name].index] = False
        assert not got[name].dense().flatten()[outside].any()
    # streaming: starting again forgets what was added
    acc.start()
    acc.add(updates[0])
    torch.testing.assert_close(acc.result()["q"].values, updates[0].values["q"])


def test_sparse_linear_and_its_gradient_equal_the_dense_product() -> None:
    mask = make_masks({"w": (7, 5)}, 0.4, seed=0)["w"]
    v = torch.randn(mask.nnz, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    y = sparse_linear(x, mask, v)  # (3, 4, 7)
    (y**2).sum().backward()
    got = v.grad.clone()
    v.grad = None
    dense = torch.zeros(35, dtype=torch.float64).index_put((mask.index,), v).view(7, 5)
    y_ref = x @ dense.T
    (y_ref**2).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(got, v.grad)


def test_bad_sparse_replies_are_rejected_by_name_and_the_rest_kept() -> None:
    masks = make_masks(SHAPES, 0.2, seed=1)
    good = _updates(masks, 2)
    short = SparseUpdate("c2", 5, {**good[0].values, "q": good[0].values["q"][:-1]})
    nan = SparseUpdate("c3", 5, {**good[0].values, "v": torch.full_like(good[0].values["v"], 1)})
    nan.values["v"][0] = float("nan")
    stranger = SparseUpdate("zz", 5, dict(good[0].values))
    extra = SparseUpdate("c4", 5, {**good[0].values, "k": torch.zeros(3)})
    valid, rejected = validate_sparse(
        [*good, short, nan, stranger, extra, "junk"], masks, ["c0", "c1", "c2", "c3", "c4"]
    )
    assert [u.client_id for u in valid] == ["c0", "c1"]
    assert "shape" in rejected["c2"] and "module q" in rejected["c2"]
    assert "nonfinite" in rejected["c3"]
    assert "unknown_client" in rejected["zz"]
    assert "extra_module" in rejected["c4"]
    assert any("type" in r for k, r in rejected.items() if k.startswith("#"))


# ------------------------------------------------------------------------- messages
def test_sparse_state_round_trips_exactly_through_safetensors(tmp_path: Path) -> None:
    masks = make_masks(SHAPES, 0.3, seed=2)
    acc = SparseAverage(masks)
    for u in _updates(masks):
        acc.add(u)
    state = acc.result("slora+flexlora")
    tensors, meta = state.to_tensors()
    save_file(tensors, tmp_path / "s.safetensors", metadata=meta)
    back = SparseState.from_tensors(load_file(tmp_path / "s.safetensors"), meta)
    assert back.names() == state.names() and back.strategy == "slora+flexlora"
    for name in SHAPES:
        assert torch.equal(back[name].values, state[name].values)
        assert torch.equal(back[name].mask.index, state[name].mask.index)
    # the message is the values only: 4 bytes per masked entry
    assert state.num_bytes() == 4 * sum(k.nnz for k in masks.values())
    # a checkpoint of the sparse stage loads back the same state
    save_checkpoint(tmp_path / "ck", Checkpoint(1, state, [], {}, {"a": 1}))
    loaded = load_checkpoint(tmp_path / "ck", SHAPES).global_update
    assert isinstance(loaded, SparseState)
    assert all(torch.equal(loaded[n].values, state[n].values) for n in SHAPES)


# ------------------------------------------------------------------------- SVD initialisation
def test_each_client_starts_from_the_truncated_svd_of_the_sparse_update_at_its_rank() -> None:
    cfg = tiny_config(
        "/tmp/unused",
        federation={"strategy": "slora+flexlora", "slora_density": 0.3},
    )
    shapes = {"q": (16, 12), "up": (24, 12)}
    clients = [f"task{i:03d}" for i in range(6)]
    server = Coordinator(cfg, shapes, resolve_client_types(cfg, clients))
    state = server.initial_state()
    assert isinstance(state, SparseState) and server.sparse_round(1)
    acc = SparseAverage(server.masks)
    for u in _updates(server.masks, 3):
        acc.add(u)
    sparse = acc.result()
    lora = server.round_state(sparse, 2)
    assert not server.sparse_round(2)
    for cid in clients:
        start = server.start_factors(lora, cid, 2)
        for name, f in start.items():
            r = server.ranks_of(cid)[name]
            U, S, Vh = torch.linalg.svd(sparse[name].dense(), full_matrices=False)
            want = (U[:, :r] * S[:r]) @ Vh[:r]  # best rank-r approximation
            torch.testing.assert_close(f.delta(torch.float64), want, rtol=1e-5, atol=1e-6)
            err = torch.linalg.norm(f.delta(torch.float64) - sparse[name].dense())
            torch.testing.assert_close(err**2, (S[r:] ** 2).sum(), rtol=1e-4, atol=1e-8)
    # svd_init by itself keeps the largest rank's triplets, in descending order
    init = svd_init(sparse, {"q": 8, "up": 30})
    assert init["q"].rank == 8 and init["up"].rank == 12  # capped at min(m, n)
    assert bool((init["q"].S[:-1] >= init["q"].S[1:]).all())


# ------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("name", "aggregator", "hold", "method", "canonical"),
    [
        ("flexlora", "flexlora", None, "fedit", "fedit+flexlora"),
        ("fedit+flexlora", "flexlora", None, "fedit", "fedit+flexlora"),
        ("fedavg+flexlora", "flexlora", None, "fedavg", "fedavg+flexlora"),
        ("fedit-min", "fedit", "min", "fedit", "fedit+homogeneous"),
        ("fedavg+homogeneous", "fedit", "min", "fedavg", "fedavg+homogeneous"),
        ("fedavg-min", "fedit", "min", "fedavg", "fedavg+homogeneous"),
        ("fedit-max", "fedit", "max", "fedit", "fedit+homogeneous-max"),
        ("hetlora", "hetlora", None, "fedit", "fedit+hetlora"),
        ("fedavg+hetlora", "hetlora", None, "fedavg", "fedavg+hetlora"),
        ("slora", "fedit", "min", "slora", "slora+homogeneous"),
        ("slora+hetlora", "hetlora", None, "slora", "slora+hetlora"),
        ("fedit", "fedit", None, "fedit", "fedit"),
        ("fedavg", "fedit", None, "fedavg", "fedavg"),
        ("flora", "flora", None, "lora", "flora"),
    ],
)
def test_strategy_names_compose_a_method_and_an_aggregation(
    name: str, aggregator: str, hold: str | None, method: str, canonical: str
) -> None:
    plan = parse_strategy(name)
    assert (plan.aggregator, plan.hold_to, plan.method, plan.canonical) == (
        aggregator,
        hold,
        method,
        canonical,
    )


@pytest.mark.parametrize("name", ["slora+flora", "fedprox+flexlora", "slora+"])
def test_unknown_compositions_are_usage_errors(name: str) -> None:
    with pytest.raises(UsageError, match="METHOD\\+AGGREGATION"):
        parse_strategy(name)


def _sim(tmp_path: Path, name: str, strategy: str, rounds: int = 2) -> FederatedRun:
    cfg = tiny_config(
        str(tmp_path / name),
        federation={"strategy": strategy, "rounds": rounds, "slora_density": 0.05},
        eval={"at_start": False, "unseen": False},
        output={"save_adapters": False, "checkpoint": False},
    )
    return FederatedRun(cfg, dataset=make_dataset(), model_and_tokenizer=build_tiny_llama(seed=0))


def test_slora_flexlora_equals_its_sparse_stage_and_flexlora_run_by_hand(tmp_path: Path) -> None:
    sim = _sim(tmp_path, "sim", "slora+flexlora")
    server = sim.server
    s1, row1 = sim.run_round(server.initial_state(), 1, False)
    s2, row2 = sim.run_round(s1, 2, False)
    assert row1["stage"] == "sparse" and "stage" not in row2
    assert row1["bytes_up"] == 4 * row1["sparse_nnz"] * len(row1["aggregated"])
    assert row1["bytes_down"] == 4 * row1["sparse_nnz"] * len(row1["clients"])
    assert len({server.client_type[c] for c in row2["aggregated"]}) > 1  # mixed ranks

    # by hand: the method's two stages with a fresh model, then FlexLoRA's aggregation
    data = make_dataset()
    model, tok = build_tiny_llama(seed=0)
    worker = ClientWorker(model, tok, sim.cfg.lora, server.slot_ranks, sim.cfg.train)
    zero = {n: torch.zeros(k.nnz) for n, k in server.masks.items()}
    acc = SparseAverage(server.masks)
    for cid in server.sample(1):
        update, _ = worker.train_sparse(
            cid, server.masks, zero, data.train(cid), seed=server.client_seed(1, cid)
        )
        acc.add(update)
    by_hand_sparse = acc.result()
    for name in server.shapes:
        assert torch.equal(by_hand_sparse[name].values, s1[name].values)
    init = svd_init(by_hand_sparse, server.max_ranks())
    updates = []
    for cid in server.sample(2):
        ranks = server.ranks_of(cid)
        start = init.factors(ranks, sim.cfg.lora.alpha, dtype=torch.float32)
        update, _ = worker.train(
            cid, server.client_type[cid], start, data.train(cid), seed=server.client_seed(2, cid)
        )
        updates.append(update)
    by_hand = FlexLoRA(keep_rank=server.max_ranks()).aggregate(updates)  # keep_rank = "max"
    for name in server.shapes:
        torch.testing.assert_close(s2[name].dense(), by_hand[name].dense(), rtol=0, atol=1e-7)


def test_a_whole_slora_run_evaluates_its_sparse_stage_and_writes_adapters(tmp_path: Path) -> None:
    cfg = tiny_config(
        str(tmp_path / "whole"), federation={"strategy": "slora+hetlora", "slora_density": 0.05}
    )
    sim = FederatedRun(cfg, dataset=make_dataset(), model_and_tokenizer=build_tiny_llama(seed=0))
    rows = sim.run()
    assert [r.get("stage") for r in rows] == [None, "sparse", None]
    assert all("rouge_l_unseen" in r for r in rows)
    assert (tmp_path / "whole" / "adapters" / "rank-8" / "adapter_model.safetensors").is_file()


def test_aliases_run_the_same_computation(tmp_path: Path) -> None:
    """flexlora and fedit+flexlora, fedavg-min and fedavg+homogeneous: one global update."""
    for a, b in (("fedit+flexlora", "flexlora"), ("fedavg+homogeneous", "fedavg-min")):
        runs = [_sim(tmp_path, f"{a}-{b}-{i}", s, rounds=1) for i, s in enumerate((a, b))]
        states = [r.run_round(r.server.initial_state(), 1, False)[0] for r in runs]
        for name in states[0].names():
            assert torch.equal(states[0][name].dense(), states[1][name].dense())


def _one_step(tmp_path: Path, strategy: str) -> FederatedRun:
    """One round of 4 clients, each one step over all 8 of its examples, no clipping."""
    cfg = tiny_config(
        str(tmp_path / strategy),
        federation={"strategy": strategy, "rounds": 1},
        train={"local_steps": 1, "batch_size": 8, "max_grad_norm": 0.0},
        eval={"at_start": False, "unseen": False},
        output={"save_adapters": False, "checkpoint": False},
    )
    return FederatedRun(cfg, dataset=make_dataset(), model_and_tokenizer=build_tiny_llama(seed=0))


def test_fedavg_clients_take_plain_sgd_steps_and_differ_from_fedit(tmp_path: Path) -> None:
    """fedavg+flexlora = each client's W - lr·grad by hand, then FlexLoRA; fedit+flexlora
    (AdamW) gives another global update."""
    sim = _one_step(tmp_path, "fedavg+flexlora")
    server = sim.server
    assert sim.worker.train_cfg.optimizer == "sgd" and server.optimizer == "sgd"
    state0 = server.initial_state()
    s1, row = sim.run_round(state0, 1, False)
    assert len(row["aggregated"]) == 4

    data = make_dataset()
    model, tok = build_tiny_llama(seed=0)
    hand = ClientWorker(model, tok, sim.cfg.lora, server.slot_ranks, sim.cfg.train)
    lr = sim.cfg.train.lr
    updates = []
    for cid in server.sample(1):
        slot = server.client_type[cid]
        examples = [hand.encode(e) for e in data.train(cid)]
        order = example_order(len(examples), len(examples), server.client_seed(1, cid))
        batch = collate([examples[i] for i in order], hand.pad_id)
        hand.host.load(slot, server.start_factors(state0, cid, 1))
        params = hand.host.activate(slot)
        grads = torch.autograd.grad(model(**batch, use_cache=False).loss, params)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                param -= lr * grad  # W - lr * grad
        for param in params:
            param.requires_grad_(False)
        updates.append(ClientUpdate(cid, len(examples), hand.host.read(slot)))
    by_hand = FlexLoRA(keep_rank=server.max_ranks()).aggregate(updates)
    for name in server.shapes:
        torch.testing.assert_close(s1[name].dense(), by_hand[name].dense(), rtol=1e-5, atol=1e-8)

    fedit = _one_step(tmp_path, "fedit+flexlora")
    assert fedit.worker.train_cfg.optimizer == "adamw"
    t1, _ = fedit.run_round(fedit.server.initial_state(), 1, False)
    for name in server.shapes:
        gap = (t1[name].dense() - s1[name].dense()).abs().max()
        assert gap > 1e-3 * s1[name].dense().abs().max()


@pytest.mark.parametrize(
    ("strategy", "optimizer", "used"),
    [
        ("fedavg+flexlora", "auto", "sgd"),
        ("fedavg", "auto", "sgd"),
        ("fedavg-min", "sgd", "sgd"),
        ("fedit+hetlora", "auto", "adamw"),
        ("flexlora", "adamw", "adamw"),
        ("slora", "auto", "adamw"),
        ("flora", "auto", "adamw"),
        ("ffa", "sgd", "sgd"),
    ],
)
def test_the_method_sets_the_local_optimizer(strategy: str, optimizer: str, used: str) -> None:
    assert local_optimizer(strategy, optimizer) == used
    cfg = tiny_config("/tmp/unused", federation={"strategy": strategy})
    cfg.train.optimizer = optimizer
    assert cfg.client_train().optimizer == used and cfg.train.optimizer == optimizer


@pytest.mark.parametrize(
    ("strategy", "optimizer", "fix"),
    [
        ("fedavg+flexlora", "adamw", r"write fedit\+flexlora \(FedIT, adamw\)"),
        ("flexlora", "sgd", r"write fedavg\+flexlora \(FedAvg, sgd\)"),
        ("fedit-min", "sgd", r"write fedavg\+homogeneous "),
        ("fedit", "sgd", r"write fedavg \(FedAvg, sgd\)"),
        ("slora+hetlora", "sgd", "no strategy name trains SLoRA with sgd"),
    ],
)
def test_an_optimizer_that_contradicts_the_method_is_refused(
    strategy: str, optimizer: str, fix: str
) -> None:
    with pytest.raises(UsageError, match=fix):
        local_optimizer(strategy, optimizer)
    cfg = tiny_config(
        "/tmp/unused", federation={"strategy": strategy}, train={"optimizer": optimizer}
    )
    clients = [f"task{i:03d}" for i in range(6)]
    with pytest.raises(UsageError, match="contradicts"):
        Coordinator(cfg, {"q": (16, 12)}, resolve_client_types(cfg, clients))


def test_slora_with_dp_or_without_a_sparse_round_is_refused() -> None:
    clients = [f"task{i:03d}" for i in range(6)]
    shapes = {"q": (16, 12)}
    for fed in ({"dp_clip": 1.0}, {"slora_rounds": 0}):
        cfg = tiny_config("/tmp/unused", federation={"strategy": "slora+flexlora", **fed})
        with pytest.raises(UsageError, match=r"SLoRA|slora_rounds"):
            Coordinator(cfg, shapes, resolve_client_types(cfg, clients))


def test_sparse_delta_values_must_fit_the_mask() -> None:
    mask = make_masks({"w": (4, 4)}, 0.5, seed=0)["w"]
    with pytest.raises(ValueError, match="values"):
        SparseDelta(mask, torch.zeros(mask.nnz + 1))


# ------------------------------------------------------------------------- density per rank type
def test_per_type_masks_nest_in_one_draw_at_the_largest_density() -> None:
    union = make_masks(SHAPES, 0.5, seed=3)
    small, mid = sub_masks(union, 0.05), sub_masks(union, 0.2)
    assert sub_positions(union, 0.5) is None  # the densest type trains all of the union
    pos = sub_positions(union, 0.05)
    assert pos is not None
    for name, (m, n) in SHAPES.items():
        assert small[name].nnz == mask_nnz((m, n), 0.05) == max(1, round(0.05 * m * n))
        assert mid[name].nnz == round(0.2 * m * n) and union[name].nnz == round(0.5 * m * n)
        assert set(small[name].index.tolist()) <= set(mid[name].index.tolist())
        assert set(mid[name].index.tolist()) <= set(union[name].index.tolist())
        assert torch.equal(union[name].index[pos[name]], small[name].index)
        assert torch.equal(small[name].index, torch.unique(small[name].index))
    # the sub-mask is a uniformly random subset: every entry is picked about as often
    counts = torch.zeros(12 * 10)
    for seed in range(400):
        counts[sub_masks(make_masks({"q": (12, 10)}, 0.5, seed), 0.1)["q"].index] += 1
    assert int(counts.min()) >= 20 and int(counts.max()) <= 62  # expected 40 each


def test_per_type_average_is_fedavg_of_the_clients_models_computed_the_slow_way() -> None:
    union = make_masks(SHAPES, 0.5, seed=1)
    g = torch.Generator().manual_seed(5)
    previous = SparseState(
        {name: SparseDelta(k, torch.randn(k.nnz, generator=g)) for name, k in union.items()}
    )
    clients = [("c0", 0.5, 7), ("c1", 0.2, 3), ("c2", 0.05, 11), ("c3", 0.05, 2)]
    acc = SparseAverage(union, previous=previous)
    updates = []
    for cid, density, n in clients:
        own = sub_masks(union, density)
        u = SparseUpdate(cid, n, {k: torch.randn(own[k].nnz, generator=g) for k in union})
        updates.append((u, own))
        acc.add(u, positions=sub_positions(union, density))
    got = acc.result()
    for name, (m, ncols) in SHAPES.items():
        # each client's whole model: what it was sent, with its own entries put in
        want = _slow_average(name, updates, (m, ncols), start=previous[name].dense())
        torch.testing.assert_close(got[name].dense(), want, rtol=1e-6, atol=1e-7)
        outside = torch.ones(m * ncols, dtype=torch.bool)
        outside[union[name].index] = False
        assert not got[name].dense().flatten()[outside].any()
    # a reply on a sub-mask needs the state it started from
    with pytest.raises(ValueError, match="started from"):
        SparseAverage(union).add(updates[2][0], positions=sub_positions(union, 0.05))


@settings(max_examples=30, deadline=None)
@given(
    dims=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=1, max_size=3),
    clients=st.lists(
        st.tuples(st.sampled_from([1.0, 0.6, 0.35]), st.integers(1, 60)), min_size=1, max_size=4
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse_average_matches_the_slow_dense_reference_over_shapes_densities_and_weights(
    dims: list[tuple[int, int]], clients: list[tuple[float, int]], seed: int
) -> None:
    """Hypothesis over shapes, per-client densities (nested sub-masks of the union) and example
    counts: SLoRA's stage-1 state is the example-weighted average of the clients' dense models,
    each the previous state with its own entries put in, entry by entry."""
    shapes = {f"w{i}": dim for i, dim in enumerate(dims)}
    union_density = max(d for d, _ in clients)
    union = make_masks(shapes, union_density, seed=seed % 1000)
    g = torch.Generator().manual_seed(seed)
    previous = SparseState(
        {name: SparseDelta(k, torch.randn(k.nnz, generator=g)) for name, k in union.items()}
    )
    acc = SparseAverage(union, previous=previous)
    replies = []
    for i, (density, n) in enumerate(clients):
        own = sub_masks(union, density)
        u = SparseUpdate(f"c{i}", n, {k: torch.randn(own[k].nnz, generator=g) for k in union})
        replies.append((u, own))
        acc.add(u, positions=sub_positions(union, density))
    got = acc.result()
    for name, shape in shapes.items():
        want = _slow_average(name, replies, shape, start=previous[name].dense().double())
        torch.testing.assert_close(got[name].dense().double(), want, rtol=1e-5, atol=1e-6)


def _typed_sim(tmp_path: Path, density: dict[str, float]) -> FederatedRun:
    cfg = tiny_config(
        str(tmp_path / "typed"),
        federation={"strategy": "slora+flexlora", "slora_density": density},
        eval={"at_start": False, "unseen": False},
        output={"save_adapters": False, "checkpoint": False},
    )
    return FederatedRun(cfg, dataset=make_dataset(), model_and_tokenizer=build_tiny_llama(seed=0))


def test_a_per_type_sparse_round_sends_each_client_its_own_entries(tmp_path: Path) -> None:
    density = {"2": 0.02, "4": 0.05, "2-8": 0.1, "8": 0.2}
    sim = _typed_sim(tmp_path, density)
    server = sim.server
    assert server.union_density == 0.2
    s1, row = sim.run_round(server.initial_state(), 1, False)
    assert row["stage"] == "sparse"
    types = {server.client_type[c] for c in row["aggregated"]}
    assert len(types) > 1  # mixed densities in this round
    union_nnz = sum(k.nnz for k in server.masks.values())
    own_nnz = {t: sum(k.nnz for k in server.type_masks(t).values()) for t in density}
    assert row["sparse_nnz"] == union_nnz
    assert row["bytes_down"] == 4 * union_nnz * len(row["clients"])  # all of the global update
    assert row["bytes_up"] == 4 * sum(own_nnz[server.client_type[c]] for c in row["aggregated"])

    # by hand: each client trains its type's entries from zero; the slow dense FedAvg of models
    data = make_dataset()
    model, tok = build_tiny_llama(seed=0)
    worker = ClientWorker(model, tok, sim.cfg.lora, server.slot_ranks, sim.cfg.train)
    zero = {n: torch.zeros(k.nnz) for n, k in server.masks.items()}
    models = []
    for cid in server.sample(1):
        update, _ = worker.train_sparse(
            cid,
            server.masks,
            zero,
            data.train(cid),
            seed=server.client_seed(1, cid),
            positions=server.sparse_positions_of(cid),
        )
        own = server.sparse_masks_of(cid)
        assert {n: v.numel() for n, v in update.values.items()} == {
            n: k.nnz for n, k in own.items()
        }
        models.append((update, own))
    for name, shape in server.shapes.items():
        want = _slow_average(name, models, shape)  # the start was zero
        torch.testing.assert_close(s1[name].dense(), want, rtol=1e-5, atol=1e-7)

    # a client of a sparser type trains on the whole global update, entries it does not own
    # included: from a start that differs only there, its own entries come back different
    cid = next(c for c in server.client_type if server.client_type[c] == "2")
    pos = server.sparse_positions_of(cid)
    assert pos is not None
    start = {n: v.clone() for n, v in s1.values().items()}
    cut = {n: v.clone() for n, v in start.items()}
    for name, v in cut.items():
        keep = v[pos[name]].clone()
        v.zero_()
        v[pos[name]] = keep
    seed = server.client_seed(2, cid)
    a, _ = worker.train_sparse(cid, server.masks, start, data.train(cid), seed, positions=pos)
    b, _ = worker.train_sparse(cid, server.masks, cut, data.train(cid), seed, positions=pos)
    assert any(not torch.allclose(a.values[n], b.values[n]) for n in a.values)


@pytest.mark.parametrize(
    ("density", "message"),
    [
        ({"2": 0.1, "4": 0.1, "2-8": 0.1, "8": 0.1, "16": 0.1}, r"names rank type\(s\) 16 that"),
        ({"2": 0.1, "4": 0.1}, r"no density for rank type\(s\) 2-8, 8"),
        ({"2": 0.1, "4": 0.0, "2-8": 0.1, "8": 0.1}, r"slora_density\.4 must be in \(0, 1\]"),
        ({"2": 0.1, "4": 1.5, "2-8": 0.1, "8": 0.1}, r"slora_density\.4 must be in \(0, 1\]"),
        (0.0, r"federation\.slora_density must be in \(0, 1\]"),
        ("paper", r"rank type\(s\) 2, 2-8, 4 have none"),
        ("dense", "is not a number, a table or 'paper'"),
    ],
)
def test_bad_slora_densities_are_usage_errors(density: object, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        tiny_config("/tmp/unused", federation={"slora_density": density})


def test_paper_densities_are_the_reference_codes_per_rank_type() -> None:
    fed = FederationConfig(slora_density="paper")  # the paper's rank types
    assert fed.slora_densities(["8", "30", "30-200", "200"]) == {
        "8": 0.0012,
        "30": 0.0246,
        "30-200": 0.0822,
        "200": 0.1222,
    }
    assert fed.slora_densities(list(PAPER_SLORA_DENSITIES)) == PAPER_SLORA_DENSITIES
    # held to one rank (slora+homogeneous), everyone takes that type's density
    fed_values = {
        "slora_density": "paper",
        "rank_types": {"8": [2, 2], "30": [4, 4], "30-200": [4, 8], "200": [8, 8]},
        "client_types": ["8", "30", "200", "30-200"],
    }
    clients = [f"task{i:03d}" for i in range(6)]
    servers = {}
    for strategy in ("slora", "slora+flexlora"):
        cfg = tiny_config("/tmp/unused", federation={**fed_values, "strategy": strategy})
        servers[strategy] = Coordinator(cfg, {"q": (40, 30)}, resolve_client_types(cfg, clients))
    held, mixed = servers["slora"], servers["slora+flexlora"]
    assert held.sparse_density == {"8": 0.0012} and held.masks["q"].nnz == 1
    assert mixed.union_density == 0.1222 and mixed.masks["q"].nnz == round(0.1222 * 1200)
    assert mixed.type_masks("30")["q"].nnz == round(0.0246 * 1200)
