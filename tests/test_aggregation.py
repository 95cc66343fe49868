"""Every aggregation strategy against a dense reference computed the slow, obvious way.

The references below use numpy in float64, build each m×n update one rank-1 term at a time,
zero-pad factors into explicit arrays and loop over clients: nothing of flexlora's own math
(QR, stacking, padding helpers) is reused. Singular vectors are compared only through the
matrices they reconstruct, since their signs are arbitrary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flexlora.aggregation import AGGREGATORS, check_updates, get_aggregator, normalize_weights
from flexlora.errors import InvalidUpdateError, RankError, UsageError
from flexlora.lora.norms import frobenius_norm
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors

Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.0.mlp.up_proj"
STRATEGIES = ("flexlora", "fedit", "hetlora", "flora", "ffa")
F32_MIN_GAP = 1e-2  # see tests/test_svd.py: float32 truncations are compared past this gap only


# --- the slow references ---------------------------------------------------------------------


def dense(f: LoRAFactors) -> np.ndarray:
    """s·B·A built from rank-1 terms in float64."""
    A, B = f.A.double().numpy(), f.B.double().numpy()
    out = np.zeros((B.shape[0], A.shape[1]))
    for k in range(A.shape[0]):
        out += f.scaling * np.outer(B[:, k], A[k])
    return out


def product(B: np.ndarray, A: np.ndarray, r: int) -> np.ndarray:
    """B[:, :r]·A[:r] from rank-1 terms."""
    out = np.zeros((B.shape[0], A.shape[1]))
    for k in range(r):
        out += np.outer(B[:, k], A[k])
    return out


def probabilities(updates: Sequence[ClientUpdate], weights: Sequence[float] | None) -> list[float]:
    raw = [float(u.num_examples) for u in updates] if weights is None else list(weights)
    return [w / sum(raw) for w in raw]


def ref_sum(updates: Sequence[ClientUpdate], module: str, p: Sequence[float]) -> np.ndarray:
    """ΔW = Σ p_i·s_i·B_i·A_i, one client at a time."""
    total = np.zeros(updates[0].factors[module].shape)
    for pi, u in zip(p, updates, strict=True):
        total += pi * dense(u.factors[module])
    return total


def ref_truncation(W: np.ndarray, r: int) -> np.ndarray:
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    return product(U * S, Vh, min(r, S.shape[0]))


def zero_pad(t: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.zeros((rows, cols))
    out[: t.shape[0], : t.shape[1]] = t
    return out


def ref_padded_average(
    updates: Sequence[ClientUpdate], module: str, q: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """(Σ q_i·s_i·pad(B_i), Σ q_i·pad(A_i)) at the largest rank (HetLoRA, FFA)."""
    fs = [u.factors[module] for u in updates]
    r_max = max(f.rank for f in fs)
    (m, n) = fs[0].shape
    B, A = np.zeros((m, r_max)), np.zeros((r_max, n))
    for qi, f in zip(q, fs, strict=True):
        B += qi * f.scaling * zero_pad(f.B.double().numpy(), m, r_max)
        A += qi * zero_pad(f.A.double().numpy(), r_max, n)
    return B, A


def ref_client_delta(
    strategy: str, updates: Sequence[ClientUpdate], module: str, p: Sequence[float], r: int
) -> np.ndarray:
    """The ΔW a client of rank r gets back under each strategy."""
    fs = [u.factors[module] for u in updates]
    if strategy in ("flexlora", "flora"):
        W = ref_sum(updates, module, p)
        return ref_truncation(W, r) if strategy == "flexlora" else W
    if strategy == "fedit":
        A = sum(pi * f.A.double().numpy() for pi, f in zip(p, fs, strict=True))
        B = sum(pi * f.B.double().numpy() for pi, f in zip(p, fs, strict=True))
        return fs[0].scaling * product(B, A, r)
    if strategy == "hetlora":
        # one weight per client: the norm of its whole update, every module together
        norms = [
            math.sqrt(sum(float(np.linalg.norm(dense(f))) ** 2 for f in u.factors.values()))
            for u in updates
        ]
        q = [x / sum(norms) for x in norms] if sum(norms) > 0 else list(p)
        B, A = ref_padded_average(updates, module, q)
        return product(B, A, r)
    assert strategy == "ffa"
    B, _ = ref_padded_average(updates, module, p)
    A_shared = max(fs, key=lambda f: f.rank).A.double().numpy()
    return product(B, A_shared, r)


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


# --- random rounds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    updates: list[ClientUpdate]
    weights: list[float] | None


def make_round(
    seed: int,
    shapes: dict[str, tuple[int, int]],
    ranks: list[dict[str, int]],
    examples: list[int],
    alphas: list[float],
    *,
    dtype: torch.dtype = torch.float64,
    shared_A: bool = False,
    rslora: bool = False,
) -> list[ClientUpdate]:
    """Client updates with Gaussian factors; with ``shared_A`` every A is a prefix of one A."""
    g = torch.Generator().manual_seed(seed)
    r_max = {name: max(r[name] for r in ranks) for name in shapes}
    frozen = {
        name: torch.randn(r_max[name], n, generator=g, dtype=torch.float64) / math.sqrt(n)
        for name, (_, n) in shapes.items()
    }
    updates = []
    for i, (client_ranks, count, alpha) in enumerate(zip(ranks, examples, alphas, strict=True)):
        factors = {}
        for name, (m, n) in shapes.items():
            r = client_ranks[name]
            A = (
                frozen[name][:r]
                if shared_A
                else torch.randn(r, n, generator=g, dtype=torch.float64) / math.sqrt(n)
            )
            B = torch.randn(m, r, generator=g, dtype=torch.float64)
            factors[name] = LoRAFactors(A.to(dtype), B.to(dtype), alpha, use_rslora=rslora)
        updates.append(ClientUpdate(f"client-{i}", count, factors))
    return updates


@st.composite
def rounds(draw: st.DrawFn, uniform: bool = False, shared_A: bool = False) -> Round:
    """1–4 clients, two modules (ranks differ per module, like PEFT's rank_pattern)."""
    k = draw(st.integers(1, 4))
    n = draw(st.integers(1, 16))
    shapes = {Q: (draw(st.integers(1, 16)), n), UP: (draw(st.integers(1, 24)), n)}
    if uniform:
        common = {Q: draw(st.integers(1, 6)), UP: draw(st.integers(1, 6))}
        ranks = [common] * k
        alphas = [draw(st.sampled_from([4.0, 16.0]))] * k
    else:
        ranks = [{Q: draw(st.integers(1, 6)), UP: draw(st.integers(1, 8))} for _ in range(k)]
        alphas = [draw(st.sampled_from([4.0, 8.0, 16.0, 3.5])) for _ in range(k)]
    examples = [draw(st.integers(1, 1000)) for _ in range(k)]
    weights = draw(st.none() | st.lists(st.floats(0.01, 100.0), min_size=k, max_size=k))
    updates = make_round(
        draw(st.integers(0, 2**31 - 1)),
        shapes,
        ranks,
        examples,
        alphas,
        shared_A=shared_A,
        rslora=draw(st.booleans()),
    )
    return Round(updates, weights)


def client_ranks(updates: Sequence[ClientUpdate], module: str) -> list[int]:
    return sorted({u.factors[module].rank for u in updates})


def gap_ok(S: np.ndarray, r: int, rel: float) -> bool:
    """Whether σ_r − σ_{r+1} is at least rel·σ_1 (the rank-r truncation is well defined)."""
    nxt = S[r] if r < S.shape[0] else 0.0
    return r >= S.shape[0] or S[r - 1] - nxt >= rel * S[0]


# --- every strategy vs its reference ---------------------------------------------------------


def check_against_reference(strategy: str, case: Round, tol: float, **options) -> None:
    state = get_aggregator(strategy, dtype=torch.float64, **options).aggregate(
        case.updates, case.weights
    )
    p = probabilities(case.updates, case.weights)
    assert state.strategy == strategy and set(state.names()) == {Q, UP}
    for module in (Q, UP):
        delta = state[module]
        if strategy == "flora":  # the state is ΔW itself, stacked or (once dense) its SVD
            assert rel_err(delta.dense().numpy(), ref_sum(case.updates, module, p)) <= tol
        for r in client_ranks(case.updates, module):
            if delta.truncation == "exact" and r != delta.rank:
                continue
            if strategy == "flora" and r < delta.rank:
                continue  # a cut of FLoRA's SVD: clients merge the whole ΔW instead
            pad = torch.Generator().manual_seed(r) if r > delta.rank else None
            got = delta.factors(r, 8.0, pad=pad, module=module)  # any receiving alpha
            assert got.rank == r
            ref = ref_client_delta(strategy, case.updates, module, p, r)
            assert rel_err(dense(got), ref) <= tol, (strategy, module, r)


@pytest.mark.parametrize("strategy", ["flexlora", "hetlora", "flora"])
@settings(max_examples=25, deadline=None)
@given(case=rounds())
def test_mixed_rank_strategies_match_dense_reference(strategy: str, case: Round) -> None:
    check_against_reference(strategy, case, 1e-9 if strategy != "flexlora" else 1e-5)


@settings(max_examples=25, deadline=None)
@given(case=rounds(uniform=True))
def test_fedit_matches_dense_reference(case: Round) -> None:
    check_against_reference("fedit", case, 1e-9)


@settings(max_examples=25, deadline=None)
@given(case=rounds(shared_A=True))
def test_ffa_matches_dense_reference(case: Round) -> None:
    check_against_reference("ffa", case, 1e-9)
    # FFA is exact: the global B̄·A is the weighted sum of the clients' updates
    state = get_aggregator("ffa", dtype=torch.float64).aggregate(case.updates, case.weights)
    p = probabilities(case.updates, case.weights)
    for module in (Q, UP):
        assert rel_err(state[module].dense().numpy(), ref_sum(case.updates, module, p)) <= 1e-9


@pytest.mark.parametrize("svd", ["auto", "factored", "dense"])
@settings(max_examples=20, deadline=None)
@given(case=rounds())
def test_flexlora_every_path_is_the_dense_svd_truncation_float64(svd: str, case: Round) -> None:
    state = get_aggregator("flexlora", svd=svd, dtype=torch.float64).aggregate(
        case.updates, case.weights
    )
    p = probabilities(case.updates, case.weights)
    for module in (Q, UP):
        W = ref_sum(case.updates, module, p)
        S = np.linalg.svd(W, compute_uv=False)
        assert rel_err(state[module].dense().numpy(), W) <= 1e-10  # the state is ΔW itself
        for r in range(1, state[module].rank + 1):
            if gap_ok(S, r, 1e-9):  # skip exact ties, where the truncation is not unique
                got = state[module].factors(r, 8.0)
                assert rel_err(dense(got), ref_truncation(W, r)) <= 1e-5


@settings(max_examples=25, deadline=None)
@given(case=rounds())
def test_flexlora_float32_is_within_1e4_of_the_float64_reference(case: Round) -> None:
    updates32 = [
        ClientUpdate(
            u.client_id,
            u.num_examples,
            {
                k: LoRAFactors(f.A.float(), f.B.float(), f.alpha, f.use_rslora)
                for k, f in u.factors.items()
            },
        )
        for u in case.updates
    ]
    state = get_aggregator("flexlora").aggregate(updates32, case.weights)
    p = probabilities(updates32, case.weights)
    for module in (Q, UP):
        assert state[module].U.dtype == torch.float32
        W = ref_sum(updates32, module, p)  # the float32 inputs, summed in float64
        S = np.linalg.svd(W, compute_uv=False)
        assert rel_err(state[module].dense().numpy(), W) <= 1e-5
        for r in client_ranks(updates32, module):
            r = min(r, state[module].rank)
            if gap_ok(S, r, F32_MIN_GAP):
                got = state[module].factors(r, 16.0, dtype=torch.float32)
                assert got.A.dtype == torch.float32
                assert rel_err(dense(got), ref_truncation(W, r)) <= 1e-4


@settings(max_examples=25, deadline=None)
@given(case=rounds(), seed=st.integers(0, 2**31 - 1))
def test_flexlora_rank_r_result_is_no_worse_than_other_rank_r_matrices(
    case: Round, seed: int
) -> None:
    """Eckart–Young, checked against matrices we can think of, not taken on trust."""
    aggregator = get_aggregator("flexlora", dtype=torch.float64)
    state = aggregator.aggregate(case.updates, case.weights)
    p = probabilities(case.updates, case.weights)
    rng = np.random.default_rng(seed)
    for module in (Q, UP):
        W = ref_sum(case.updates, module, p)
        S = np.linalg.svd(W, compute_uv=False)
        for r in client_ranks(case.updates, module):
            r = min(r, state[module].rank)
            ours = float(np.linalg.norm(W - dense(state[module].factors(r, 8.0))))
            # the optimum's value: the energy of the dropped singular values
            assert ours == pytest.approx(math.sqrt(float(np.sum(S[r:] ** 2))), abs=1e-9)
            candidates = [W, ref_client_delta("hetlora", case.updates, module, p, r)]
            for u, pi in zip(case.updates, p, strict=True):
                f = u.factors[module]
                if f.rank <= r:
                    candidates += [dense(f), pi * dense(f)]
            for scale in (1e-3, 1e-1, 1.0):
                noisy = W + scale * np.linalg.norm(W) * rng.standard_normal(W.shape)
                candidates.append(ref_truncation(noisy, r))
            for _ in range(3):
                candidates.append(
                    rng.standard_normal((W.shape[0], r)) @ rng.standard_normal((r, W.shape[1]))
                )
            for X in candidates:
                if np.linalg.matrix_rank(X) <= r:
                    assert ours <= float(np.linalg.norm(W - X)) * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=20, deadline=None)
