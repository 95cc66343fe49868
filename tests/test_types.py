"""The typed vocabulary: LoRA factors, client updates, rank patterns and the global state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flexlora.errors import InvalidUpdateError, RankError
from flexlora.types import (
    ClientUpdate,
    GlobalUpdate,
    LoRAFactors,
    ModuleDelta,
    lora_scaling,
    match_pattern,
    resolve_ranks,
)


def loop_product(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """B·A as a sum of outer products, one rank-1 term at a time (the slow, obvious way)."""
    out = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)  # (m, n)
    for k in range(A.shape[0]):
        out += torch.outer(B[:, k].double(), A[k].double())
    return out


def svd_delta(m: int, n: int, k: int, seed: int) -> ModuleDelta:
    """A ModuleDelta that is an exact thin SVD of a random rank-k matrix (float64)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(
        k, n, generator=g, dtype=torch.float64
    )  # (m, n)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = min(k, m, n)
    return ModuleDelta(U[:, :keep], S[:keep], Vh[:keep], "svd")


# --- LoRAFactors -----------------------------------------------------------------------------


def test_scaling_is_alpha_over_r_or_sqrt_r() -> None:
    A, B = torch.ones(4, 3), torch.ones(5, 4)
    assert LoRAFactors(A, B, alpha=16).scaling == 4.0
    assert LoRAFactors(A, B, alpha=16, use_rslora=True).scaling == 8.0
    assert lora_scaling(6.0, 9, use_rslora=True) == 2.0
    with pytest.raises(ValueError):
        lora_scaling(8.0, 0)


def test_factors_shape_rank_and_delta(make_factors) -> None:
    f = make_factors(7, 5, 3, seed=1, alpha=6.0)
    assert (f.rank, f.shape) == (3, (7, 5))
    assert f.num_bytes() == (3 * 5 + 7 * 3) * 8
    torch.testing.assert_close(f.delta(), 2.0 * loop_product(f.B, f.A), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("A", "B", "alpha", "needle"),
    [
        (torch.ones(3), torch.ones(4, 3), 8.0, "2-D"),
        (torch.ones(3, 5), torch.ones(4, 2), 8.0, "rank mismatch"),
        (torch.ones(0, 5), torch.ones(4, 0), 8.0, "positive"),
        (torch.ones(2, 5), torch.ones(4, 2), 0.0, "alpha"),
        (torch.ones(2, 5), torch.ones(4, 2), -1.0, "alpha"),
        (torch.ones(2, 5), torch.ones(4, 2), math.nan, "alpha"),
        (torch.ones(2, 5), torch.ones(4, 2), math.inf, "alpha"),
    ],
)
def test_bad_factors_are_refused(A: torch.Tensor, B: torch.Tensor, alpha: float, needle: str):
    with pytest.raises(ValueError, match=needle):
        LoRAFactors(A, B, alpha=alpha)


@pytest.mark.parametrize("num_examples", [0, -3, 2.5, True])
def test_client_update_needs_positive_int_examples(make_factors, num_examples) -> None:
    with pytest.raises(InvalidUpdateError) as info:
        ClientUpdate("client-7", num_examples, {"q": make_factors(3, 3, 1, seed=0)})
    assert info.value.client == "client-7"
    assert "client-7" in str(info.value)


def test_client_update_ranks_and_bytes(make_factors) -> None:
    u = ClientUpdate(
        "c", 3, {"q": make_factors(4, 4, 2, seed=0), "mlp.up": make_factors(6, 4, 3, seed=1)}
    )
    assert u.ranks == {"q": 2, "mlp.up": 3}
    assert u.num_bytes() == sum(f.num_bytes() for f in u.factors.values())


# --- rank patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "module", "expected"),
    [
        (
            ["model.layers.0.mlp.gate_proj"],
            "model.layers.0.mlp.gate_proj",
            "model.layers.0.mlp.gate_proj",
        ),
        (["gate_proj"], "model.layers.3.mlp.gate_proj", "gate_proj"),
        (["mlp.gate_proj"], "model.layers.3.mlp.gate_proj", "mlp.gate_proj"),
        (["proj"], "model.layers.3.mlp.gate_proj", None),
        (["up_proj"], "model.layers.3.mlp.gate_proj", None),
        (["layers.[01].mlp.up_proj"], "model.layers.1.mlp.up_proj", "layers.[01].mlp.up_proj"),
        (["layers.[01].mlp.up_proj"], "model.layers.2.mlp.up_proj", None),
        (["(", "q_proj"], "model.layers.0.self_attn.q_proj", "q_proj"),
    ],
)
def test_match_pattern(patterns: list[str], module: str, expected: str | None) -> None:
    assert match_pattern(patterns, module) == expected


