"""The tiny test model: a 2-layer LLaMA with seeded random weights and a byte-level tokenizer.

Built in memory with no download; for tests, quick smoke runs and the memory planner.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = ["BYTE_SPECIALS", "TINY_LLAMA", "build_byte_tokenizer", "build_tiny_llama", "tiny_config"]

TINY_LLAMA = "tiny-llama"

# tiny-llama's special tokens come first, then the 256 byte symbols
BYTE_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (4 specials + 256 bytes, no merges): exact round trip, no download.

    Text is encoded as ``<s>`` followed by one token per UTF-8 byte, so ``decode(encode(t))``
    gives ``t`` back for any string.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    vocab = {token: i for i, token in enumerate((*BYTE_SPECIALS, *alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def tiny_config(
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
) -> LlamaConfig:
    """The config of :func:`build_tiny_llama` (vocabulary and special ids of the byte tokenizer)."""
    vocab = len(BYTE_SPECIALS) + 256
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BYTE_SPECIALS.index("<s>"),
        eos_token_id=BYTE_SPECIALS.index("</s>"),
        pad_token_id=BYTE_SPECIALS.index("<pad>"),
    )


def build_tiny_llama(
    seed: int = 0, **shape: int | bool
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny random LLaMA and its byte tokenizer; the same ``seed`` gives the same weights.

    ``shape`` takes :func:`tiny_config`'s keywords (``hidden_size=32``, ...). The global torch
    RNG is left as it was. ``save_pretrained`` both to share the identical model with other
    processes (they load the folder with ``load_base_model``).
    """
    tokenizer = build_byte_tokenizer()
    config = tiny_config(**shape)  # type: ignore[arg-type]
    assert config.vocab_size == len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer
