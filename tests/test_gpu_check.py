"""bench/gpu_check.py on CPU: the one-line exit without CUDA (through make), the result table,
the SKIP line for a missing optional package and the guard-band checker catching a stray write."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-without-CUDA path")
def test_make_gpu_check_without_cuda_prints_one_line_and_exits_0():
    proc = subprocess.run(["make", "-s", "gpu-check", f"PY={sys.executable}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (f"gpu-check: no CUDA device visible to {sys.executable} "
                           f"(torch {torch.__version__}): nothing to check\n")
    assert proc.stderr == ""


def test_table_lists_every_case_and_counts(gc):
    rows = [("dema backends vs reference", "PASS", "worst 1e-7"), ("big", "SKIP", "needs 17 GiB"),
            ("graph-capture refusal", "FAIL", "AssertionError: no refusal")]
    lines = gc.format_table(rows).splitlines()
    assert lines[0].split() == ["case", "status", "detail"]
    assert lines[2] == "dema backends vs reference  PASS    worst 1e-7"
    assert lines[3] == "big                         SKIP    needs 17 GiB"
    assert lines[-1] == "gpu-check: 1 PASS, 1 FAIL, 1 SKIP"


def test_missing_package_gives_one_skip_line(gc, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "no_such_pkg_for_gpu_check", None)
    ran = []
    rows = gc.run_cases(torch, [("needs it", lambda t: ran.append(1), ("no_such_pkg_for_gpu_check",)),
                                ("needs torch", lambda t: "ok", ("torch",))])
    assert ran == []
    assert rows == [("needs it", "SKIP", "no_such_pkg_for_gpu_check is not installed"),
                    ("needs torch", "PASS", "ok")]
    assert capsys.readouterr().out.splitlines() == ["gpu-check: SKIP needs it: no_such_pkg_for_gpu_check is not installed",
                                                    "gpu-check: PASS needs torch (0 s)"]


def test_failing_case_is_a_fail_row_not_a_crash(gc):
    def boom(t):
        raise AssertionError("bands overwritten")
    assert gc.run_cases(torch, [("c", boom, ())]) == [("c", "FAIL", "AssertionError: bands overwritten")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_guard_bands_catch_a_write_past_a_tensor(gc, dtype):
    g = gc.Guarded([(3, 5), (7,), (2, 2)], dtype, "cpu", fill=lambda s: torch.ones(s))
    assert [t.shape for t in g.tensors] == [torch.Size([3, 5]), torch.Size([7]), torch.Size([2, 2])]
    for t in g.tensors:  # writes inside the tensors leave the bands alone
        t.mul_(3.0)
    assert g.check() is None
    flat = g.tensors[1].view(-1)
    g.buffer[flat.storage_offset() + flat.numel()] = 0.0  # one element past tensor 1
    assert g.check() == f"guard band 2 (elements {g.bands[2][0]}..{g.bands[2][1]}) has 1 element(s) overwritten"


# ---- stage 4 (the suite's tests) against a simulated machine without some packages: a
# sitecustomize on PYTHONPATH makes `hypothesis` and `sklearn` unimportable in every process
# gpu_check starts, as on a GPU machine that lacks them; real pytest runs on small files.
BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('hypothesis', 'sklearn', 'accelerate', 'peft'):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _Block())
"""


@pytest.fixture
def machine(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    tests = tmp_path / "proj" / "tests"
    tests.mkdir(parents=True)
    (tests / "test_needs_hypothesis.py").write_text("import hypothesis\n\ndef test_cuda_x():\n    assert True\n")
    (tests / "test_ok.py").write_text("def test_cuda_ok():\n    assert 1 + 1 == 2\n\ndef test_cpu_only():\n    assert True\n")
    (tests / "test_fails.py").write_text("def test_cuda_bad():\n    assert False\n")
    (tests / "test_no_cuda.py").write_text("def test_plain():\n    assert True\n")
    # the blocked packages' pytest plugins (hypothesis registers one) are not there either
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env.pop("PYTEST_ADDOPTS", None)
    return tmp_path / "proj", env


@pytest.mark.slow
def test_stage_4_leaves_out_files_this_machine_cannot_collect(gc, machine):
    root, env = machine
    files = gc.cuda_test_files(str(root))
    assert files == ["tests/test_fails.py", "tests/test_needs_hypothesis.py", "tests/test_ok.py"]
    ok, bad = gc.collectable(files, str(root), env)
    assert ok == ["tests/test_fails.py", "tests/test_ok.py"]
    assert list(bad) == ["tests/test_needs_hypothesis.py"] and "hypothesis" in bad["tests/test_needs_hypothesis.py"]
    rows = gc.pytest_rows(str(root), env, cuda_files=["tests/test_needs_hypothesis.py", "tests/test_ok.py"],
                          compile_files=["tests/test_no_cuda.py"])
    assert rows[0][:2] == ("pytest: CUDA tests (test_cuda_*)", "PASS"), rows
    assert "1 passed, 1 deselected" in rows[0][2] and "test_needs_hypothesis.py (ModuleNotFoundError" in rows[0][2]
    assert rows[1][:2] == ("pytest: compile tests (sm_80/sm_90)", "PASS")


def test_stage_4_exit_codes(gc, machine):
    root, env = machine
    # every file uncollectable: nothing to run is a FAIL, not a pass
    rows = gc.pytest_rows(str(root), env, cuda_files=["tests/test_needs_hypothesis.py"], compile_files=[])
    assert [r[1] for r in rows] == ["FAIL", "FAIL"] and rows[0][2].startswith("no test file can be collected")
    # collected but every test deselected: pytest exits 5, a FAIL
    assert gc.run_pytest(["tests/test_no_cuda.py"], str(root), env, select=("-k", "test_cuda_"))[0] == "FAIL"
    status, detail = gc.run_pytest(["tests/test_no_cuda.py"], str(root), env, select=("-k", "test_cuda_"))
    assert "exit 5" in detail
    # a failing test: FAIL with pytest's summary line
    status, detail = gc.run_pytest(["tests/test_fails.py"], str(root), env)
    assert status == "FAIL" and "1 failed" in detail


@pytest.mark.slow
def test_pytest_only_exit_status_follows_the_table(gc, machine, tmp_path, monkeypatch, capsys):
    root, env = machine
    monkeypatch.setattr(gc, "ROOT", str(root))
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setattr(gc, "COMPILE_TESTS", "tests/test_no_cuda.py")
    # test_fails.py is among the CUDA files: exit 1
    assert gc.main(["--pytest-only", "--log", str(tmp_path / "log")]) == 1
    out = capsys.readouterr().out
    assert "tests/test_needs_hypothesis.py cannot be collected here" in out and "1 PASS, 1 FAIL, 0 SKIP" in out
    (root / "tests" / "test_fails.py").unlink()
    assert gc.main(["--pytest-only", "--log", str(tmp_path / "log2")]) == 0
