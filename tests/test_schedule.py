"""Resource types and client sampling: exact shares, seeded, every client reachable."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.config import PAPER_RANK_TYPES
from flexlora.errors import UsageError
from flexlora.schedule import (
    DISTRIBUTIONS,
    assign_rank_types,
    derive_seed,
    module_ranks,
    sample_clients,
)

CLIENTS = [f"c{i:04d}" for i in range(1613)]


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_named_distributions_give_their_exact_shares(name: str) -> None:
    types = assign_rank_types(CLIENTS[:1000], name, seed=1, rank_types=PAPER_RANK_TYPES)
    counts = Counter(types.values())
    for label, share in DISTRIBUTIONS[name].items():
        assert counts[label] == round(1000 * share), (label, counts)


def test_paper_distributions_match_the_issue() -> None:
    assert DISTRIBUTIONS["heavy-tail-light"] == {"8": 0.8, "200": 0.1, "30-200": 0.05, "30": 0.05}
    assert DISTRIBUTIONS["heavy-tail-strong"] == {"200": 0.8, "30-200": 0.1, "30": 0.05, "8": 0.05}
    assert set(DISTRIBUTIONS["uniform"].values()) == {0.25}
    normal = DISTRIBUTIONS["normal"]
    assert normal["30"] + normal["30-200"] > normal["8"] + normal["200"]  # middle types dominate


def test_rank_types_are_seeded_and_fixed_per_client() -> None:
    a = assign_rank_types(CLIENTS, "uniform", 3, PAPER_RANK_TYPES)
    b = assign_rank_types(CLIENTS, "uniform", 3, PAPER_RANK_TYPES)
    c = assign_rank_types(CLIENTS, "uniform", 4, PAPER_RANK_TYPES)
    assert a == b
    assert a != c
    assert Counter(a.values()) == Counter(c.values())


def test_explicit_types_cycle_and_unknown_types_fail() -> None:
    types = assign_rank_types(["a", "b", "c"], "explicit", 0, PAPER_RANK_TYPES, ["8", "200"])
    assert types == {"a": "8", "b": "200", "c": "8"}
    with pytest.raises(UsageError, match="not defined"):
        assign_rank_types(["a"], "explicit", 0, PAPER_RANK_TYPES, ["9000"])
    with pytest.raises(UsageError, match="unknown distribution"):
        assign_rank_types(["a"], "zipf", 0, PAPER_RANK_TYPES)
    with pytest.raises(UsageError, match="client_types"):
        assign_rank_types(["a"], "explicit", 0, PAPER_RANK_TYPES)


def test_sampling_is_keyed_on_seed_and_round() -> None:
    r1 = sample_clients(CLIENTS, 80, seed=5, round_=1)
    assert r1 == sample_clients(CLIENTS, 80, seed=5, round_=1)
    assert r1 != sample_clients(CLIENTS, 80, seed=5, round_=2)
    assert r1 != sample_clients(CLIENTS, 80, seed=6, round_=1)
    assert len(set(r1)) == 80 and set(r1) <= set(CLIENTS)
    assert sample_clients(CLIENTS[:3], 80, 5, 1) == CLIENTS[:3]


def test_every_client_is_sampled_eventually_including_the_last() -> None:
    """The reference never sampled its last client; here every client has a chance."""
    clients = CLIENTS[:200]
    hit: set[str] = set()
    for round_ in range(1, 200):
        hit.update(sample_clients(clients, 10, seed=0, round_=round_))
    assert hit == set(clients)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 2**40), st.text(max_size=5)), min_size=1, max_size=4))
def test_derive_seed_is_stable_and_in_range(keys) -> None:
    s = derive_seed(*keys)
    assert s == derive_seed(*keys)
    assert 0 <= s < 2**63


def test_module_ranks_split_attention_and_ffn() -> None:
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    assert module_ranks(modules, [30, 200], ["up_proj", "down_proj"]) == {
        modules[0]: 30,
        modules[1]: 200,
    }
