"""``flexlora aggregate`` reads its inputs module by module and still gives the same adapters.

The reference is the all-in-memory path (every adapter loaded, ``aggregate`` on the updates)
and, underneath, the dense weighted sum truncated by numpy's SVD in float64.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flexlora.aggregate_cmd import run_aggregate
from flexlora.aggregation import get_aggregator
from flexlora.lora.peft_io import ADAPTER_WEIGHTS, AdapterReader, load_adapter, write_adapter
from flexlora.types import ClientUpdate, LoRAFactors

SHAPES = {  # module -> (m, n): one module switches to the dense sum, the others stay stacked
    "model.layers.0.self_attn.q_proj": (24, 16),
    "model.layers.0.mlp.down_proj": (16, 40),
    "model.layers.1.self_attn.q_proj": (6, 5),
}
RANKS = [2, 3, 4, 3, 2]
WEIGHTS = [1.0, 2.5, 0.5, 4.0, 1.0]


def make_clients(tmp: Path) -> list[str]:
    g = torch.Generator().manual_seed(11)
    specs = []
    for i, (r, w) in enumerate(zip(RANKS, WEIGHTS, strict=True)):
        factors = {
            name: LoRAFactors(
                torch.randn(r, n, generator=g) / math.sqrt(n),  # (r, n)
                torch.randn(m, r, generator=g),  # (m, r)
                alpha=8.0,
            )
            for name, (m, n) in SHAPES.items()
        }
        folder = write_adapter(tmp / f"c{i}", factors, {"base_model_name_or_path": "tiny"})
        specs.append(f"{folder}:{w}")
    return specs


def written(out: Path, r: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"rank-{r}" / ADAPTER_WEIGHTS))


def dense_sum(specs: list[str], weights: list[float], name: str) -> np.ndarray:
    """Σ p_i s_i B_i A_i of one module in float64, the slow obvious way (m, n)."""
    total = sum(weights)
    return sum(
        (w / total) * load_adapter(s.rsplit(":", 1)[0]).factors[name].delta(torch.float64)
        for s, w in zip(specs, weights, strict=True)
    ).numpy()


def truncation(W: np.ndarray, r: int) -> np.ndarray:
    """The best rank-r approximation of W (m, n) by a float64 LAPACK SVD."""
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def written_delta(out: Path, r: int, name: str, alpha: float = 8.0) -> np.ndarray:
    """(alpha / r)·B·A of one module of the rank-r adapter written to ``out`` (m, n)."""
    got = written(out, r)
    A = got[f"base_model.model.{name}.lora_A.weight"].double().numpy()
    B = got[f"base_model.model.{name}.lora_B.weight"].double().numpy()
    assert A.shape[0] == B.shape[1] == r
    return (alpha / r) * B @ A


@pytest.mark.parametrize("strategy", ["flexlora", "flora", "ffa", "hetlora"])
def test_streamed_aggregate_equals_the_all_in_memory_path(tmp_path: Path, strategy: str) -> None:
    specs = make_clients(tmp_path)
    if strategy == "ffa":  # FFA needs one frozen A: give every client the widest one's prefix
        widest = load_adapter(specs[2].rsplit(":", 1)[0])
        for spec in specs:
            folder = spec.rsplit(":", 1)[0]
            mine = load_adapter(folder).factors
            shared = {
                n: LoRAFactors(widest.factors[n].A[: f.rank].clone(), f.B, f.alpha)
                for n, f in mine.items()
            }
            write_adapter(folder, shared, {"base_model_name_or_path": "tiny"})
    # FLoRA: Σ r_i·(m + n) > m·n in every module, so its state is the SVD of the dense sum,
    # cut as FlexLoRA's is (its exact stack, while smaller, gives only its whole rank)
    ranks = {"ffa": [1, 2], "hetlora": [1, 2]}.get(strategy, [1, 3, 5])
    run_aggregate(specs, ranks, tmp_path / "out", strategy=strategy)
    adapters = [load_adapter(s.rsplit(":", 1)[0]) for s in specs]
    options = {"weight_by_examples": True} if strategy == "hetlora" else {}
    state = get_aggregator(strategy, **options).aggregate(
        [ClientUpdate(a.source, 1, a.factors) for a in adapters], weights=WEIGHTS
    )
    for r in ranks:
        got = written(tmp_path / "out", r)
        want = state.factors(r, 8.0, dtype=torch.float32)
        for name, f in want.items():
            torch.testing.assert_close(got[f"base_model.model.{name}.lora_A.weight"], f.A)
            torch.testing.assert_close(got[f"base_model.model.{name}.lora_B.weight"], f.B)


def test_streamed_flexlora_is_the_dense_truncation_and_reads_module_by_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = make_clients(tmp_path)
    reads: list[str] = []
    original = AdapterReader.factors

    def spy(self: AdapterReader, module: str) -> LoRAFactors:
        reads.append(module)
        return original(self, module)

    monkeypatch.setattr(AdapterReader, "factors", spy)
    run_aggregate(specs, [3], tmp_path / "out", strategy="flexlora", dtype="float64")
    # all clients' copy of one module, then the next: never two modules of a client at once
    k = len(specs)
    grouped = [reads[i : i + k] for i in range(0, len(SHAPES) * k, k)]
    assert all(len(set(g)) == 1 for g in grouped)
    assert sorted(g[0] for g in grouped) == sorted(SHAPES)
    for name in SHAPES:
        want = truncation(dense_sum(specs, WEIGHTS, name), 3)
        ours = written_delta(tmp_path / "out", 3, name)
        assert np.linalg.norm(ours - want) <= 1e-5 * np.linalg.norm(want)


def test_randomized_aggregate_stops_at_the_largest_rank_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--svd randomized`` finds only the triplets some output needs (it ran at min(m, n))."""
    import flexlora.aggregation.flexlora as flexlora_module

    specs = make_clients(tmp_path)
    asked: list[int] = []
    original = flexlora_module.randomized_svd

    def spy(delta: torch.Tensor, rank: int, niter: int = 4) -> object:
        asked.append(rank)
        return original(delta, rank, niter)

    monkeypatch.setattr(flexlora_module, "randomized_svd", spy)
    run_aggregate(specs, [3, 1], tmp_path / "out", strategy="flexlora", svd="randomized")
    assert asked == [3] * len(SHAPES)
    printed = capsys.readouterr().out
    # the capped state knows the ||dW||^2 its cap left out: each rank's share is the whole ΔW's
    spectra = [np.linalg.svd(dense_sum(specs, WEIGHTS, name), compute_uv=False) for name in SHAPES]
    total = sum(float((S**2).sum()) for S in spectra)
    for r in (3, 1):
        share = sum(float((S[:r] ** 2).sum()) for S in spectra) / total
        found = re.search(rf"\(rank {r}, keeps ([0-9.]+)% of", printed)
        assert found is not None, printed
        assert float(found.group(1)) == pytest.approx(100 * share, abs=0.02)
    for name, (m, n) in SHAPES.items():
        want = truncation(dense_sum(specs, WEIGHTS, name), 3)
        ours = written_delta(tmp_path / "out", 3, name)
        # approximate, but on these small modules the randomized range finder is near exact
        assert np.linalg.norm(ours - want) <= 1e-3 * np.linalg.norm(want), (name, m, n)