@given(case=rounds())
def test_flexlora_at_rank_of_delta_reproduces_delta(dtype: torch.dtype, case: Round) -> None:
    state = get_aggregator("flexlora", dtype=dtype).aggregate(case.updates, case.weights)
    p = probabilities(case.updates, case.weights)
    for module in (Q, UP):
        W = ref_sum(case.updates, module, p)
        rank = int(np.linalg.matrix_rank(W))
        tol = 1e-9 if dtype == torch.float64 else 1e-5
        for r in {rank, state[module].rank, state[module].rank + 3}:
            pad = torch.Generator().manual_seed(0) if r > state[module].rank else None
            got = state[module].factors(r, 16.0, pad=pad, module=module)
            assert rel_err(dense(got), W) <= tol


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("c", [1e-3, 7.0, 1e6])
def test_weights_are_normalized(strategy: str, c: float) -> None:
    shapes = {Q: (9, 7), UP: (12, 7)}
    ranks = (
        [{Q: 2, UP: 3}] * 3
        if strategy == "fedit"
        else [{Q: 1, UP: 4}, {Q: 3, UP: 2}, {Q: 2, UP: 2}]
    )
    updates = make_round(3, shapes, ranks, [10, 30, 60], [16.0] * 3, shared_A=strategy == "ffa")
    agg = get_aggregator(strategy, dtype=torch.float64)
    by_default = agg.aggregate(updates)
    by_counts = agg.aggregate(updates, weights=[10, 30, 60])
    scaled = agg.aggregate(updates, weights=[10 * c, 30 * c, 60 * c])
    fractions = agg.aggregate(updates, weights=[0.1, 0.3, 0.6])
    more = make_round(3, shapes, ranks, [30, 90, 180], [16.0] * 3, shared_A=strategy == "ffa")
    more_examples = agg.aggregate(more)
    for other in (by_counts, scaled, fractions, more_examples):
        for module in (Q, UP):
            torch.testing.assert_close(
                other[module].dense(), by_default[module].dense(), rtol=1e-12, atol=1e-14
            )
    # and a different weighting does change the result (so the check above can fail)
    uniform = agg.aggregate(updates, weights=[1, 1, 1])
    if strategy != "hetlora":  # HetLoRA weighs by update norms, not by examples
        assert not torch.allclose(uniform[Q].dense(), by_default[Q].dense())


