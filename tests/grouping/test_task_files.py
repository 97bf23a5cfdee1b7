"""Reading task files and extracting instructions the way the official LCIA script does."""
import json
import logging
from pathlib import Path

import pytest

from cl_core.continual.templates import ORIGINAL, TASKS
from cl_core.task_files import (
    TaskFileError,
    TaskRecord,
    extract_instruction,
    infer_kind,
    load_task_file,
    read_task_file,
    templates,
)
from tests.helpers import DATA_GROUPING

DATA = DATA_GROUPING
COIN = DATA / "Instructions"


# The official extraction (instruct/LoRASelect.py), written out for comparison.
def official_train(path, task):
    data = json.load(open(path, encoding="utf-8"))
    out = []
    for entry in data:
        if "conversations" in entry:
            value = entry["conversations"][0]["value"]
            if task == "ImageNet":
                out.append(value.split("\n")[1].strip())
            elif task == "Grounding":
                out.append(value.split("\n")[-1].split(":")[0].strip())
            else:
                out.append(value.split("\n")[-1].strip())
    return out


def official_test(path, task):
    data = json.load(open(path, encoding="utf-8"))
    out = []
    for entry in data:
        text = entry["text"]
        if task == "ImageNet":
            out.append(text.strip())
        elif task == "Grounding":
            out.append(text.split("\n")[-1].split(":")[0].strip())
        else:
            out.append(text.split("\n")[-1].strip())
    return out


@pytest.mark.parametrize("task", TASKS)
def test_coin_train_files_extract_like_official(task):
    path = COIN / task / "train.json"
    records = load_task_file(path)
    assert [r.instruction for r in records] == official_train(path, task)
    assert set(templates(records)) == set(ORIGINAL[task])
    raw = json.load(open(path))
    for i, r in enumerate(records):
        assert r.index == i and r.source == str(path)
        assert r.answer == raw[i]["conversations"][1]["value"]
        assert r.prompt == raw[i]["conversations"][0]["value"].replace("<image>", "").strip()
        assert "<image>" not in r.prompt and r.image == raw[i]["image"]


@pytest.mark.parametrize("task", ["TextVQA", "ImageNet", "Grounding"])
def test_coin_test_files_extract_like_official(task):
    path = COIN / task / "test.json"
    records = load_task_file(path)
    assert [r.instruction for r in records] == official_test(path, task)
    raw = json.load(open(path))
    assert [r.answer for r in records] == [x["answer"] for x in raw]


def test_extract_instruction_kinds():
    t = "<image>\nWhat is this?\nAnswer briefly."
    assert extract_instruction(t, "vqa") == "Answer briefly."
    assert extract_instruction(t, "classification") == "What is this?"
    assert extract_instruction("What is this?\nAnswer.", "classification", record="question") == "What is this?\nAnswer."
    assert extract_instruction("<image>\nPlease give the box: the dog: left", "grounding") == "Please give the box"
    with pytest.raises(ValueError, match="unknown instruction kind"):
        extract_instruction(t, "caption")
    with pytest.raises(ValueError, match="second line"):
        extract_instruction("one line", "classification")


def test_infer_kind_from_folder(tmp_path):
    assert infer_kind(COIN / "ImageNet" / "train.json") == "classification"
    assert infer_kind(COIN / "Grounding" / "test.json") == "grounding"
    assert infer_kind(COIN / "GQA" / "train.json") == "vqa"
    assert infer_kind(tmp_path / "task.json") == "vqa"


def test_kind_can_be_forced():
    records = load_task_file(COIN / "Grounding" / "train.json", kind="vqa")
    assert all(":" in r.instruction for r in records)


def test_instruction_input_output_json_and_jsonl():
    recs = load_task_file(DATA / "alpaca.json")
    assert recs[0] == TaskRecord(
        "Translate the sentence into French.", "Translate the sentence into French.\nGood morning.", "Bonjour.", 0,
        str(DATA / "alpaca.json"), None,
    )
    assert recs[1].prompt == "Summarize the paragraph in one sentence."
    assert templates(recs) == ["Translate the sentence into French.", "Summarize the paragraph in one sentence."]
    recs = load_task_file(DATA / "alpaca.jsonl")
    assert [(r.index, r.answer) for r in recs] == [(0, "positive"), (1, "negative")]
    assert templates(recs) == ["Classify the sentiment of the review."]


def test_json_file_holding_jsonl_is_read(tmp_path):
    p = tmp_path / "task.json"
    p.write_text('{"instruction": "a b", "output": "x"}\n{"instruction": "c d", "output": "y"}\n')
    assert [r.instruction for r in load_task_file(p)] == ["a b", "c d"]


