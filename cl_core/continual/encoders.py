"""Examples encoders: how the runner turns (prompt, answer, image) into model inputs, for a
text model (its tokenizer) and an image-text model (its processor). Training
(:func:`cl_core.continual.training.train`) and generation
(:func:`cl_core.continual.evaluation.generate`) go through one encoder, so there is one
training and one evaluation code path for both kinds of model.

    enc = as_encoder(tokenizer)                    # TextEncoder
    enc = ImageTextEncoder(processor, load_image)  # load_image(ref) -> PIL image
    item = enc.example(prompt, answer, image, max_length)   # input_ids, labels (+ pixel_values ...)
    batch = enc.collate([item, ...])                         # right-padded training batch
    inputs = enc.prompts(prompts, images, max_prompt_tokens) # left-padded generation batch

A text example is the prompt, ``PROMPT_SEPARATOR`` and the answer with the end-of-sequence
token, the loss on the answer only (:func:`encode_example`; :func:`encode_prompt` for generation, so the two always agree). An
image-text example puts the processor's image token and a newline before the prompt, as LLaVA's
``<image>\\n`` first turn does; the processor expands it to the model's image tokens and returns
``pixel_values`` (and whatever else it returns per image), all of which reach the model.
Tested on LLaVA; the Qwen-VL family's encoder (:mod:`cl_core.continual.qwen_vl`) is this one with
its image markers, its token-count check and its per-token ``mm_token_type_ids``. Labels are -100
on the prompt, so on the image tokens too. A record
without an image is a text-only example (no image token, no pixels), which LLaVA-style models
accept in the same batch as image examples.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

IGNORE = -100
PROMPT_SEPARATOR = "\n"  # between the prompt and the answer


def encode_prompt(tokenizer, prompt: str, max_prompt_tokens: int | None = None) -> list[int]:
    """Token ids the model reads before its answer (the tokenizer's own special tokens
    included). Over-long prompts keep their end, where the instruction is."""
    ids = tokenizer(prompt + PROMPT_SEPARATOR)["input_ids"]
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        ids = ids[len(ids) - max_prompt_tokens:]
    return list(ids)


def encode_example(tokenizer, prompt: str, answer: str, max_length: int) -> dict:
    """``input_ids`` and ``labels`` (prompt positions masked with -100) for training."""
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    answer_ids = answer_ids[: max(1, max_length // 2)]
    prompt_ids = encode_prompt(tokenizer, prompt, max_length - len(answer_ids))
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [-100] * len(prompt_ids) + answer_ids,
    }


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class TextEncoder:
    """A causal LM's tokenizer as an examples encoder (images are not used)."""

    uses_images = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = _pad_id(tokenizer)

    # -- training
    def example(self, prompt: str, answer: str, image=None, max_length: int = 256) -> dict:
        return encode_example(self.tokenizer, prompt, answer, max_length)

    def collate(self, batch: Sequence[dict]) -> dict:
        import torch

        width = max(len(x["input_ids"]) for x in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):
            n = len(x["input_ids"])
            ids[row, :n] = torch.as_tensor(x["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(x["labels"], dtype=torch.long)
            attention[row, :n] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": attention}
        extra = _concat_extras(batch)
        out.update(extra)
        return out

    # -- generation
    def prompt_ids(self, prompt: str, image=None, max_prompt_tokens: Optional[int] = None) -> dict:
        return {"input_ids": encode_prompt(self.tokenizer, prompt, max_prompt_tokens)}

    def prompts(self, prompts: Sequence[str], images: Optional[Sequence] = None,
                max_prompt_tokens: Optional[int] = None) -> dict:
        """A left-padded batch of prompts (with their images' tensors) for ``generate``."""
        import torch

        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        rows = [self.prompt_ids(p, im, max_prompt_tokens) for p, im in zip(prompts, images)]
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for row, r in enumerate(rows):
            ids = r["input_ids"]
            input_ids[row, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
            attention[row, width - len(ids):] = 1
        out = {"input_ids": input_ids, "attention_mask": attention}
        out.update(_concat_extras(rows))
        return out


def _concat_extras(rows: Sequence[dict]) -> dict:
    """The image tensors of a batch (``pixel_values`` and the like), concatenated along the
    first dimension over the rows that have them (LLaVA: (images, 3, H, W)), in row order,
    which is the order the model fills its image tokens in. Per-token tensors (Qwen2-VL's
    ``mm_token_type_ids``) are not handled here."""
    import torch

    keys = [k for k in rows[0] if k not in ("input_ids", "labels", "attention_mask")] if rows else []
    for r in rows[1:]:
        keys += [k for k in r if k not in ("input_ids", "labels", "attention_mask") and k not in keys]
    return {k: torch.cat([r[k] for r in rows if k in r], dim=0) for k in keys}


class ImageTextEncoder(TextEncoder):
    """An image-text model's processor as an examples encoder. ``load_image(ref)`` turns a
    record's image reference into a PIL image (:func:`cl_core.continual.multimodal.load_image`)."""

    uses_images = True
    image_marker = None   # the text standing for the image; None: the processor's image token

    def __init__(self, processor, load_image: Callable):
        tokenizer = getattr(processor, "tokenizer", None)
        token = getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None)
        if tokenizer is None or token is None:
            raise ValueError(f"{type(processor).__name__} has no tokenizer or no image token: not an image-text "
                             "processor the runner can drive")
        super().__init__(tokenizer)
        self.processor = processor
        self.image_token = token
        self.load_image = load_image
        self.image_token_id = tokenizer.convert_tokens_to_ids(token)
        self.image_end_id = self.image_token_id   # the last token of the image (a cut prompt keeps it)
        self.image_marker = self.image_marker or token

    def check_model(self, model) -> None:
        """Refuse a model the processor does not fit, before training (LLaVA: the processor and
        the model check each other at the first forward; qwen_vl overrides)."""

    def check_run(self, tasks, cfg) -> None:
        """Refuse settings and records the model family cannot take, before training (LLaVA:
        every image gives the same tokens, the runner encodes one example per task; qwen_vl
        overrides)."""

    def prompt_ids(self, prompt: str, image=None, max_prompt_tokens: Optional[int] = None) -> dict:
        if image is None:
            return super().prompt_ids(prompt, None, max_prompt_tokens)
        enc = self.processor(images=[self.load_image(image)], text=[f"{self.image_marker}\n{prompt}{PROMPT_SEPARATOR}"],
                             return_tensors="pt")
        ids = enc.pop("input_ids")[0].tolist()
        enc.pop("attention_mask", None)
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            # Keep the image tokens (and what precedes them) whole; cut the text after them
            # from the left, as the text path keeps a long prompt's end, where the instruction is.
            last = max(i for i, t in enumerate(ids) if t in (self.image_token_id, self.image_end_id))
            head, tail = ids[:last + 1], ids[last + 1:]
            room = max_prompt_tokens - len(head)
            if room < 1:
                raise ValueError(f"{head.count(self.image_token_id)} image tokens do not fit in {max_prompt_tokens} "
                                 f"prompt tokens (with {len(head) - head.count(self.image_token_id)} before them and "
                                 "the answer): raise --max-length")
            ids = head + tail[len(tail) - room:]
        out = {"input_ids": ids}
        out.update({k: v for k, v in enc.items() if hasattr(v, "shape")})
        return out

    def example(self, prompt: str, answer: str, image=None, max_length: int = 256) -> dict:
        if image is None:
            return super().example(prompt, answer, None, max_length)
        answer_ids = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) + [self.tokenizer.eos_token_id]
        answer_ids = answer_ids[: max(1, max_length // 2)]
        enc = self.prompt_ids(prompt, image, max_length - len(answer_ids))
        prompt_ids = enc.pop("input_ids")
        enc["input_ids"] = prompt_ids + answer_ids
        enc["labels"] = [IGNORE] * len(prompt_ids) + answer_ids
        return enc


def as_encoder(tokenizer_or_encoder):
    """An encoder as is; a tokenizer wrapped in a :class:`TextEncoder`."""
    if isinstance(tokenizer_or_encoder, TextEncoder):
        return tokenizer_or_encoder
    return TextEncoder(tokenizer_or_encoder)
