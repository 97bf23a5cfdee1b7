"""Reading task files: LLaVA / CoIN conversation JSON, CoIN test files, {"instruction", "input",
"output"} JSON or JSONL, with the instruction extracted the way the official LCIA code does.

API
---
    from cl_core.task_files import load_task_file, read_task_file, extract_instruction

    records = load_task_file(path, skip_bad=False, kind="auto")   # -> list[TaskRecord]
    records, skipped = read_task_file(path, skip_bad=True)         # also the skipped Problems
    extract_instruction(text, kind, record="conversation")         # -> str
    templates(records) -> list[str]                                # unique instructions, in order

    TaskRecord(instruction, prompt, answer, index, source, image)
        instruction  the template used for grouping (see below)
        prompt       the full human text of the first turn, "<image>" tags removed, stripped
                     (instruction records: instruction + "\\n" + input when input is given)
        answer       the first assistant reply after that turn ("gpt"/"assistant"), the
                     "answer" field of test records, the "output" field; None when absent
        index        0-based position of the record in the file (JSONL: among non-blank lines)
        source       the file path, as a string
        image        the record's "image" field, or None
        id           the record's "id" (CoIN test files: "question_id") as a string, or None
    Problem(index, message)                                        # one malformed record
    TaskFileError(ValueError): .path, .problems                    # one-line message, file + index

Record forms (one file may mix them):
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}
                               LLaVA / CoIN training files; the first human turn is used (the
                               first turn when no turn says "from")
    {"text": ..., "answer": ...}   CoIN test files (question_id, image, text, answer)
    {"instruction": ..., "input": ..., "output": ...}   instruction-tuning files

Extraction, as ``instruct/LoRASelect.py`` of the LCIA code does it:
    kind "vqa"             last line of the text, stripped
    kind "grounding"       last line, the part before the first ':', stripped
    kind "classification"  conversation turns: the second line (``split('\\n')[1]``, the line
                           after "<image>"); test records ("text"): the whole text, stripped
    instruction records    the whole "instruction" field, stripped, for every kind
kind="auto" reads it from the name of the folder holding the file, as the official script
does (``.../ImageNet/train.json`` -> classification, ``.../Grounding/...`` -> grounding, else
vqa); any other name of a kind forces it.

Malformed records (not an object, no known form, a turn without a text, an empty instruction,
a JSONL line that is not JSON, ...) raise TaskFileError naming the file and the record index,
unless skip_bad=True, which skips them with a logged warning. A file that is missing raises
FileNotFoundError; one that is empty, not JSON at all, not a list, or has no usable records raises
TaskFileError (skip_bad does not help there). Files are UTF-8, with or without a byte-order mark.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

__all__ = [
    "KINDS",
    "Problem",
    "TaskFileError",
    "TaskRecord",
    "extract_instruction",
    "infer_kind",
    "load_task_file",
    "read_task_file",
    "templates",
]

log = logging.getLogger(__name__)

KINDS = ("vqa", "grounding", "classification")
_HUMAN = {"human", "user"}
_ASSISTANT = {"gpt", "assistant"}


@dataclass(frozen=True)
class TaskRecord:
    instruction: str
    prompt: str
    answer: str | None
    index: int
    source: str
    image: str | None = None
    id: str | None = None       # the record's "id" or "question_id", for messages


@dataclass(frozen=True)
class Problem:
    index: int
    message: str


class TaskFileError(ValueError):
    """A task file that cannot be used as it is; the message names the file and record."""

    def __init__(self, message: str, path=None, problems=()):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.problems = list(problems)


class _Bad(Exception):
    """A malformed record (internal)."""


def infer_kind(path) -> str:
    """The extraction kind from the folder name, as the official script decides it."""
    folder = Path(path).resolve().parent.name.lower()
    if folder == "imagenet":
        return "classification"
    if folder == "grounding":
        return "grounding"
    return "vqa"


def extract_instruction(text: str, kind: str = "vqa", record: str = "conversation") -> str:
    """The instruction template in a prompt text, the official way.

    ``record`` is "conversation" (the human turn of a training record) or "question" (the
    "text" of a test record); it matters only for kind "classification".
    """
    if kind not in KINDS:
        raise ValueError(f"unknown instruction kind {kind!r}; allowed: {', '.join(KINDS)}")
    if record not in ("conversation", "question"):
        raise ValueError(f"record={record!r} must be 'conversation' or 'question'")
    if kind == "vqa":
        return text.split("\n")[-1].strip()
    if kind == "grounding":
        return text.split("\n")[-1].split(":")[0].strip()
    if record == "question":
        return text.strip()
    lines = text.split("\n")
    if len(lines) < 2:
        raise ValueError("a classification prompt needs a second line (the line after '<image>')")
    return lines[1].strip()


def _clean_prompt(text: str) -> str:
    return text.replace("<image>", "").strip()


def _optional_str(rec: dict, key: str):
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _Bad(f"'{key}' must be a string, found {type(value).__name__}")
    return str(value)


def _image_field(value):
    """The record's one image path. LLaVA data often writes ``"image": ["a.png"]``: a list of
    one is that image; a list of several is refused (the runner gives each example one image,
    and dropping the others silently would train on what the record does not say)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(value) == 1:
            return value[0]
        if not value:
            return None
        raise _Bad(f"'image' lists {len(value)} images; cl_core gives one image per example: split the record "
                   "into one per image, or skip such records with --skip-bad")
    raise _Bad(f"'image' must be a path (text) or a list of one path, found {type(value).__name__}")