def test_normalize_weights() -> None:
    updates = make_round(0, {Q: (3, 3)}, [{Q: 1}] * 3, [1, 2, 5], [8.0] * 3)
    assert normalize_weights(updates, None) == [1 / 8, 2 / 8, 5 / 8]
    assert normalize_weights(updates, [2, 2, 4]) == [0.25, 0.25, 0.5]
    assert math.fsum(normalize_weights(updates, [1e-300, 1e-300, 1e-300])) == 1.0
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(InvalidUpdateError, match=r"client client-1: weight must be > 0"):
            normalize_weights(updates, [1.0, bad, 1.0])
    with pytest.raises(UsageError, match="2 weights for 3"):
        normalize_weights(updates, [1.0, 1.0])


# --- small cases checked by hand -------------------------------------------------------------


def diag_clients() -> list[ClientUpdate]:
    """Client a updates W[0, 0] by 1, client b updates W[1, 1] by 1; rank 1, alpha = r."""
    e0, e1 = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    return [
        ClientUpdate("a", 3, {"w": LoRAFactors(e0.T.double(), e0.double(), alpha=1.0)}),
        ClientUpdate("b", 1, {"w": LoRAFactors(e1.T.double(), e1.double(), alpha=1.0)}),
    ]


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("flexlora", [[0.75, 0.0], [0.0, 0.0]]),  # best rank-1 part of diag(0.75, 0.25)
        ("fedit", [[0.5625, 0.1875], [0.1875, 0.0625]]),  # (0.75, 0.25)ᵀ(0.75, 0.25): noise
        ("hetlora", [[0.25, 0.25], [0.25, 0.25]]),  # equal norms: q = (1/2, 1/2), ignores counts
    ],
)
def test_two_diagonal_clients_by_hand(strategy: str, expected: list[list[float]]) -> None:
    state = get_aggregator(strategy, dtype=torch.float64).aggregate(diag_clients())
    got = state.factors(1, 1.0)["w"]
    torch.testing.assert_close(got.delta(), torch.tensor(expected, dtype=torch.float64))


