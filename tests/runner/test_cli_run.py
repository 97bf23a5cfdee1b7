"""`cl-core run` / `cl-core demo` command line: your own files and model, clear errors
(exit code 2, nothing trained) for bad options, files and model folders."""
import json
import logging
import subprocess
import sys

import pytest

from cl_core.continual import synthetic as S
from cl_core.cli import main



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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_unknown_method_is_refused_naming_it(tmp_path, caplog):
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


def test_mismatched_file_lists_and_unknown_task_types_are_refused(tmp_path, caplog, model_dir):
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


# ------------------------------------------------ the run folder and the disk
def _one_error_line(argv, caplog):
    """Run the CLI; return (exit code, the one ERROR line)."""
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = main(argv)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return code, errors[0]


def test_out_naming_a_file_or_a_path_under_a_file(tmp_path, model_dir, caplog):
    f = _instruction_file(tmp_path / "t.jsonl", 8)
    args = ["run", "--tasks", str(f), "--model", str(model_dir), "--steps", "1", "--quiet"]
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    # before: a NotADirectoryError traceback (a file), a late FileExistsError (under a file)
    code, line = _one_error_line(args + ["--out", str(afile)], caplog)
    assert code == 2 and f"--out {afile} is a file, not a folder" in line
    code, line = _one_error_line(args + ["--out", str(afile / "run")], caplog)
    assert code == 2 and f"{afile} is a file, so no folder can be made under it" in line
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "t.jsonl"]


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root ignores folder permissions; tests/runner/test_reliability.py checks a read-only mount")
def test_out_in_a_read_only_folder(tmp_path, model_dir, caplog):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        f = _instruction_file(tmp_path / "t.jsonl", 8)
        code, line = _one_error_line(["run", "--tasks", str(f), "--model", str(model_dir), "--out", str(ro / "run"),
                                      "--quiet"], caplog)
        assert code == 2 and f"cannot write in {ro}" in line and not any(ro.iterdir())
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_threads_below_one_refused_before_anything_is_written(tmp_path, model_dir, caplog, threads):
    # before: 0 ran silently with 1 thread; -1 was a traceback after config.json was written
    f = _instruction_file(tmp_path / "t.jsonl", 8)
    out = tmp_path / "o"
    code, line = _one_error_line(["run", "--tasks", str(f), "--model", str(model_dir), "--steps", "1",
                                  "--threads", threads, "--out", str(out), "--quiet"], caplog)
    assert code == 2 and f"--threads {threads}: give at least 1" in line and not out.exists()
    code, line = _one_error_line(["demo", "--quick", "--threads", threads, "--out", str(out), "--quiet"], caplog)
    assert code == 2 and not out.exists()


