"""The runner under real faults and real files: two writers on one run folder, a UTF-8 BOM,
bad JSONL lines with --skip-bad, damaged images, multi-image records, SIGTERM."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cl_core.atomic_io import atomic_dir
from cl_core.cli import main
from cl_core.continual.run_lock import LOCK_NAME, RunFolderBusy, RunLock
from cl_core.task_files import TaskFileError, read_task_file
from tests.helpers import ROOT


def _instruction_lines(n):
    return [json.dumps({"instruction": "Summarize the input.", "input": f"red {i % 3} circle", "output": "red"})
            for i in range(n)]


def _argv(f, out, *more):
    return ["run", "--tasks", str(f), *more, "--methods", "lora", "--steps", "1", "--batch-size", "4",
            "--max-length", "64", "--out", str(out), "--quiet"]


# ------------------------------------------------------------------ two writers
def test_atomic_dir_two_writers_at_once(tmp_path):
    """Both writers build their folder at the same time: neither deletes the other's (before:
    one shared `.name.tmp`, the second writer's rmtree made the first one's finish fail)."""
    target = tmp_path / "base" / "seed0"
    with atomic_dir(target) as a:
        (a / "w").write_text("a")
        with atomic_dir(target) as b:
            assert a != b
            (b / "w").write_text("b")
        assert (target / "w").read_text() == "b" and (a / "w").read_text() == "a"
    assert (target / "w").read_text() == "a"       # the last to finish wins
    assert [p.name for p in target.parent.iterdir()] == ["seed0"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


HOLDER = r'''
import sys, time
from cl_core.continual.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
'''


def test_second_run_on_the_same_out_is_refused_naming_the_holder(tmp_path, model_dir, caplog):
    """A real second process holds the folder: the run is refused at once with its PID and
    host; once that process is dead (kill -9, no cleanup) its lock is taken over."""
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        f = tmp_path / "t.jsonl"
        f.write_text("\n".join(_instruction_lines(8)) + "\n")
        caplog.clear()
        assert main(_argv(f, out, "--model", str(model_dir))) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= 40]
        assert len(errors) == 1, errors
        assert f"pid {holder.pid} on host {socket.gethostname()}" in errors[0] and "in use by another run" in errors[0]
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]   # nothing of the run was written
    finally:
        holder.kill()
        holder.wait()
    # the dead holder's lock file stays, with its text: the next run takes it over
    assert f"pid {holder.pid}" in (out / LOCK_NAME).read_text()
    assert main(_argv(f, out, "--model", str(model_dir))) == 0
    assert (out / "results.json").is_file()


def test_lock_released_and_empty_folder_removed_after_a_refusal(tmp_path):
    out = tmp_path / "new"
    lock = RunLock(out).acquire()
    with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
        RunLock(out).acquire()
    lock.release(undo=True)
    assert not out.exists()


# ------------------------------------------------------------------ task files
def test_bom_task_and_test_files_run(tmp_path, model_dir):
    """A BOM in a task file and in its test file (Windows editors write one)."""
    f, t = tmp_path / "t.jsonl", tmp_path / "test.json"
    f.write_bytes(b"\xef\xbb\xbf" + ("\n".join(_instruction_lines(8)) + "\n").encode())
    t.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "Summarize the input.", "input": "red 1 circle",
                                                  "output": "red", "answers": ["red", "red"]}] * 4).encode())
    assert main(_argv(f, tmp_path / "o", "--test-tasks", str(t), "--model", str(model_dir))) == 0
    assert main(_argv(f, tmp_path / "o2", "--model", str(model_dir))) == 0


def test_skip_bad_survives_a_bad_jsonl_line(tmp_path, model_dir, caplog):
    lines = _instruction_lines(10)
    lines[5] = '{"instruction": "Summarize", "input": '
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(lines) + "\n")
    caplog.clear()
    assert main(_argv(f, tmp_path / "o0", "--model", str(model_dir))) == 2
    assert any(f"task file {f}: record 5: line 6 is not valid JSON" in r.getMessage() for r in caplog.records)
    assert main(_argv(f, tmp_path / "o", "--skip-bad", "--model", str(model_dir))) == 0


def test_multi_image_records(tmp_path):
    f = tmp_path / "t.json"
    rec = {"conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    f.write_text(json.dumps([{**rec, "image": ["gqa/0.png"]}, {**rec, "image": ["gqa/1.png", "gqa/2.png"]}]))
    with pytest.raises(TaskFileError, match=r"record 1: 'image' lists 2 images; cl_core gives one image per "
                                            r"example.*--skip-bad"):
        read_task_file(f)
    records, problems = read_task_file(f, skip_bad=True)
    assert [r.image for r in records] == ["gqa/0.png"] and [p.index for p in problems] == [1]


# ------------------------------------------------------------------ images
def _damaged_images(folder):
    """A JPEG cut to 60 % and a PNG whose IDAT data is corrupt: both pass PIL's verify()."""
    import zlib

    from PIL import Image

    im = Image.effect_noise((64, 64), 40).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: int(len(buf.getvalue()) * 0.6)])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    png = bytearray(buf.getvalue())
    at = png.index(b"IDAT") + 4 + 40
    png[at:at + 64] = bytes(64)            # zeros in the middle of the deflate stream
    # keep the chunk's CRC valid, so only the decoder can tell
    start = png.index(b"IDAT")
    length = int.from_bytes(png[start - 4:start], "big")
    crc = zlib.crc32(bytes(png[start:start + 4 + length])).to_bytes(4, "big")
    png[start + 4 + length:start + 8 + length] = crc
    (folder / "bad.png").write_bytes(bytes(png))
    im.save(folder / "good.png")
    for name in ("cut.jpg", "bad.png"):
        with Image.open(folder / name) as opened:
            opened.verify()                 # the old check passed them


