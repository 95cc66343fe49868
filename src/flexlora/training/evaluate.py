"""Rouge-L of generated text: greedy decoding of each prompt, scored against its reference.

FlexLoRA's reference code computed Rouge-L from the teacher-forced argmax of the reference
tokens. That conditions every step on the true previous tokens, so a model that would derail
after one wrong word still scores nearly full marks. Here the model generates its answer
(greedy, stopping at EOS) and only that continuation is scored.

Scores use the ``rouge-score`` package (``RougeScorer(["rougeL"], use_stemmer=True)``,
F-measure). Its default tokenizer lowercases, replaces every non-alphanumeric character by a
space and splits on whitespace, so punctuation, case and non-Latin text do not count (a text of
only Chinese characters, for one, has no tokens and scores 0).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from rouge_score import rouge_scorer
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from flexlora.errors import UsageError

__all__ = [
    "EvalResult",
    "evaluate_examples",
    "generate",
    "generate_ids",
    "rouge_l",
    "weighted_mean",
]


@dataclass(frozen=True)
class EvalResult:
    """Rouge-L F-measures of one evaluation set (``mean_rouge_l`` is NaN when ``n == 0``)."""

    mean_rouge_l: float
    n: int
    scores: tuple[float, ...]
    predictions: tuple[str, ...] = ()


#: config fields that bound a model's sequence length (GPT-2's learned position table is
#: n_positions: past it, generation fails with a bare IndexError)
POSITION_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length")


def position_limit(model: nn.Module) -> int | None:
    """The most tokens the model's config says it takes (prompt and generation together), or
    None when it names no limit. A PeftModel reads its base model's config."""
    config = getattr(model, "config", None)
    for field in POSITION_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def generate_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    *,
    max_prompt_tokens: int | None = None,
    stop: Sequence[str] = (),
    progress: bool = False,
) -> list[list[int]]:
    """Greedy continuation ids of each prompt, without the prompt and cut before the first EOS.

    Prompts are tokenized with the tokenizer's special tokens (as training does), left-padded
    in batches of similar length, and kept to their last ``max_prompt_tokens`` tokens when
    that is set, and always to what the model's positions leave beside ``max_new_tokens``
    (:func:`position_limit`). Works with a plain model and with a ``PeftModel``. The model's
    train/eval mode is restored afterwards.
    """
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise UsageError(f"generation batch_size must be at least 1, got {batch_size}")
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise UsageError(f"max_prompt_tokens must be at least 1, got {max_prompt_tokens}")
    if not prompts:
        return []
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        stop_strings=[m for m in stop if m] or None,
    )
    limit = position_limit(model)
    if limit is not None:  # a prompt and its new tokens must fit the model's positions
        if max_new_tokens >= limit:
            raise UsageError(
                f"eval.max_new_tokens = {max_new_tokens} leaves no room for a prompt in the "
                f"model's {limit} positions: make it smaller"
            )
        room = limit - max_new_tokens
        max_prompt_tokens = room if max_prompt_tokens is None else min(max_prompt_tokens, room)
    encoded: list[list[int]] = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    if max_prompt_tokens is not None:
        encoded = [ids[-max_prompt_tokens:] for ids in encoded]
    if any(len(ids) == 0 for ids in encoded):
        raise UsageError("a prompt encodes to no tokens; generation needs at least one")
    # longest first: similar lengths share a batch, and an out-of-memory error shows up at once
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    results: list[list[int]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    try:
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="generate", unit="batch", disable=not progress):
            index = order[start : start + batch_size]
            input_ids, attention_mask = _left_pad([encoded[i] for i in index], pad_id)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids.to(device),  # (b, t)
                    attention_mask=attention_mask.to(device),  # (b, t)
                    generation_config=config,
                    tokenizer=tokenizer,  # for stop strings
                )  # (b, t + new)
            new = out[:, input_ids.shape[1] :].tolist()  # (b, new)
            for i, ids in zip(index, new, strict=True):
                results[i] = _cut_at_eos(ids, eos_ids)
    finally:
        model.train(was_training)
    return results


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    *,
    max_prompt_tokens: int | None = None,
    stop: Sequence[str] = (),
    progress: bool = False,
) -> list[str]:
    """Greedy continuation text of each prompt (prompt and special tokens removed, stripped).

    Deterministic: the same model and prompts give the same text whatever ``batch_size``.
    """
    ids = generate_ids(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        batch_size,
        max_prompt_tokens=max_prompt_tokens,
        stop=stop,
        progress=progress,
    )
    return [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in ids]


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's generation EOS ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    extra = getattr(generation_config, "eos_token_id", None)
    for token in extra if isinstance(extra, list) else [extra]:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    if not ids:
        raise UsageError("neither the tokenizer nor the model defines an EOS token")
    return ids


def _left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, both ``(b, t)`` with ``t`` the longest prompt."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (b, t)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (b, t)
    for row, seq in enumerate(seqs):
        input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq) :] = 1
    return input_ids, attention_mask


def _cut_at_eos(ids: list[int], eos_ids: Sequence[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position]
    return ids


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string, stripped."""
    cut = len(text)
    for marker in stop:
        if marker and (at := text.find(marker)) >= 0:
            cut = min(cut, at)
    return text[:cut].strip()


@functools.lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Rouge-L F-measure of each prediction against its reference (0.0 when either is empty)."""
    if len(predictions) != len(references):
        raise UsageError(
            f"{len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    scorer = _scorer()
    return [
        float(scorer.score(target=ref, prediction=pred)["rougeL"].fmeasure)
        for pred, ref in zip(predictions, references, strict=True)
    ]


def evaluate_examples(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    max_prompt_tokens: int | None = None,
    stop: Sequence[str] = (),
    progress: bool = False,
) -> EvalResult:
    """Generate an answer to each prompt and score it against its reference with Rouge-L.

    ``stop`` strings end an answer where they first appear (e.g. the template's ``###``
    section marker, which an untrained model tends to run on into).
    """
    if len(prompts) != len(references):
        raise UsageError(
            f"{len(prompts)} prompts but {len(references)} references; they must pair up"
        )
    predictions = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        batch_size,
        max_prompt_tokens=max_prompt_tokens,
        stop=stop,
        progress=progress,
    )
    predictions = [cut_at_stop(p, stop) for p in predictions]
    scores = rouge_l(predictions, references)
    mean = math.fsum(scores) / len(scores) if scores else math.nan
    return EvalResult(mean, len(scores), tuple(scores), tuple(predictions))


def weighted_mean(results: Iterable[EvalResult]) -> float:
    """Mean Rouge-L over several clients, each weighted by its example count.

    Equals the plain mean over all their examples pooled together; empty results are skipped.
    """
    pairs = [(r.n, r.mean_rouge_l) for r in results if r.n > 0]
    total = sum(n for n, _ in pairs)
    if total == 0:
        raise UsageError("no examples to average: every evaluation result is empty")
    return math.fsum(n * mean for n, mean in pairs) / total
