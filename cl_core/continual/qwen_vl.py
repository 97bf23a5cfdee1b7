"""The Qwen-VL family (Qwen2-VL, Qwen2.5-VL) in the runner: its processor built without
torchvision, its examples encoder (variable-size patch sets, the image-token count checked
against the grid), the checks a run makes before training, and the tiny models of the tests and
the multimodal demo.

    proc = QwenVLProcessor.from_pretrained(folder)   # Qwen2VLImageProcessorPil + the tokenizer
    enc = QwenVLEncoder(proc, load_image)             # an ImageTextEncoder (cl_core.continual.encoders)
    enc.check_model(model); enc.check_run(tasks, cfg)   # before the first step
    model = build_tiny("qwen2_5_vl", proc.tokenizer, image_size=48, patch_size=6)

What the model family needs (transformers' qwen2_vl / qwen2_5_vl sources): an image is resized so
each side is a multiple of patch x merge (14 x 2 = 28 in the released models) within a pixel
budget (``min_pixels``..``max_pixels``), cut into patches of ``temporal_patch_size`` frames
(a still image is repeated), and handed over flattened: ``pixel_values`` is (patches, 3 x t x p x p)
and ``image_grid_thw`` (t, h, w) per image, so a batch concatenates its images' patch sets
instead of stacking them. The text holds ``<|vision_start|>``, then t·h·w / merge² ``<|image_pad|>``
tokens (merge 2: a quarter of the patches), then ``<|vision_end|>``; ``mm_token_type_ids`` marks
the image tokens (1) for the model's 3-D rotary positions (Qwen2-VL refuses an image batch without
it; Qwen2.5-VL silently falls back to 1-D positions), so it is padded and cut with ``input_ids``:
the encoder derives it from the padded ids in ``collate`` / ``prompts``.

Why not ``AutoProcessor``: ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` cannot be constructed
without torchvision (they want the video processor, even with ``video_processor=None``), and
PyPI's torchvision does not always load against the installed torch. :class:`QwenVLProcessor` is
the image half of them over transformers' pure PIL/numpy ``Qwen2VLImageProcessorPil`` and the
folder's tokenizer; the video half is left out (the runner reads still images). The runner's
prompt layout is the one of its LLaVA path (image first, then the prompt, a newline and the
answer; no chat template applied), with the image wrapped in ``<|vision_start|>`` /
``<|vision_end|>`` as Qwen's own template wraps it.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

from cl_core.continual.encoders import ImageTextEncoder

log = logging.getLogger("cl_core.continual.run")

# config.json model_type -> the family's name (as docs and the demo's --model-family say it)
FAMILIES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}
VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
# the multimodal demo's --model-family names -> model_type
DEMO_FAMILIES = {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl"}
SPECIAL_TOKENS = (VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD)
# The config ids of those tokens (Qwen2VLConfig / Qwen2_5_VLConfig fields), in the same order.
TOKEN_FIELDS = ("vision_start_token_id", "image_token_id", "vision_end_token_id", "video_token_id")
# The image processor's fields that must agree with the vision tower's config.
GEOMETRY = (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
            ("temporal_patch_size", "temporal_patch_size"))


def is_qwen_vl(model_type: Optional[str]) -> bool:
    """Whether a config's ``model_type`` is one of the family's (Qwen2-VL, Qwen2.5-VL)."""
    return model_type in FAMILIES


# --------------------------------------------------------------------------- processor

class QwenVLProcessor:
    """The image half of ``Qwen2VLProcessor`` over ``Qwen2VLImageProcessorPil`` (no torchvision):
    ``proc(images=[pil, ...], text=[str, ...], return_tensors="pt")`` expands each
    ``<|image_pad|>`` of the texts, in order, to the t·h·w / merge² tokens of its image and returns
    ``input_ids``, ``attention_mask``, ``pixel_values`` (patches concatenated) and
    ``image_grid_thw``. ``save_pretrained`` writes the image processor's and the tokenizer's files
    (what :meth:`from_pretrained`, and transformers' own loaders, read back)."""

    image_token = IMAGE_PAD

    def __init__(self, image_processor, tokenizer):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    @classmethod
    def from_pretrained(cls, path) -> "QwenVLProcessor":
        """From a model folder (its ``preprocessor_config.json`` and tokenizer files); a
        ValueError in one line naming ``--model`` and what is missing."""
        from pathlib import Path

        import transformers
        from transformers import AutoTokenizer

        try:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        except ImportError:
            raise ValueError(f"--model {path}: a Qwen-VL model needs transformers 5 (its PIL image processor "
                             f"Qwen2VLImageProcessorPil and mm_token_type_ids; tested with 5.23), this is "
                             f"{transformers.__version__}: pip install -U 'transformers>=5'") from None
        if not (Path(path) / "preprocessor_config.json").is_file():
            raise ValueError(f"--model {path}: no preprocessor_config.json (the image processor's settings) inside; "
                             "save it with the model: processor.save_pretrained(DIR) or "
                             "image_processor.save_pretrained(DIR)")
        try:
            images = Qwen2VLImageProcessorPil.from_pretrained(str(path))
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001 - transformers' messages run to pages: keep the first line
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise ValueError(f"--model {path}: cannot load its image processor or tokenizer ({first[:200]})") from None
        missing = [t for t in SPECIAL_TOKENS[:3] if _single_token_id(tokenizer, t) is None]
        if missing:
            raise ValueError(f"--model {path}: the tokenizer has no single token for {', '.join(missing)}; a "
                             "Qwen-VL tokenizer keeps each of them one special token")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"--model {path}: the tokenizer has no end-of-sequence token")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(images, tokenizer)

    def save_pretrained(self, folder) -> None:
        self.image_processor.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))

    def image_tokens(self, width: int, height: int) -> tuple:
        """(image tokens, (t, h, w) grid) of a ``width`` x ``height`` image, from its size
        alone (the image processor's resize rule): what the text must hold for it."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.image_processor
        factor = ip.patch_size * ip.merge_size
        h, w = smart_resize(height, width, factor=factor, min_pixels=ip.size["shortest_edge"],
                            max_pixels=ip.size["longest_edge"])
        grid = (1, h // ip.patch_size, w // ip.patch_size)
        return grid[0] * grid[1] * grid[2] // self.merge_size ** 2, grid

    def __call__(self, images=None, text=None, return_tensors="pt"):
        import torch
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        counts = []
        if images:
            out = dict(self.image_processor(images=list(images), return_tensors="pt"))
            counts = [int(g.prod()) // self.merge_size ** 2 for g in out["image_grid_thw"]]
        wanted = sum(t.count(IMAGE_PAD) for t in texts)
        if wanted != len(counts):
            raise ValueError(f"{wanted} {IMAGE_PAD} in the text for {len(counts)} images")
        expanded, k = [], 0
        for t in texts:
            parts = t.split(IMAGE_PAD)
            s = parts[0]
            for p in parts[1:]:
                s += IMAGE_PAD * counts[k] + p
                k += 1
            expanded.append(s)
        enc = self.tokenizer(expanded)
        width = max(len(ids) for ids in enc["input_ids"])
        if any(len(ids) != width for ids in enc["input_ids"]):
            raise ValueError("QwenVLProcessor encodes texts of one length at a time (the encoder pads batches)")
        out["input_ids"] = torch.tensor(enc["input_ids"], dtype=torch.long)
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        return BatchFeature(out, tensor_type=return_tensors)


def _single_token_id(tokenizer, token: str) -> Optional[int]:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


# --------------------------------------------------------------------------- encoder

class QwenVLEncoder(ImageTextEncoder):
    """The runner's examples encoder for the family: the image as ``<|vision_start|>``, its
    ``<|image_pad|>`` tokens and ``<|vision_end|>`` before the prompt; every image example's
    token count checked against its grid (a ValueError naming the image, not a shape error in
    the model); ``mm_token_type_ids`` added to every batch from its padded ``input_ids``."""

    image_marker = VISION_START + IMAGE_PAD + VISION_END
    # Qwen2.5-VL's model class declares accepts_loss_kwargs = False (transformers 5.23), though its
    # forward hands the Trainer's num_items_in_batch to its loss as Qwen2-VL's does. Left so, every
    # rank of a launch averages its own share's tokens and the ranks' means are averaged: another
    # loss than one process's mean over the batch (2 ranks: 6e-4 relative, seen in
    # tests/runner/test_launch.py). The runner's Trainer passes the token count for the family.
    loss_takes_token_count = True

    def __init__(self, processor: QwenVLProcessor, load_image: Callable):
        super().__init__(processor, load_image)
        # a prompt cut to --max-length keeps the image whole up to its closing token
        self.image_end_id = self.tokenizer.convert_tokens_to_ids(VISION_END)

    def prompt_ids(self, prompt: str, image=None, max_prompt_tokens: Optional[int] = None) -> dict:
        out = super().prompt_ids(prompt, image, max_prompt_tokens)
        if image is not None:
            grid = out["image_grid_thw"][0]
            want = int(grid.prod()) // self.processor.merge_size ** 2
            have = out["input_ids"].count(self.image_token_id)
            if have != want:
                raise ValueError(f"image {image if isinstance(image, str) else type(image).__name__}: the text holds "
                                 f"{have} {IMAGE_PAD} tokens, its grid {tuple(int(v) for v in grid)} needs {want} "
                                 f"(t·h·w / {self.processor.merge_size}²); remove {IMAGE_PAD} from the record's "
                                 "text")
        return out

    def collate(self, batch: Sequence[dict]) -> dict:
        out = super().collate(batch)
        out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).int()
        return out

    def prompts(self, prompts, images=None, max_prompt_tokens=None) -> dict:
        out = super().prompts(prompts, images, max_prompt_tokens)
        out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).int()
        return out

    # -- checks before training
    def check_model(self, model) -> None:
        """The processor and the model agree: patch, merge and temporal patch sizes, and the
        special tokens' ids (a ValueError naming both sides otherwise)."""
        vision = model.config.vision_config
        ip = self.processor.image_processor
        for mine, theirs in GEOMETRY:
            a, b = getattr(ip, mine), getattr(vision, theirs)
            if a != b:
                raise ValueError(f"the image processor's {mine} is {a} (preprocessor_config.json), the vision "
                                 f"tower's {theirs} is {b} (config.json): they must be equal")
        for token, field in zip(SPECIAL_TOKENS, TOKEN_FIELDS):
            want = getattr(model.config, field, None)
            have = self.tokenizer.convert_tokens_to_ids(token)
            if want is not None and token != VIDEO_PAD and have != want:
                raise ValueError(f"the tokenizer's {token} is id {have}, the model's {field} is {want} "
                                 "(config.json): the tokenizer does not belong to this model")

    def check_run(self, tasks, cfg) -> None:
        """The settings, then every image record's token count from its image's size (no pixels
        read): a record whose text holds the family's image markers, or whose image needs more
        tokens than ``--max-length`` leaves room for, is a ValueError naming the task, the record
        and the image.

        Refused: ``--train-projector`` with a method that routes test instances to LoRA sets
        (grouping). PEFT routes a mixed-adapter batch row by row, and Qwen-VL's patch merger
        reads a batch's patches concatenated, not its rows, so its per-set copies cannot be
        routed (PEFT stops with a length error at the first evaluation)."""
        from cl_core.continual.images import IMAGE_SIZE

        routed = [m for m in cfg.methods if cfg.plan(m).grouping]
        if cfg.train_projector and routed:
            raise ValueError(f"--train-projector (train_projector) on a Qwen-VL model cannot be combined with "
                             f"{', '.join(routed)}: the patch merger reads the batch's image patches, not its rows, "
                             "so PEFT cannot route its copy per LoRA set; drop --train-projector or run those "
                             "methods without it")
        max_length = cfg.max_length
        for task in tasks:
            for split, records, images in (("training", task.train, task.train_images),
                                           ("test", task.test, task.test_images)):
                for k, ((prompt, _, _), image) in enumerate(zip(records, images)):
                    if image is None:
                        continue
                    shown = image if isinstance(image, str) else "drawn"
                    where = f"task {task.name}, {split} record {k} (image {shown})"
                    if any(t in prompt for t in SPECIAL_TOKENS):
                        raise ValueError(f"{where}: its text holds {'/'.join(SPECIAL_TOKENS[:3])}; the runner places "
                                         "the image itself (write <image> or nothing)")
                    # a file's size as opened (multimodal.check_images), or a drawn scene's
                    w, h = task.image_sizes[image] if isinstance(image, str) else (IMAGE_SIZE, IMAGE_SIZE)
                    n, grid = self.processor.image_tokens(w, h)
                    if n + 4 > max_length:   # + start, end, a prompt token and the answer's end
                        raise ValueError(f"{where}: its {w}x{h} image takes {n} image tokens (grid {grid}, "
                                         f"t·h·w / {self.processor.merge_size}²), more than --max-length "
                                         f"{max_length} leaves room for; raise --max-length or lower max_pixels in "
                                         "preprocessor_config.json")


