"""Client-level DP: exact clipping of factored updates, noise of the right size on the sum,
ε from Opacus's RDP accountant, which strategies accept it, and a DP run's metrics."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from flexlora.errors import UsageError
from flexlora.lora.norms import update_norm
from flexlora.privacy import ClientDP, clip_update, dp_epsilon
from flexlora.server import Coordinator
from flexlora.types import ClientUpdate, LoRAFactors
from tests.conftest import random_factors
from tests.reliability_helpers import one_torch_thread  # noqa: F401 (fixture)
from tests.sim_helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_update(
    cid: str, shapes: dict[str, tuple[int, int]], ranks: dict[str, int], seed: int, scale: float
) -> ClientUpdate:
    factors = {}
    for i, (name, (m, n)) in enumerate(shapes.items()):
        f = random_factors(m, n, ranks[name], seed=seed * 31 + i, alpha=8.0)
        factors[name] = LoRAFactors(A=f.A, B=f.B * scale, alpha=f.alpha)
    return ClientUpdate(cid, 5 + seed, factors)


def dense_norm(u: ClientUpdate) -> float:
    return math.sqrt(sum(float(torch.sum(f.delta(torch.float64) ** 2)) for f in u.factors.values()))


@st.composite
def updates(draw: st.DrawFn) -> ClientUpdate:
    k = draw(st.integers(1, 3))
    shapes = {f"mod{i}": (draw(st.integers(1, 9)), draw(st.integers(1, 9))) for i in range(k)}
    ranks = {name: draw(st.integers(1, 5)) for name in shapes}
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    return make_update("c", shapes, ranks, draw(st.integers(0, 999)), scale)


@settings(max_examples=40, deadline=None)
@given(u=updates(), clip=st.floats(1e-3, 1e3))
def test_scaling_B_clips_the_whole_update_exactly(u: ClientUpdate, clip: float) -> None:
    before = {k: (f.A.clone(), f.B.clone()) for k, f in u.factors.items()}
    clipped, norm = clip_update(u, clip)
    assert norm == pytest.approx(dense_norm(u), rel=1e-9)
    assert dense_norm(clipped) == pytest.approx(min(norm, clip), rel=1e-9)
    c = min(1.0, clip / norm)
    for name, f in clipped.factors.items():
        expected = c * u.factors[name].delta()
        atol = 1e-12 * float(expected.abs().max())
        torch.testing.assert_close(f.delta(), expected, rtol=1e-10, atol=atol)
        assert f.rank == u.factors[name].rank  # still a rank-r LoRA update
    for k, f in u.factors.items():  # the input is untouched
        assert torch.equal(f.A, before[k][0]) and torch.equal(f.B, before[k][1])
    assert update_norm(clipped.factors.values()) <= clip * (1 + 1e-9)


SHAPES = {"q": (40, 30), "up": (50, 30)}
RANKS = {"q": 2, "up": 4}
FULL = {name: min(m, n) for name, (m, n) in SHAPES.items()}


def cohort_updates(k: int = 3) -> list[ClientUpdate]:
    return [make_update(f"c{i}", SHAPES, RANKS, i, scale=1.0 + 3 * i) for i in range(k)]


def test_noiseless_dp_is_the_fixed_cohort_mean_of_clipped_updates() -> None:
    ups = cohort_updates()
    low, mid, _ = sorted(dense_norm(u) for u in ups)
    clip = (low * mid) ** 0.5  # one update below the clip, two above
    dp = ClientDP(clip=clip, noise_multiplier=0.0, delta=1e-5, cohort=4, population=10)
    state, n_clipped = dp.aggregate(
        ups, SHAPES, FULL, torch.Generator().manual_seed(0), torch.float64
    )
    assert n_clipped == 2
    for name in SHAPES:
        reference = (
            sum(min(1.0, clip / dense_norm(u)) * u.factors[name].delta(torch.float64) for u in ups)
            / 4
        )  # uniform weights over the fixed cohort K = 4, not the 3 that answered
        torch.testing.assert_close(state[name].dense(), reference, rtol=1e-9, atol=1e-12)


def test_noise_on_the_sum_has_std_sigma_clip_over_cohort() -> None:
    ups = cohort_updates()
    sigma, clip, cohort = 2.0, 0.5, 4
    dp = ClientDP(clip=clip, noise_multiplier=sigma, delta=1e-5, cohort=cohort, population=10)
    clean = ClientDP(clip=clip, noise_multiplier=0.0, delta=1e-5, cohort=cohort, population=10)
    noised, _ = dp.aggregate(ups, SHAPES, FULL, torch.Generator().manual_seed(3), torch.float64)
    base, _ = clean.aggregate(ups, SHAPES, FULL, torch.Generator().manual_seed(3), torch.float64)
    residual = torch.cat([(noised[n].dense() - base[n].dense()).flatten() for n in SHAPES])
    assert residual.numel() == 40 * 30 + 50 * 30
    assert float(residual.std()) == pytest.approx(sigma * clip / cohort, rel=0.06)
    assert abs(float(residual.mean())) < 4 * sigma * clip / cohort / residual.numel() ** 0.5
    # the noised ΔW is full rank: the SVD truncation acts on it (post-processing)
    assert torch.linalg.matrix_rank(noised["q"].dense()) == 30
    again, _ = dp.aggregate(ups, SHAPES, FULL, torch.Generator().manual_seed(3), torch.float64)
    other, _ = dp.aggregate(ups, SHAPES, FULL, torch.Generator().manual_seed(4), torch.float64)
    assert torch.equal(again["q"].S, noised["q"].S) and not torch.equal(other["q"].S, noised["q"].S)


def test_the_state_keeps_the_best_low_rank_part_of_the_noised_sum() -> None:
    ups = cohort_updates()
    dp = ClientDP(clip=1.0, noise_multiplier=1.0, delta=1e-5, cohort=3, population=3)
    full, _ = dp.aggregate(ups, SHAPES, FULL, torch.Generator().manual_seed(1), torch.float64)
    cut, _ = dp.aggregate(ups, SHAPES, RANKS, torch.Generator().manual_seed(1), torch.float64)
    for name, r in RANKS.items():
        assert cut[name].rank == r
        torch.testing.assert_close(cut[name].S, full[name].S[:r])
        U, S, Vh = full[name].U[:, :r], full[name].S[:r], full[name].Vh[:r]
        torch.testing.assert_close(cut[name].dense(), (U * S) @ Vh, rtol=1e-9, atol=1e-12)


def test_epsilon_comes_from_the_rdp_accountant() -> None:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(5):
        accountant.step(noise_multiplier=1.1, sample_rate=0.04)
    assert dp_epsilon(1.1, 0.04, 5, 1e-5) == pytest.approx(accountant.get_epsilon(delta=1e-5))
    assert dp_epsilon(1.1, 0.04, 0, 1e-5) == 0.0
    assert dp_epsilon(0.0, 0.04, 3, 1e-5) == math.inf
    # more noise, fewer rounds or a smaller sample rate spend less
    assert dp_epsilon(2.0, 0.04, 5, 1e-5) < dp_epsilon(1.1, 0.04, 5, 1e-5)
    assert dp_epsilon(1.1, 0.04, 5, 1e-5) < dp_epsilon(1.1, 0.04, 50, 1e-5)
    assert dp_epsilon(1.1, 0.01, 5, 1e-5) < dp_epsilon(1.1, 0.04, 5, 1e-5)


@pytest.mark.parametrize("sigma,steps", [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_full_participation_epsilon_is_below_the_classic_rdp_bound(
    sigma: float, steps: int
) -> None:
    """q = 1: RDP of T Gaussian steps is T·α/(2σ²); ε ≤ min_α RDP + log(1/δ)/(α-1)."""
    from opacus.accountants import RDPAccountant

    delta = 1e-5
    classic = min(
        steps * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1)
        for a in RDPAccountant.DEFAULT_ALPHAS
    )
    eps = dp_epsilon(sigma, 1.0, steps, delta)
    assert 0.5 * classic < eps <= classic


@pytest.mark.parametrize("strategy", ["fedit-min", "fedit-max", "hetlora", "flora", "ffa"])
def test_dp_is_refused_for_strategies_whose_aggregate_is_not_dw(strategy: str) -> None:
    cfg = tiny_config("unused", federation={"strategy": strategy, "dp_clip": 1.0})
    types = dict.fromkeys(["a", "b"], "8")
    with pytest.raises(UsageError, match="supported by flexlora only"):
        Coordinator(cfg, {"q": (8, 8)}, types)


def test_noise_without_a_clip_is_refused() -> None:
    cfg = tiny_config("unused", federation={"dp_noise_multiplier": 1.0})
    with pytest.raises(UsageError, match=r"needs federation\.dp_clip"):
        Coordinator(cfg, {"q": (8, 8)}, {"a": "8"})


def test_a_dp_run_logs_epsilon_per_round(tmp_path: Path) -> None:
    from flexlora.simulation.runner import FederatedRun
    from flexlora.training.model import build_tiny_llama
    from tests.sim_helpers import make_dataset

    fed = {"dp_clip": 0.05, "dp_noise_multiplier": 0.8, "dp_delta": 1e-4}
    cfg = tiny_config(str(tmp_path / "dp"), federation=fed, eval={"at_start": False, "every": 0})
    rows = FederatedRun(
        cfg, dataset=make_dataset(), model_and_tokenizer=build_tiny_llama(seed=0)
    ).run()
    assert [r["round"] for r in rows] == [1, 2]
    q = 4 / 6  # clients_per_round / population
    for r in rows:
        assert r["dp_noise_multiplier"] == 0.8 and r["dp_delta"] == 1e-4 and r["dp_clip"] == 0.05
        assert r["dp_epsilon"] == pytest.approx(dp_epsilon(0.8, q, r["round"], 1e-4))
        assert r["aggregated"] and 0 <= r["dp_clipped"] <= len(r["aggregated"])
    assert 0 < rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"]
    assert (tmp_path / "dp" / "adapters" / "rank-8" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- DPSum: exactness and memory


def dense_dp_reference(
    ups: list[ClientUpdate],
    shapes: dict[str, tuple[int, int]],
    keep: dict[str, int],
    dp: ClientDP,
    seed: int,
    noise_dtype: torch.dtype,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The obvious way, in float64: clip each update, sum the s·B·A, add the noise (drawn in
    ``noise_dtype`` from a generator seeded alike, module by module), divide by K, SVD, cut.

    Per module: the reconstructed truncation U·S·Vh and all the singular values."""
    g = torch.Generator().manual_seed(seed)
    std = dp.noise_multiplier * dp.clip
    out = {}
    for name, (m, n) in shapes.items():
        total = torch.zeros(m, n, dtype=torch.float64)
        for u in ups:
            total += min(1.0, dp.clip / dense_norm(u)) * u.factors[name].delta(torch.float64)
        if std > 0:
            total += std * torch.randn(m, n, generator=g, dtype=noise_dtype).double()
        total /= dp.cohort
        U, S, Vh = torch.linalg.svd(total, full_matrices=False)
        k = min(keep[name], S.numel())
        out[name] = ((U[:, :k] * S[:k]) @ Vh[:k], S)
    return out


