"""Scoring per task type (CoIN's truth-alignment evaluation) and batched greedy generation.

Task types and their rules, after the official CoIN evaluation scripts:

    mc      multiple choice: the option letter is parsed from the output as
            ``eval_science_qa.py`` does (the whole output if it is a letter, ``"B. ..."``,
            else the first one-character word) and compared with the answer's letter.
    short   short answer (TextVQA, GQA, VizWiz, VQAv2, OCR-VQA): case-insensitive exact
    cls     match after trimming whitespace and trailing punctuation (``eval_vqav2.py``
    exact   compares ``pred.upper() == answer.upper()``).
    count   exact match, with number words read as digits ("two" == "2").
    box     grounding: four numbers parsed from the output (brackets and commas allowed);
            correct when IoU with the answer box is at least 0.5.

Several reference answers (a test record whose answer is a list, as TextVQA / VQAv2 /
VizWiz annotations carry ten): VQA accuracy, min(#references equal to the output / 3, 1),
after the VQA evaluators' answer normalisation (:func:`normalize_vqa`), as CoIN scores those
datasets; whatever the task type.

Prompts and answers are turned into token ids by :func:`encode_example` for training and
:func:`encode_prompt` for generation, so the two always agree (both live in
:mod:`cl_core.continual.encoders`, with the image-text encoder).
"""
from __future__ import annotations

import re
from typing import Sequence

# The token-id layout of an example has one home, cl_core.continual.encoders; re-exported here.
from cl_core.continual.encoders import PROMPT_SEPARATOR, as_encoder, encode_example, encode_prompt  # noqa: F401

TASK_TYPES = ("mc", "short", "cls", "exact", "count", "box")
IOU_THRESHOLD = 0.5

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?")
_LETTER_RE = re.compile(r"\b(\w)\b")


# The VQA evaluators' answer normalisation (written from their description, not copied):
# lower case; punctuation removed when it touches a space, else replaced by a space; commas
# inside numbers and periods outside numbers dropped; number words as digits; articles dropped.
_VQA_PUNCT = ";/[]\"{}()=+\\_-><@`,?!*#%^&$:"
_VQA_NUMBERS = {w: str(i) for i, w in enumerate(
    "none one two three four five six seven eight nine ten".split())}
_VQA_NUMBERS["zero"] = "0"
_VQA_ARTICLES = {"a", "an", "the"}
_DIGIT_COMMA_RE = re.compile(r"(?<=\d),(?=\d)")
_PERIOD_RE = re.compile(r"(?<!\d)\.(?!\d)")
VQA_MATCHES_FOR_FULL_CREDIT = 3


def normalize_vqa(text: str) -> str:
    """An answer as the VQA evaluators compare it. Apostrophes are dropped on both sides
    ("don't" == "dont"), where the evaluators' contraction table maps some words only."""
    t = str(text).replace("\n", " ").replace("\t", " ").strip().lower()
    t = _DIGIT_COMMA_RE.sub("", t).replace("'", "")
    for p in _VQA_PUNCT:
        if p in t:
            t = t.replace(p, "") if (p + " " in t or " " + p in t) else t.replace(p, " ")
    t = _PERIOD_RE.sub("", t)
    words = [_VQA_NUMBERS.get(w, w) for w in t.split()]
    return " ".join(w for w in words if w not in _VQA_ARTICLES)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """min(#references equal to the prediction / 3, 1), after :func:`normalize_vqa`."""
    if not references:
        raise ValueError("VQA accuracy needs at least one reference answer")
    pred = normalize_vqa(prediction)
    matches = sum(normalize_vqa(r) == pred for r in references)
    return min(matches / VQA_MATCHES_FOR_FULL_CREDIT, 1.0)


def check_task_type(task_type: str) -> str:
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; allowed: {', '.join(TASK_TYPES)}")
    return task_type


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding whitespace and trailing '.'/'!'."""
    text = " ".join(str(text).lower().split())
    return text.rstrip(".!").strip()


def parse_letter(text: str) -> str | None:
    """The option letter of a multiple-choice output, as CoIN's ScienceQA evaluation reads it."""
    text = str(text).strip()
    if len(text) == 1 and text.isalpha():
        return text.upper()
    if len(text) >= 3 and text[0].isalpha() and text[1:3] == ". ":
        return text[0].upper()
    found = _LETTER_RE.findall(text)
    return found[0].upper() if found else None


