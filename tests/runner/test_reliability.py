"""Reliability: damaged files and full or read-only disks give one clear line
that points the right way, and nothing changes before a bad input is refused."""
import pytest
import torch

from cl_core import DEMA
from cl_core.integrations.state_files import atomic_save, load_state_file
from tests.helpers import DATA_GROUPING, ROOT


# ------------------------------------------------------------------ DEMA state files
@pytest.fixture
def state_bytes(tmp_path):
    params = [torch.nn.Parameter(torch.randn(16, 4)) for _ in range(3)]
    engine = DEMA(params)
    for p in params:
        p.grad = torch.randn_like(p)
    engine.update()
    path = tmp_path / "dema_state.pt"
    atomic_save({"engine": engine.state_dict()}, str(path))
    return path.read_bytes()


def test_truncated_state_file_says_truncated(tmp_path, state_bytes):
    path = tmp_path / "dema_state.pt"
    # Most cut points made torch say "[Errno 22] Invalid argument", others a miniz error.
    for n in (2, 100, len(state_bytes) // 2, len(state_bytes) - 1):
        path.write_bytes(state_bytes[:n])
        with pytest.raises(ValueError, match=rf"dema_state\.pt is truncated \({n} bytes, the end of the archive "
                                             r"is missing.*copy it again.*or delete it"):
            load_state_file(str(path))
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"dema_state\.pt is empty \(0 bytes\)"):
        load_state_file(str(path))
    path.write_bytes(b'{"not": "torch"}')
    with pytest.raises(ValueError, match=r"dema_state\.pt is not a torch.save file \(it starts with b'\{\"no'\)"):
        load_state_file(str(path))
    path.write_bytes(state_bytes)
    assert set(load_state_file(str(path))) == {"engine"}


# ------------------------------------------- a real full disk and a real read-only mount
# The CLI runs in a child process with its own mount namespace (`unshare -m`; `-rm` as a
# user), where a 1 MiB tmpfs is filled up and another is remounted read-only: the real
# ENOSPC and EROFS, also for root, whom chmod does not stop. Nothing outside the child sees
# the mounts, and they vanish with it.
CHILD = r'''
import contextlib, io, json, logging, os, subprocess, sys
from pathlib import Path
from cl_core.cli import main

full, ro, codebook_data, out_file = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
errors = []

class Grab(logging.Handler):
    def emit(self, record):
        errors.append(record.getMessage())

logging.getLogger("cl_core").addHandler(Grab(level=logging.ERROR))

def cli(*argv):
    del errors[:]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    return {"rc": rc, "stdout": buf.getvalue(), "errors": list(errors)}

results = {}
assign = ["group", "assign", "--data", codebook_data]
# codebooks written while there is room / before the remount
assert cli(*assign, "--codebook", str(full / "cb.json"))["rc"] == 0
assert cli(*assign, "--codebook", str(ro / "cb.json"))["rc"] == 0
results["before"] = {"full": (full / "cb.json").read_text(), "ro": (ro / "cb.json").read_text()}
fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
for chunk in (65536, 4096, 1):
    try:
        while True:
            os.write(fd, b"x" * chunk)
    except OSError as exc:
        assert exc.errno == 28
os.close(fd)
subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)  # root of this namespace may
run = ["run", "--bundled-tasks", "sqa", "--steps", "1", "--stage1-steps", "1", "--n-train", "16", "--n-test", "4",
       "--quiet"]
results["assign_full"] = cli(*assign, "--codebook", str(full / "cb.json"))
results["run_full"] = cli(*run, "--out", str(full / "run"))
results["assign_ro"] = cli(*assign, "--codebook", str(ro / "cb.json"))
results["run_ro"] = cli(*run, "--out", str(ro / "run"))
# safetensors (PEFT adapters) reports a full disk as its own SafetensorError, "(os error 28)"
import cl_core.cli.group as group_cli
from safetensors.torch import save_file
import torch
group_cli._assign = lambda args: save_file({"w": torch.zeros(4096)}, str(full / "adapter.safetensors"))
results["safetensors_full"] = cli(*assign, "--codebook", str(full / "cb.json"))
results["after"] = {"full": (full / "cb.json").read_text(), "ro": (ro / "cb.json").read_text(),
                    "full_files": sorted(str(p.relative_to(full)) for p in full.rglob("*")),
                    "ro_files": sorted(str(p.relative_to(ro)) for p in ro.rglob("*"))}
Path(out_file).write_text(json.dumps(results))
'''