def test_flora_aggregate_writes_the_whole_sum_at_its_rank_when_modules_differ(
    tmp_path: Path,
) -> None:
    """FLoRA at --rank Σ r_i when one module's state is its stack (rank Σ r_i) and another's
    the SVD of its dense sum (rank min(m, n) < Σ r_i): both write the whole ΔW (zero B past
    the SVD's rank); a smaller rank writes the best approximation of each. It failed at
    every rank once a module had gone dense."""
    shapes = {"layers.0.k_proj": (8, 32), "layers.0.q_proj": (64, 64)}  # dense, stacked
    g = torch.Generator().manual_seed(5)
    specs, weights = [], [1.0, 2.0, 3.0, 4.0]
    for i, w in enumerate(weights):
        factors = {
            name: LoRAFactors(torch.randn(4, n, generator=g), torch.randn(m, 4, generator=g), 8.0)
            for name, (m, n) in shapes.items()
        }
        specs.append(f"{write_adapter(tmp_path / f'c{i}', factors, {})}:{w}")
    run_aggregate(specs, [16, 3], tmp_path / "out", strategy="flora")
    for name in shapes:
        W = dense_sum(specs, weights, name)
        for r, want in ((16, W), (3, truncation(W, 3))):
            ours = written_delta(tmp_path / "out", r, name)
            assert np.linalg.norm(ours - want) <= 1e-5 * np.linalg.norm(want)


