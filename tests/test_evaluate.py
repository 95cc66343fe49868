"""Generation and Rouge-L: greedy, batched = unbatched, EOS, generated text not teacher forcing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model

from flexlora.errors import UsageError
from flexlora.training.evaluate import (
    EvalResult,
    cut_at_stop,
    evaluate_examples,
    generate,
    generate_ids,
    rouge_l,
    weighted_mean,
)
from flexlora.training.model import build_tiny_llama
from tests.helpers import bigram_model, word_tokenizer

PROMPTS = [
    "Below is an instruction.\n\n### Instruction:\nSay hi.\n\n### Response:\n",
    "Q: 2+2?\nA:",
    "x",
    "A much longer prompt, so that the batch needs real left padding for the short ones.\n",
    "Translate to French: I like apples.",
]


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    return build_tiny_llama(seed=11)


# -- generation -------------------------------------------------------------------------------


def test_generation_is_the_continuation_of_plain_hf_greedy_decoding(tiny) -> None:
    model, tokenizer = tiny
    prompt = PROMPTS[0]
    (ids,) = generate_ids(model, tokenizer, [prompt], max_new_tokens=12, batch_size=1)
    encoded = tokenizer(prompt, return_tensors="pt")
    full = model.generate(**encoded, max_new_tokens=12, do_sample=False)  # (1, t + new)
    expected = full[0, encoded["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in expected:
        expected = expected[: expected.index(tokenizer.eos_token_id)]
    assert ids == expected
    (text,) = generate(model, tokenizer, [prompt], max_new_tokens=12, batch_size=1)
    assert text == tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_generation_is_deterministic_and_batch_independent(tiny) -> None:
    model, tokenizer = tiny
    one_by_one = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=1)
    batched = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3)
    again = generate_ids(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=len(PROMPTS))
    assert batched == one_by_one == again
    assert all(0 < len(ids) <= 10 for ids in batched)
    assert len({tuple(ids) for ids in batched}) > 1  # prompts do change the answer


def test_peft_model_generates_with_its_adapter(tiny) -> None:
    model, tokenizer = tiny
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    config.init_lora_weights = False  # random B: the adapter is not a no-op
    torch.manual_seed(0)
    peft_model = get_peft_model(build_tiny_llama(seed=11)[0], config)
    peft_model.train()
    one_by_one = generate_ids(peft_model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=1)
    batched = generate_ids(peft_model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4)
    assert batched == one_by_one
    assert peft_model.training  # mode restored
    assert batched != generate_ids(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4)


WORDS = ["question", "repeat", "answer", ":", "one", "two", "three", "four", "five", "wrong"]


@pytest.fixture(scope="module")
def words():
    return word_tokenizer(WORDS)


def test_generation_stops_at_eos_and_respects_max_new_tokens(words) -> None:
    chain = {"one": "two", "two": "three", "three": "</s>", "wrong": "wrong"}
    model = bigram_model(words, chain, default="wrong")
    prompts = ["answer : one", "answer : four", "one"]
    for batch_size in (1, 3):
        ids = generate_ids(model, words, prompts, max_new_tokens=5, batch_size=batch_size)
        assert [len(seq) for seq in ids] == [2, 5, 2]
        assert all(words.eos_token_id not in seq for seq in ids)
        texts = generate(model, words, prompts, max_new_tokens=5, batch_size=batch_size)
        assert texts == ["two three", "wrong wrong wrong wrong wrong", "two three"]
    one_token = generate(model, words, prompts, max_new_tokens=1, batch_size=2)
    assert one_token == ["two", "wrong", "two"]


def test_long_prompts_can_be_cut_from_the_left(tiny) -> None:
    model, tokenizer = tiny
    long_prompt = "filler " * 50 + PROMPTS[1]
    cut = generate_ids(
        model, tokenizer, [long_prompt], max_new_tokens=6, batch_size=1, max_prompt_tokens=8
    )
    tail = tokenizer(long_prompt)["input_ids"][-8:]
    direct = model.generate(torch.tensor([tail]), max_new_tokens=6, do_sample=False)  # (1, 14)
    assert cut == [direct[0, 8:].tolist()]


def test_a_prompt_is_cut_to_what_the_models_positions_leave(tiny) -> None:
    """GPT-2's learned positions end at n_positions: a prompt as long as that (train.cutoff_len
    = n_positions) plus new tokens raised a bare IndexError; it keeps its last tokens now."""
    import transformers as tf

    _, tokenizer = tiny
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "vocab_size": 260}
    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids))
    long_prompt = "filler " * 50 + PROMPTS[1]  # far past 64 tokens
    cut = generate_ids(gpt2, tokenizer, [long_prompt], max_new_tokens=4, max_prompt_tokens=64)
    tail = tokenizer(long_prompt)["input_ids"][-60:]
    gpt2.eval()
    direct = gpt2.generate(torch.tensor([tail]), max_new_tokens=4, do_sample=False, eos_token_id=2)
    assert len(cut[0]) >= 1 and cut[0] == direct[0, 60:].tolist()[: len(cut[0])]
    with pytest.raises(UsageError, match=r"max_new_tokens = 64 .* 64 positions"):
        generate_ids(gpt2, tokenizer, ["x"], max_new_tokens=64)


def test_generation_argument_errors(tiny) -> None:
    model, tokenizer = tiny
    assert generate(model, tokenizer, [], max_new_tokens=4, batch_size=2) == []
    with pytest.raises(UsageError, match="max_new_tokens"):
        generate(model, tokenizer, ["x"], max_new_tokens=0, batch_size=1)
    with pytest.raises(UsageError, match="batch_size"):
        generate(model, tokenizer, ["x"], max_new_tokens=1, batch_size=0)


# -- Rouge-L ----------------------------------------------------------------------------------


def _f(lcs: int, n_pred: int, n_ref: int) -> float:
    p, r = lcs / n_pred, lcs / n_ref
    return 2 * p * r / (p + r)


def test_rouge_l_hand_computed_values() -> None:
    pairs = [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        ("red green blue", "one two three", 0.0),
        ("the cat sat on the mat", "the cat was on a mat", _f(4, 6, 6)),  # the cat on mat
        ("alpha beta gamma", "alpha gamma delta epsilon", _f(2, 3, 4)),  # alpha gamma
        ("Paris!", "paris", 1.0),  # lowercased, punctuation dropped
        ("she was running", "she runs", _f(2, 3, 2)),  # Porter stemming: running, runs -> run
        ("", "something", 0.0),
    ]
    preds, refs, expected = zip(*pairs, strict=True)
    assert rouge_l(list(preds), list(refs)) == pytest.approx(list(expected))


def test_rouge_l_needs_pairs() -> None:
    with pytest.raises(UsageError, match="pair up"):
        rouge_l(["a"], ["a", "b"])


def test_evaluate_scores_generated_text_not_teacher_forced_argmax(words) -> None:
    """The reference (even quoted in the prompt) is predicted step by step under teacher forcing,
    but the model's own first word is wrong and it never recovers: Rouge-L must see that."""
    chain = {":": "wrong", "one": "two", "two": "three", "three": "four", "four": "five"}
    chain |= {"five": "</s>", "wrong": "wrong"}
    model = bigram_model(words, chain, default="wrong")
    prompt, reference = (
        "question : repeat one two three four five answer :",
        "one two three four five",
    )

    prompt_ids = words(prompt)["input_ids"]
    ref_ids = words(reference)["input_ids"]
    logits = model(torch.tensor([prompt_ids + ref_ids])).logits  # (1, t, V)
    forced = logits[0, len(prompt_ids) - 1 : -1].argmax(-1).tolist()  # (len(ref),)
    (teacher_forced,) = rouge_l([words.decode(forced)], [reference])
    assert teacher_forced >= 0.8  # what the reference code would have reported

    result = evaluate_examples(model, words, [prompt], [reference], max_new_tokens=5)
    assert result.predictions == ("wrong wrong wrong wrong wrong",)
    assert result.scores == (0.0,)
    assert result.mean_rouge_l == 0.0


