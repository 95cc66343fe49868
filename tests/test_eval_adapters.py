"""The global model is evaluated as a float32 LoRA adapter on the unmodified base.

Checked against the old way (ΔW merged into float32 weights): same logits; the base weights
are bit-identical after an evaluation; ``eval.global_rank`` picks what is scored; FLoRA's
merged ΔW is a frozen float32 term that trains like merged weights, also on bf16 and 4-bit.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from flexlora.errors import UsageError
from flexlora.server import Coordinator, resolve_client_types
from flexlora.training.adapters import EVAL_ADAPTER
from flexlora.training.client import tokenize, train_local
from flexlora.training.model import build_tiny_llama, target_linear_modules
from flexlora.training.worker import ClientWorker
from flexlora.types import ClientUpdate, GlobalUpdate, LoRAFactors
from tests.conftest import random_factors
from tests.sim_helpers import make_dataset, tiny_config

IDS = torch.tensor([[1, 40, 77, 90, 12, 33, 101, 7], [1, 5, 6, 9, 200, 150, 2, 3]])


def coordinator(
    tmp_path: Path, strategy: str = "flexlora", keep_rank: str = "max", **eval_keys
) -> Coordinator:
    cfg = tiny_config(
        str(tmp_path / "out"),
        federation={"strategy": strategy, "keep_rank": keep_rank},
        eval=dict(eval_keys),
    )
    model, _ = build_tiny_llama(seed=0)
    shapes = target_linear_modules(model, cfg.lora.target_modules)
    return Coordinator(cfg, shapes, resolve_client_types(cfg, make_dataset().seen))


def global_state(server: Coordinator, clients: int = 4, scale: float = 1.0) -> GlobalUpdate:
    """The aggregate of ``clients`` random mixed-rank updates (every slot's ranks in turn)."""
    slots = list(server.slot_ranks.values())
    updates = []
    for i in range(clients):
        ranks = slots[i % len(slots)]
        factors = {}
        for j, (name, (m, n)) in enumerate(server.shapes.items()):
            f = random_factors(m, n, ranks[name], seed=100 * i + j, dtype=torch.float32)
            factors[name] = LoRAFactors(f.A, f.B * scale, alpha=server.cfg.lora.alpha)
        updates.append(ClientUpdate(f"c{i}", 5 + i, factors))
    return server.aggregator.aggregate(updates)


def worker_for(server: Coordinator, dtype: torch.dtype = torch.float32) -> ClientWorker:
    model, tok = build_tiny_llama(seed=0)
    model = model.to(dtype)
    return ClientWorker(model, tok, server.cfg.lora, server.slot_ranks, server.cfg.train)


def merged_logits(factors: dict[str, LoRAFactors]) -> torch.Tensor:
    """The old evaluation: W0 + s·B·A written into a fresh float32 copy of the base."""
    model, _ = build_tiny_llama(seed=0)
    params = dict(model.named_modules())
    with torch.no_grad():
        for name, f in factors.items():
            params[name].weight += f.delta(torch.float32)  # (m, n)
        return model(input_ids=IDS).logits


def base_snapshot(worker: ClientWorker) -> dict[str, torch.Tensor]:
    base = worker.host.base
    return {k: v.detach().clone() for k, v in base.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("rule", ["max", "full", 3])
def test_adapter_evaluation_equals_merged_weights_in_float32(tmp_path: Path, rule) -> None:
    server = coordinator(tmp_path, global_rank=rule)
    state = global_state(server)
    factors = server.eval_factors(state)
    worker = worker_for(server)
    with torch.no_grad(), worker.host.global_model(factors) as model:
        got = model(input_ids=IDS).logits
    want = merged_logits(factors)
    assert (got - want).abs().max().item() <= 1e-5
    assert (want - merged_logits({})).abs().max().item() > 1e-2  # the update matters
    layer = next(iter(worker.host.layers.values()))
    assert layer.lora_A[EVAL_ADAPTER].weight.dtype == torch.float32


def test_global_rank_rules(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    top = coordinator(tmp_path).max_ranks()
    # keep_rank=all: the state stores the sum of 4 clients' ranks, more than any client gets
    state = global_state(coordinator(tmp_path, keep_rank="all"))
    stored = {m: d.rank for m, d in state.modules.items()}
    assert all(stored[m] > top[m] for m in top)
    assert coordinator(tmp_path, global_rank="max").eval_ranks(state) == top
    assert coordinator(tmp_path, global_rank="full").eval_ranks(state) == stored
    caplog.set_level(logging.INFO, logger="flexlora")
    big = coordinator(tmp_path, global_rank=10_000).eval_ranks(state)
    assert big == stored and "hold fewer components" in caplog.text
    assert set(coordinator(tmp_path, global_rank="5").eval_ranks(state).values()) == {5}
    # the default keep_rank=max state holds exactly the top rank: "full" is then "max"
    capped = global_state(coordinator(tmp_path))
    assert coordinator(tmp_path, global_rank="full").eval_ranks(capped) == top
    # the max rule is the top exported adapter, factor for factor
    server = coordinator(tmp_path, keep_rank="all")
    exported = server.export_factors(state)["rank-8"]
    for name, f in server.eval_factors(state).items():
        assert torch.equal(f.A, exported[name].A) and torch.equal(f.B, exported[name].B)
    # a state that holds less than the top rank is evaluated at what it holds: exact
    small = global_state(server, clients=1)  # one rank-2 client
    assert set(server.eval_ranks(small).values()) == {2}
    for bad in ("top", 0, -3):
        with pytest.raises(UsageError, match=r"eval\.global_rank"):
            tiny_config(str(tmp_path), eval={"global_rank": bad})


def test_flora_first_round_stack_is_cut_to_its_best_approximation(tmp_path: Path) -> None:
    server = coordinator(tmp_path, "flora")
    state = global_state(server)
    assert {d.truncation for d in state.modules.values()} == {"exact"}
    for name, f in server.eval_factors(state).items():
        dense = state[name].dense(torch.float64)  # (m, n)
        S = torch.linalg.svdvals(dense)
        r = server.max_ranks()[name]
        err = torch.linalg.matrix_norm(dense - f.delta(torch.float64))
        assert err.item() == pytest.approx(S[r:].square().sum().sqrt().item(), rel=1e-4)
    assert sorted(server.export_factors(state)) == sorted(f"rank-{t}" for t in server.slot_ranks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluation_leaves_the_base_weights_bit_identical(tmp_path: Path, dtype) -> None:
    server = coordinator(tmp_path)
    worker = worker_for(server, dtype)
    before = base_snapshot(worker)
    data = make_dataset()
    sets = {"unseen": [list(data.test(c))[:2] for c in data.unseen]}
    cfg = server.cfg.eval
    first = worker.evaluate(server.eval_factors(global_state(server)), sets, cfg, 64)
    worker.evaluate(None, sets, cfg, 64)
    worker.evaluate(server.eval_factors(global_state(server, clients=2)), sets, cfg, 64)
    assert math.isfinite(first["rouge_l_unseen"])
    after = base_snapshot(worker)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    layer = next(iter(worker.host.layers.values()))
    assert layer.get_base_layer().weight.dtype == dtype
    assert layer.lora_A[EVAL_ADAPTER].weight.dtype == torch.float32


def train_once(worker: ClientWorker, server: Coordinator, slot: str) -> tuple[float, dict]:
    tok = worker.tokenizer
    data = make_dataset()
    examples = [
        tokenize(tok, e.instruction + " " + e.input, e.output, 64, False)
        for e in data.train(data.seen[0])
    ]
    start = server.initial_state().factors(server.slot_ranks[slot], server.cfg.lora.alpha)
    result = train_local(
        worker.host, slot, start, examples, server.cfg.train, seed=3, pad_id=tok.pad_token_id
    )
    return result.train_loss, result.factors


def test_flora_merged_term_trains_like_merged_float32_weights(tmp_path: Path) -> None:
    """FLoRA's clients train on W0 + ΔW: a float32 term beside the weights, as merging did."""
    server = coordinator(tmp_path, "flora")
    state = global_state(server)
    frozen = server.frozen_part(state)
    assert frozen is not None and server.frozen_part(state, initial=True) is None
    ours = worker_for(server)
    before = base_snapshot(ours)
    ours.set_base_delta(frozen)
    loss, factors = train_once(ours, server, "8")
    assert all(torch.equal(v, before[k]) for k, v in base_snapshot(ours).items())
    terms = [t for side in ours.host._side.values() for pair in side for t in pair]
    assert terms and all(t.dtype == torch.float32 and not t.requires_grad for t in terms)

    # the previous behaviour: ΔW written into float32 frozen weights, no extra term
    old = worker_for(server)
    modules = dict(old.host.base.named_modules())
    with torch.no_grad():
        for name in state.names():
            modules[name].base_layer.weight += state.delta(name, torch.float32)  # (m, n)
    old_loss, old_factors = train_once(old, server, "8")
    assert loss == pytest.approx(old_loss, rel=1e-5)
    for name, f in factors.items():
        torch.testing.assert_close(f.B, old_factors[name].B, rtol=1e-4, atol=1e-6)
    # and it matters: without the merged term training differs
    bare_loss, _ = train_once(worker_for(server), server, "8")
    assert abs(bare_loss - loss) > 1e-3
    # an evaluation in between neither sees the term nor loses it
    with torch.no_grad(), ours.host.global_model(None) as model:
        assert torch.equal(model(input_ids=IDS).logits, merged_logits({}))
    again, _ = train_once(ours, server, "8")
    assert again == loss


def test_a_4bit_base_evaluates_and_merges_through_float32_adapters(tmp_path: Path) -> None:
    """bitsandbytes NF4 on the CPU: nothing changes the 4-bit base, FLoRA included.

    bitsandbytes repacks its own storage at the first CPU forward, so the witness is what the
    bare base computes, before and after an evaluation and a FLoRA client's training.
    """
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, tok = build_tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny", quantization_config=quant, device_map="cpu"
    )
    q.requires_grad_(False)
    assert q.is_loaded_in_4bit
    server = coordinator(tmp_path, "flora")
    worker = ClientWorker(q, tok, server.cfg.lora, server.slot_ranks, server.cfg.train)
    state = global_state(server)

    def bare() -> torch.Tensor:
        with torch.no_grad(), worker.host.global_model(None) as base:
            return base(input_ids=IDS).logits

    plain = bare()
    with torch.no_grad(), worker.host.global_model(server.eval_factors(state)) as glob:
        scored = glob(input_ids=IDS).logits
    assert torch.isfinite(scored).all() and (scored - plain).abs().max().item() > 1e-2
    worker.set_base_delta(server.frozen_part(state))
    loss, factors = train_once(worker, server, "8")
    assert math.isfinite(loss) and all(torch.isfinite(f.B).all() for f in factors.values())
    assert torch.equal(bare(), plain)


def test_bf16_merging_would_lose_small_updates_the_side_term_keeps_them(tmp_path: Path) -> None:
    """Why ΔW is never merged into bf16 weights: 1e-4 entries on N(0, 0.02²) weights come out
    about a quarter wrong on average; the float32 term beside the layer holds them exactly."""
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(576, 576, generator=g) * 0.02).to(torch.bfloat16)  # (m, n)
    D = torch.full((576, 576), 1e-4)  # (m, n)
    merged = (W + D.to(torch.bfloat16)).float() - W.float()
    error = ((merged - D).abs() / D).mean().item()
    assert 0.2 < error < 0.35  # 26 % (README)
    server = coordinator(tmp_path, "flora")
    worker = worker_for(server, torch.bfloat16)
    state = global_state(server, scale=1e-3)
    worker.set_base_delta(server.frozen_part(state))
    for name, terms in worker.host._side.items():
        held = sum(B.double() @ A.double() for B, A in terms)  # (m, n)
        torch.testing.assert_close(held, state.delta(name), rtol=1e-5, atol=1e-12)
