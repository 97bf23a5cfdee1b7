"""A tiny Llama and a word-level tokenizer for the bundled benchmark.

Nothing is downloaded: the vocabulary is built from the words the synthetic benchmark
(:mod:`cl_core.continual.synthetic`) can produce, the tokenizer is a ``tokenizers`` WordLevel
model (lower-cased, split on whitespace and punctuation) wrapped in a
``PreTrainedTokenizerFast``, and the model is a ``LlamaForCausalLM`` built from a small
``LlamaConfig``. Both save and load with ``save_pretrained`` / ``from_pretrained``, so a
stage-1 base model folder is an ordinary local causal-LM folder (usable as ``--model``).

The multimodal twin (:func:`build_processor`, :func:`build_llava`): the same tokenizer with an
``<image>`` token, a ``LlavaProcessor`` over it and a ``CLIPImageProcessor`` for the 48-pixel
scene pictures of :mod:`cl_core.continual.images`, and a ``LlavaForConditionalGeneration``
whose vision tower is a small CLIP (8-pixel patches: 36 image tokens) and whose language model
is the tiny Llama. Saved with ``save_pretrained`` they form an ordinary image-text-to-text
folder (``AutoProcessor`` / ``AutoModelForImageTextToText``).
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


def build_tokenizer(vocab: list[str], image_token: str | None = None):
    """A ``PreTrainedTokenizerFast`` over ``vocab`` that prepends ``<s>`` to every encoding.
    ``image_token`` (e.g. ``"<image>"``, appended to the vocabulary when missing) becomes a
    special token (``tokenizer.image_token``), as LlavaProcessor needs."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if list(vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
        raise ValueError(f"the vocabulary must start with the special tokens {SPECIAL_TOKENS}")
    if len(set(vocab)) != len(vocab):
        raise ValueError("the vocabulary has duplicate entries")
    if image_token is not None and image_token not in vocab:
        vocab = list(vocab) + [image_token]
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(WordLevel(vocab=ids, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, ids[BOS])]
    )
    extra = {"extra_special_tokens": {"image_token": image_token}} if image_token is not None else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD, **extra
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


IMAGE_TOKEN = "<image>"


def build_processor(tokenizer, *, image_size: int, patch_size: int):
    """A ``LlavaProcessor`` over ``tokenizer`` (which must carry ``IMAGE_TOKEN``) for square
    ``image_size`` pictures. ``num_additional_image_tokens=1`` is the CLIP tower's CLS token: the
    processor then expands ``<image>`` to (image_size / patch_size)^2 tokens, the number of
    features the model inserts (the "default" strategy drops the CLS feature)."""
    import warnings

    from transformers import CLIPImageProcessor, LlavaProcessor

    if getattr(tokenizer, "image_token", None) != IMAGE_TOKEN:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token: build it with build_tokenizer(vocab, "
                         f"image_token={IMAGE_TOKEN!r})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without torchvision transformers uses its PIL processor, and says so
        images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def build_llava(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                image_size: int, patch_size: int, vision_layers: int = 2, max_positions: int = 256,
                seed: int = 0):
    """A freshly initialised tiny ``LlavaForConditionalGeneration`` for ``tokenizer``'s vocabulary,
    deterministic in ``seed``: a CLIP vision tower (hidden ``hidden_size``, ``vision_layers`` layers),
    LLaVA-1.5's two-layer MLP projector, and the tiny Llama as its language model."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    text = build_model(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                       max_positions=max_positions).config
    vision = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                              num_hidden_layers=vision_layers, num_attention_heads=num_heads,
                              image_size=image_size, patch_size=patch_size)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-1, tie_word_embeddings=True)
    return seeded(LlavaForConditionalGeneration, config, seed, ids=text)


def seeded(model_cls, config, seed: int, *, ids):
    """``model_cls(config)`` initialised from ``seed`` (the global RNG left as it was), generating
    with the pad / end / start ids of ``ids`` (a config or a tokenizer)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(ids, key))
    return model
