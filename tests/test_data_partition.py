"""Splitting, subsampling, unseen selection and the Dirichlet / meta partitioners."""

from __future__ import annotations

import statistics
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.data.partition import (
    category_entropy,
    dirichlet_partition,
    meta_partition,
    rng_for,
    select_unseen,
    shard,
    split_examples,
    split_sizes,
    subsample_indices,
)
from flexlora.data.types import Example

RATIOS = (0.8, 0.1, 0.1)


def _examples(n: int, cats: int = 1) -> list[Example]:
    return [Example("i", f"x{j}", f"y{j}", f"c{j % cats}", id=str(j)) for j in range(n)]


@pytest.mark.parametrize(("n", "sizes"), [(10, (8, 1, 1)), (100, (80, 10, 10)), (58, (46, 6, 6))])
def test_split_sizes_8_1_1(n: int, sizes: tuple[int, int, int]) -> None:
    assert split_sizes(n, RATIOS) == sizes


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5000), st.sampled_from([RATIOS, (0.9, 0.05, 0.05), (0.7, 0.3, 0.0)]))
def test_split_sizes_properties(n: int, ratios: tuple[float, float, float]) -> None:
    tr, ev, te = split_sizes(n, ratios)
    assert tr + ev + te == n and tr >= 1 and ev >= 0 and te >= 0
    if n >= 3 and ratios[2] > 0:
        assert te >= 1
    if ratios[2] == 0:
        assert te == 0
    assert abs(te - n * ratios[2]) <= 1


def test_split_examples_is_a_seeded_partition_and_caps_apply_after() -> None:
    exs = _examples(50)
    a = split_examples(exs, RATIOS, rng_for(1, "split", "c"))
    b = split_examples(exs, RATIOS, rng_for(1, "split", "c"))
    c = split_examples(exs, RATIOS, rng_for(2, "split", "c"))
    assert a == b and a != c
    assert (len(a.train), len(a.eval), len(a.test)) == (40, 5, 5)
    assert sorted(e.id for e in (*a.train, *a.eval, *a.test)) == sorted(e.id for e in exs)
    capped = split_examples(exs, RATIOS, rng_for(1, "split", "c"), max_train=7, max_test=2)
    assert capped.train == a.train[:7] and capped.test == a.test[:2] and capped.eval == a.eval[:2]
    unseen = split_examples(exs, RATIOS, rng_for(1, "split", "c"), keep_train=False)
    assert unseen.train == () and unseen.eval == a.eval and unseen.test == a.test


def test_subsample_indices() -> None:
    kept = subsample_indices(100, 0.25, 0, rng_for(0, "s"))
    assert len(kept) == 25 and list(kept) == sorted(set(kept.tolist()))
    assert len(subsample_indices(100, 1.0, 10, rng_for(0, "s"))) == 10
    assert len(subsample_indices(3, 0.01, 0, rng_for(0, "s"))) == 1  # never empties a task
    assert list(subsample_indices(5, 1.0, 0, rng_for(0, "s"))) == [0, 1, 2, 3, 4]


def test_select_unseen() -> None:
    units = [f"t{i}" for i in range(20)]
    a = select_unseen(units, 0.25, rng_for(3, "unseen"))
    assert len(a) == 5 and a <= set(units)
    assert a == select_unseen(list(reversed(units)), 0.25, rng_for(3, "unseen"))  # order-free
    assert a != select_unseen(units, 0.25, rng_for(4, "unseen"))
    assert select_unseen(units, 0.0, rng_for(3, "unseen")) == set()
    assert len(select_unseen(units[:2], 0.01, rng_for(3, "unseen"))) == 1
    assert len(select_unseen(units[:1], 0.5, rng_for(3, "unseen"))) == 0  # keeps one seen


def test_shard_near_equal_and_complete() -> None:
    parts = shard(_examples(10), 3, rng_for(0, "shard"))
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert sorted(e.id for p in parts for e in p) == sorted(str(j) for j in range(10))
    assert len(shard(_examples(2), 5, rng_for(0, "shard"))) == 2


def _dirichlet_entropy(alpha: float, seed: int) -> float:
    exs = _examples(2000, cats=8)
    parts = dirichlet_partition([e.category for e in exs], 20, alpha, rng_for(seed, "d"))
    return statistics.fmean(category_entropy(exs[i] for i in p) for p in parts)


def test_dirichlet_partition_covers_every_example_once_with_equal_sizes() -> None:
    cats = [f"c{j % 5}" for j in range(1003)]
    parts = dirichlet_partition(cats, 10, 0.3, rng_for(0, "d"))
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(1003))
    assert {len(p) for p in parts} <= {100, 101}
    again = dirichlet_partition(cats, 10, 0.3, rng_for(0, "d"))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_skew_falls_as_alpha_grows() -> None:
    low, mid, high = (_dirichlet_entropy(a, 0) for a in (0.05, 1.0, 100.0))
    assert low < mid < high
    assert low < 1.0 and high > 2.8  # log2(8) = 3 is an IID client


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 12),
    st.floats(0.01, 50.0),
    st.integers(0, 2**16),
)
def test_dirichlet_partition_property(cats: int, clients: int, alpha: float, seed: int) -> None:
    labels = [f"c{j % cats}" for j in range(clients * 7 + seed % 5)]
    parts = dirichlet_partition(labels, clients, alpha, rng_for(seed, "d"))
    assert len(parts) == clients and all(len(p) > 0 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))


def test_dirichlet_needs_enough_examples() -> None:
    from flexlora.errors import UsageError

    with pytest.raises(UsageError, match="cannot fill"):
        dirichlet_partition(["a", "b"], 3, 1.0, rng_for(0, "d"))


def test_meta_partition_one_category_per_client() -> None:
    cats = ["b", "a", "b", "c", "a"]
    groups = meta_partition(cats)
    assert list(groups) == ["a", "b", "c"]
    assert groups == {"a": [1, 4], "b": [0, 2], "c": [3]}
    assert all(len({cats[i] for i in idx}) == 1 for idx in groups.values())


def test_category_entropy() -> None:
    assert category_entropy([]) == 0.0
    assert category_entropy(_examples(4, cats=1)) == 0.0
    assert category_entropy(_examples(8, cats=4)) == pytest.approx(2.0)
    assert Counter(e.category for e in _examples(8, cats=4))["c0"] == 2
