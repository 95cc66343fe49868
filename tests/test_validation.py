"""Malformed client updates thrown at Coordinator.aggregate: each is rejected with its reason,
the round goes on with the others, and the global state is byte-identical to before."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from flexlora.aggregation.validation import MAX_ABS, MAX_EXAMPLES, REASONS, UpdateValidator
from flexlora.lora.norms import frobenius_norm
from flexlora.server import Coordinator
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors
from tests.sim_helpers import tiny_config

SHAPES = {"layers.0.self_attn.q_proj": (8, 6), "layers.0.mlp.up_proj": (10, 6)}
CLIENTS = ["c0", "c1", "c2", "c3"]
TYPES = dict(zip(CLIENTS, ["2", "4", "2-8", "8"], strict=True))
MAX_NORM = 50.0


def coordinator(tmp: str = "unused", **federation: Any) -> Coordinator:
    cfg = tiny_config(tmp, federation={"max_update_norm": MAX_NORM, **federation})
    return Coordinator(cfg, SHAPES, TYPES)


def forge(cls: type, **fields: Any) -> Any:
    """An instance that skipped ``__post_init__``, as a careless deserializer could make."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        value = fields.get(f.name, getattr(f, "default", None))
        object.__setattr__(obj, f.name, value)
    return obj