def test_damaged_images_are_named_before_training(tmp_path):
    from cl_core.continual.multimodal import check_images
    from cl_core.task_files import TaskRecord

    _damaged_images(tmp_path)
    records = [TaskRecord("q", "q", "a", i, "f", name, None) for i, name in enumerate(["good.png", "cut.jpg", "bad.png"])]
    for i, name in ((1, "cut.jpg"), (2, "bad.png")):
        with pytest.raises(ValueError, match=rf"task file f: record {i}: image .*{name} cannot be opened"):
            check_images([records[0], records[i]], folder=str(tmp_path), skip_bad=False, where="task file f")
    kept, paths, skipped, _ = check_images(records, folder=str(tmp_path), skip_bad=True, where="task file f")
    assert [r.index for r in kept] == [0] and skipped == 2


# ------------------------------------------------------------------ SIGTERM
@pytest.mark.slow
def test_sigterm_says_how_to_resume_and_exits_143(tmp_path, model_dir):
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(_instruction_lines(16)) + "\n")
    out = tmp_path / "o"
    argv = [a for a in _argv(f, out, "--model", str(model_dir)) if a != "--quiet"]
    argv[argv.index("--steps") + 1] = "100000"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "cl_core", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 60
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    text, _ = p.communicate(timeout=60)
    assert p.returncode == 143, text
    assert f"Stopped by SIGTERM. Finished tasks are saved in {out}; run the same command again to resume" in text
    assert "Traceback" not in text and not list(out.rglob("*.tmp"))


# ------------------------------------------------------------------ extras up front
BLOCKED = r'''
import sys
blocked = set(sys.argv[1].split(","))

class Blocker:   # these packages are not installed, as with only ".[hf]"
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocker)
from cl_core.cli import main
sys.exit(main(sys.argv[2:]))
'''