def test_two_diagonal_clients_flexlora_and_flora_keep_the_exact_sum() -> None:
    exact = torch.tensor([[0.75, 0.0], [0.0, 0.25]], dtype=torch.float64)
    for strategy in ("flexlora", "flora"):
        state = get_aggregator(strategy, dtype=torch.float64).aggregate(diag_clients())
        torch.testing.assert_close(state["w"].dense(), exact)
        torch.testing.assert_close(state.factors(2, 4.0)["w"].delta(), exact)


def test_scalings_by_hand() -> None:
    """Rank 2, alpha 2 (s = 1): diag(3, 1). Rank 1, alpha 4 (s = 4), B = 0.5·e1: diag(0, 2)."""
    a = LoRAFactors(
        torch.eye(2, dtype=torch.float64), torch.diag(torch.tensor([3.0, 1.0])).double(), 2.0
    )
    b = LoRAFactors(torch.tensor([[0.0, 1.0]]).double(), torch.tensor([[0.0], [0.5]]).double(), 4.0)
    updates = [ClientUpdate("a", 1, {"w": a}), ClientUpdate("b", 3, {"w": b})]
    state = get_aggregator("flexlora", dtype=torch.float64).aggregate(updates)
    torch.testing.assert_close(state["w"].S, torch.tensor([1.75, 0.75], dtype=torch.float64))
    # the rank-1 client (s = 4) gets diag(0, 1.75): its B carries 1.75 / 4 = 0.4375
    back = state.factors(1, 4.0)["w"]
    assert back.scaling == 4.0
    assert abs(float(back.B[1, 0] * back.A[0, 1])) == pytest.approx(0.4375)
    torch.testing.assert_close(back.delta(), torch.diag(torch.tensor([0.0, 1.75])).double())
    # the rank-2 client with alpha 2 gets the whole sum back
    torch.testing.assert_close(
        state.factors(2, 2.0)["w"].delta(), torch.diag(torch.tensor([0.75, 1.75])).double()
    )


# --- FlexLoRA options ------------------------------------------------------------------------


def test_flexlora_keep_rank_and_randomized_path() -> None:
    shapes = {Q: (40, 30), UP: (50, 30)}
    ranks = [{Q: 2, UP: 3}, {Q: 3, UP: 1}, {Q: 1, UP: 2}]
    updates = make_round(7, shapes, ranks, [5, 3, 2], [8.0, 16.0, 8.0])
    full = get_aggregator("flexlora", svd="dense", dtype=torch.float64).aggregate(updates)
    kept = get_aggregator("flexlora", keep_rank=3, dtype=torch.float64).aggregate(updates)
    torch.manual_seed(0)
    rand = get_aggregator("flexlora", svd="randomized", keep_rank=6).aggregate(updates)
    for module in (Q, UP):
        assert kept[module].rank == 3 and rand[module].rank == 6
        for r in (1, 3):
            ref = full.factors(r, 8.0)[module].delta()
            torch.testing.assert_close(kept.factors(r, 8.0)[module].delta(), ref)
            assert rel_err(dense(rand.factors(r, 8.0)[module]), ref.numpy()) <= 1e-3
        # ΔW has rank ≤ 6 here, so the randomized state holds all of it
        assert rel_err(rand[module].dense().numpy(), full[module].dense().numpy()) <= 1e-4
    with pytest.raises(RankError):
        kept.factors(4, 8.0)


