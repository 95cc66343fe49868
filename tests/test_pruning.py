"""HetLoRA's local rank self-pruning: the regulariser, the pruning rule, training at pruned
ranks (sequential and batched), the simulator with pruned ranks kept per client, and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexlora.client_state import CLIENT_RANKS, with_own_ranks
from flexlora.config import TrainConfig, load_config
from flexlora.errors import UsageError
from flexlora.server import Coordinator
from flexlora.simulation.runner import FederatedRun
from flexlora.training.batched import ClientJob
from flexlora.training.model import build_tiny_llama
from flexlora.training.pruning import (
    SelfPruning,
    keep_prefix,
    pruned_ranks,
    self_prune,
    tail_penalty,
    tail_start,
)
from flexlora.types import LoRAFactors
from tests.sim_helpers import make_dataset, tiny_config
from tests.test_batched import TRAIN, assert_same, jobs_for, make_worker, rel
from tests.test_checkpoint_resume import (
    assert_same_adapters,
    comparable,
    interrupted_then_resumed,
)


def random_factors(ranks: dict[str, int], seed: int, alpha: float = 16.0) -> dict[str, LoRAFactors]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: LoRAFactors(
            A=torch.randn(r, 7, generator=g, dtype=torch.float64),
            B=torch.randn(9, r, generator=g, dtype=torch.float64),
            alpha=alpha,
        )
        for name, r in ranks.items()
    }


def by_hand_gradient(A: torch.Tensor, B: torch.Tensor, gamma: float, lam: float):
    """d/dA, d/dB of lam·‖B[:, t:]‖·‖A[t:]‖ written out: lam·‖A_t‖·B_t/‖B_t‖ and its mirror."""
    t = math.floor(gamma * A.shape[0])
    gA, gB = torch.zeros_like(A), torch.zeros_like(B)
    nA, nB = A[t:].norm(), B[:, t:].norm()
    gA[t:] = lam * nB * A[t:] / nA
    gB[:, t:] = lam * nA * B[:, t:] / nB
    return gA, gB


@pytest.mark.parametrize(("rank", "gamma"), [(8, 0.5), (10, 0.9), (7, 0.75), (3, 0.4)])
def test_regulariser_gradient_equals_the_by_hand_one(rank: int, gamma: float) -> None:
    g = torch.Generator().manual_seed(rank)
    A = torch.randn(rank, 6, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, rank, generator=g, dtype=torch.float64, requires_grad=True)
    (0.3 * tail_penalty([(A, B, rank)], gamma)).backward()
    gA, gB = by_hand_gradient(A.detach(), B.detach(), gamma, 0.3)
    t = tail_start(rank, gamma)
    assert 0 < t < rank and t == math.floor(gamma * rank)
    torch.testing.assert_close(A.grad, gA, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(B.grad, gB, rtol=1e-12, atol=1e-14)
    assert bool((A.grad[:t] == 0).all()) and bool((B.grad[:, :t] == 0).all())


def test_regulariser_reads_nothing_beyond_a_clients_rank_and_zero_has_zero_gradient() -> None:
    A = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)  # a stack padded to 8
    B = torch.zeros(5, 8, dtype=torch.float64, requires_grad=True)  # B = 0: round 1's start
    tail_penalty([(A, B, 4)], 0.5).backward()
    assert float(A.grad.abs().sum()) == 0 and float(B.grad.abs().sum()) == 0
    assert torch.isfinite(B.grad).all()


def one_sgd_step(pruning: SelfPruning | None, batched: bool) -> list[dict[str, LoRAFactors]]:
    """One plain SGD step (no clipping) of two clients, from non-zero factors."""
    cfg = TrainConfig(local_steps=1, batch_size=2, cutoff_len=48, lr=0.05, optimizer="sgd")
    cfg.max_grad_norm = 0.0
    worker = make_worker(cfg)
    worker.pruning = pruning
    jobs = jobs_for(worker, 2)
    if batched:
        return [u.factors for u, _ in worker.train_many(jobs)]
    return [worker.train(j.client, j.slot, j.start, j.examples, j.seed)[0].factors for j in jobs]


@pytest.mark.parametrize("batched", [False, True], ids=["sequential", "batched"])
def test_training_adds_the_regulariser_gradient(batched: bool) -> None:
    """SGD: (with - without the regulariser) after one step is -lr·∇(λ·R) at the start."""
    lam, gamma = 0.7, 0.5
    never = SelfPruning(weight=lam, gamma=gamma, min_rank=64)  # penalised, never pruned
    plain = one_sgd_step(None, batched)
    with_reg = one_sgd_step(never, batched)
    worker = make_worker(TrainConfig())
    for job, a, b in zip(jobs_for(worker, 2), plain, with_reg, strict=True):
        for name, f in job.start.items():
            gA, gB = by_hand_gradient(f.A.double(), f.B.double(), gamma, lam)
            close = {"atol": 2e-6, "rtol": 1e-4}
            torch.testing.assert_close(b[name].A - a[name].A, (-0.05 * gA).float(), **close)
            torch.testing.assert_close(b[name].B - a[name].B, (-0.05 * gB).float(), **close)


def test_pruning_triggers_when_the_tail_shrank_and_keeps_the_prefix_update() -> None:
    cfg = SelfPruning(weight=1e-3, gamma=0.5, min_rank=2)
    start = random_factors({"q": 8, "up": 3}, seed=1)
    half = {name: f.rank // 2 for name, f in start.items()}
    shrunk = {  # the tail columns of B halved: the tail's norm shrank
        name: LoRAFactors(
            f.A, torch.cat([f.B[:, : half[name]], 0.5 * f.B[:, half[name] :]], 1), f.alpha
        )
        for name, f in start.items()
    }
    sent, pruned = self_prune(start, shrunk, cfg)
    assert pruned
    assert {n: f.rank for n, f in sent.items()} == {"q": 4, "up": 2}  # ⌊0.5·3⌋ = 1 < min_rank
    for name, f in sent.items():
        r = f.rank
        want = shrunk[name].scaling * (shrunk[name].B[:, :r] @ shrunk[name].A[:r])
        torch.testing.assert_close(f.delta(), want, rtol=1e-12, atol=1e-12)


def test_pruning_does_not_trigger_when_the_tail_grew_or_stayed() -> None:
    cfg = SelfPruning(gamma=0.5)
    start = random_factors({"q": 8, "up": 4}, seed=2)
    grown = {n: LoRAFactors(f.A * 1.1, f.B, f.alpha) for n, f in start.items()}
    for trained in (grown, start):
        sent, pruned = self_prune(start, trained, cfg)
        assert not pruned and sent == dict(trained)
    # at the floor already: nothing to prune, whatever the tail did
    floor = SelfPruning(gamma=0.5, min_rank=8)
    small = {n: LoRAFactors(f.A * 0.1, f.B, f.alpha) for n, f in start.items()}
    assert pruned_ranks({"q": 8, "up": 4}, floor) == {"q": 8, "up": 4}
    assert self_prune(start, small, floor) == (small, False)


def test_own_ranks_cut_the_start_factors_as_the_server_would() -> None:
    f = random_factors({"q": 8}, seed=3)["q"]
    cut = with_own_ranks("c", {"q": f}, {"q": torch.tensor([3])})["q"]
    assert cut.rank == 3
    torch.testing.assert_close(cut.delta(), f.scaling * (f.B[:, :3] @ f.A[:3]), rtol=1e-12, atol=0)
    assert keep_prefix(f, 8) is f
    with pytest.raises(Exception, match="exceeds"):
        with_own_ranks("c", {"q": f}, {"q": torch.tensor([9])})


def test_a_client_below_its_slot_trains_alone_and_batched_alike() -> None:
    """A pruned client trains a genuine lower-rank adapter in both paths (with its penalty)."""
    worker = make_worker(TrainConfig(**TRAIN))
    worker.pruning = SelfPruning(weight=0.5, gamma=0.5, min_rank=64)
    jobs = jobs_for(worker, 3)
    small = {m: max(1, f.rank // 2) for m, f in jobs[2].start.items()}
    jobs[2] = ClientJob(
        jobs[2].client,
        jobs[2].slot,
        {m: keep_prefix(f, small[m]) for m, f in jobs[2].start.items()},
        jobs[2].examples,
        jobs[2].seed,
    )
    alone = [worker.train(j.client, j.slot, j.start, j.examples, j.seed) for j in jobs]
    together = worker.train_many(jobs)
    assert alone[2][0].ranks == small
    for (u1, r1), (u2, r2) in zip(alone, together, strict=True):
        assert r2.losses == pytest.approx(r1.losses, rel=1e-5)
        assert_same(u2.factors, u1.factors, 1e-5)
    assert max(rel(alone[2][0].factors[m].B, jobs[2].start[m].B) for m in small) > 1e-3


def test_self_pruning_needs_the_hetlora_aggregation() -> None:
    cfg = load_config(values={"hetlora": {"self_pruning": True}})
    with pytest.raises(UsageError, match="hetlora aggregation"):
        Coordinator(cfg, {"q": (4, 4)}, {"c": "8"})
    with pytest.raises(UsageError, match="gamma"):
        load_config(values={"hetlora": {"gamma": 1.0}})


# ---------------------------------------------------------------- in the simulator
PRUNING = {"self_pruning": True, "reg_weight": 5.0, "gamma": 0.5}


def sim(out: Path, rounds: int = 3, **hetlora) -> FederatedRun:
    cfg = tiny_config(
        str(out),
        federation={"strategy": "hetlora", "rounds": rounds},
        hetlora=hetlora,
        eval={"at_start": False, "every": 2},
    )
    return FederatedRun(cfg, dataset=make_dataset(), model_and_tokenizer=build_tiny_llama(seed=0))


def stored_ranks(out: Path) -> dict[str, dict[str, dict[str, int]]]:
    return {
        f"{p.parent.name}/{p.name}": {k: int(v[0]) for k, v in load_file(p).items()}
        for p in sorted(out.glob(f"{CLIENT_RANKS}/*/*.safetensors"))
    }


def test_simulator_clients_prune_and_keep_their_ranks(tmp_path: Path, monkeypatch) -> None:
    from flexlora.aggregation.base import Accumulator

    seen: list[tuple[str, dict[str, int]]] = []
    original = Accumulator.add

    def spy(self, update, weight=None):  # every reply the server folds, in order
        seen.append((update.client_id, update.ranks))
        return original(self, update, weight)

    monkeypatch.setattr(Accumulator, "add", spy)
    run = sim(tmp_path / "run", rounds=4, **PRUNING)
    rows = run.run()
    pruned = {cid: ranks for r in rows for cid, ranks in r.get("client_ranks", {}).items()}
    assert pruned, "no client pruned"
    assert rows[0]["client_ranks"] == {}  # round 1 starts from B = 0: the tail cannot shrink
    assert stored_ranks(tmp_path / "run")
    type_ranks = run.server.ranks_of
    for cid, ranks in pruned.items():
        assert all(ranks[m] < type_ranks(cid)[m] for m in ranks if type_ranks(cid)[m] > 1)
    # a client that pruned never replies above its pruned ranks again
    lowest: dict[str, dict[str, int]] = {}
    for cid, ranks in seen:
        if cid in lowest:
            assert all(ranks[m] <= lowest[cid][m] for m in ranks), (cid, ranks, lowest[cid])
        if ranks != type_ranks(cid):
            lowest[cid] = ranks
    again = [cid for cid, _ in seen if cid in lowest]
    assert len(again) > len(lowest)  # some pruned client was sampled again
    # it downloads its type's ranks (the server keeps no per-client ranks; the client cuts
    # them, as a Flower node does) and uploads its own
    shapes = run.server.shapes

    def size(ranks: dict[str, int]) -> int:
        return sum(4 * ranks[m] * (a + b) for m, (a, b) in shapes.items())

    for r in rows:
        for cid in r["clients"]:
            assert r["bytes_down_per_client"][cid] == size(type_ranks(cid))
            own = r["client_ranks"].get(cid, type_ranks(cid))
            assert r["bytes_up_per_client"][cid] == size(own)


def test_pruned_ranks_survive_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = sim(tmp_path / "whole", **PRUNING).run()
    assert whole[1]["client_ranks"] and whole[2]["client_ranks"]  # round 3 reads pruned ranks
    broken = tmp_path / "broken"
    resumed = interrupted_then_resumed(lambda: sim(broken, **PRUNING), monkeypatch, broken)
    assert comparable(resumed) == comparable(whole)
    assert_same_adapters(tmp_path / "whole", tmp_path / "broken")
    assert stored_ranks(tmp_path / "whole") == stored_ranks(tmp_path / "broken")


def test_off_by_default_and_inert_pruning_changes_nothing(tmp_path: Path) -> None:
    """Off (the default) writes no rank store and no client_ranks; switched on with λ = 0
    and a floor above every rank, the plumbing (sub-rank slots, per-job ranks) gives the
    same run bit for bit."""
    off = sim(tmp_path / "off", rounds=2).run()
    inert = sim(tmp_path / "inert", rounds=2, self_pruning=True, reg_weight=0.0, min_rank=64).run()
    assert not (tmp_path / "off" / CLIENT_RANKS).exists()
    assert all("client_ranks" not in r for r in off)
    assert [r.pop("client_ranks") for r in inert] == [{}, {}]
    assert comparable(off) == comparable(inert)
    assert_same_adapters(tmp_path / "off", tmp_path / "inert")
    rows = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
