"""Client-level DP: exact clipping of factored updates, noise of the right size on the sum,
ε from Opacus's RDP accountant, which strategies accept it, and a DP run's metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
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
