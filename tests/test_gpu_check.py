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
    assert capsys.readouterr().out == "gpu-check: SKIP needs it: no_such_pkg_for_gpu_check is not installed\n"


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