@st.composite
def dp_rounds(draw: st.DrawFn) -> tuple[list[ClientUpdate], dict, dict, ClientDP]:
    k = draw(st.integers(1, 3))
    shapes = {f"mod{i}": (draw(st.integers(1, 12)), draw(st.integers(1, 12))) for i in range(k)}
    clients = draw(st.integers(1, 6))
    ups = []
    for c in range(clients):
        ranks = {name: draw(st.integers(1, 5)) for name in shapes}
        scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
        ups.append(make_update(f"c{c}", shapes, ranks, draw(st.integers(0, 999)), scale))
    keep = {name: draw(st.integers(1, min(m, n))) for name, (m, n) in shapes.items()}
    dp = ClientDP(
        clip=draw(st.floats(0.05, 20.0)),
        noise_multiplier=draw(st.sampled_from([0.0, 0.3, 2.0])),
        delta=1e-5,
        cohort=clients + draw(st.integers(0, 2)),
        population=clients + 2,
    )
    return ups, shapes, keep, dp


@settings(max_examples=60, deadline=None)
@given(case=dp_rounds(), seed=st.integers(0, 2**31 - 1))
def test_dpsum_equals_the_slow_dense_reference(case: tuple, seed: int) -> None:
    """Stacks or dense sum, the noised truncated state is the one formed the obvious way."""
    ups, shapes, keep, dp = case
    ref = dense_dp_reference(ups, shapes, keep, dp, seed, torch.float64)
    for name, (_, S) in ref.items():  # a truncation inside a (near) tie is not unique
        k = min(keep[name], S.numel())
        assume(k == S.numel() or float(S[k - 1] - S[k]) > 1e-6 * float(S[0]))
    acc = dp.start(shapes, keep, torch.float64)
    for u in ups:
        acc.add(u)
    state, n_clipped = acc.result(torch.Generator().manual_seed(seed))
    assert n_clipped == sum(dense_norm(u) > dp.clip for u in ups)
    for name, (expected, S) in ref.items():
        assert state[name].rank == min(keep[name], S.numel())
        atol = 1e-8 * float(S[0]) + 1e-300
        torch.testing.assert_close(state[name].dense(), expected, rtol=0, atol=atol)