@pytest.mark.parametrize(
    ("options", "needle"),
    [({"svd": "qr"}, "svd must be"), ({"keep_rank": 0}, "keep_rank"), ({"dtype": "half"}, "dtype")],
)
def test_flexlora_rejects_bad_options(options: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        get_aggregator("flexlora", **options)


# --- strategy-specific rules -----------------------------------------------------------------


def test_fedit_rejects_mixed_ranks_naming_client_and_module() -> None:
    updates = make_round(
        1, {Q: (6, 6), UP: (8, 6)}, [{Q: 2, UP: 2}, {Q: 2, UP: 4}], [1, 1], [8.0, 8.0]
    )
    with pytest.raises(InvalidUpdateError) as info:
        get_aggregator("fedit").aggregate(updates)
    err = info.value
    assert (err.client, err.module, err.reason) == ("client-1", UP, "rank")
    assert "client client-1" in str(err) and UP in str(err) and "client-0" in str(err)


def test_fedit_rejects_mixed_scalings() -> None:
    updates = make_round(1, {Q: (6, 6)}, [{Q: 2}, {Q: 2}], [1, 1], [8.0, 16.0])
    with pytest.raises(InvalidUpdateError) as info:
        get_aggregator("fedit").aggregate(updates)
    assert (info.value.client, info.value.module, info.value.reason) == ("client-1", Q, "alpha")


def test_fedit_state_only_gives_its_own_rank() -> None:
    updates = make_round(1, {Q: (6, 6)}, [{Q: 2}, {Q: 2}], [1, 1], [8.0, 8.0])
    state = get_aggregator("fedit").aggregate(updates)
    with pytest.raises(RankError, match=f"module {Q}"):
        state.factors(3, 8.0, pad=torch.Generator())


def test_ffa_rejects_a_client_whose_A_moved() -> None:
    ranks = [{Q: 2}, {Q: 4}, {Q: 3}]
    updates = make_round(2, {Q: (6, 8)}, ranks, [1, 1, 1], [8.0] * 3, shared_A=True)
    get_aggregator("ffa").aggregate(updates)  # consistent: fine
    f = updates[2].factors[Q]
    moved = LoRAFactors(f.A + 1e-3, f.B, f.alpha)
    updates[2] = ClientUpdate("client-2", 1, {Q: moved})
    with pytest.raises(InvalidUpdateError) as info:
        get_aggregator("ffa").aggregate(updates)
    assert (info.value.client, info.value.module, info.value.reason) == ("client-2", Q, "frozen_A")
    assert "client-1" in str(info.value)  # the client whose A is the reference (largest rank)


@settings(max_examples=20, deadline=None)
@given(first=rounds(), seed=st.integers(0, 1000))
def test_flora_accumulates_the_previous_state(first: Round, seed: int) -> None:
    agg = get_aggregator("flora", dtype=torch.float64)
    state1 = agg.aggregate(first.updates, first.weights)
    p1 = probabilities(first.updates, first.weights)
    for module in (Q, UP):
        R = sum(u.factors[module].rank for u in first.updates)
        m, n = state1[module].shape
        if R * (m + n) <= m * n:  # the stacked factors themselves
            assert (state1[module].truncation, state1[module].rank) == ("exact", R)
        else:  # the stacks would be larger than ΔW: its thin SVD, from the dense sum
            assert (state1[module].truncation, state1[module].rank) == ("svd", min(R, m, n))
        assert rel_err(state1[module].dense().numpy(), ref_sum(first.updates, module, p1)) <= 1e-9
    shapes = {name: state1[name].shape for name in (Q, UP)}
    second = make_round(seed, shapes, [{Q: 2, UP: 1}, {Q: 1, UP: 3}], [4, 9], [16.0, 8.0])
    state2 = agg.aggregate(second, previous=state1)
    p2 = probabilities(second, None)
    for module in (Q, UP):
        expected = ref_sum(first.updates, module, p1) + ref_sum(second, module, p2)
        assert rel_err(state2[module].dense().numpy(), expected) <= 1e-9
        assert state2[module].truncation == "svd"
        assert state2[module].rank <= min(shapes[module])


def test_flora_previous_without_the_module_starts_fresh() -> None:
    agg = get_aggregator("flora", dtype=torch.float64)
    only_q = agg.aggregate(make_round(0, {Q: (5, 4)}, [{Q: 2}], [1], [8.0]))
    updates = make_round(1, {Q: (5, 4), UP: (6, 4)}, [{Q: 1, UP: 2}], [1], [8.0])
    state = agg.aggregate(updates, previous=only_q)
    assert rel_err(state[UP].dense().numpy(), ref_sum(updates, UP, [1.0])) <= 1e-12
    assert (
        rel_err(state[Q].dense().numpy(), only_q[Q].dense().numpy() + ref_sum(updates, Q, [1.0]))
        <= 1e-9
    )


def test_flora_stacked_state_is_the_scaled_B_and_weighted_A_as_before() -> None:
    """While the stacks are the smaller form, round 1's state is [s_i·B_i] and [w_i·A_i] / W
    exactly (bit for bit): what clients and exports are handed did not change."""
    updates = make_round(3, {Q: (12, 10)}, [{Q: 2}, {Q: 1}], [3, 5], [8.0, 16.0])  # 3·22 <= 120
    state = get_aggregator("flora", dtype=torch.float64).aggregate(updates)
    fs = [u.factors[Q] for u in updates]
    assert state[Q].truncation == "exact"
    assert torch.equal(state[Q].U, torch.cat([f.scaling * f.B for f in fs], dim=1))
    assert torch.equal(state[Q].Vh, torch.cat([3.0 * fs[0].A, 5.0 * fs[1].A]) / 8.0)
    assert state[Q].U.is_contiguous() and torch.equal(state[Q].S, torch.ones(3).double())
    for t in (state[Q].U, state[Q].Vh):  # in their own storage, not the server's buffers
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@st.composite
def crowded_rounds(draw: st.DrawFn) -> Round:
    """3–12 clients on small modules: Σ r_i·(m + n) > m·n, so the sum goes dense mid-round."""
    shapes = {Q: (draw(st.integers(1, 12)), draw(st.integers(1, 12)))}
    shapes[UP] = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    k = draw(st.integers(3, 12))
    ranks = [{Q: draw(st.integers(1, 6)), UP: draw(st.integers(1, 6))} for _ in range(k)]
    for name, (m, n) in shapes.items():
        assume(sum(r[name] for r in ranks) * (m + n) > m * n)
    alphas = [draw(st.sampled_from([4.0, 8.0, 16.0, 3.5])) for _ in range(k)]
    examples = [draw(st.integers(1, 1000)) for _ in range(k)]
    weights = draw(st.none() | st.lists(st.floats(0.01, 100.0), min_size=k, max_size=k))
    seed = draw(st.integers(0, 2**31 - 1))
    return Round(make_round(seed, shapes, ranks, examples, alphas), weights)


@settings(max_examples=30, deadline=None)
@given(case=crowded_rounds(), previous_seed=st.none() | st.integers(0, 1000))
def test_flora_past_the_dense_size_is_still_the_exact_sum(
    case: Round, previous_seed: int | None
) -> None:
    """Σ r_i·(m + n) > m·n: the server sums densely, and the state is still ΔW (plus the
    previous state), as the exact thin SVD of the reference: rank min(R + k, m, n), S its
    singular values."""
    agg = get_aggregator("flora", dtype=torch.float64)
    shapes = {name: f.shape for name, f in case.updates[0].factors.items()}
    previous, before = None, dict.fromkeys(shapes, 0.0)
    if previous_seed is not None:  # a state from an earlier round (stacked or SVD)
        ranks = [dict.fromkeys(shapes, 2)] * 2
        first = make_round(previous_seed, shapes, ranks, [3, 5], [8.0] * 2)
        previous = agg.aggregate(first)
        before = {name: ref_sum(first, name, [3 / 8, 5 / 8]) for name in shapes}
    state = agg.aggregate(case.updates, case.weights, previous=previous)
    p = probabilities(case.updates, case.weights)
    for name, (m, n) in shapes.items():
        expected = before[name] + ref_sum(case.updates, name, p)
        rank = sum(u.factors[name].rank for u in case.updates)
        rank += previous[name].rank if previous is not None else 0
        d = state[name]
        assert (d.truncation, d.rank) == ("svd", min(rank, m, n))
        assert rel_err(d.dense().numpy(), expected) <= 1e-9
        S = np.linalg.svd(expected, compute_uv=False)[: d.rank]
        np.testing.assert_allclose(d.S.numpy(), S, rtol=0, atol=1e-9 * S[0])


def test_flora_holds_per_module_the_smaller_exact_form() -> None:
    """After each of 40 replies: per module exactly min(R·(m + n), m·n) numbers, the stacks
    while they are the smaller, then one (m, n) sum and no stack buffer; the state is the sum."""
    shapes = {"q": (64, 64), "v": (64, 16), "tall": (200, 3), "big": (512, 400)}
    cycle = [1, 2, 4, 8]
    acc = get_aggregator("flora").start(shapes)
    total_rank = dict.fromkeys(shapes, 0)
    went_dense, updates = set(), []
    for c in range(40):
        ranks = {
            name: min(cycle[(c + i) % 4], m, n) for i, (name, (m, n)) in enumerate(shapes.items())
        }
        update = make_round(c, shapes, [ranks], [1], [8.0], dtype=torch.float32)[0]
        acc.add(ClientUpdate(f"c{c}", 1 + c % 3, update.factors))
        updates.append(ClientUpdate(f"c{c}", 1 + c % 3, update.factors))
        for name, (m, n) in shapes.items():
            total_rank[name] += ranks[name]
            R, mod = total_rank[name], acc.modules[name]
            assert mod.num_bytes() == min(R * (m + n), m * n) * 4  # float32, exactly
            if R * (m + n) <= m * n:
                assert all(t.shape != (m, n) for t in mod.tensors())
            else:
                assert [t.shape for t in mod.tensors()] == [(m, n)]
                assert mod.sum.Bt.buffer is None and mod.sum.As.buffer is None
                went_dense.add(name)
    assert went_dense == {"q", "v", "tall"}  # "big" stays stacked: 150·912 < 512·400
    expected = sum(min(total_rank[k] * (m + n), m * n) for k, (m, n) in shapes.items())
    assert acc.num_bytes() == 4 * expected < 4 * sum(m * n for m, n in shapes.values())
    state = acc.result()
    p = probabilities(updates, None)
    for name in shapes:
        ref = ref_sum(updates, name, p)
        assert state[name].truncation == ("exact" if name == "big" else "svd")
        assert rel_err(state[name].dense().numpy(), ref) <= 1e-5


def test_hetlora_weights_are_proportional_to_update_norms() -> None:
    updates = make_round(4, {Q: (7, 5)}, [{Q: 1}, {Q: 3}], [1, 1], [8.0, 8.0])
    norms = [float(np.linalg.norm(dense(u.factors[Q]))) for u in updates]
    for u, norm in zip(updates, norms, strict=True):
        assert frobenius_norm(u.factors[Q]) == pytest.approx(norm, rel=1e-12)
    # doubling a client's B doubles its update and so its weight: q ∝ (2·‖Δ0‖, ‖Δ1‖)
    f = updates[0].factors[Q]
    doubled = [ClientUpdate("client-0", 1, {Q: LoRAFactors(f.A, 2 * f.B, f.alpha)}), updates[1]]
    state = get_aggregator("hetlora", dtype=torch.float64).aggregate(doubled)
    q = [2 * norms[0] / (2 * norms[0] + norms[1]), norms[1] / (2 * norms[0] + norms[1])]
    B, A = ref_padded_average(doubled, Q, q)
    assert rel_err(state[Q].dense().numpy(), product(B, A, 3)) <= 1e-12
    # example counts are ignored unless asked for
    with_counts = make_round(4, {Q: (7, 5)}, [{Q: 1}, {Q: 3}], [50, 1], [8.0, 8.0])
    ignored = get_aggregator("hetlora", dtype=torch.float64).aggregate(with_counts)
    plain = get_aggregator("hetlora", dtype=torch.float64).aggregate(updates)
    torch.testing.assert_close(ignored[Q].dense(), plain[Q].dense())
    both = get_aggregator("hetlora", weight_by_examples=True, dtype=torch.float64)
    q2 = [norms[0] * 50 / (norms[0] * 50 + norms[1]), norms[1] / (norms[0] * 50 + norms[1])]
    B2, A2 = ref_padded_average(with_counts, Q, q2)
    assert rel_err(both.aggregate(with_counts)[Q].dense().numpy(), product(B2, A2, 3)) <= 1e-12


@settings(max_examples=25, deadline=None)
@given(case=rounds())
def test_one_update_norm_serves_hetlora_dp_and_validation(case: Round) -> None:
    """‖ΔW_i‖_F over all modules is one function (``lora.norms``) that HetLoRA's weights and
    client-level DP's clipping both use, equal to the norm of the dense update built term by
    term."""
    from flexlora import privacy
    from flexlora.aggregation import hetlora, validation
    from flexlora.lora import norms

    assert hetlora.update_norm is privacy.update_norm is norms.update_norm
    assert hetlora.frobenius_norm is validation.frobenius_norm is norms.frobenius_norm
    for u in case.updates:
        want = math.sqrt(sum(float(np.sum(dense(f) ** 2)) for f in u.factors.values()))
        assert norms.update_norm(u.factors.values()) == pytest.approx(want, rel=1e-10, abs=1e-12)
        assert norms.update_norm(iter(u.factors.values())) == norms.update_norm(u.factors.values())


@pytest.mark.parametrize(
    "options",
    [{"weighting": "module"}, {"weight_by_examples": True}],
    ids=["per-module", "by-examples"],
)
@settings(max_examples=25, deadline=None)
@given(case=rounds())
def test_hetlora_variants_match_dense_reference(options: dict, case: Round) -> None:
    """HetLoRA's non-paper options: each module weighed by its own ‖s·B·A‖_F, or the client
    norms times the example weights; every rank gets the prefix of the padded average."""
    state = get_aggregator("hetlora", dtype=torch.float64, **options).aggregate(
        case.updates, case.weights
    )
    p = probabilities(case.updates, case.weights)
    whole = [
        math.sqrt(sum(float(np.sum(dense(f) ** 2)) for f in u.factors.values()))
        for u in case.updates
    ]
    for module in (Q, UP):
        if options.get("weighting") == "module":
            c = [float(np.linalg.norm(dense(u.factors[module]))) for u in case.updates]
        else:
            c = [norm * pi for norm, pi in zip(whole, p, strict=True)]
        q = [x / sum(c) for x in c] if sum(c) > 0 else list(p)
        B, A = ref_padded_average(case.updates, module, q)
        for r in client_ranks(case.updates, module):
            got = state[module].factors(r, 8.0, module=module)
            assert rel_err(dense(got), product(B, A, r)) <= 1e-9, (module, r)


def test_hetlora_all_zero_updates_fall_back_to_example_weights() -> None:
    zero = [
        ClientUpdate(
            c, k, {Q: LoRAFactors(torch.ones(r, 3).double(), torch.zeros(4, r).double(), 8.0)}
        )
        for c, k, r in (("a", 1, 1), ("b", 3, 2))
    ]
    state = get_aggregator("hetlora", dtype=torch.float64).aggregate(zero)
    expected_A = zero_pad(np.ones((1, 3)), 2, 3) * 0.25 + np.ones((2, 3)) * 0.75
    np.testing.assert_allclose(state[Q].Vh.numpy(), expected_A)
    assert not state[Q].dense().any()


# --- shared checks, purity, registry ---------------------------------------------------------


def test_check_updates_returns_shapes() -> None:
    updates = make_round(
        0, {Q: (5, 4), UP: (9, 4)}, [{Q: 1, UP: 2}, {Q: 3, UP: 1}], [1, 1], [8.0] * 2
    )
    assert check_updates(updates) == {Q: (5, 4), UP: (9, 4)}


def _with(update: ClientUpdate, module: str, f: LoRAFactors | None) -> ClientUpdate:
    factors = dict(update.factors)
    if f is None:
        del factors[module]
    else:
        factors[module] = f
    return ClientUpdate(update.client_id, update.num_examples, factors)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("missing", "missing_module"),
        ("shape", "shape"),
        ("nan", "nonfinite"),
        ("inf", "nonfinite"),
        ("int", "dtype"),
    ],
)
def test_bad_updates_name_the_client_and_module(strategy: str, fault: str, reason: str) -> None:
    updates = make_round(
        0, {Q: (5, 4), UP: (9, 4)}, [{Q: 2, UP: 2}] * 3, [1, 1, 1], [8.0] * 3, shared_A=True
    )
    f = updates[1].factors[UP]
    bad: LoRAFactors | None
    if fault == "missing":
        bad = None
    elif fault == "shape":
        bad = LoRAFactors(f.A, torch.ones(10, 2, dtype=f.B.dtype), f.alpha)
    elif fault == "int":
        bad = LoRAFactors(f.A, torch.ones(9, 2, dtype=torch.int64), f.alpha)
    else:
        B = f.B.clone()
        B[3, 1] = math.nan if fault == "nan" else -math.inf
        bad = LoRAFactors(f.A, B, f.alpha)
    updates[1] = _with(updates[1], UP, bad)
    with pytest.raises(InvalidUpdateError) as info:
        get_aggregator(strategy).aggregate(updates)
    err = info.value
    assert (err.client, err.module, err.reason) == ("client-1", UP, reason)
    assert "client client-1" in str(err) and f"module {UP}" in str(err)


