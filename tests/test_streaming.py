"""The streaming aggregation protocol: folding replies one by one is the batch aggregate.

Every strategy's :class:`Accumulator` is checked against ``aggregate`` (and FlexLoRA's against
a dense reference computed the slow way): in any order, with raw weights, with rejected
replies in between that must leave no trace, across FlexLoRA's switch from factor stacks to
a dense sum, and with the state capped at the largest client rank (``keep_rank``).
"""

from __future__ import annotations

import math
import random
import warnings

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from flexlora.aggregation import get_aggregator
from flexlora.config import load_config
from flexlora.errors import InvalidUpdateError, UsageError
from flexlora.server import Coordinator
from flexlora.types import ClientUpdate, LoRAFactors
from tests.test_aggregation import STRATEGIES, UP, Q, Round, make_round, rel_err, rounds
from tests.test_baselines import ref_fedsa


def fold(strategy: str, case: Round, order: list[int], **options) -> object:
    """Fold ``case`` client by client, in ``order``, with raw (unnormalised) weights."""
    agg = get_aggregator(strategy, dtype=torch.float64, **options)
    shapes = {name: f.shape for name, f in case.updates[0].factors.items()}
    acc = agg.start(shapes)
    for i in order:
        u = case.updates[i]
        acc.add(u, None if case.weights is None else case.weights[i])
    return acc


def assert_same_state(a, b, tol: float = 1e-9) -> None:
    assert a.names() == b.names()
    for name in a.names():
        assert a[name].truncation == b[name].truncation and a[name].rank == b[name].rank
        ref = b[name].dense().numpy()
        assert rel_err(a[name].dense().numpy(), ref) <= tol


@settings(max_examples=25, deadline=None)
@given(
    case=rounds(),
    uniform=rounds(uniform=True),
    shared=rounds(shared_A=True),
    seed=st.integers(0, 99),
)
def test_streaming_in_any_order_equals_the_batch_aggregate(
    case: Round, uniform: Round, shared: Round, seed: int
) -> None:
    for strategy in STRATEGIES:
        c = {"fedit": uniform, "ffa": shared}.get(strategy, case)
        order = list(range(len(c.updates)))
        random.Random(seed).shuffle(order)
        batch = get_aggregator(strategy, dtype=torch.float64).aggregate(c.updates, c.weights)
        streamed = fold(strategy, c, order).result()
        assert_same_state(streamed, batch)


def _bad_replies(u: ClientUpdate) -> list[ClientUpdate]:
    """Replies the accumulator must refuse: NaN, wrong shape, a module missing, a duplicate."""
    f = u.factors[Q]
    nan_A = f.A.clone()
    nan_A[0, 0] = float("nan")
    wide = LoRAFactors(torch.zeros(f.rank, f.shape[1] + 1, dtype=f.A.dtype), f.B, f.alpha)
    return [
        ClientUpdate("bad-nan", 5, {**u.factors, Q: LoRAFactors(nan_A, f.B, f.alpha)}),
        ClientUpdate("bad-shape", 5, {**u.factors, Q: wide}),
        ClientUpdate("bad-missing", 5, {UP: u.factors[UP]}),
        u,  # the same client again
    ]


@pytest.mark.parametrize("strategy", [*STRATEGIES, "fedsa"])
def test_a_rejected_reply_leaves_the_accumulator_untouched(strategy: str) -> None:
    shapes = {Q: (9, 7), UP: (11, 7)}
    uniform = strategy == "fedit"
    ranks = [{Q: 2, UP: 3}] * 3 if uniform else [{Q: 2, UP: 3}, {Q: 4, UP: 1}, {Q: 3, UP: 2}]
    updates = make_round(3, shapes, ranks, [10, 20, 30], [8.0] * 3, shared_A=strategy == "ffa")
    agg = get_aggregator(strategy, dtype=torch.float64)
    clean = agg.start(shapes)
    dirty = agg.start(shapes)
    for u in updates[:2]:
        clean.add(u)
        dirty.add(u)
    for bad in _bad_replies(updates[0]):
        before = dirty.num_bytes()
        with pytest.raises(InvalidUpdateError):
            dirty.add(bad)
        assert dirty.num_bytes() == before
    clean.add(updates[2])
    dirty.add(updates[2])
    assert dirty.clients == clean.clients and dirty.total_weight == clean.total_weight
    assert_same_state(dirty.result(), clean.result(), tol=0.0)


