"""A tiny Llama and a word-level tokenizer for the bundled benchmark.

Nothing is downloaded: the vocabulary is built from the words the synthetic benchmark
(:mod:`cl_core.continual.synthetic`) can produce, the tokenizer is a ``tokenizers`` WordLevel
model (lower-cased, split on whitespace and punctuation) wrapped in a
``PreTrainedTokenizerFast``, and the model is a ``LlamaForCausalLM`` built from a small
``LlamaConfig``. Both save and load with ``save_pretrained`` / ``from_pretrained``, so a
stage-1 base model folder is an ordinary local causal-LM folder (usable as ``--model``).
"""
from __future__ import annotations

import re
from typing import Iterable

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
PAD, UNK, BOS, EOS = SPECIAL_TOKENS

# The same split as tokenizers' Whitespace pre-tokenizer (\w+|[^\w\s]+), after lower-casing.
_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def words_of(text: str) -> list[str]:
    """The word-level tokens of ``text`` (what the tokenizer will see)."""
    return _WORD_RE.findall(text.lower())


def build_vocab(texts: Iterable[str]) -> list[str]:
    """Special tokens, then every word of ``texts`` in sorted order (deterministic)."""
    words = set()
    for text in texts:
        words.update(words_of(text))
    words.difference_update(SPECIAL_TOKENS)
    return list(SPECIAL_TOKENS) + sorted(words)


def build_tokenizer(vocab: list[str]):
    """A ``PreTrainedTokenizerFast`` over ``vocab`` that prepends ``<s>`` to every encoding."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if list(vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
        raise ValueError(f"the vocabulary must start with the special tokens {SPECIAL_TOKENS}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("the vocabulary has duplicate entries")
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(WordLevel(vocab=ids, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, ids[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD
    )


def build_model(vocab_size: int, *, hidden_size: int = 96, num_layers: int = 2, num_heads: int = 4,
                intermediate_size: int | None = None, max_positions: int = 160, seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` (tied embeddings), deterministic in ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model
