"""One client's local training: tokenization, masking, optimiser options, slots, reproducibility."""

from __future__ import annotations

import pytest
import torch

from flexlora.config import LoRASettings, TrainConfig
from flexlora.training.client import IGNORE_INDEX, collate, local_steps, tokenize
from flexlora.training.model import build_tiny_llama, target_linear_modules
from flexlora.training.worker import ClientWorker
from tests.sim_helpers import make_dataset

LORA = LoRASettings(target_modules=["q_proj", "v_proj", "up_proj"], dropout=0.0)


def worker(train: TrainConfig, slots: dict[str, int] | None = None) -> ClientWorker:
    model, tok = build_tiny_llama(seed=0)
    shapes = target_linear_modules(model, LORA.target_modules)
    slots = slots or {"r2": 2, "r8": 8}
    slot_ranks = {name: dict.fromkeys(shapes, r) for name, r in slots.items()}
    return ClientWorker(model, tok, LORA, slot_ranks, train)


def examples():
    data = make_dataset()
    return list(data.train(data.seen[0]))


def test_prompt_tokens_are_masked_unless_training_on_inputs() -> None:
    _, tok = build_tiny_llama()
    ex = tokenize(tok, "Say hi:", "hi", cutoff_len=64, train_on_inputs=False)
    n_prompt = len(tok("Say hi:")["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id
    full = tokenize(tok, "Say hi:", "hi", cutoff_len=64, train_on_inputs=True)
    assert full.labels == full.input_ids


def test_long_prompts_keep_their_end_and_the_response() -> None:
    _, tok = build_tiny_llama()
    prompt = "instruction " * 40 + "### Response:\n"
    ex = tokenize(tok, prompt, "answer", cutoff_len=32, train_on_inputs=False)
    assert len(ex.input_ids) == 32
    text = tok.decode(ex.input_ids, skip_special_tokens=True)
    assert text.endswith("### Response:\nanswer")
    assert sum(label != IGNORE_INDEX for label in ex.labels) == len("answer") + 1  # + EOS


def test_collate_pads_right_and_ignores_padding() -> None:
    _, tok = build_tiny_llama()
    a = tokenize(tok, "a", "bb", 64, False)
    b = tokenize(tok, "aaaa", "b", 64, False)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, max(len(a.input_ids), len(b.input_ids)))
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_local_steps_from_epochs() -> None:
    assert local_steps(TrainConfig(local_steps=5), 1000) == 5
    cfg = TrainConfig(local_steps=0, local_epochs=2.0, batch_size=4, grad_accum=2)
    assert local_steps(cfg, 20) == 5  # ceil(2 * 20 / 8)


def test_client_returns_factors_at_its_slot_rank_and_they_change() -> None:
    w = worker(TrainConfig(local_steps=3, batch_size=2, cutoff_len=48, lr=1e-2))
    start = w.host.read("r8")
    update, result = w.train("c0", "r8", start, examples(), seed=1)
    assert set(update.ranks.values()) == {8}
    assert update.num_examples == len(examples())
    assert result.steps == 3 and len(result.losses) == 3
    moved = [not torch.equal(update.factors[m].B, start[m].B) for m in start]
    assert all(moved)
    small, _ = w.train("c1", "r2", w.host.read("r2"), examples(), seed=1)
    assert set(small.ranks.values()) == {2}


def test_same_seed_same_update_different_seed_different() -> None:
    cfg = TrainConfig(local_steps=2, batch_size=2, cutoff_len=48, lr=1e-2)
    w = worker(cfg)
    start = w.host.read("r8")
    a, _ = w.train("c", "r8", start, examples(), seed=3)
    b, _ = w.train("c", "r8", start, examples(), seed=3)
    c, _ = w.train("c", "r8", start, examples(), seed=4)
    m = next(iter(a.factors))
    assert torch.equal(a.factors[m].B, b.factors[m].B)
    assert not torch.equal(a.factors[m].B, c.factors[m].B)


def test_frozen_A_trains_only_B() -> None:
    w = worker(TrainConfig(local_steps=2, batch_size=2, cutoff_len=48, lr=1e-2))
    start = w.host.read("r8")
    update, _ = w.train("c", "r8", start, examples(), seed=0, train_A=False)
    for m, f in update.factors.items():
        assert torch.equal(f.A, start[m].A)
        assert not torch.equal(f.B, start[m].B)


def test_gradient_accumulation_matches_one_big_batch() -> None:
    """Two micro-batches of 2 with accumulation = one batch of 4 (same examples, same order)."""
    exs = examples()[:4]
    big = worker(
        TrainConfig(
            local_steps=1,
            batch_size=4,
            grad_accum=1,
            cutoff_len=48,
            optimizer="sgd",
            lr=0.5,
            max_grad_norm=0.0,
        )
    )
    acc = worker(
        TrainConfig(
            local_steps=1,
            batch_size=2,
            grad_accum=2,
            cutoff_len=48,
            optimizer="sgd",
            lr=0.5,
            max_grad_norm=0.0,
        )
    )
    start = big.host.read("r2")
    # a single step over all four examples: order within the step does not matter for SGD
    a, _ = big.train("c", "r2", start, exs, seed=0)
    b, _ = acc.train("c", "r2", start, exs, seed=0)
    for m in a.factors:
        # token-weighted accumulation: the same gradient as the batch of 4, to rounding
        assert torch.allclose(a.factors[m].B, b.factors[m].B, atol=1e-6, rtol=1e-4)
        assert torch.allclose(a.factors[m].A, b.factors[m].A, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("schedule", "precision"), [("linear", "fp32"), ("cosine", "bf16")])
def test_schedules_and_bf16_train(schedule: str, precision: str) -> None:
    cfg = TrainConfig(
        local_steps=3,
        batch_size=2,
        cutoff_len=48,
        lr=1e-2,
        lr_schedule=schedule,
        warmup_steps=1,
        precision=precision,
        optimizer="sgd",
        momentum=0.9,
    )
    w = worker(cfg)
    update, result = w.train("c", "r2", w.host.read("r2"), examples(), seed=0)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(f.A.dtype == torch.float32 for f in update.factors.values())