def test_strategy_level_rejection_is_per_client() -> None:
    """FedIT refuses a client of another rank; the others still aggregate."""
    shapes = {Q: (6, 6)}
    updates = make_round(1, shapes, [{Q: 2}, {Q: 3}, {Q: 2}], [1, 2, 3], [8.0] * 3)
    acc = get_aggregator("fedit", dtype=torch.float64).start(shapes)
    acc.add(updates[0])
    with pytest.raises(InvalidUpdateError) as info:
        acc.add(updates[1])
    assert (info.value.client, info.value.reason) == ("client-1", "rank")
    acc.add(updates[2])
    want = get_aggregator("fedit", dtype=torch.float64).aggregate([updates[0], updates[2]])
    assert_same_state(acc.result(), want, tol=1e-12)


def dense_reference(updates: list[ClientUpdate], module: str, weights: list[float]) -> np.ndarray:
    """Σ p_i·s_i·B_i·A_i in float64 numpy, written out."""
    total = math.fsum(weights)
    out = 0.0
    for u, w in zip(updates, weights, strict=True):
        f = u.factors[module]
        out = out + (w / total) * f.scaling * (f.B.double().numpy() @ f.A.double().numpy())
    return out


def test_flexlora_switches_from_stacks_to_a_dense_sum_exactly() -> None:
    """20×16 holds 320 numbers; each rank-3 client's factors 3·36 = 108: the third switches."""
    m, n = 20, 16
    updates = make_round(5, {Q: (m, n)}, [{Q: 3}] * 7, [3, 1, 4, 1, 5, 9, 2], [8.0] * 7)
    acc = get_aggregator("flexlora", dtype=torch.float64).start({Q: (m, n)})
    forms = []
    for u in updates:
        acc.add(u)
        forms.append(acc.modules[Q].stacked)
        assert acc.num_bytes() <= m * n * 8  # never more than the dense sum
    assert forms == [True, True, False, False, False, False, False]
    state = acc.result()
    W = dense_reference(updates, Q, [float(u.num_examples) for u in updates])
    assert rel_err(state[Q].dense().numpy(), W) <= 1e-12
    assert state[Q].rank == min(m, n)  # rank(ΔW) <= min(R, m, n) = 16
    stacked = get_aggregator("flexlora", svd="factored", dtype=torch.float64).aggregate(updates)
    for r in (1, 5, 16):
        got = state.factors(r, 8.0)[Q].delta().numpy()
        assert rel_err(got, stacked.factors(r, 8.0)[Q].delta().numpy()) <= 1e-9


def test_accumulator_memory_does_not_grow_with_the_clients() -> None:
    shapes = {Q: (24, 16), UP: (40, 16)}
    updates = make_round(8, shapes, [{Q: 4, UP: 6}] * 40, [1] * 40, [8.0] * 40)
    acc = get_aggregator("flexlora").start(shapes)
    sizes = []
    for u in updates:
        acc.add(u)
        sizes.append(acc.num_bytes())
    bound = sum(m * n * 4 for m, n in shapes.values())
    assert max(sizes) <= bound and sizes[-1] == sizes[10] == bound