@pytest.mark.slow
def test_kill_during_the_first_write_is_resumed_and_temp_files_cleaned(tmp_path, model_dir):
    """A kill while config.json was first written leaves only its temporary file; the same
    command then starts the run (before: "not a cl_core run folder") and removes it."""
    f = _instruction_file(tmp_path / "t.jsonl", 8)
    out = tmp_path / "o"
    out.mkdir()
    (out / ".config.json.k1ll3d.tmp").write_text('{"methods": ["lo')
    argv = ["run", "--tasks", str(f), "--model", str(model_dir), "--methods", "lora", "--steps", "1",
            "--batch-size", "4", "--max-length", "64", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert not list(out.rglob("*.tmp")) and (out / "results.json").is_file()
    # stale temporary files anywhere in a run folder are removed on every start
    chain = next(p for p in (out / "chains").rglob("task0") if p.is_dir()).parent
    (chain / ".task0.tmp").mkdir()
    (chain / ".task0.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (out / ".state.json.x7.tmp").write_text("{")
    assert main(argv) == 0
    assert not list(out.rglob("*.tmp"))


def test_a_foreign_folder_is_refused_and_left_alone(tmp_path, model_dir, caplog):
    f = _instruction_file(tmp_path / "t.jsonl", 8)
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    (out / ".mine.txt.tmp").write_text("y")  # refused before anything changes: not removed
    code, line = _one_error_line(["run", "--tasks", str(f), "--model", str(model_dir), "--out", str(out),
                                  "--quiet"], caplog)
    assert code == 2 and "is not a cl_core run folder" in line
    assert sorted(p.name for p in out.iterdir()) == [".mine.txt.tmp", "mine.txt"]


def test_disk_full_while_writing_is_one_line(tmp_path, model_dir, caplog, monkeypatch):
    """The write itself fails as a full disk makes it fail (ENOSPC from the file's write());
    tests/runner/test_reliability.py does it on a real full file system."""
    import errno
    import os

    real_fsync = os.fsync

    def full(fd):
        real_fsync(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    f = _instruction_file(tmp_path / "t.jsonl", 8)
    out = tmp_path / "o"
    code, line = _one_error_line(["run", "--tasks", str(f), "--model", str(model_dir), "--steps", "1",
                                  "--out", str(out), "--quiet"], caplog)
    assert code == 2
    assert line == (f"{out.absolute() / 'config.json'}: No space left on device (ENOSPC); the disk is full: "
                    "free some space and run the same command again")
    assert not out.exists()  # the temporary file is removed, and the folder the run lock made


# ------------------------------------------------ help and errors in the user's words
def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_help_shows_the_defaults(capsys):
    from cl_core.continual.config import RunConfig

    d = RunConfig()
    text = " ".join(_help(["run"], capsys).split())  # argparse wraps lines: compare word by word
    for flag, value in (("--steps", d.steps), ("--lr", d.lr), ("--batch-size", d.batch_size),
                        ("--seeds", " ".join(map(str, d.seeds))), ("--beta", d.ema_beta),
                        ("--dema-scale", d.dema_scale), ("--n-train", d.n_train)):
        part = text.split(f" {flag} ", 1)[1].split(" --", 1)[0]
        assert f"(default: {value})" in part, (flag, part)
    assert "(default: runs/run-YYYYmmdd-HHMMSS)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    demo = " ".join(_help(["demo"], capsys).split())
    assert "(default: demo_out; with --quick runs/demo-quick)" in demo


def test_top_level_help_counts_the_demo_methods(capsys):
    from cl_core.cli.run import DEMO_METHODS

    text = " ".join(_help([], capsys).split())
    assert f"`demo` compares {len(DEMO_METHODS)} methods ({', '.join(DEMO_METHODS)})" in text


@pytest.mark.parametrize("argv, line", [
    (["--steps", "-5"], "--steps must be a number >= 1, got -5"),
    (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
    (["--threshold", "2"], "--threshold must be a number between 0 and 1, got 2.0"),
    (["--methods", "ema", "--beta", "1.5"], "--beta 1.5 is out of range"),
    (["--dema-scale", "-1"], "--dema-scale -1.0 is out of range"),
    (["--dema-fallback", "1"], "--dema-fallback 1.0 is out of range"),
    (["--seeds", "0", "0"], "--seeds must be distinct"),
    (["--test-fraction", "1.5"], "--test-fraction must be between 0 and 1 (exclusive), got 1.5"),
])
def test_errors_name_the_flag(tmp_path, caplog, argv, line):
    out = tmp_path / "o"
    code, error = _one_error_line(["run"] + argv + ["--out", str(out), "--quiet"], caplog)
    assert code == 2 and error.startswith(line), error
    # not the internal names (steps=-5, DEMAConfig.beta=1.5, ema_beta, group_threshold)
    assert not any(w in error for w in ("DEMAConfig", "ema_beta", "group_threshold", "_", f"{argv[0][2:]}=")), error
    assert not out.exists()


def test_a_bad_type_prints_a_short_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--steps", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["usage: cl-core run [OPTIONS]   (all options: cl-core run --help)",
                   "cl-core run: error: argument --steps: invalid int value: 'x'"]


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs /proc")
def test_out_where_no_folder_can_be_made_names_out(caplog):
    code, line = _one_error_line(["demo", "--quick", "--out", "/proc/nope", "--quiet"], caplog)
    assert code == 2 and line.startswith("--out /proc/nope: no folder can be made in /proc"), line


def test_device_cuda_without_a_gpu_is_refused_naming_the_flag(tmp_path, caplog):
    # This machine's torch sees no CUDA device: --device cuda must say so (and how to fix it)
    # before anything is written; auto picks the CPU here, as the Trainer does.
    import torch

    from cl_core.continual.config import RunConfig

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    out = tmp_path / "o"
    code, line = _one_error_line(["run", "--bundled-tasks", "textvqa", "--device", "cuda", "--steps", "1",
                                  "--out", str(out), "--quiet"], caplog)
    assert code == 2 and "--device cuda: torch sees no CUDA device" in line and "--device cpu" in line
    assert not out.exists()
    assert not RunConfig().on_cuda() and not RunConfig(device="cpu").on_cuda()
    with pytest.raises(ValueError, match="device"):
        RunConfig(device="gpu").validate()