# --------------------------------------------------------------------------- tiny models

def tiny_processor(*, image_size: int, patch_size: int, max_pixels: Optional[int] = None) -> QwenVLProcessor:
    """The bundled benchmark's word-level tokenizer with the family's special tokens, over a
    ``Qwen2VLImageProcessorPil`` for ``patch_size`` patches merged 2 x 2: a square picture of
    ``image_size`` keeps its size (a multiple of 2 x patch_size) and gives
    (image_size / patch_size)² / 4 image tokens."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from cl_core.continual import synthetic, tiny_model

    factor = 2 * patch_size
    if image_size % factor:
        raise ValueError(f"image_size {image_size} must be a multiple of 2 x patch_size = {factor}")
    tokenizer = tiny_model.build_tokenizer(tiny_model.build_vocab(synthetic.vocabulary_texts()) + list(SPECIAL_TOKENS))
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)   # each one token, never split
    images = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": factor * factor,
                                            "longest_edge": max_pixels or (4 * image_size) ** 2})
    return QwenVLProcessor(images, tokenizer)


def build_tiny(model_type: str, tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               image_size: int, patch_size: int, vision_layers: int = 2, max_positions: int = 256, seed: int = 0):
    """A freshly initialised tiny Qwen2-VL (``model_type`` "qwen2_vl") or Qwen2.5-VL
    ("qwen2_5_vl") for ``tokenizer``'s vocabulary, deterministic in ``seed``: a vision tower of
    ``vision_layers`` blocks (width ``hidden_size`` / 2), the 2 x 2 patch merger, and a language
    model of ``num_layers`` layers (M-RoPE sections in the released models' 1:1.5:1.5 ratio)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r}: the Qwen-VL family is {', '.join(FAMILIES)}")
    half = hidden_size // num_heads // 2     # M-RoPE: the sections add up to half the head size
    t = half // 4
    sections = [t, (half - t) // 2, half - t - (half - t) // 2]
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                max_position_embeddings=max_positions, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": sections, "rope_theta": 10000.0},
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    width = max(16, hidden_size // 2)
    common = dict(depth=vision_layers, num_heads=2, patch_size=patch_size, spatial_merge_size=2,
                  temporal_patch_size=2)
    if model_type == "qwen2_vl":
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = dict(common, embed_dim=width, hidden_size=hidden_size, mlp_ratio=2)
    else:
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        # windowed attention over 2 x 2 merged patches; the last block attends over the whole image
        vision = dict(common, hidden_size=width, intermediate_size=2 * width, out_hidden_size=hidden_size,
                      window_size=4 * patch_size, fullatt_block_indexes=[vision_layers - 1])
    ids = {f: tokenizer.convert_tokens_to_ids(t) for t, f in zip(SPECIAL_TOKENS, TOKEN_FIELDS)}
    config = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    from cl_core.continual.tiny_model import seeded

    return seeded(model_cls, config, seed, ids=tokenizer)