def parse_box(text: str):
    """Four numbers from ``text`` (``[x1, y1, x2, y2]``, ``x1 y1 x2 y2`` ...), else None."""
    numbers = _NUM_RE.findall(str(text))
    if len(numbers) != 4:
        return None
    return tuple(float(v) for v in numbers)


def iou(a, b) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2); 0 for degenerate unions."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _count(text: str) -> str:
    t = normalize(text)
    return _NUMBER_WORDS.get(t, t)


def score(task_type: str, prediction: str, answer: str) -> bool:
    """Whether ``prediction`` is correct for ``answer`` under ``task_type``'s rule."""
    check_task_type(task_type)
    if task_type == "mc":
        gold = parse_letter(answer)
        return gold is not None and parse_letter(prediction) == gold
    if task_type == "box":
        gold, pred = parse_box(answer), parse_box(prediction)
        return gold is not None and pred is not None and iou(pred, gold) >= IOU_THRESHOLD
    if task_type == "count":
        return _count(prediction) == _count(answer)
    return normalize(prediction) == normalize(answer)


def credit(task_type: str, prediction: str, answer) -> float:
    """1.0 / 0.0 for one reference answer (:func:`score`); VQA accuracy for a list of them."""
    if isinstance(answer, (list, tuple)):
        return vqa_accuracy(prediction, answer)
    return float(score(task_type, prediction, answer))


def accuracy(task_type: str, predictions: Sequence[str], answers: Sequence) -> float:
    """Percentage (0-100): the mean credit of the predictions. An answer may be a list of
    reference answers (VQA accuracy for that record)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("no answers to score")
    total = sum(credit(task_type, p, a) for p, a in zip(predictions, answers))
    return 100.0 * total / len(answers)


def infer_task_type(answers: Sequence[str], prompts: Sequence[str] = ()) -> str:
    """A task type for data without one: ``box`` if every answer is four numbers, ``mc``
    if every answer is one letter, else ``exact``."""
    if answers and all(parse_box(a) is not None for a in answers):
        return "box"
    if answers and all(len(a.strip().rstrip(".")) == 1 and a.strip()[0].isalpha() for a in answers):
        return "mc"
    return "exact"


# --------------------------------------------------------------------------- generation

def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 8,
             batch_size: int = 64, max_prompt_tokens: int | None = None,
             adapter_names: Sequence[str] | None = None, progress=None, images: Sequence | None = None) -> list[str]:
    """Greedy answers for ``prompts``, in batches, left-padded.

    ``tokenizer``: a tokenizer or an examples encoder (:mod:`cl_core.continual.encoders`);
    ``images`` (one per prompt, None for none) go with the prompts through an image-text
    encoder. ``adapter_names`` (one per prompt) routes each row to a PEFT adapter in one batch
    (``PeftModel.generate(adapter_names=...)``). ``progress`` is an optional tqdm-like
    object updated by the number of prompts done.
    """
    import torch

    encoder = as_encoder(tokenizer)
    tokenizer = encoder.tokenizer
    if adapter_names is not None and len(adapter_names) != len(prompts):
        raise ValueError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                end = start + batch_size
                inputs = encoder.prompts(prompts[start:end], None if images is None else images[start:end],
                                         max_prompt_tokens)
                # on the model's device (a GPU after the Trainer moved it there)
                inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                width = inputs["input_ids"].shape[1]
                if adapter_names is not None:
                    inputs["adapter_names"] = list(adapter_names[start:end])
                generated = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    pad_token_id=encoder.pad_id, eos_token_id=tokenizer.eos_token_id,
                )
                for row in generated[:, width:]:
                    out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
                if progress is not None:
                    progress.update(len(inputs["input_ids"]))
    finally:
        model.train(was_training)
    return out
