"""What kind of model a model folder holds (read from its config.json, nothing loaded)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def model_type(path) -> Optional[str]:
    """The ``model_type`` of a model folder's config.json (None when there is none)."""
    f = Path(path) / "config.json"
    try:
        import json

        return json.loads(f.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def is_image_text_folder(path) -> bool:
    """Whether transformers loads the folder's model with AutoModelForImageTextToText."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type(path) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
