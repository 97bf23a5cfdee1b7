"""`cl-core group assign|route` on CoIN-layout task files."""
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


from cl_core.cli import main
from cl_core.continual.templates import TASKS
from cl_core.grouping import InstructionGrouper
from tests.helpers import DATA_GROUPING

DATA = DATA_GROUPING
COIN = DATA / "Instructions"


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_assign_eight_tasks_builds_codebook(tmp_path, capsys):
    cb = tmp_path / "cb.json"
    decisions = []
    for t in TASKS:
        rc, out, _ = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / t / "train.json"), "--json")
        assert rc == 0
        d = json.loads(out)
        assert d["task"] == t and d["records"] == 4 and d["dema"] == d["reused"]
        decisions.append((d["group"], d["reused"]))
    assert decisions == [(0, False), (1, False), (2, False), (1, True), (1, True), (3, False), (1, True), (1, True)]
    g = InstructionGrouper.load(cb)
    assert g.num_groups == 4 and [t["name"] for t in g.tasks] == list(TASKS)
    assert json.loads(cb.read_text())["groups"][1]["tasks"] == ["TextVQA", "GQA", "VizWiz", "VQAv2", "OCRVQA"]


def test_assign_human_table(tmp_path, capsys):
    cb = tmp_path / "cb.json"
    rc, out, _ = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "TextVQA" / "train.json"))
    assert rc == 0 and "decision: new group 0 (first task)" in out
    rc, out, _ = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "GQA" / "train.json"), "--name", "gqa-2")
    assert rc == 0
    assert "group  templates  similarity" in out and "<- best" in out
    assert "decision: re-train group 0 (similarity 1.0000 >= threshold 0.9), DEMA on" in out
    rc, out, _ = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "ImageNet" / "train.json"))
    assert "decision: new group 1 (best similarity 0.0000 < threshold 0.9), fresh LoRA, DEMA off" in out
    assert InstructionGrouper.load(cb).tasks[1]["name"] == "gqa-2"


def test_threshold_option_is_kept_in_codebook(tmp_path, capsys):
    cb = tmp_path / "cb.json"
    run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "TextVQA" / "train.json"), "--threshold", "0.3")
    assert InstructionGrouper.load(cb).threshold == 0.3
    rc, _, _ = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "GQA" / "train.json"), "--threshold", "2")
    assert rc == 2


def test_route_json_and_table(tmp_path, capsys):
    cb = tmp_path / "cb.json"
    for t in TASKS:
        run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / t / "train.json"))
    rc, out, _ = run(capsys, "group", "route", "--codebook", str(cb), "--data", str(COIN / "Grounding" / "test.json"), "--json")
    d = json.loads(out)
    assert rc == 0 and d["groups"] == [3, 3, 3] and d["indices"] == [0, 1, 2]
    assert d["counts"] == {"0": 0, "1": 0, "2": 0, "3": 3}
    assert d["file_decision"]["group"] == 3 and d["file_decision"]["reused"]
    rc, out, _ = run(capsys, "group", "route", "--codebook", str(cb), "--data", str(COIN / "TextVQA" / "test.json"))
    assert rc == 0 and "whole file (official rule): group 1 (most similar)" in out
    assert "    1          3  100.0%" in out


def test_errors_exit_2_with_one_line(tmp_path, capsys, caplog):
    def run(capsys, *argv):  # the error line goes to the log (stderr outside pytest)
        caplog.clear()
        rc = main(list(argv))
        capsys.readouterr()
        (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        return rc, None, line

    cb = tmp_path / "cb.json"
    rc, out, err = run(capsys, "group", "route", "--codebook", str(cb), "--data", str(COIN / "GQA" / "train.json"))
    assert rc == 2 and "cb.json: file not found" in err and not cb.exists()
    cb.write_text("{not json")
    rc, _, err = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "GQA" / "train.json"))
    assert rc == 2 and "corrupt, not valid JSON" in err and cb.read_text() == "{not json"
    cb.unlink()
    rc, _, err = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(DATA / "malformed.json"))
    assert rc == 2 and "malformed.json: record 1:" in err and not cb.exists()
    rc, _, err = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(tmp_path / "none.json"))
    assert rc == 2 and "none.json: file not found" in err