def test_dpsum_in_float32_matches_the_float64_reference() -> None:
    """Both forms in float32 (q and v stay stacked, up and wide go dense), σ > 0."""
    shapes = {"q": (64, 48), "v": (48, 16), "up": (20, 24), "wide": (6, 90)}
    ranks = {"q": 4, "v": 2, "up": 4, "wide": 3}
    ups = [make_update(f"c{i}", shapes, ranks, i, scale=0.5 + i) for i in range(6)]
    keep = {"q": 6, "v": 16, "up": 5, "wide": 6}
    dp = ClientDP(clip=2.0, noise_multiplier=0.7, delta=1e-5, cohort=7, population=20)
    acc = dp.start(shapes, keep)
    for u in ups:
        acc.add(u)
    forms = {name: a.stacked for name, a in acc.modules.items()}
    assert forms == {"q": True, "v": True, "up": False, "wide": False}
    state, _ = acc.result(torch.Generator().manual_seed(11))
    ref = dense_dp_reference(ups, shapes, keep, dp, 11, torch.float32)
    for name, (expected, S) in ref.items():
        assert state[name].U.dtype == torch.float32
        torch.testing.assert_close(state[name].dense(), expected, rtol=0, atol=2e-5 * float(S[0]))


def test_dpsum_holds_per_module_the_smaller_exact_form() -> None:
    """After each of 40 replies: per module exactly min(R·(m + n), m·n) numbers, the stacks
    (no (m, n) tensor) while they are the smaller, and never a buffer beyond m·n."""
    shapes = {"q": (64, 64), "v": (64, 16), "up": (96, 40), "tall": (200, 3), "big": (512, 400)}
    cycle = [1, 2, 4, 8]
    dp = ClientDP(clip=1.0, noise_multiplier=1.0, delta=1e-5, cohort=40, population=100)
    acc = dp.start(shapes, dict.fromkeys(shapes, 8))
    total_rank = dict.fromkeys(shapes, 0)
    went_dense = set()
    for c in range(40):
        ranks = {
            name: min(cycle[(c + i) % 4], min(m, n))
            for i, (name, (m, n)) in enumerate(shapes.items())
        }
        acc.add(make_update(f"c{c}", shapes, ranks, c, scale=1.0))
        for name, (m, n) in shapes.items():
            total_rank[name] += ranks[name]
            R, mod = total_rank[name], acc.modules[name]
            assert mod.num_bytes() == min(R * (m + n), m * n) * 4  # float32, exactly
            if R * (m + n) <= m * n:
                assert mod.stacked and all(t.shape != (m, n) for t in mod.tensors())
                assert sum(t.numel() for t in mod.tensors()) == R * (m + n)
            else:
                assert not mod.stacked and [t.shape for t in mod.tensors()] == [(m, n)]
                went_dense.add(name)
            allocated = [s.buffer for s in (mod.Bt, mod.As) if s.buffer is not None]
            assert sum(b.numel() for b in allocated) <= m * n
    assert went_dense == {"q", "v", "up", "tall"}  # "big" stays stacked: 150·912 < 512·400
    expected = sum(min(total_rank[k] * (m + n), m * n) for k, (m, n) in shapes.items())
    assert acc.num_bytes() == 4 * expected < 4 * sum(m * n for m, n in shapes.values())