def _parse_record(rec, kind: str, index: int, source: str) -> TaskRecord:
    if not isinstance(rec, dict):
        raise _Bad(f"expected a JSON object, found {type(rec).__name__}")
    image = _image_field(rec.get("image"))
    if "conversations" in rec:
        turns = rec["conversations"]
        if not isinstance(turns, list) or not turns:
            raise _Bad("'conversations' must be a non-empty list")
        if not all(isinstance(t, dict) for t in turns):
            raise _Bad("every turn in 'conversations' must be an object")
        if any("from" in t for t in turns):
            humans = [i for i, t in enumerate(turns) if str(t.get("from", "")).lower() in _HUMAN]
            if not humans:
                raise _Bad("'conversations' has no human turn")
            first = humans[0]
        else:
            first = 0
        value = turns[first].get("value")
        if not isinstance(value, str):
            raise _Bad(f"conversations[{first}] has no 'value' string")
        answer = None
        for t in turns[first + 1:]:
            if str(t.get("from", "")).lower() in _ASSISTANT:
                if not isinstance(t.get("value"), str):
                    raise _Bad("the assistant turn has no 'value' string")
                answer = t["value"]
                break
        try:
            instruction = extract_instruction(value, kind, "conversation")
        except ValueError as exc:
            raise _Bad(str(exc)) from None
        prompt = _clean_prompt(value)
    elif "instruction" in rec:
        instruction = rec["instruction"]
        if not isinstance(instruction, str):
            raise _Bad("'instruction' must be a string")
        extra = _optional_str(rec, "input")
        answer = _optional_str(rec, "output")
        instruction = instruction.strip()
        prompt = instruction + ("\n" + extra.strip() if extra and extra.strip() else "")
    elif "text" in rec:
        text = rec["text"]
        if not isinstance(text, str):
            raise _Bad("'text' must be a string")
        instruction = extract_instruction(text, kind, "question")
        prompt = _clean_prompt(text)
        answer = _optional_str(rec, "answer")
    else:
        raise _Bad("no 'conversations', 'text' or 'instruction' field")
    if not instruction:
        raise _Bad("the extracted instruction is empty")
    rid = rec.get("id", rec.get("question_id"))
    return TaskRecord(instruction, prompt, answer, index, source, image,
                      None if rid is None or isinstance(rid, (dict, list)) else str(rid))