def test_flora_aggregate_pads_a_stacked_module_past_its_rank(tmp_path: Path) -> None:
    """FLoRA writes the whole ΔW at any rank: a module whose stack is narrower than --rank
    (a rank_pattern gives it a smaller Σ r_i, or --rank exceeds Σ r_i) gets zero B past its
    rank. It was refused ("this global state has rank 6 and cannot be cut to rank 9")."""
    shapes = {"layers.0.q_proj": (64, 64), "layers.0.down_proj": (64, 96)}  # both stacked
    ranks = {"layers.0.q_proj": [3, 3, 3], "layers.0.down_proj": [2, 2, 2]}  # Σ: 9 and 6
    g = torch.Generator().manual_seed(3)
    specs, weights = [], [1.0, 2.0, 3.0]
    for i, w in enumerate(weights):
        factors = {
            name: LoRAFactors(
                torch.randn(ranks[name][i], n, generator=g),  # (r, n)
                torch.randn(m, ranks[name][i], generator=g),  # (m, r)
                8.0,
            )
            for name, (m, n) in shapes.items()
        }
        specs.append(f"{write_adapter(tmp_path / f'c{i}', factors, {})}:{w}")
    run_aggregate(specs, [9, 12], tmp_path / "out", strategy="flora")
    for name in shapes:
        W = dense_sum(specs, weights, name)
        for r in (9, 12):
            ours = written_delta(tmp_path / "out", r, name)
            assert np.linalg.norm(ours - W) <= 1e-5 * np.linalg.norm(W), (name, r)


def test_fedex_aggregate_writes_its_residual_beside_the_adapters(tmp_path: Path, capsys) -> None:
    """FedEx-LoRA's adapter is the FedAvg of the factors; the rest of Σ p_i s_i B_i A_i is a
    residual its clients hold in their base weights. It used to be dropped without a word
    (the written ΔW was far off the weighted sum); it is written as frozen_delta.safetensors,
    as `flexlora run` exports it, and adapter + residual is the exact sum."""
    from flexlora.lora.peft_io import FROZEN_DELTA
    from flexlora.types import GlobalUpdate

    specs = make_clients(tmp_path)
    top = max(RANKS)
    run_aggregate(specs, [top], tmp_path / "out", strategy="fedex", dtype="float64")
    assert f"{FROZEN_DELTA} (fedex: the residual" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / FROZEN_DELTA), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iter
        residual = GlobalUpdate.from_tensors(tensors, fh.metadata())
    assert set(residual.modules) == set(SHAPES)
    for name in SHAPES:
        exact = dense_sum(specs, WEIGHTS, name)
        adapter = written_delta(tmp_path / "out", top, name)
        rest = residual.modules[name].dense().double().numpy()
        assert np.linalg.norm(adapter - exact) > 0.1 * np.linalg.norm(exact)  # not the sum alone
        assert np.linalg.norm(adapter + rest - exact) <= 1e-6 * np.linalg.norm(exact), name