def _namespace_prefix(probe_dir):
    """The command prefix that runs a child in its own mount namespace, or skip (with why)."""
    import os
    import shutil
    import subprocess

    exe = shutil.which("unshare")
    if exe is None:
        pytest.skip("no unshare(1): cannot make a private tmpfs for a real full / read-only disk")
    prefix = [exe, "-m"] if os.geteuid() == 0 else [exe, "-rm"]  # -r: a user namespace where we are root
    probe_dir.mkdir()
    probe = subprocess.run(prefix + ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe_dir)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.strip()[:200]}")
    return prefix


@pytest.mark.slow
def test_real_full_disk_and_read_only_mount(tmp_path):
    import json
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    prefix = _namespace_prefix(tmp_path / "probe")
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    (tmp_path / "child.py").write_text(CHILD)
    data = DATA_GROUPING / "Instructions" / "TextVQA" / "train.json"
    q = [shlex.quote(str(x)) for x in (full, ro, sys.executable, tmp_path / "child.py", data, tmp_path / "out.json")]
    script = (f"mount -t tmpfs -o size=1m tmpfs {q[0]} && mount -t tmpfs -o size=1m tmpfs {q[1]} && "
              f"exec {q[2]} {q[3]} {q[0]} {q[1]} {q[4]} {q[5]}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(prefix + ["sh", "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "out.json").read_text())
    assert not any(full.iterdir()) and not any(ro.iterdir())  # the mounts were the child's own

    # group assign on a full disk: the decision, then one line; the codebook as it was
    a = r["assign_full"]
    assert a["rc"] == 2 and "decision: re-train group 0" in a["stdout"]
    assert a["errors"] == [f"codebook {full / 'cb.json'} could not be written, so the decision above was not "
                           f"recorded: {full / 'cb.json'}: No space left on device (ENOSPC); the disk is full: "
                           "free some space and run the same command again"]
    assert r["after"]["full"] == r["before"]["full"]
    # cl-core run on a full disk: one line naming config.json, no temporary file left
    a = r["run_full"]
    assert a["rc"] == 2 and len(a["errors"]) == 1, a
    assert a["errors"][0].startswith(f"{full / 'run' / 'config.json'}: No space left on device (ENOSPC)")
    assert set(r["after"]["full_files"]) <= {"cb.json", "filler", "run", "adapter.safetensors"}  # (an empty run/ may be there)
    # an adapter write (Rust) on the full disk: the same one line, not a traceback
    a = r["safetensors_full"]
    assert a["rc"] == 2 and len(a["errors"]) == 1 and "SafetensorError" not in a["errors"][0]
    assert "No space left on device (os error 28) (ENOSPC); the disk is full: free some space" in a["errors"][0]
    # read-only: assign shows the decision and says EROFS; run is refused before anything
    a = r["assign_ro"]
    assert a["rc"] == 2 and "decision: re-train group 0" in a["stdout"] and len(a["errors"]) == 1
    assert "Read-only file system (EROFS); the file system is read-only" in a["errors"][0]
    assert r["after"]["ro"] == r["before"]["ro"]
    a = r["run_ro"]
    assert a["rc"] == 2 and a["errors"] == [
        f"--out {ro / 'run'}: cannot write in {ro} (read-only file system or no permission); choose another "
        "--out folder, or fix its permissions"]
    assert r["after"]["ro_files"] == ["cb.json"]