def test_evaluate_examples_is_rouge_of_generate(tiny) -> None:
    model, tokenizer = tiny
    references = ["hello there", "four", "x y z", "padding", "J'aime les pommes."]
    result = evaluate_examples(
        model, tokenizer, PROMPTS, references, max_new_tokens=6, batch_size=2
    )
    predictions = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=5)
    assert result.predictions == tuple(predictions)
    assert result.scores == tuple(rouge_l(predictions, references))
    assert result.n == len(PROMPTS)
    assert result.mean_rouge_l == pytest.approx(sum(result.scores) / len(PROMPTS))
    empty = evaluate_examples(model, tokenizer, [], [])
    assert empty.n == 0 and math.isnan(empty.mean_rouge_l)
    with pytest.raises(UsageError, match="pair up"):
        evaluate_examples(model, tokenizer, PROMPTS, references[:2])


# -- weighted mean ----------------------------------------------------------------------------


def _result(scores: list[float]) -> EvalResult:
    mean = sum(scores) / len(scores) if scores else math.nan
    return EvalResult(mean, len(scores), tuple(scores))


def test_weighted_mean_weights_by_example_count() -> None:
    assert weighted_mean([_result([1.0]), _result([0.0, 0.0, 0.0])]) == pytest.approx(0.25)
    assert weighted_mean([_result([0.5]), _result([])]) == pytest.approx(0.5)  # empty skipped
    with pytest.raises(UsageError, match="no examples"):
        weighted_mean([_result([]), _result([])])


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(0.0, 1.0), min_size=0, max_size=6),
        min_size=1,
        max_size=5,
    ).filter(lambda groups: any(groups))
)
def test_weighted_mean_equals_the_pooled_mean(groups: list[list[float]]) -> None:
    pooled = [s for group in groups for s in group]
    assert weighted_mean([_result(g) for g in groups]) == pytest.approx(
        sum(pooled) / len(pooled), abs=1e-12
    )


def test_cut_at_stop_ends_the_answer_at_the_first_marker() -> None:
    assert cut_at_stop("Paris.\n\n### Explanation: it is", ["###"]) == "Paris."
    assert cut_at_stop("a b ## c", ["###", "##"]) == "a b"
    assert cut_at_stop("no marker here ", ["###"]) == "no marker here"
    assert cut_at_stop("keep", []) == "keep"


def test_stop_strings_cut_generation_where_the_marker_first_appears(tiny) -> None:
    model, tok = tiny
    prompts = ["Say something:", "Another prompt, longer than the first one:"]
    free = generate(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert all(len(p) >= 6 for p in free), free
    marker = free[0][3:5]
    stopped = generate(model, tok, prompts, max_new_tokens=12, batch_size=2, stop=[marker])
    # HF stops generating once the marker is produced; the text then holds it at most at the end
    assert stopped[0].startswith(free[0][: free[0].find(marker)].strip())
    assert cut_at_stop(stopped[0], [marker]) == free[0][: free[0].find(marker)].strip()
    result = evaluate_examples(model, tok, prompts, ["x", "y"], max_new_tokens=12, stop=[marker])
    assert marker not in result.predictions[0]