def test_dpsum_result_forms_one_dense_matrix_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each module's noised (m, n) matrix is freed before the next module's SVD."""
    import weakref

    from flexlora.lora import svd as svd_module

    shapes = {"q": (30, 20), "v": (30, 8), "up": (12, 40)}
    ups = [make_update(f"c{i}", shapes, {"q": 2, "v": 4, "up": 8}, i, 1.0) for i in range(3)]
    seen: list[weakref.ref] = []

    def tracking(real):  # type: ignore[no-untyped-def]
        def svd(delta: torch.Tensor, *args: int):  # type: ignore[no-untyped-def]
            assert all(ref() is None for ref in seen), "an earlier module's matrix is still held"
            seen.append(weakref.ref(delta))
            return real(delta, *args)

        return svd

    # the full SVD, or the top-k route for a kept rank at most min(m, n) / 4 (q, up here)
    monkeypatch.setattr(svd_module, "dense_svd", tracking(svd_module.dense_svd))
    monkeypatch.setattr(svd_module, "dense_top_svd", tracking(svd_module.dense_top_svd))
    for sigma in (0.0, 1.0):
        seen.clear()
        dp = ClientDP(clip=1.0, noise_multiplier=sigma, delta=1e-5, cohort=3, population=9)
        acc = dp.start(shapes, dict.fromkeys(shapes, 4))
        for u in ups:
            acc.add(u)
        assert {n: a.stacked for n, a in acc.modules.items()} == {
            "q": True,
            "v": False,
            "up": False,
        }
        acc.result(torch.Generator().manual_seed(0))
        assert len(seen) == 3 and all(ref() is None for ref in seen)


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_dpsum_result_twice_gives_identical_tensors(sigma: float) -> None:
    shapes = {"q": (30, 20), "v": (30, 8)}  # q stays stacked, v goes dense
    ups = [make_update(f"c{i}", shapes, {"q": 2, "v": 4}, i, 1.0 + i) for i in range(4)]
    dp = ClientDP(clip=0.8, noise_multiplier=sigma, delta=1e-5, cohort=5, population=9)
    acc = dp.start(shapes, {"q": 5, "v": 3})
    for u in ups:
        acc.add(u)
    assert acc.modules["q"].stacked and not acc.modules["v"].stacked
    held = [t.clone() for a in acc.modules.values() for t in a.tensors()]
    first, c1 = acc.result(torch.Generator().manual_seed(5))
    second, c2 = acc.result(torch.Generator().manual_seed(5))
    assert c1 == c2 == sum(dense_norm(u) > 0.8 for u in ups)
    for name in shapes:
        for attr in ("U", "S", "Vh"):
            assert torch.equal(getattr(first[name], attr), getattr(second[name], attr))
    now = [t for a in acc.modules.values() for t in a.tensors()]  # the sums are untouched
    assert len(now) == len(held) and all(torch.equal(a, b) for a, b in zip(now, held, strict=True))


def test_dpsum_add_without_a_module_changes_nothing() -> None:
    shapes = {"q": (10, 8), "v": (10, 8)}
    dp = ClientDP(clip=1.0, noise_multiplier=0.0, delta=1e-5, cohort=2, population=4)
    acc = dp.start(shapes, {"q": 4, "v": 4})
    acc.add(make_update("a", shapes, {"q": 2, "v": 2}, 0, 1.0))
    before = [t.clone() for a in acc.modules.values() for t in a.tensors()]
    clipped = acc.clipped
    partial = make_update("b", {"q": (10, 8)}, {"q": 2}, 1, 5.0)  # no "v"
    with pytest.raises(KeyError):
        acc.add(partial)
    assert acc.count == 1 and acc.clipped == clipped
    assert all(a.total_rank == 2 for a in acc.modules.values())
    now = [t for a in acc.modules.values() for t in a.tensors()]
    assert all(torch.equal(a, b) for a, b in zip(now, before, strict=True))


def bad_reply(kind: str, good: ClientUpdate) -> ClientUpdate:
    """``good`` spoiled in its last module, which a partial fold would reach last."""
    name = list(good.factors)[-1]
    f = good.factors[name]
    factors = dict(good.factors)
    if kind == "nonfinite":
        B = f.B.clone()
        B[0, 0] = float("nan")
        factors[name] = LoRAFactors(A=f.A, B=B, alpha=f.alpha)
    elif kind == "missing_module":
        del factors[name]
    elif kind == "shape":
        factors[name] = LoRAFactors(A=f.A[:, :-1], B=f.B, alpha=f.alpha)
    elif kind == "alpha":
        factors[name] = LoRAFactors(A=f.A, B=f.B, alpha=f.alpha * 3)
    return replace(good, factors=factors)


@pytest.mark.parametrize("kind", ["nonfinite", "missing_module", "shape", "alpha"])
def test_a_rejected_reply_leaves_no_trace_in_the_dp_round(kind: str) -> None:
    """The server validates a reply before DPSum.add: refused, the state is the one of the
    valid replies alone, bit for bit (same round, so the same noise)."""
    shapes = {"layers.0.self_attn.q_proj": (12, 8), "layers.0.mlp.up_proj": (16, 8)}
    types = {"c0": "2", "c1": "4", "c2": "8", "c3": "2"}
    fed = {"dp_clip": 0.5, "dp_noise_multiplier": 1.0}
    server = Coordinator(tiny_config("unused", federation=fed), shapes, types)
    alpha = server.cfg.lora.alpha

    def reply(cid: str, seed: int) -> ClientUpdate:
        g = torch.Generator().manual_seed(seed)
        factors = {}
        for name, (m, n) in shapes.items():
            r = server.ranks_of(cid)[name]
            A, B = torch.randn(r, n, generator=g) / n**0.5, torch.randn(m, r, generator=g)
            factors[name] = LoRAFactors(A=A, B=B, alpha=alpha)
        return ClientUpdate(cid, 10, factors)

    state0 = server.initial_state()
    c0, c1, c2 = reply("c0", 0), reply("c1", 1), reply("c2", 2)
    clean = server.open_round(state0, 1, list(types))
    for u in (c0, c2):
        assert clean.add(u)
    expected, _ = clean.close()
    dirty = server.open_round(state0, 1, list(types))
    assert dirty.add(c0)
    assert not dirty.add(bad_reply(kind, c1))
    assert dirty.add(c2)
    got, row = dirty.close()
    assert kind in str(row["rejected"])
    for name in shapes:
        for attr in ("U", "S", "Vh"):
            assert torch.equal(getattr(got[name], attr), getattr(expected[name], attr))
