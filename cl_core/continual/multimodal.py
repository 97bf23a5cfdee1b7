"""The runner on image-text-to-text models (LLaVA-style, and the Qwen-VL family through
:mod:`cl_core.continual.qwen_vl`): which model folders are multimodal,
their processor and model, the records' images (resolved under ``--image-folder``, every one
checked before training), where LoRA goes (the language model only) and what is trainable
beside it (``--train-projector``: the multi-modal projector, as the official ``mm_projector``).

    is_image_text_folder(path) -> bool        # its config is an AutoModelForImageTextToText type
    encoder_for(cfg) -> TextEncoder | ImageTextEncoder   (cl_core.continual.encoders)
    check_images(tasks, cfg) -> dict          # resolve + open every image; summary for the report
    lora_targets(model, target_modules) / projector_modules(model)

A model folder is multimodal when transformers maps its ``config.json`` model type to
``AutoModelForImageTextToText`` (LLaVA, Qwen2-VL and Qwen2.5-VL tested; docs/runner.md); it is
then loaded with ``AutoModelForImageTextToText`` and its processor (``AutoProcessor``; the Qwen-VL
family: the image processor and the tokenizer, without torchvision), anything else as a causal
LM with its tokenizer, as before. The bundled benchmark in multimodal mode
(``RunConfig(multimodal=True)``, ``--multimodal``) uses the tiny LLaVA of
:mod:`cl_core.continual.tiny_model` (or a tiny Qwen-VL, ``model_family``) and the scene
pictures of :mod:`cl_core.continual.images`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from cl_core.continual.model_folder import is_image_text_folder, model_type  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

# The language-model part of a multimodal model's module names (LLaVA: model.language_model;
# older layouts: language_model.model); LoRA's "all-linear" means its linear layers only.
LANGUAGE_MODEL = "language_model"
# The projector between the vision tower and the language model (LLaVA's
# multi_modal_projector; the official LLaVA code calls it mm_projector; Qwen-VL's patch merger).
PROJECTORS = ("multi_modal_projector", "mm_projector", "merger")
# transformers' own hint when a processor needs torchvision, and what to tell the user instead
TORCHVISION_HINT = ("needs torchvision, which is not installed or does not load against this torch: install the "
                    "torchvision release built for your torch (pip install torchvision; with the CPU torch 2.13 "
                    "build: pip install torch==2.14.1 torchvision==0.29.1)")


def uses_images(cfg) -> bool:
    """Whether the run feeds images: the bundled multimodal benchmark, or an image-text --model."""
    if cfg.model is not None:
        return is_image_text_folder(cfg.model)
    return bool(cfg.multimodal)


# --------------------------------------------------------------------------- images

def load_image(ref):
    """A record's image as an RGB PIL image: a path (already resolved), a drawn Scene, or a
    PIL image as is."""
    from PIL import Image

    if isinstance(ref, (str, Path)):
        with Image.open(ref) as im:
            return im.convert("RGB")
    if hasattr(ref, "objects"):   # a synthetic Scene
        from cl_core.continual.images import draw_scene

        return draw_scene(ref)
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    raise TypeError(f"cannot read an image from {type(ref).__name__}")


def resolve_image(image: str, folder: Optional[str]) -> Path:
    """A record's ``image`` field as a path: absolute as is, else under ``--image-folder``
    (as LLaVA's and CoIN's data loaders join them)."""
    p = Path(image)
    if p.is_absolute() or folder is None:
        return p
    return Path(folder) / p


def _open_image(path: Path):
    """(None, (width, height)) when PIL opens the file; else (why not in a few words, None)."""
    import zlib

    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return ("not found" if not path.exists() else "not a file"), None
    try:
        with Image.open(path) as im:
            size = im.size
            # Every pixel decoded, as training will: verify() reads only the structure and
            # passes a JPEG cut short or a PNG with corrupt IDAT data ("image file is
            # truncated" / "broken data stream" mid-run, naming no file).
            im.load()
            return None, size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        return f"cannot be opened as an image ({type(exc).__name__}: {str(exc)[:80]})", None


def check_images(records, *, folder: Optional[str], skip_bad: bool, where: str):
    """The records whose image exists and opens with PIL, with each record's resolved path.

    ``records``: task_files.TaskRecord objects of one file (``where``: the file, for messages).
    A record without an image stays (a text-only example). A bad image raises ValueError in
    one line naming the file, the record (index and id) and the image path, or with
    ``skip_bad`` the record is dropped and counted. Returns (kept records, their image paths
    as strings or None, number skipped, {path: (width, height)} of the images opened)."""
    kept, paths, skipped, sizes = [], [], 0, {}
    seen: dict = {}
    for r in records:
        if r.image is None:
            kept.append(r)
            paths.append(None)
            continue
        if r.image not in seen:
            p = resolve_image(r.image, folder)
            seen[r.image] = (p, *_open_image(p))
        p, problem, size = seen[r.image]
        if problem is not None:
            rid = f" (id {r.id})" if getattr(r, "id", None) is not None else ""
            msg = f"{where}: record {r.index}{rid}: image {p} {problem}"
            if folder is None and not Path(r.image).is_absolute():
                msg += " (relative image paths are resolved under --image-folder DIR, which is not given)"
            if not skip_bad:
                raise ValueError(msg + "; fix the file or skip such records with --skip-bad")
            log.warning("skipping %s", msg)
            skipped += 1
            continue
        sizes[str(p)] = size
        kept.append(r)
        paths.append(str(p))
    return kept, paths, skipped, sizes


def image_report(tasks, cfg, sizes: dict, skipped: dict) -> Optional[dict]:
    """What the report says about a multimodal run's images: where from, how many, their sizes
    (``"WxH": count``, most common first) and the records skipped for a bad image per file."""
    from cl_core.continual.images import IMAGE_SIZE

    if cfg.model is None and cfg.multimodal:
        n = sum(len(t.train_images) + len(t.test_images) for t in tasks)
        return {"source": "drawn scenes (cl_core.continual.images)", "folder": None, "count": n,
                "sizes": {f"{IMAGE_SIZE}x{IMAGE_SIZE}": n}, "skipped": {}}
    counts: dict = {}
    for w, h in sizes.values():
        counts[f"{w}x{h}"] = counts.get(f"{w}x{h}", 0) + 1
    with_image = sum(1 for t in tasks for im in t.train_images + t.test_images if im is not None)
    without = sum(1 for t in tasks for im in t.train_images + t.test_images if im is None)
    return {"source": "files", "folder": cfg.image_folder, "count": len(sizes), "records_with_image": with_image,
            "records_without_image": without,
            "sizes": dict(sorted(counts.items(), key=lambda kv: -kv[1])), "skipped": dict(skipped)}


# --------------------------------------------------------------------------- models

def user_processor(path: str):
    """The processor of an image-text model folder (ValueError in one line otherwise)."""
    from transformers import AutoProcessor

    from cl_core.continual.training import check_weights_present, ready_tokenizer

    check_weights_present(path)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the PIL fallback notice without torchvision
            proc = AutoProcessor.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers' messages run to pages: keep the first line
        if "torchvision" in str(exc).lower():
            raise ValueError(f"--model {path}: its processor {TORCHVISION_HINT}") from None
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"--model {path}: cannot load its processor ({first[:200]}); save it with the model: "
                         "processor.save_pretrained(DIR)") from None
    tok = getattr(proc, "tokenizer", None)
    if tok is None or getattr(proc, "image_processor", None) is None:
        raise ValueError(f"--model {path}: its processor ({type(proc).__name__}) has no tokenizer or no image "
                         "processor; an image-text model needs both")
    ready_tokenizer(tok, path)
    return proc


def tiny_processor(family: str = "llava"):
    """The bundled tiny model's processor (the benchmark's words and an ``<image>`` token; a
    Qwen-VL ``family``: its special tokens, half-size patches merged 2 x 2, the same 16 image
    tokens per picture)."""
    from cl_core.continual import images, qwen_vl, synthetic, tiny_model

    if family != "llava":
        return qwen_vl.tiny_processor(image_size=images.IMAGE_SIZE, patch_size=images.PATCH_SIZE // 2)
    tok = tiny_model.build_tokenizer(tiny_model.build_vocab(synthetic.vocabulary_texts()),
                                     image_token=tiny_model.IMAGE_TOKEN)
    return tiny_model.build_processor(tok, image_size=images.IMAGE_SIZE, patch_size=images.PATCH_SIZE)


def encoder_for(cfg):
    """The run's examples encoder: the processor of an image-text model (the bundled tiny
    LLaVA in multimodal mode), else the causal LM's tokenizer."""
    from cl_core.continual import qwen_vl
    from cl_core.continual.encoders import ImageTextEncoder, TextEncoder
    from cl_core.continual.training import check_weights_present, tiny_tokenizer, user_tokenizer

    if cfg.model is not None:
        if qwen_vl.is_qwen_vl(model_type(cfg.model)):
            check_weights_present(cfg.model)
            return qwen_vl.QwenVLEncoder(qwen_vl.QwenVLProcessor.from_pretrained(cfg.model), load_image)
        if is_image_text_folder(cfg.model):
            return ImageTextEncoder(user_processor(cfg.model), load_image)
        return TextEncoder(user_tokenizer(cfg.model))
    if cfg.multimodal:
        family = cfg.model_family
        if family != "llava":
            return qwen_vl.QwenVLEncoder(tiny_processor(family), load_image)
        return ImageTextEncoder(tiny_processor(), load_image)
    return TextEncoder(tiny_tokenizer())