def test_resolve_ranks_uses_pattern_else_default() -> None:
    modules = ["m.layers.0.self_attn.q_proj", "m.layers.0.mlp.up_proj", "m.layers.1.mlp.up_proj"]
    ranks = resolve_ranks(modules, 8, {"layers.1.mlp.up_proj": 2, "up_proj": 16})
    assert ranks == dict(zip(modules, [8, 16, 2], strict=True))
    assert resolve_ranks(modules, 4) == dict.fromkeys(modules, 4)


# --- ModuleDelta -----------------------------------------------------------------------------


def test_module_delta_validation() -> None:
    with pytest.raises(ValueError, match="truncation"):
        ModuleDelta(torch.ones(3, 2), torch.ones(2), torch.ones(2, 4), "best")
    with pytest.raises(ValueError, match="inconsistent"):
        ModuleDelta(torch.ones(3, 2), torch.ones(3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="inconsistent"):
        ModuleDelta(torch.ones(3, 2), torch.ones(2, 1), torch.ones(2, 4))


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 9),
    k=st.integers(1, 9),
    r=st.integers(1, 9),
    alpha=st.sampled_from([1.0, 8.0, 16.0, 3.5]),
    rslora=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_factors_reproduce_the_truncation_at_the_clients_scaling(
    m: int, n: int, k: int, r: int, alpha: float, rslora: bool, seed: int
) -> None:
    d = svd_delta(m, n, k, seed)
    r = min(r, d.rank)
    truncated = loop_product(d.U[:, :r] * d.S[:r], d.Vh[:r])  # (m, n)
    for split in ("B", "balanced"):
        f = d.factors(r, alpha, use_rslora=rslora, split=split)
        assert f.rank == r
        assert f.scaling == lora_scaling(alpha, r, rslora)
        assert f.alpha == alpha and f.use_rslora == rslora
        torch.testing.assert_close(f.delta(), truncated, rtol=1e-10, atol=1e-10)
    # "B" keeps A orthonormal (the right singular vectors); "balanced" splits sqrt(S/s) evenly.
    fb = d.factors(r, alpha, use_rslora=rslora, split="B")
    torch.testing.assert_close(fb.A, d.Vh[:r])
    fs = d.factors(r, alpha, use_rslora=rslora, split="balanced")
    torch.testing.assert_close(fs.A.norm(dim=1), fs.B.norm(dim=0), rtol=1e-10, atol=1e-12)


def test_cut_factors_do_not_keep_the_whole_state_alive() -> None:
    """A rank-r cut owns its storage: a view of the state's first rows would keep the whole
    (rank, n) Vh alive with it (flexlora aggregate held every module's full Vh that way)."""
    s = svd_delta(40, 30, 12, seed=1)
    d = ModuleDelta(s.U.contiguous(), s.S, s.Vh.contiguous(), "svd")  # as the server keeps it
    for split in ("B", "balanced"):
        for dtype in (None, torch.float32):
            f = d.factors(3, 8.0, split=split, dtype=dtype)
            for t in (f.A, f.B):
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), split
                assert t.untyped_storage().data_ptr() not in (
                    d.U.untyped_storage().data_ptr(),
                    d.Vh.untyped_storage().data_ptr(),
                )


def test_factors_split_must_be_known() -> None:
    with pytest.raises(ValueError, match="split"):
        svd_delta(4, 4, 2, 0).factors(2, 8.0, split="A")


def test_factors_pad_keeps_delta_and_draws_trainable_rows() -> None:
    d = svd_delta(6, 10, 3, seed=4)
    f = d.factors(7, 14.0, pad=torch.Generator().manual_seed(11), module="q")
    assert (f.A.shape, f.B.shape) == ((7, 10), (6, 7))
    torch.testing.assert_close(f.delta(), d.dense(), rtol=1e-10, atol=1e-12)
    assert torch.equal(f.B[:, 3:], torch.zeros(6, 4, dtype=f.B.dtype))
    extra = f.A[3:]  # (4, n): drawn like PEFT's init, uniform in ±1/sqrt(n)
    assert bool((extra.abs() <= 1 / math.sqrt(10)).all())
    assert bool((extra != 0).all())
    assert torch.linalg.matrix_rank(f.A) == 7  # every component can learn
    again = d.factors(7, 14.0, pad=torch.Generator().manual_seed(11))
    other = d.factors(7, 14.0, pad=torch.Generator().manual_seed(12))
    assert torch.equal(f.A, again.A)  # reproducible from the generator
    assert not torch.equal(f.A[3:], other.A[3:])