def test_module_only_one_client_sent_is_reported_on_the_others() -> None:
    updates = make_round(0, {Q: (5, 4)}, [{Q: 2}] * 2, [1, 1], [8.0] * 2)
    extra = make_round(1, {UP: (9, 4)}, [{UP: 2}], [1], [8.0])[0].factors[UP]
    updates[1] = _with(updates[1], UP, extra)
    with pytest.raises(InvalidUpdateError) as info:
        check_updates(updates)
    assert (info.value.client, info.value.module) == ("client-0", UP)
    assert "client-1 sent it" in str(info.value)


def test_empty_and_duplicate_rounds_are_refused() -> None:
    with pytest.raises(InvalidUpdateError, match="no client updates"):
        check_updates([])
    u = make_round(0, {Q: (3, 3)}, [{Q: 1}], [1], [8.0])[0]
    with pytest.raises(InvalidUpdateError, match="client client-0: client sent two updates"):
        check_updates([u, u])
    with pytest.raises(InvalidUpdateError, match="client e: update has no modules"):
        check_updates([u, ClientUpdate("e", 1, {})])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_aggregation_does_not_touch_its_inputs(strategy: str) -> None:
    ranks = [{Q: 2, UP: 2}] * 2
    updates = make_round(5, {Q: (6, 5), UP: (7, 5)}, ranks, [2, 3], [8.0] * 2, shared_A=True)
    before = [{k: (f.A.clone(), f.B.clone()) for k, f in u.factors.items()} for u in updates]
    agg = get_aggregator(strategy)
    previous = agg.aggregate(updates)
    prev_copy = {k: (d.U.clone(), d.S.clone(), d.Vh.clone()) for k, d in previous.modules.items()}
    state = agg.aggregate(updates, previous=previous)
    for u, saved in zip(updates, before, strict=True):
        for k, (A, B) in saved.items():
            assert torch.equal(u.factors[k].A, A) and torch.equal(u.factors[k].B, B)
    for k, (U, S, Vh) in prev_copy.items():
        d = previous[k]
        assert torch.equal(d.U, U) and torch.equal(d.S, S) and torch.equal(d.Vh, Vh)
    # the returned state shares no storage with the inputs
    inputs = {
        t.untyped_storage().data_ptr()
        for u in updates
        for f in u.factors.values()
        for t in (f.A, f.B)
    }
    for d in state.modules.values():
        assert d.U.untyped_storage().data_ptr() not in inputs
        assert d.Vh.untyped_storage().data_ptr() not in inputs