def good_update(coord: Coordinator, cid: str, seed: int, n: int = 10) -> ClientUpdate:
    """A well-formed update at the client's assigned ranks, with a modest norm."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (m, k) in SHAPES.items():
        r = coord.ranks_of(cid)[name]
        A = torch.randn(r, k, generator=g) / k**0.5  # (r, n)
        B = torch.randn(m, r, generator=g) * 0.1  # (m, r)
        factors[name] = LoRAFactors(A=A, B=B, alpha=coord.cfg.lora.alpha)
    return ClientUpdate(cid, n + seed % 7, factors, {"train_loss": 1.0 + seed % 3})


def state_bytes(state: GlobalUpdate) -> bytes:
    """The state as safetensors bytes (its metadata apart: safetensors writes it in any order)."""
    tensors, meta = state.to_tensors()
    return save(tensors) + json.dumps(meta, sort_keys=True).encode()


def update_bytes(u: object) -> bytes | None:
    if not isinstance(u, ClientUpdate) or not isinstance(u.factors, dict):
        return None
    out = b""
    for f in u.factors.values():
        for t in (getattr(f, "A", None), getattr(f, "B", None)):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                out += (
                    t.numpy().tobytes()
                    if t.dtype != torch.bfloat16
                    else t.float().numpy().tobytes()
                )
    return out


# ---------------------------------------------------------------- malformations
Draw = Callable[[st.SearchStrategy], Any]


def _with_module(u: ClientUpdate, name: str, f: Any) -> ClientUpdate:
    factors = dict(u.factors)
    factors[name] = f
    return forge(ClientUpdate, **{**_fields(u), "factors": factors})


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _pick_module(draw: Draw) -> str:
    return draw(st.sampled_from(sorted(SHAPES)))


def bad_type(u: ClientUpdate, draw: Draw) -> list[object]:
    choice = draw(st.integers(0, 4))
    name = _pick_module(draw)
    f = u.factors[name]
    if choice == 0:
        return [draw(st.sampled_from([None, "update", 3.5, {"client_id": u.client_id}]))]
    if choice == 1:
        return [forge(ClientUpdate, **{**_fields(u), "factors": [1, 2]})]
    if choice == 2:
        return [_with_module(u, name, {"A": f.A, "B": f.B})]
    if choice == 3:
        return [_with_module(u, name, forge(LoRAFactors, **{**_fields(f), "A": f.A.tolist()}))]
    return [_with_module(u, name, forge(LoRAFactors, **{**_fields(f), "B": f.B.to_sparse()}))]


def bad_client_id(u: ClientUpdate, draw: Draw) -> list[object]:
    cid = draw(st.sampled_from([None, 7, "", ("c0",)]))
    return [forge(ClientUpdate, **{**_fields(u), "client_id": cid})]


def bad_duplicate(u: ClientUpdate, draw: Draw) -> list[object]:
    twin = dataclasses.replace(u, num_examples=u.num_examples + draw(st.integers(0, 5)))
    return [u, twin]


def bad_unknown_client(u: ClientUpdate, draw: Draw) -> list[object]:
    cid = draw(st.sampled_from(["intruder", "c9", "c0 ", "C0"]))
    return [dataclasses.replace(u, client_id=cid)]


def bad_num_examples(u: ClientUpdate, draw: Draw) -> list[object]:
    n = draw(
        st.one_of(
            st.integers(max_value=0),
            st.integers(min_value=MAX_EXAMPLES + 1),
            st.sampled_from([True, 3.0, float("nan"), "12", None]),
        )
    )
    return [forge(ClientUpdate, **{**_fields(u), "num_examples": n})]


def bad_metrics(u: ClientUpdate, draw: Draw) -> list[object]:
    metrics = draw(
        st.sampled_from(
            [
                {"train_loss": "low"},
                {"train_loss": float("nan")},
                {"train_loss": float("inf")},
                {"train_loss": None},
                {"train_loss": True},
                {3: 1.0},
                [("train_loss", 1.0)],
            ]
        )
    )
    return [forge(ClientUpdate, **{**_fields(u), "metrics": metrics})]


def bad_missing_module(u: ClientUpdate, draw: Draw) -> list[object]:
    name = _pick_module(draw)
    factors = {k: v for k, v in u.factors.items() if k != name}
    return [dataclasses.replace(u, factors=factors)]


def bad_extra_module(u: ClientUpdate, draw: Draw) -> list[object]:
    name = draw(st.sampled_from(["layers.0.self_attn.k_proj", "lm_head", "layers.9.mlp.up_proj"]))
    f = next(iter(u.factors.values()))
    return [dataclasses.replace(u, factors={**u.factors, name: f})]


def bad_ndim(u: ClientUpdate, draw: Draw) -> list[object]:
    name = _pick_module(draw)
    f = u.factors[name]
    label = draw(st.sampled_from(["A", "B"]))
    t = getattr(f, label)
    wrong = draw(st.sampled_from([t.reshape(-1), t.unsqueeze(0), torch.tensor(1.0)]))
    return [_with_module(u, name, forge(LoRAFactors, **{**_fields(f), label: wrong}))]


def bad_dtype(u: ClientUpdate, draw: Draw) -> list[object]:
    name = _pick_module(draw)
    f = u.factors[name]
    label = draw(st.sampled_from(["A", "B"]))
    dtype = draw(st.sampled_from([torch.int32, torch.int64, torch.complex64, torch.bool]))
    wrong = getattr(f, label).to(dtype)
    return [_with_module(u, name, forge(LoRAFactors, **{**_fields(f), label: wrong}))]


def bad_shape(u: ClientUpdate, draw: Draw) -> list[object]:
    name = _pick_module(draw)
    f = u.factors[name]
    m, n = SHAPES[name]
    r = f.rank
    which = draw(st.integers(0, 2))
    dm = draw(st.integers(-m + 1, 6).filter(lambda d: d != 0))
    dn = draw(st.integers(-n + 1, 6).filter(lambda d: d != 0))
    if which == 0:  # B adapts another output size
        wrong = LoRAFactors(A=f.A, B=torch.randn(m + dm, r) * 0.1, alpha=f.alpha)
    elif which == 1:  # A adapts another input size
        wrong = LoRAFactors(A=torch.randn(r, n + dn) * 0.1, B=f.B, alpha=f.alpha)
    else:  # A and B disagree on the rank (only a forged object can)
        wrong = forge(LoRAFactors, **{**_fields(f), "B": torch.randn(m, r + 1) * 0.1})
    return [_with_module(u, name, wrong)]


def bad_rank(u: ClientUpdate, draw: Draw) -> list[object]:
    name = _pick_module(draw)
    f = u.factors[name]
    m, n = SHAPES[name]
    extra = draw(st.integers(1, min(m, n)))
    r = f.rank + extra
    wrong = LoRAFactors(A=torch.randn(r, n) * 0.1, B=torch.randn(m, r) * 0.01, alpha=f.alpha)
    return [_with_module(u, name, wrong)]


def bad_alpha(u: ClientUpdate, draw: Draw) -> list[object]:
    name = _pick_module(draw)
    f = u.factors[name]
    alpha = draw(
        st.one_of(
            st.floats(1e-3, 1e6).filter(lambda a: not math.isclose(a, f.alpha, rel_tol=1e-3)),
            st.sampled_from([0.0, -16.0, float("nan"), float("inf"), "16"]),
        )
    )
    return [_with_module(u, name, forge(LoRAFactors, **{**_fields(f), "alpha": alpha}))]


def bad_scaling(u: ClientUpdate, draw: Draw) -> list[object]:
    name = _pick_module(draw)
    f = u.factors[name]
    flag = draw(st.sampled_from([True, 1, "yes"]))
    return [_with_module(u, name, forge(LoRAFactors, **{**_fields(f), "use_rslora": flag}))]


def _poke(u: ClientUpdate, draw: Draw, value: float) -> ClientUpdate:
    name = _pick_module(draw)
    f = u.factors[name]
    label = draw(st.sampled_from(["A", "B"]))
    t = getattr(f, label).clone()
    i = draw(st.integers(0, t.shape[0] - 1))
    j = draw(st.integers(0, t.shape[1] - 1))
    t[i, j] = value
    return _with_module(u, name, LoRAFactors(**{**_fields(f), label: t}))


def bad_nonfinite(u: ClientUpdate, draw: Draw) -> list[object]:
    return [_poke(u, draw, draw(st.sampled_from([float("nan"), float("inf"), -float("inf")])))]


def bad_magnitude(u: ClientUpdate, draw: Draw) -> list[object]:
    value = draw(st.floats(MAX_ABS * 1.01, 1e38)) * draw(st.sampled_from([1, -1]))
    return [_poke(u, draw, value)]


def bad_norm(u: ClientUpdate, draw: Draw) -> list[object]:
    name = _pick_module(draw)
    f = u.factors[name]
    over = draw(st.floats(1.01, 1e4))
    c = over * MAX_NORM / frobenius_norm(f)
    return [_with_module(u, name, LoRAFactors(A=f.A, B=f.B * c, alpha=f.alpha))]


MALFORMATIONS: dict[str, Callable[..., list[object]]] = {
    "type": bad_type,
    "client_id": bad_client_id,
    "duplicate": bad_duplicate,
    "unknown_client": bad_unknown_client,
    "num_examples": bad_num_examples,
    "metrics": bad_metrics,
    "missing_module": bad_missing_module,
    "extra_module": bad_extra_module,
    "ndim": bad_ndim,
    "dtype": bad_dtype,
    "shape": bad_shape,
    "rank": bad_rank,
    "alpha": bad_alpha,
    "scaling": bad_scaling,
    "nonfinite": bad_nonfinite,
    "magnitude": bad_magnitude,
    "norm": bad_norm,
}


def test_every_reason_has_a_malformation() -> None:
    assert set(MALFORMATIONS) == set(REASONS)


COORD = coordinator()
PREVIOUS, _ = COORD.aggregate(
    COORD.initial_state(), 1, CLIENTS, [good_update(COORD, c, i) for i, c in enumerate(CLIENTS)]
)


@pytest.mark.parametrize("reason", REASONS)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_malformed_update_is_rejected_and_state_untouched(reason: str, data: st.DataObject) -> None:
    bad_client = data.draw(st.sampled_from(CLIENTS), label="client")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    bad = MALFORMATIONS[reason](good_update(COORD, bad_client, seed), data.draw)
    others = [good_update(COORD, c, seed + 1 + i) for i, c in enumerate(CLIENTS) if c != bad_client]
    before = state_bytes(PREVIOUS)
    bad_before = [update_bytes(u) for u in bad]

    # 1. alone in the round: rejected with its reason, and the previous state is kept as is;
    # a duplicate: the client's first update counts, the later one is rejected
    state, row = COORD.aggregate(PREVIOUS, 2, CLIENTS, bad)
    if reason == "duplicate":
        assert row["aggregated"] == [bad[0].client_id]  # type: ignore[union-attr]
        assert state_bytes(PREVIOUS) == before
    else:
        assert state is PREVIOUS and state_bytes(state) == before
        assert row["kept_previous_state"] and row["aggregated"] == []
    assert len(row["rejected"]) == (1 if reason == "duplicate" else len(bad))  # one per client
    for label, message in row["rejected"].items():
        assert message.endswith(f"[{reason}]") or f"[{reason}];" in message, message
        if reason not in ("type", "client_id"):  # the message names the client it blames
            cid = bad[0].client_id  # type: ignore[union-attr]
            assert label == cid and f"client {cid}" in message, message

    # 2. with the other clients: the round goes on, exactly as if the bad update never came
    # (a duplicate: as if the copy that came second never came)
    shuffled = data.draw(st.permutations([*others, *bad]), label="order")
    state, row = COORD.aggregate(PREVIOUS, 2, CLIENTS, shuffled)
    first = [next(u for u in shuffled if any(u is b for b in bad))] if reason == "duplicate" else []
    counted = [*others, *first]
    in_order = [u for u in shuffled if any(u is o for o in counted)]  # float sums follow order
    clean, clean_row = COORD.aggregate(PREVIOUS, 2, CLIENTS, in_order)
    assert not row["kept_previous_state"]
    assert sorted(row["aggregated"]) == sorted(u.client_id for u in counted)
    assert state_bytes(state) == state_bytes(clean)
    assert row["train_loss"] == clean_row["train_loss"]
    assert state_bytes(PREVIOUS) == before
    assert [update_bytes(u) for u in bad] == bad_before  # nothing was modified in place


@settings(max_examples=20, deadline=None)
@given(
    junk=st.lists(
        st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=5),
            st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        ),
        max_size=4,
    )
)
def test_empty_or_junk_rounds_keep_the_state(junk: list[object]) -> None:
    before = state_bytes(PREVIOUS)
    state, row = COORD.aggregate(PREVIOUS, 3, CLIENTS, junk)
    assert state is PREVIOUS and state_bytes(state) == before
    assert row["kept_previous_state"] and row["bytes_up"] == 0
    assert len(row["rejected"]) == len(junk)
    assert all(m.endswith("[type]") for m in row["rejected"].values())


def test_failed_client_reply_is_not_taken() -> None:
    """A client the driver declared failed (or timed out) cannot slip its update in."""
    updates = [good_update(COORD, c, i) for i, c in enumerate(CLIENTS)]
    _, row = COORD.aggregate(PREVIOUS, 2, CLIENTS, updates, failures={"c1": "timed out"})
    assert "c1" not in row["aggregated"] and row["rejected"]["c1"].endswith("[unknown_client]")
    assert row["failed"] == {"c1": "timed out"}


def test_fewer_than_min_clients_keeps_the_previous_state(tmp_path: Path, caplog) -> None:
    coord = coordinator(str(tmp_path), min_clients=3)
    updates = [good_update(coord, c, i) for i, c in enumerate(CLIENTS[:2])]
    updates.append(dataclasses.replace(good_update(coord, "c2", 5), client_id="nobody"))
    before = state_bytes(PREVIOUS)
    with caplog.at_level("WARNING"):
        state, row = coord.aggregate(PREVIOUS, 4, CLIENTS, updates)
    assert state is PREVIOUS and state_bytes(state) == before
    assert row["kept_previous_state"] and row["aggregated"] == []
    assert "2 valid updates < min_clients=3" in caplog.text
    assert "client nobody" in caplog.text and "[unknown_client]" in caplog.text
    updates.append(good_update(coord, "c3", 9))
    state, row = coord.aggregate(PREVIOUS, 4, CLIENTS, updates)
    assert not row["kept_previous_state"] and state_bytes(state) != before


def test_validator_accepts_what_training_produces() -> None:
    """Half-precision factors and numpy-scalar metrics are legitimate."""
    import numpy as np

    u = good_update(COORD, "c3", 1)
    half = {
        k: LoRAFactors(A=f.A.half(), B=f.B.bfloat16(), alpha=f.alpha) for k, f in u.factors.items()
    }
    u = dataclasses.replace(u, factors=half, metrics={"train_loss": np.float32(0.5)})
    UpdateValidator(SHAPES, MAX_NORM, alpha=16.0, use_rslora=False).check(u, COORD.ranks_of("c3"))
    smaller = {k: LoRAFactors(A=f.A[:1], B=f.B[:, :1], alpha=f.alpha) for k, f in u.factors.items()}
    UpdateValidator(SHAPES).check(dataclasses.replace(u, factors=smaller), COORD.ranks_of("c3"))