def test_factors_refuse_ranks_they_cannot_give() -> None:
    d = svd_delta(5, 6, 3, seed=0)
    with pytest.raises(RankError, match=r"module layers\.0\.q.*rank 4.*only 3"):
        d.factors(4, 8.0, module="layers.0.q")
    for bad in (0, -2):
        with pytest.raises(RankError, match="positive"):
            d.factors(bad, 8.0, module="q")
    exact = ModuleDelta(d.U, d.S, d.Vh, "exact")
    exact.factors(3, 8.0)
    with pytest.raises(RankError, match=r"module q.*rank 3.*rank 2"):
        exact.factors(2, 8.0, module="q")
    with pytest.raises(RankError):
        exact.factors(5, 8.0, pad=torch.Generator().manual_seed(0), module="q")


def test_prefix_truncation_keeps_leading_components() -> None:
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g)
    d = ModuleDelta(B, torch.ones(4, dtype=torch.float64), A.double(), "prefix")
    f = d.factors(2, 4.0)
    torch.testing.assert_close(f.delta(), loop_product(B[:, :2], A[:2]))


# --- GlobalUpdate ----------------------------------------------------------------------------


def test_global_update_factors_per_module_ranks_and_alphas() -> None:
    state = GlobalUpdate({"q": svd_delta(6, 6, 4, 0), "mlp.up": svd_delta(12, 6, 5, 1)}, "x")
    assert state.names() == ["q", "mlp.up"]
    assert state["q"].rank == 4 and state.max_rank() == 5
    out = state.factors({"q": 2, "mlp.up": 5}, {"q": 4.0, "mlp.up": 10.0})
    assert (out["q"].rank, out["mlp.up"].rank) == (2, 5)
    assert (out["q"].alpha, out["mlp.up"].alpha) == (4.0, 10.0)
    torch.testing.assert_close(out["mlp.up"].delta(), state["mlp.up"].dense())
    with pytest.raises(RankError, match="module q"):
        state.factors(5, 8.0)
    assert state.num_bytes() == sum(
        t.numel() * 8 for d in state.modules.values() for t in (d.U, d.S, d.Vh)
    )
    assert GlobalUpdate({}).max_rank() == 0


def test_global_update_round_trips_through_safetensors(tmp_path) -> None:
    names = ["model.layers.1.q", "model.layers.0.mlp.up", "model.layers.0.q"]  # not sorted
    deltas = [
        svd_delta(6, 6, 4, 0),
        ModuleDelta(torch.randn(8, 2), torch.ones(2), torch.randn(2, 6), "prefix"),
        ModuleDelta(torch.randn(6, 3), torch.ones(3), torch.randn(3, 6), "exact"),
    ]
    state = GlobalUpdate(dict(zip(names, deltas, strict=True)), "flexlora")
    tensors, meta = state.to_tensors()
    save_file(tensors, str(tmp_path / "state.safetensors"), metadata=meta)
    with safe_open(str(tmp_path / "state.safetensors"), framework="pt") as fh:
        stored_meta = fh.metadata()
    # safetensors gives metadata back in any order; the module order must survive anyway
    for shuffled in (stored_meta, dict(reversed(list(stored_meta.items())))):
        back = GlobalUpdate.from_tensors(load_file(str(tmp_path / "state.safetensors")), shuffled)
        assert back.strategy == "flexlora" and back.names() == names
        for name in names:
            assert back[name].truncation == state[name].truncation
            for t0, t1 in zip(
                (state[name].U, state[name].S, state[name].Vh),
                (back[name].U, back[name].S, back[name].Vh),
                strict=True,
            ):
                assert torch.equal(t0, t1)
    legacy = {k: v for k, v in meta.items() if k != "modules"}
    assert GlobalUpdate.from_tensors(tensors, legacy).names() == sorted(names)
    with pytest.raises(ValueError, match="metadata lists modules"):
        GlobalUpdate.from_tensors(tensors, {**meta, "modules": '["model.layers.0.q"]'})
    with pytest.raises(KeyError):
        GlobalUpdate.from_tensors({}, meta)