@pytest.mark.parametrize("blocked, argv, line", [
    ("matplotlib,scipy,sklearn", ["run", "--bundled-tasks", "sqa", "--steps", "2"],
     "cl-core run needs scikit-learn, scipy, matplotlib (the 'runner' extra), which are not installed; "
     'install with: pip install ".[runner]" (in the cl_core checkout)'),
    ("matplotlib", ["demo", "--quick"], "cl-core demo needs matplotlib (the 'runner' extra), which is not installed"),
    ("scipy", ["group", "assign", "--codebook", "cb.json", "--data", "none.json"],
     "cl-core group assign needs scipy (the 'grouping' extra), which is not installed; "
     'install with: pip install ".[grouping]"'),
])
def test_missing_extra_refused_before_any_work(tmp_path, blocked, argv, line):
    """With only ".[hf]": one line naming the packages and the install command that works
    from a checkout, before anything is trained or written (before: a traceback after the
    140 s base training)."""
    out = tmp_path / "o"
    argv = argv + (["--out", str(out)] if argv[0] != "group" else [])
    p = subprocess.run([sys.executable, "-c", BLOCKED, blocked, *argv], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2, p.stderr[-2000:]
    assert line in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "cb.json").exists()


# ------------------------------------------------------------------ first tries
def test_run_without_tasks_says_the_three_ways(tmp_path, caplog):
    out = tmp_path / "o"
    assert main(["run", "--out", str(out), "--quiet"]) == 2
    line = [r.getMessage() for r in caplog.records if r.levelno >= 40][-1]
    assert "no tasks given" in line and "--tasks FILE" in line and "--bundled-tasks" in line \
        and "cl-core demo --quick" in line
    assert not out.exists()


def test_answers_the_tokenizer_cannot_spell_are_warned_before_training(tmp_path, model_dir, caplog):
    lines = [json.dumps({"instruction": "Summarize the input.", "input": f"red {i % 3} circle",
                         "output": "красный" if i % 2 else "red"}) for i in range(8)]
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(lines) + "\n")
    caplog.clear()
    assert main(_argv(f, tmp_path / "o", "--model", str(model_dir))) == 0
    warned = [r.getMessage() for r in caplog.records if "tokenizer does not know" in r.getMessage()]
    assert len(warned) == 1 and "1 of 2 distinct answers" in warned[0] and "'красный'" in warned[0], warned


def test_csv_task_file_is_named_as_csv(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("instruction,output\nSay red,red\n")
    with pytest.raises(TaskFileError, match=r"t\.csv: CSV is not a task format; convert it to a JSON list"):
        read_task_file(f)


@pytest.mark.slow
def test_bundled_base_trained_once_and_reused_from_the_cache(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CL_CORE_BASE_CACHE", str(tmp_path / "cache"))
    small = ["run", "--bundled-tasks", "textvqa", "imagenet", "--stage1-steps", "3", "--steps", "2",
             "--batch-size", "8", "--n-train", "16", "--n-test", "4", "--max-length", "96", "--methods", "lora",
             "--quiet"]
    assert main(small + ["--out", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "cache").iterdir())) == 1
    caplog.clear()
    with caplog.at_level("INFO", logger="cl_core"):
        assert main(small[:-1] + ["--out", str(tmp_path / "b")]) == 0   # not --quiet: the info line
    assert any("stage-1 base reused from the cache" in r.getMessage() for r in caplog.records)
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    same = lambda r: {k: v for k, v in r["methods"]["lora"]["seeds"]["0"].items() if "second" not in k and "time" not in k}
    assert same(a) == same(b)
    files = lambda d: {p.name: p.read_bytes() for p in (tmp_path / d / "base" / "seed0").iterdir()}
    assert files("a") == files("b")
    # another setting stage 1 reads: another base
    assert main(small[:5] + ["4"] + small[6:] + ["--out", str(tmp_path / "c")]) == 0
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_demo_states_its_plan_time_and_output_first(tmp_path, monkeypatch, caplog):
    import cl_core.cli.run as cli_run

    monkeypatch.setattr(cli_run, "_execute", lambda cfg, out, args: 0)   # the plan line only, no training
    with caplog.at_level("INFO", logger="cl_core"):
        assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("demo plan:")]
    assert len(plan) == 1 and "3 seed(s)" in plan[0] and "about 7 minutes of one free CPU core" in plan[0] \
        and f"the report: {tmp_path / 'd'}/report.md" in plan[0], plan