def test_malformed_records_reported_with_file_and_index():
    path = DATA / "malformed.json"
    with pytest.raises(TaskFileError) as err:
        load_task_file(path)
    msg = str(err.value)
    assert str(path) in msg and "record 1:" in msg and "'conversations' must be a non-empty list" in msg
    assert "and 2 more malformed records" in msg and "--skip-bad" in msg
    assert [p.index for p in err.value.problems] == [1, 2, 4]
    assert isinstance(err.value, ValueError)


def test_skip_bad_skips_and_logs(caplog):
    caplog.set_level(logging.WARNING, logger="cl_core.task_files")
    records, skipped = read_task_file(DATA / "malformed.json", skip_bad=True)
    assert [r.index for r in records] == [0, 3]
    assert [p.index for p in skipped] == [1, 2, 4]
    assert "expected a JSON object" in skipped[1].message and "no 'conversations'" in skipped[2].message
    assert sum("skipping record" in r.getMessage() for r in caplog.records) == 3


@pytest.mark.parametrize(
    "record,needle",
    [
        ({"conversations": [{"from": "gpt", "value": "x"}]}, "no human turn"),
        ({"conversations": [{"from": "human"}]}, "has no 'value' string"),
        ({"conversations": [{"from": "human", "value": "q\n  "}]}, "instruction is empty"),
        ({"conversations": ["turn"]}, "every turn"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]}, "assistant turn"),
        ({"instruction": 5, "output": "x"}, "'instruction' must be a string"),
        ({"instruction": "ok", "output": ["x"]}, "'output' must be a string"),
        ({"text": None}, "'text' must be a string"),
    ],
)
def test_each_kind_of_malformed_record(tmp_path, record, needle):
    p = tmp_path / "t.json"
    p.write_text(json.dumps([{"instruction": "fine", "output": "y"}, record]))
    with pytest.raises(TaskFileError, match="record 1: .*" + needle.replace("(", r"\(")):
        load_task_file(p)


def test_jsonl_bad_line_is_a_record_problem(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"instruction": "a b", "output": "x"}\n{oops\n{"instruction": "c d", "output": "y"}\n')
    with pytest.raises(TaskFileError, match=r"record 1: line 2 is not valid JSON"):
        load_task_file(p)
    assert [r.index for r in load_task_file(p, skip_bad=True)] == [0, 2]


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json: file not found"):
        load_task_file(tmp_path / "missing.json")
    p = tmp_path / "broken.json"
    p.write_text('[{"instruction": "a"')
    with pytest.raises(TaskFileError, match=r"broken\.json: not valid JSON .*line 1"):
        load_task_file(p, skip_bad=True)
    p.write_text('{"instruction": "a"}')
    with pytest.raises(TaskFileError, match="expected a JSON list of records"):
        load_task_file(p)
    p.write_text("[]")
    with pytest.raises(TaskFileError, match="no usable records"):
        load_task_file(p)
    p.write_text('[{"nothing": 1}]')
    with pytest.raises(TaskFileError, match=r"no usable records \(1 malformed\)"):
        load_task_file(p, skip_bad=True)


def test_first_human_turn_and_answer_after_it(tmp_path):
    p = tmp_path / "t.json"
    p.write_text(json.dumps([{"conversations": [
        {"from": "system", "value": "be nice"},
        {"from": "human", "value": "<image>\nq?\nReply briefly."},
        {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "more?"},
        {"from": "gpt", "value": "a2"},
    ]}]))
    (r,) = load_task_file(p)
    assert (r.instruction, r.prompt, r.answer) == ("Reply briefly.", "q?\nReply briefly.", "a1")


@pytest.mark.parametrize("name,content", [("t.json", ""), ("t.jsonl", ""), ("t.json", "\n  \n")])
def test_empty_file_says_empty(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    # before the fix: "not valid JSON (Expecting value at line 1 column 1)" / "no usable records"
    with pytest.raises(TaskFileError, match=r"t\.jsonl?: the file is empty \((0 bytes|only whitespace)\); a task file holds"):
        load_task_file(p, skip_bad=True)


@pytest.mark.parametrize("name", ["t.json", "t.jsonl"])
def test_utf8_with_bom_is_read(tmp_path, name):
    recs = [{"instruction": "Résumé the input.", "input": "a", "output": "b"}] * 2
    text = json.dumps(recs) if name.endswith(".json") else "\n".join(json.dumps(r) for r in recs)
    p = tmp_path / name
    p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # as Notepad / Excel save "UTF-8"
    got = load_task_file(p)  # before the fix: "not valid JSON (Unexpected UTF-8 BOM ...)"
    assert [r.instruction for r in got] == ["Résumé the input."] * 2 and got[0].answer == "b"
