"""The package as a trainer's dependency: the wheel, installed with no extras into a fresh
virtual environment holding only torch, runs the engine and the fused optimizer with its
prebuilt native kernels, and `import cl_core` loads no part of the research stack."""
import json
import os
import subprocess
import sys
import textwrap
import venv

import pytest

from tests.helpers import ROOT

HEAVY = ["transformers", "peft", "accelerate", "sklearn", "scipy", "matplotlib", "tqdm", "safetensors"]

CHECK = textwrap.dedent('''
    import json, logging, os, sys
    warnings = []
    class Keep(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())
    logging.getLogger("cl_core").addHandler(Keep(logging.WARNING))
    import torch
    import cl_core
    from cl_core import DEMA, DEMAConfig, DEMAOptimizer
    heavy = [m for m in %r if m in sys.modules]

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 8)), torch.nn.Parameter(torch.randn(8, 64))]
    dema = DEMA(params, DEMAConfig())
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-0.01)
        dema.update()
    again = DEMA(params, DEMAConfig())
    again.load_state_dict(dema.state_dict())
    round_trip = all(torch.equal(a, b) for a, b in zip(again.ema_tensors(), dema.ema_tensors()))

    opt = DEMAOptimizer(torch.optim.AdamW(params, lr=1e-2))
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    from cl_core.kernels import build, native
    loaded = [native.load(name) is not None for name in build.LIBRARIES]
    try:
        import cl_core.integrations.hf  # noqa: F401
        hf_error = None
    except ImportError as exc:
        hf_error = str(exc)
    print(json.dumps({"heavy": heavy, "round_trip": round_trip, "fused": opt.fused,
                      "finite": all(torch.isfinite(e).all().item() for e in opt.engine.ema_tensors()),
                      "prebuilt": [str(p) for p in build.PREBUILT.glob("*.so")], "warnings": warnings,
                      "hf_error": hf_error, "loaded": loaded}))
''' % HEAVY)


@pytest.mark.slow
def test_wheel_installs_with_torch_only_and_runs_the_fused_engine(tmp_path):
    # nothing of the checkout or the test environment on the path: the fresh venv sees only itself
    pip_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    pip_env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
                   check=True, env=pip_env, capture_output=True)
    (wheel,) = wheels.glob("cl_core-*.whl")
    assert "none-any" not in wheel.name, f"{wheel.name}: a wheel with compiled kernels must carry a platform tag"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    constraints = str(ROOT / "constraints.txt")
    # torch first, pinned (a bare requirement would pull a CUDA build); then the wheel with its
    # declared dependencies, which must need nothing else.
    subprocess.run([py, "-m", "pip", "install", "-q", "-c", constraints, "torch==2.13.0"], check=True, env=pip_env,
                   capture_output=True)
    before = subprocess.run([py, "-m", "pip", "freeze"], check=True, env=pip_env, capture_output=True, text=True).stdout
    subprocess.run([py, "-m", "pip", "install", "-q", "-c", constraints, str(wheel)], check=True, env=pip_env,
                   capture_output=True)
    after = subprocess.run([py, "-m", "pip", "freeze"], check=True, env=pip_env, capture_output=True, text=True).stdout
    added = sorted(set(after.splitlines()) - set(before.splitlines()))
    assert [line.split("==")[0].split(" @ ")[0] for line in added] == ["cl_core"], added

    run_env = dict(pip_env)
    run_env["CL_CORE_CACHE"] = str(tmp_path / "empty_cache")  # only the wheel's prebuilt kernels
    out = subprocess.run([py, "-c", CHECK], cwd=tmp_path, env=run_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["heavy"] == [], f"import cl_core and a DEMA step loaded {r['heavy']}"
    assert r["round_trip"] and r["fused"] and r["finite"] and all(r["loaded"]), r
    assert len(r["prebuilt"]) == 2, r["prebuilt"]
    assert not any("first use" in w for w in r["warnings"]), r["warnings"]
    assert not (tmp_path / "empty_cache").exists(), "the prebuilt kernels were not used"
    assert r["hf_error"] is not None and '".[hf]"' in r["hf_error"], r["hf_error"]