def _read_raw(path: Path):
    """[(index, record or _Bad)] from a JSON list or JSONL file."""
    if path.suffix.lower() in (".csv", ".tsv", ".xlsx", ".parquet"):
        # said as what it is, not as "not valid JSON" at line 1
        raise TaskFileError(f"task file {path}: {path.suffix[1:].upper()} is not a task format; convert it to a "
                            "JSON list of records or JSONL (one JSON record per line)", path)
    try:
        raw = path.read_text(encoding="utf-8-sig")  # UTF-8 with or without a BOM (Windows editors add one)
    except FileNotFoundError:
        raise FileNotFoundError(f"task file {path}: file not found") from None
    except IsADirectoryError:
        raise TaskFileError(f"task file {path}: is a directory, not a file", path) from None
    except UnicodeDecodeError as exc:
        raise TaskFileError(f"task file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
    if not raw.strip():
        size = "0 bytes" if not raw else "only whitespace"
        raise TaskFileError(f"task file {path}: the file is empty ({size}); a task file holds a JSON list of "
                            "records or one JSON record per line (JSONL)", path)
    jsonl = path.suffix.lower() == ".jsonl"
    if not jsonl:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            # A .json file that holds one object per line is read as JSONL.
            if exc.msg == "Extra data" and raw.lstrip().startswith("{"):
                jsonl = True
            else:
                raise TaskFileError(
                    f"task file {path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", path
                ) from None
        else:
            if not isinstance(data, list):
                raise TaskFileError(
                    f"task file {path}: expected a JSON list of records, found a JSON {type(data).__name__}", path
                )
            return list(enumerate(data))
    out = []
    index = 0
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((index, json.loads(line)))
        except json.JSONDecodeError as exc:
            out.append((index, _Bad(f"line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})")))
        index += 1
    return out


def raw_records(path) -> list:
    """[(index, record)] of a task file's well-formed JSON records, read as `read_task_file`
    reads it (BOM, JSON list or JSONL); malformed lines are left out (`read_task_file`
    reports or skips them). For callers that need fields beyond a `TaskRecord` (the
    runner's ``answers`` lists): one reader, so the two never disagree on a file."""
    return [(i, rec) for i, rec in _read_raw(Path(path)) if not isinstance(rec, _Bad)]


def _resolve_kind(path: Path, kind: str) -> str:
    if kind == "auto":
        return infer_kind(path)
    if kind not in KINDS:
        raise ValueError(f"unknown instruction kind {kind!r}; allowed: auto, {', '.join(KINDS)}")
    return kind


def _scan(path: Path, kind: str):
    """(records, problems): every usable record and every malformed one."""
    kind = _resolve_kind(path, kind)
    records, problems = [], []
    for index, rec in _read_raw(path):
        try:
            if isinstance(rec, _Bad):
                raise rec
            records.append(_parse_record(rec, kind, index, str(path)))
        except _Bad as exc:
            problems.append(Problem(index, str(exc)))
    return records, problems


def read_task_file(path, skip_bad: bool = False, kind: str = "auto"):
    """(records, skipped problems) of a task file (see the module docstring)."""
    path = Path(path)
    records, problems = _scan(path, kind)
    if problems and not skip_bad:
        first = problems[0]
        more = f" (and {len(problems) - 1} more malformed records)" if len(problems) > 1 else ""
        raise TaskFileError(
            f"task file {path}: record {first.index}: {first.message}{more}; "
            "fix the file or skip malformed records (skip_bad=True, --skip-bad)",
            path,
            problems,
        )
    for p in problems[:20]:
        log.warning("task file %s: skipping record %d: %s", path, p.index, p.message)
    if len(problems) > 20:
        log.warning("task file %s: skipped %d more malformed records", path, len(problems) - 20)
    if not records:
        why = f" ({len(problems)} malformed)" if problems else ""
        raise TaskFileError(f"task file {path}: no usable records{why}", path, problems)
    return records, problems


def load_task_file(path, skip_bad: bool = False, kind: str = "auto") -> list:
    """The records of a task file (see the module docstring)."""
    return read_task_file(path, skip_bad, kind)[0]


def templates(records: Iterable[TaskRecord]) -> list:
    """The unique instructions of the records, in first-seen order."""
    return list(dict.fromkeys(r.instruction for r in records))