@settings(max_examples=30, deadline=None)
@given(case=rounds())
def test_capped_state_gives_every_client_what_the_full_state_gives(case: Round) -> None:
    """keep_rank = the largest rank per module: every rank <= the cap gets the same factors."""
    cap = {name: max(u.factors[name].rank for u in case.updates) for name in (Q, UP)}
    full = get_aggregator("flexlora", keep_rank=None, dtype=torch.float64)
    capped = get_aggregator("flexlora", keep_rank=cap, dtype=torch.float64)
    a = full.aggregate(case.updates, case.weights)
    b = capped.aggregate(case.updates, case.weights)
    for name in (Q, UP):
        assert b[name].rank == min(cap[name], a[name].rank)
        for r in range(1, b[name].rank + 1):
            fa = a[name].factors(r, 8.0)
            fb = b[name].factors(r, 8.0)
            # the same core SVD; the capped path forms only its columns (rounding apart)
            torch.testing.assert_close(fb.A, fa.A, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(fb.B, fa.B, rtol=1e-9, atol=1e-12 * float(fa.B.abs().max()))


def coordinator(keep_rank: int | str) -> Coordinator:
    """Clients of rank types 2/3 and 4/1 (attention / FFN) on two modules."""
    fed = {"keep_rank": keep_rank, "rank_types": {"2-3": [2, 3], "4-1": [4, 1]}}
    cfg = load_config(values={"federation": fed, "lora": {"ffn_modules": ["up_proj"]}})
    types = {"client-0": "2-3", "client-1": "4-1", "client-2": "2-3"}
    return Coordinator(cfg, {Q: (9, 7), UP: (11, 7)}, types)


@pytest.mark.parametrize(("keep", "want"), [("max", {Q: 4, UP: 3}), ("all", None), (2, 2)])
def test_coordinator_caps_the_flexlora_state_by_federation_keep_rank(
    keep: int | str, want: dict[str, int] | int | None
) -> None:
    coord = coordinator(keep)
    assert coord.max_ranks() == {Q: 4, UP: 3}
    clients = list(coord.client_type)
    ranks = [coord.ranks_of(c) for c in clients]
    alpha = coord.cfg.lora.alpha
    updates = make_round(4, coord.shapes, ranks, [1, 2, 3], [alpha] * 3, dtype=torch.float32)
    state, row = coord.aggregate(coord.initial_state(), 1, clients, updates)
    assert not row["rejected"] and not row["kept_previous_state"]
    for name, total in ((Q, min(2 + 4 + 2, 7)), (UP, min(3 + 1 + 3, 7))):  # rank(ΔW) <= n = 7
        expected = total if want is None else want if isinstance(want, int) else want[name]
        assert state[name].rank == expected
    if keep == "max":  # every client starts round 2 from what the whole ΔW would give it
        full = get_aggregator("flexlora", keep_rank=None).aggregate(updates)
        for c in clients:
            got = coord.start_factors(state, c, 2)
            for name, f in full.factors(coord.ranks_of(c), alpha).items():
                torch.testing.assert_close(got[name].B, f.B, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(got[name].A, f.A, rtol=1e-5, atol=1e-6)


def test_a_keep_rank_below_a_client_rank_is_warned_about() -> None:
    """keep_rank = 2 with clients of rank 4 at Q and 3 at UP: they would silently get a
    rank-2 start plus fresh components; 'max', 'all' and a cap >= every rank say nothing."""
    with pytest.warns(
        UserWarning, match=r"keep_rank = 2 is below .* 2 module\(s\) \(e\.g\. .*: 4\)"
    ):
        coordinator(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for keep in ("max", "all", 4):
            coordinator(keep)


def test_flexlora_aggregator_takes_keep_rank_as_the_config_spells_it() -> None:
    """``keep_rank="all"`` is None (the exact ΔW), ``"2"`` is 2; ``"max"`` needs the ranks."""
    ranks = [{Q: 4, UP: 3}, {Q: 2, UP: 1}]
    updates = make_round(
        5, {Q: (9, 7), UP: (11, 7)}, ranks, [1, 2], [8.0, 8.0], dtype=torch.float32
    )
    assert get_aggregator("flexlora", keep_rank="all").keep_rank is None
    assert get_aggregator("flexlora", keep_rank={Q: "all", UP: "2"}).keep_for(UP) == 2
    capped = get_aggregator("flexlora", keep_rank="2").aggregate(updates)
    assert all(capped[m].rank == 2 for m in (Q, UP))
    exact = get_aggregator("flexlora", keep_rank="all").aggregate(updates)
    assert exact[Q].rank == 6 and exact[UP].rank == 4
    for bad, needle in (("max", "needs the clients' ranks"), (0, "positive"), ("x", "'all'")):
        with pytest.raises(UsageError, match=needle):
            get_aggregator("flexlora", keep_rank=bad)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("keep_rank", "most", "keep_rank"),
        ("keep_rank", 0, "keep_rank"),
        ("server_device", "tpu", "server_device"),
    ],
)
def test_bad_server_settings_are_refused(key: str, value: object, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        load_config(values={"federation": {key: value}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_server_gpu_that_is_not_there_is_refused_before_the_model_loads(
    device: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """federation.server_device = cuda without a GPU: a clear error before the model (which
    may take minutes for a 7B one) is loaded; it came after the load."""
    from flexlora.simulation.runner import FederatedRun
    from tests.sim_helpers import make_dataset, tiny_config

    def no_load(self: FederatedRun) -> None:
        raise AssertionError("the model was loaded before the server device was checked")

    monkeypatch.setattr(FederatedRun, "_load_model", no_load)
    cfg = tiny_config(str(tmp_path / "run"), federation={"server_device": device})
    with pytest.raises(UsageError, match=f"server device '{device}': torch sees no CUDA"):
        FederatedRun(cfg, dataset=make_dataset())


# --- HetLoRA, FedEx-LoRA and FedSA-LoRA stream too -------------------------------------------
MIXED = [{Q: 4, UP: 6}, {Q: 2, UP: 1}, {Q: 3, UP: 5}]


@pytest.mark.parametrize(
    ("strategy", "options"),
    [("hetlora", {}), ("hetlora", {"weighting": "module"}), ("fedex", {}), ("fedsa", {})],
    ids=["hetlora", "hetlora-module", "fedex", "fedsa"],
)
def test_hetlora_fedex_and_fedsa_accumulators_hold_a_fixed_number_of_buffers(
    strategy: str, options: dict
) -> None:
    """After 42 replies the accumulator holds what it held after a handful: per module the
    padded sums at the largest rank (and FedEx's exact sum, at most one dense m×n; FedSA's
    weight per row of A), never anything per client."""
    from flexlora.aggregation.base import BufferedAccumulator

    shapes = {Q: (24, 16), UP: (40, 16)}
    updates = make_round(9, shapes, MIXED * 14, list(range(1, 43)), [8.0] * 42)
    acc = get_aggregator(strategy, **options).start(shapes)
    assert not isinstance(acc, BufferedAccumulator)
    sizes, counts = [], []
    for u in updates:
        acc.add(u)
        sizes.append(acc.num_bytes())
        counts.append(sum(len(m.tensors()) for m in acc.modules.values()))
    r_max = {Q: 4, UP: 6}
    padded = sum(r_max[k] * (m + n) * 4 for k, (m, n) in shapes.items())
    dense = sum(m * n * 4 for m, n in shapes.values())
    rows = sum(r_max.values()) * 4  # FedSA-LoRA: the weight of each row of A
    extra = {"fedex": dense, "fedsa": rows}.get(strategy, 0)
    assert max(sizes) <= padded + extra
    assert sizes[-1] == sizes[5] and counts[-1] == counts[5] <= 3 * len(shapes)
    assert acc.result().names() == [Q, UP]


@settings(max_examples=25, deadline=None)
@given(case=rounds(), seed=st.integers(0, 99), again=st.booleans())
def test_fedsa_folded_in_any_order_is_the_row_wise_dense_reference(
    case: Round, seed: int, again: bool
) -> None:
    """FedSA-LoRA's accumulator, with raw weights and in any order, on top of a previous state
    of larger rank or none: Ā row by row over the clients that have the row (the previous row
    where none has it) and B̄ = Σ p_i s_i pad(B_i), computed the slow way."""
    shapes = {name: f.shape for name, f in case.updates[0].factors.items()}
    previous = None
    if again:  # a previous state of rank 9 > any client's: its tail rows must survive
        prev_round = make_round(seed, shapes, [{Q: 9, UP: 9}], [1], [8.0])
        previous = get_aggregator("fedsa", dtype=torch.float64).aggregate(prev_round)
    order = list(range(len(case.updates)))
    random.Random(seed).shuffle(order)
    acc = get_aggregator("fedsa", dtype=torch.float64).start(shapes, previous)
    for i in order:
        acc.add(case.updates[i], None if case.weights is None else case.weights[i])
    state = acc.result()
    raw = case.weights or [float(u.num_examples) for u in case.updates]
    p = [w / math.fsum(raw) for w in raw]
    for name in (Q, UP):
        prev_A = previous[name].Vh.numpy() if previous is not None else None
        B, A = ref_fedsa(case.updates, name, p, prev_A)
        assert state[name].rank == A.shape[0]
        assert np.allclose(state[name].Vh.numpy(), A, atol=1e-12)
        assert np.allclose(state[name].U.numpy()[:, : B.shape[1]], B, atol=1e-12)
        assert not state[name].U.numpy()[:, B.shape[1] :].any()


def test_fedex_across_the_switch_to_a_dense_sum_is_exact_over_two_rounds() -> None:
    """20×16 holds 320 numbers; rank-3 stacks 3·36 each: the exact sum turns dense at the
    third client. The global model is W0 + Σ p_i s_i B_i A_i (float64) in both rounds, and the
    stacked and dense forms of one round give the same residual."""
    m, n = 20, 16
    agg = get_aggregator("fedex", dtype=torch.float64)
    state = None
    for rnd, count in ((1, 7), (2, 2)):
        updates = make_round(
            rnd, {Q: (m, n)}, [{Q: 3}, {Q: 1}] * 4, [3, 1, 4, 1, 5, 9, 2, 6], [8.0] * 8
        )
        updates = updates[:count]
        acc = agg.start({Q: (m, n)}, state)
        for u in updates:
            acc.add(u)
        assert acc.modules[Q].exact.stacked == (count == 2)
        # the clients' adapters hold all but the residual they started with
        held = state.frozen[Q].dense().numpy() if state is not None else 0.0
        state = acc.result()
        W = dense_reference(updates, Q, [float(u.num_examples) for u in updates])
        assert rel_err(state.delta(Q).numpy(), held + W) <= 1e-12
        assert state.frozen[Q].rank <= min(m, n)
    # the same round folded by a stacking-only exact sum: the same residual
    updates = make_round(1, {Q: (m, n)}, [{Q: 3}, {Q: 1}] * 4, [3, 1, 4, 1, 5, 9, 2, 6], [8.0] * 8)
    dense_acc = agg.start({Q: (m, n)})
    stacked_acc = agg.start({Q: (m, n)})
    stacked_acc.modules[Q].exact.method = "factored"
    for u in updates[:7]:
        dense_acc.add(u)
        stacked_acc.add(u)
    a, b = dense_acc.result(), stacked_acc.result()
    assert rel_err(a.frozen[Q].dense().numpy(), b.frozen[Q].dense().numpy()) <= 1e-12


def test_hetlora_zero_updates_before_non_zero_ones_leave_no_trace() -> None:
    """The example-weighted fallback is kept only while every update so far is zero."""
    shapes = {Q: (6, 5)}
    updates = make_round(2, shapes, [{Q: 2}, {Q: 3}], [1, 2], [8.0, 8.0])
    zero = ClientUpdate(
        "z", 7, {Q: LoRAFactors(torch.ones(4, 5).double(), torch.zeros(6, 4).double(), 8.0)}
    )
    agg = get_aggregator("hetlora", dtype=torch.float64)
    acc = agg.start(shapes)
    acc.add(zero)
    assert acc.modules[Q].fallback is not None
    for u in updates:
        acc.add(u)
    assert acc.modules[Q].fallback is None
    got, want = acc.result(), agg.aggregate(updates)
    assert got[Q].rank == 4  # the zero client's rank still counts, as zero padding
    assert rel_err(got[Q].dense().numpy(), want[Q].dense().numpy()) <= 1e-12


@pytest.mark.parametrize("reserve", [None, 5, 64])
def test_row_stack_appends_blocks_in_order(reserve: int | None) -> None:
    """RowStack's filled rows are the appended blocks in order, through reservation and
    growth (a copy of what is filled), and nothing past them is reported held."""
    from flexlora.aggregation.flexlora import RowStack

    g = torch.Generator().manual_seed(2)
    stack = RowStack(6, torch.float32, torch.device("cpu"), reserve)
    assert stack.rows().shape == (0, 6)
    blocks = [torch.randn(r, 6, generator=g) for r in (3, 1, 8, 2, 30)]
    for b in blocks:
        stack.slot(b.shape[0]).copy_(b)
    torch.testing.assert_close(stack.rows(), torch.cat(blocks), rtol=0, atol=0)
    assert stack.len == 44 and stack.buffer is not None and stack.buffer.shape[0] >= 44


def test_federation_keep_rank_spelled_as_text_is_a_number() -> None:
    """A Flower run config or ``--set`` gives ``"200"``: the number, as eval.global_rank does."""
    from flexlora.config import load_config

    assert load_config(values={"federation": {"keep_rank": "200"}}).federation.keep_rank == 200
    assert load_config(values={"federation": {"keep_rank": " 8 "}}).federation.keep_rank == 8
    for bad in ("0", "x", "-3", "²", "٣"):  # digits of other scripts are not a rank
        with pytest.raises(UsageError, match="keep_rank"):
            load_config(values={"federation": {"keep_rank": bad}})


def test_a_per_module_keep_rank_may_say_all() -> None:
    """keep_rank = {Q: "all", UP: 2}: Q keeps every triplet (the exact ΔW), UP two."""
    shapes = {Q: (24, 16), UP: (40, 16)}
    updates = make_round(3, shapes, [{Q: 4, UP: 3}, {Q: 2, UP: 5}], [1, 2], [8.0, 8.0])
    full = get_aggregator("flexlora", keep_rank="all").aggregate(updates)
    mixed = get_aggregator("flexlora", keep_rank={Q: "all", UP: 2}).aggregate(updates)
    assert mixed[Q].rank == full[Q].rank == 6 and mixed[UP].rank == 2
    torch.testing.assert_close(mixed[Q].dense(), full[Q].dense())
    top = full[UP]
    cut = (top.U[:, :2] * top.S[:2]) @ top.Vh[:2]  # the best rank-2 part of the exact ΔW
    torch.testing.assert_close(mixed[UP].dense(torch.float32), cut)


def test_a_capped_dense_sum_gives_every_client_what_the_full_state_gives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Float32 stacks past the dense switch (R·(m + n) > m·n) with keep_rank ≤ min(m, n) / 4:
    the top-k route from the sum's Gram gives each rank what the full dense SVD gives, and
    the ‖·‖²_F it left out."""
    import flexlora.lora.svd as svd_module

    routed: list[tuple[int, int]] = []
    original = svd_module.dense_top_svd

    def spy(delta: torch.Tensor, k: int) -> object:
        routed.append((delta.shape[0], k))
        return original(delta, k)

    monkeypatch.setattr(svd_module, "dense_top_svd", spy)
    shapes = {Q: (48, 40), UP: (36, 64)}
    ranks = [{Q: 10, UP: 8}, {Q: 6, UP: 9}, {Q: 10, UP: 5}, {Q: 8, UP: 7}]
    updates = make_round(5, shapes, ranks, [4, 1, 3, 2], [8.0] * 4, dtype=torch.float32)
    cap = {name: max(r[name] for r in ranks) for name in shapes}
    full = get_aggregator("flexlora", keep_rank="all").aggregate(updates)
    capped = get_aggregator("flexlora", keep_rank=cap).aggregate(updates)
    for name, (m, n) in shapes.items():
        assert sum(r[name] for r in ranks) * (m + n) > m * n  # the dense form
        assert capped[name].rank == cap[name] and 4 * cap[name] <= min(m, n)
        for r in range(1, cap[name] + 1):
            fa, fb = full[name].factors(r, 8.0), capped[name].factors(r, 8.0)
            want = (fa.B.double() @ fa.A.double()).numpy()
            got = (fb.B.double() @ fb.A.double()).numpy()
            assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
        tail = float(full[name].S[cap[name] :].double().square().sum())
        assert capped[name].cut_energy == pytest.approx(tail, rel=1e-4)
    assert sorted(routed) == [(36, cap[UP]), (48, cap[Q])]  # only the capped state took it


@pytest.mark.parametrize("shapes", [{Q: (24, 16), UP: (40, 16)}, {Q: (400, 300), UP: (300, 500)}])
def test_a_cut_that_leaves_out_nothing_reports_no_energy(shapes: dict) -> None:
    """Clients sharing one A: rank(ΔW) is the largest client rank, the cap's, so the cut
    leaves out nothing; float32 rounding of the two totals (1e-7 of ‖ΔW‖²) is not reported
    as energy (stacks and the dense sum alike)."""
    ranks = [{Q: 4, UP: 3}, {Q: 2, UP: 5}, {Q: 3, UP: 2}] * 2
    updates = make_round(6, shapes, ranks, [1, 2, 3] * 2, [8.0] * 6, shared_A=True)
    updates = [
        ClientUpdate(
            u.client_id,
            u.num_examples,
            {n: LoRAFactors(f.A.float(), f.B.float(), f.alpha) for n, f in u.factors.items()},
        )
        for u in updates
    ]
    cap = {name: max(r[name] for r in ranks) for name in shapes}
    state = get_aggregator("flexlora", keep_rank=cap).aggregate(updates)
    assert all(state[name].rank == cap[name] for name in shapes)
    assert [state[name].cut_energy for name in shapes] == [0.0, 0.0]