def save_encoder(encoder, folder) -> None:
    """Save what loads the encoder again with the model (the processor, or the tokenizer)."""
    getattr(encoder, "processor", encoder.tokenizer).save_pretrained(str(folder))


def lora_targets(model, target_modules):
    """LoRA's ``target_modules`` for ``model``: as given for a text model; for a multimodal
    model "all-linear" becomes the language model's linear layers only (a regex over their
    names), so the vision tower and the projector get no LoRA."""
    import torch

    if target_modules != "all-linear" or not any(LANGUAGE_MODEL in n for n, _ in model.named_modules()):
        return target_modules
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and LANGUAGE_MODEL in n})
    if not leaves:
        raise ValueError("the model's language model has no linear layers for LoRA")
    return rf".*{LANGUAGE_MODEL}\..*\.({'|'.join(leaves)})"


def projector_modules(model) -> list:
    """PEFT ``modules_to_save`` for the model's projector: its linear layers, named from the
    projector on (``multi_modal_projector.linear_1``, ...). The linear layers rather than the
    projector module, because PEFT routes mixed-adapter batches (per-instance test routing)
    through Linear/Embedding/Conv copies only. ValueError when the model has no projector
    (a text model given ``--train-projector``)."""
    import torch

    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        hit = [k for k, p in enumerate(parts) if p in PROJECTORS]
        if hit and isinstance(module, torch.nn.Linear):
            found.append(".".join(parts[hit[-1]:]))
    if not found:
        raise ValueError(f"--train-projector: the model ({type(model).__name__}) has no multi-modal projector "
                         f"with linear layers (none of {', '.join(PROJECTORS)}); it is for image-text models")
    return sorted(set(found))


def describe_processor(encoder) -> Optional[dict]:
    """The processor used, for the report (None for a text model)."""
    proc = getattr(encoder, "processor", None)
    if proc is None:
        return None
    ip = proc.image_processor
    size = getattr(ip, "crop_size", None) or getattr(ip, "size", None)
    if size is not None and not isinstance(size, (int, float)):
        # transformers' SizeDict (or a dict): the set fields only, as plain JSON
        items = size.items() if hasattr(size, "items") else vars(size).items()
        size = {k: int(v) for k, v in items if isinstance(v, (int, float))}
    return {"processor": type(proc).__name__, "image_processor": type(ip).__name__,
            "image_size": size, "image_token": encoder.image_token}
