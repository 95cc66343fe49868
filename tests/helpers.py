"""Test fixtures built in memory: a word-level tokenizer, a hand-wired bigram LLaMA and a GGUF
writer for tiny LLaMA models (so the GGUF conversion is tested without the 94 MB package)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORD_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word (no BOS added); decoding joins with spaces."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys((*WORD_SPECIALS, *words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def bigram_model(
    tokenizer: PreTrainedTokenizerFast, successor: Mapping[str, str], default: str
) -> LlamaForCausalLM:
    """A real 1-layer LLaMA whose greedy next token depends only on the current token.

    Attention and MLP outputs are zeroed so the residual stream carries the current token's
    one-hot embedding; ``lm_head`` is then a transition table: ``successor[word]`` (or
    ``default``) gets the top logit.
    """
    vocab = tokenizer.get_vocab()
    size = len(vocab)
    hidden = size + size % 2  # rotary embeddings need an even head size
    config = LlamaConfig(
        vocab_size=size,
        hidden_size=hidden,
        intermediate_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :size] = torch.eye(size)  # (V, H) one-hot rows
        for word, index in vocab.items():
            model.lm_head.weight[vocab[successor.get(word, default)], index] = 10.0  # (V, H)
    model.requires_grad_(False)
    return model.eval()


def _permute_for_gguf(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaving of q/k rows (the inverse of what transformers undoes on load)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_llama_gguf(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path
) -> Path:
    """Write a LLaMA model and its byte-level tokenizer as an F32 GGUF file."""
    config = model.config
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in specials else 1 for token, _ in vocab])  # 3: control
    writer.add_token_scores([0.0] * len(vocab))  # no merges: transformers derives none
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(True)  # like the byte tokenizer, which starts every text with <s>
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        array = tensor.detach().to(torch.float32).numpy().copy()
        if hf_name.endswith("q_proj.weight"):
            array = _permute_for_gguf(array, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = _permute_for_gguf(array, config.num_key_value_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        assert name is not None, hf_name
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