def test_registry_and_traits() -> None:
    assert set(STRATEGIES) <= set(AGGREGATORS)
    traits = {
        name: (cls.freeze_lora_A, cls.merges_into_base, cls.needs_uniform_rank)
        for name, cls in AGGREGATORS.items()
        if name in STRATEGIES
    }
    assert traits == {
        "flexlora": (False, False, False),
        "fedit": (False, False, True),
        "hetlora": (False, False, False),
        "flora": (False, True, False),
        "ffa": (True, False, False),
    }
    with pytest.raises(UsageError, match=r"unknown strategy 'fedavg'.*flexlora"):
        get_aggregator("fedavg")
    with pytest.raises(UsageError, match="strategy 'fedit'"):
        get_aggregator("fedit", svd="dense")
    assert get_aggregator("hetlora", dtype="float64").dtype == torch.float64


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_initial_state_is_zero_with_a_shared_A(strategy: str) -> None:
    agg = get_aggregator(strategy)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    state = agg.initial_state({Q: (6, 16), UP: (9, 16)}, {Q: 4, UP: 8}, g1)
    again = agg.initial_state({Q: (6, 16), UP: (9, 16)}, {Q: 4, UP: 8}, g2)
    for module, r_max in ((Q, 4), (UP, 8)):
        assert not state[module].dense().any()
        assert torch.equal(state[module].Vh, again[module].Vh)
        small, big = state[module].factors(2, 8.0), state[module].factors(r_max, 8.0)
        assert torch.equal(small.A, big.A[:2])  # every rank starts from the same prefix
        assert bool((big.A.abs() <= 1 / 4).all()) and torch.linalg.matrix_rank(big.A) == r_max
    assert isinstance(state, GlobalUpdate)


