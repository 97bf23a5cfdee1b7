"""`cl-core run` / `cl-core demo` command line: your own files and model, clear errors
(exit code 2, nothing trained) for bad options, files and model folders."""
import json
import logging
import subprocess
import sys

import pytest

from cl_core.continual import synthetic as S
from cl_core.continual import tiny_model as T
from cl_core.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny Llama with its tokenizer: an ordinary local causal-LM folder."""
    path = tmp_path_factory.mktemp("model")
    tok = T.build_tokenizer(T.build_vocab(S.vocabulary_texts() + ["summarize translate the input"]))
    T.build_model(len(tok), hidden_size=32, num_layers=1, num_heads=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _llava_file(folder, task, n):
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"id": i, "conversations": [{"from": "human", "value": s.prompt}, {"from": "gpt", "value": s.answer}]}
               for i, s in enumerate(S.generate_task(task, n))]
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


def _instruction_file(path, n):
    lines = [json.dumps({"instruction": "Summarize the input.", "input": f"red {i % 3} circle", "output": "red"})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_on_your_files(tmp_path, model_dir, capsys):
    a = _llava_file(tmp_path / "data" / "TextVQA", "textvqa", 20)
    b = _llava_file(tmp_path / "data" / "Grounding", "grounding", 20)
    c = _instruction_file(tmp_path / "data" / "summaries.jsonl", 20)
    out = tmp_path / "out"
    code = main(["run", "--tasks", str(a), str(b), str(c), "--model", str(model_dir), "--methods", "lora,dema+group",
                 "--steps", "3", "--batch-size", "4", "--max-length", "96", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"Report: {out / 'report.md'}" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == "files"
    assert results["tasks"] == ["TextVQA", "Grounding", "summaries"]
    assert results["task_types"] == ["exact", "box", "exact"]
    assert set(results["methods"]) == {"lora", "dema+group"}
    for r in results["methods"].values():
        assert len(r["matrix"]) == 3 and all(len(row) == 3 for row in r["matrix"])
    # Grounding's and the instruction file's templates differ from TextVQA's: three groups.
    assert results["methods"]["dema+group"]["seeds"]["0"]["groups"] == [0, 1, 2]
    assert not (out / "base").exists()  # your model: no stage 1


def test_test_files_and_order(tmp_path, model_dir):
    a = _llava_file(tmp_path / "TextVQA", "textvqa", 8)
    b = _llava_file(tmp_path / "GQA", "gqa", 8)
    ta = _llava_file(tmp_path / "test" / "TextVQA", "textvqa", 5)
    tb = _llava_file(tmp_path / "test" / "GQA", "gqa", 6)
    out = tmp_path / "out"
    code = main(["run", "--tasks", str(a), str(b), "--test-tasks", str(ta), str(tb), "--order", "alphabet",
                 "--model", str(model_dir), "--methods", "lora", "--steps", "2", "--batch-size", "4",
                 "--task-types", "short", "short", "--out", str(out), "--quiet"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["GQA", "TextVQA"]  # alphabet order
    state = json.loads((out / "state.json").read_text())
    assert len(state["chains"]["lora/seed0"]["tasks"]) == 2


def _fails(argv, caplog, needle, out):
    with caplog.at_level(logging.ERROR):
        code = main(argv + ["--out", str(out), "--quiet"])
    assert code == 2
    assert needle in caplog.text, caplog.text
    assert not out.exists() or not any(out.iterdir()), "something was written before the error"


def test_unknown_method(tmp_path, caplog):
    _fails(["run", "--methods", "lora,sgd"], caplog, "unknown method 'sgd'", tmp_path / "o")


def test_missing_task_file(tmp_path, caplog):
    _fails(["run", "--tasks", str(tmp_path / "nope.json")], caplog, "file not found", tmp_path / "o")


def test_malformed_task_file(tmp_path, caplog, model_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "human", "value": "q\nAnswer."},
                                                  {"from": "gpt", "value": "a"}]}, {"oops": 1}]))
    _fails(["run", "--tasks", str(bad), "--model", str(model_dir)], caplog, "record 1", tmp_path / "o")
    notjson = tmp_path / "x.json"
    notjson.write_text("{not json")
    _fails(["run", "--tasks", str(notjson), "--model", str(model_dir)], caplog, "not valid JSON", tmp_path / "o")


def test_records_without_answers(tmp_path, caplog, model_dir):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"instruction": "Say hi.", "input": "x"}) + "\n")
    _fails(["run", "--tasks", str(f), "--model", str(model_dir)], caplog, "has no answer", tmp_path / "o")


def test_bad_model_folders(tmp_path, caplog):
    _fails(["run", "--model", str(tmp_path / "missing")], caplog, "not a folder", tmp_path / "o1")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(["run", "--model", str(empty)], caplog, "no config.json", tmp_path / "o2")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps({"model_type": "llama"}))
    f = _instruction_file(tmp_path / "t.jsonl", 4)
    _fails(["run", "--tasks", str(f), "--model", str(noweights)], caplog, "no weights", tmp_path / "o3")


def test_mismatched_lists(tmp_path, caplog, model_dir):
    f = _instruction_file(tmp_path / "t.jsonl", 4)
    _fails(["run", "--tasks", str(f), "--test-tasks", str(f), str(f), "--model", str(model_dir)], caplog,
           "2 test files for 1 task files", tmp_path / "o")
    _fails(["run", "--tasks", str(f), "--task-types", "bleu", "--model", str(model_dir)], caplog,
           "unknown task type 'bleu'", tmp_path / "o")


def test_unknown_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--no-such-option"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--fast"])
    assert exc.value.code == 2


def test_help_through_python_m():
    for cmd in ("demo", "run"):
        p = subprocess.run([sys.executable, "-m", "cl_core", cmd, "--help"], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr
        assert "--out" in p.stdout and "--quiet" in p.stdout


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from cl_core.continual import run as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    out = tmp_path / "o"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 130
    assert f"Finished tasks are saved in {out}; run the same command again to resume" in capsys.readouterr().out