def test_skip_bad_counts_the_skipped_records(tmp_path, capsys):
    cb = tmp_path / "cb.json"
    rc, out, _ = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(DATA / "malformed.json"), "--skip-bad", "--json")
    d = json.loads(out)
    assert rc == 0 and d["records"] == 2 and d["skipped"] == 3


def test_console_script_error_goes_to_stderr(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "cl_core", "group", "route", "--codebook", str(tmp_path / "cb.json"),
         "--data", str(COIN / "GQA" / "train.json")],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "cb.json: file not found" in res.stderr


def test_console_script_help_is_wired():
    exe = shutil.which("cl-core", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "cl_core"]
    res = subprocess.run(cmd + ["group", "assign", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--codebook" in res.stdout and "--skip-bad" in res.stdout


# ------------------------------------------------------- thresholds and failed writes
def _errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_one_off_threshold_is_not_saved_and_set_threshold_is(tmp_path, capsys):
    cb = tmp_path / "cb.json"
    run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "TextVQA" / "train.json"))
    assert InstructionGrouper.load(cb).threshold == 0.9
    # before: --threshold rewrote the codebook's threshold, which then governed later calls
    rc, out, _ = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "ImageNet" / "train.json"),
                     "--threshold", "0.0", "--json")
    d = json.loads(out)
    assert rc == 0 and (d["group"], d["reused"], d["threshold"], d["codebook_threshold"]) == (0, True, 0.0, 0.9)
    assert InstructionGrouper.load(cb).threshold == 0.9
    rc, out, _ = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "Grounding" / "train.json"),
                     "--threshold", "0.5")
    assert "< threshold 0.5 for this call; the codebook keeps 0.9)" in out
    rc, out, _ = run(capsys, "group", "route", "--codebook", str(cb), "--data", str(COIN / "TextVQA" / "test.json"),
                     "--threshold", "0.2", "--json")
    assert json.loads(out)["threshold"] == 0.2 and InstructionGrouper.load(cb).threshold == 0.9
    rc, out, _ = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "GQA" / "train.json"),
                     "--set-threshold", "0.3", "--json")
    assert rc == 0 and json.loads(out)["threshold"] == 0.3 and InstructionGrouper.load(cb).threshold == 0.3


def test_bad_thresholds_leave_the_codebook_alone(tmp_path, capsys, caplog):
    cb = tmp_path / "cb.json"
    run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "TextVQA" / "train.json"))
    before = cb.read_text()
    for extra, needle in ((["--threshold", "0.5", "--set-threshold", "0.3"], "not both"),
                          (["--set-threshold", "nan"], "--set-threshold nan must be a finite number"),
                          (["--threshold", "2"], "--threshold 2.0 is out of range")):
        caplog.clear()
        rc, _, _ = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "GQA" / "train.json"), *extra)
        (line,) = _errors(caplog)
        assert rc == 2 and needle in line and cb.read_text() == before


def test_codebook_that_cannot_be_written_prints_the_decision_then_the_error(tmp_path, capsys, caplog):
    blocker = tmp_path / "cb"
    blocker.write_text("a file where the codebook's folder should be")
    cb = blocker / "cb.json"  # a real ENOTDIR from the file system; a full disk: tests/runner/test_reliability.py
    caplog.clear()
    rc, out, err = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "TextVQA" / "train.json"))
    assert rc == 2 and "decision: new group 0 (first task), fresh LoRA, DEMA off" in out and "codebook " not in out
    (line,) = _errors(caplog)  # before: a NotADirectoryError traceback
    assert line.startswith(f"codebook {cb} could not be written, so the decision above was not recorded: ")
    assert "(ENOTDIR); a part of the path is a file" in line
    assert blocker.read_text().startswith("a file")
    rc, out, _ = run(capsys, "group", "assign", "--codebook", str(cb), "--data", str(COIN / "TextVQA" / "train.json"),
                     "--json")
    assert rc == 2 and json.loads(out)["codebook_saved"] is False


def test_assign_and_route_describe_themselves(capsys):
    for action, words in (("assign", "re-trains that group's LoRA set"), ("route", "to the most recent group")):
        with pytest.raises(SystemExit) as exc:
            main(["group", action, "--help"])
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert words in text, text
    # route's threshold is about routing, not about creating a codebook
    with pytest.raises(SystemExit):
        main(["group", "route", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    threshold = text.split("--threshold T ", 1)[1].split(" --kind", 1)[0]
    assert "most similar group" in threshold and "created" not in threshold, threshold