def test_shape_error_blames_the_odd_client_out_even_when_it_comes_first() -> None:
    ranks = [{Q: 2}] * 3
    odd = make_round(0, {Q: (7, 4)}, [{Q: 2}], [1], [8.0])[0]
    updates = [
        ClientUpdate("odd", 1, odd.factors),
        *make_round(1, {Q: (5, 4)}, ranks[:2], [1, 1], [8.0] * 2),
    ]
    with pytest.raises(InvalidUpdateError) as info:
        check_updates(updates)
    assert (info.value.client, info.value.module, info.value.reason) == ("odd", Q, "shape")
    assert "adapts a 7x4 weight" in str(info.value) and "client client-0 adapts 5x4" in str(
        info.value
    )


@pytest.mark.parametrize("split", ["B", "balanced"])
def test_ffa_redistribution_keeps_the_frozen_A_for_every_split(split: str) -> None:
    """The A a client gets back is the shared frozen A, so the next round is accepted."""
    ranks = [{Q: 2}, {Q: 4}]
    updates = make_round(6, {Q: (6, 8)}, ranks, [1, 1], [8.0, 16.0], shared_A=True)
    shared = updates[1].factors[Q].A
    agg = get_aggregator("ffa", dtype=torch.float64)
    state = agg.aggregate(updates)
    back = [state[Q].factors(r[Q], a, split=split) for r, a in zip(ranks, (8.0, 16.0), strict=True)]
    for f in back:
        assert torch.equal(f.A, shared[: f.rank])
    p = probabilities(updates, None)
    for f, r in zip(back, ranks, strict=True):
        assert rel_err(dense(f), ref_client_delta("ffa", updates, Q, p, r[Q])) <= 1e-12
    agg.aggregate([ClientUpdate(f"client-{i}", 1, {Q: f}) for i, f in enumerate(back)])


def test_ffa_names_the_clients_own_rank_when_it_is_larger_than_the_reference() -> None:
    """A rank-3 client whose A moved, against a rank-2 reference: the message gave the
    length of the compared prefix (2) as the client's rank."""
    updates = make_round(2, {Q: (6, 8)}, [{Q: 2}, {Q: 3}], [1, 1], [8.0] * 2, shared_A=True)
    f = updates[1].factors[Q]
    updates[1] = ClientUpdate("client-1", 1, {Q: LoRAFactors(f.A + 1e-3, f.B, f.alpha)})
    with pytest.raises(
        InvalidUpdateError,
        match=r"this client's A \(rank 3\) differs from .*"
        r"\(rank 2\) in its first 2 rows",
    ):
        get_aggregator("ffa").aggregate(updates)
