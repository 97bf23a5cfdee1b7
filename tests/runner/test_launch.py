"""`cl-core run` on many processes (cl_core.continual.launch): the refusals, checked in this
process, and one 2-rank torchrun launch (gloo on CPU, DS_ACCELERATOR=cpu) of the bundled tiny
model on quick settings, compared with the same command in one process:

* DDP, interrupted after the first task on every rank and resumed by the same command line
  under the launcher: the results, losses, α and every saved tensor equal the single-process
  run within the tolerance below, and the run folder holds the same files;
* the evaluation shared out over the ranks gives exactly the answers of one process;
* the same DDP run on the tiny LLaVA (``--multimodal``: the bundled tasks as pictures) equals
  its single-process run; so do the tiny Qwen2-VL under DDP and the tiny Qwen2.5-VL under
  DeepSpeed ZeRO-0 (``--model-family``: variable-size patch sets, ``mm_token_type_ids``);
* DeepSpeed ZeRO-0 (fp32) equals the single-process run within the same tolerance; ZeRO-0 bf16
  with the official recipe completes, trains bf16 weights and averages with precision="official";
* DeepSpeed ZeRO-3 (fp32, every tensor partitioned: stage3_param_persistence_threshold 0),
  interrupted after the first task and resumed, equals the single-process run within the same
  tolerance (the runner gathers the parameters back whole after each training).

Tolerance, per saved tensor: ‖Δ‖ ≤ 1e-4 ‖ref‖ + 1e-5 and max|Δ| ≤ 1e-3 max|ref| + 1e-5
(typically ≤ 2e-5 of the largest entry; one entry in a thousand was seen at 2e-4 of it; the 1e-5
is for tensors whose exact gradient is zero, such as an attention key bias, which move by
rounding noise alone); losses 1e-5 relative, α 1e-4 relative. Not exact because the two processes each reduce half the batch and the gradients are
then averaged across them, so the fp32 sums run in another order than one process's; Adam
divides each step by the root of the squared gradients, so where a gradient entry is near zero
a last-bit difference moves that weight by a visible fraction of the learning rate (an
elementwise tolerance would fail on those few entries; the tensor as a whole stays close).
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from cl_core.cli import main as cli
from cl_core.continual.config import RunConfig
from cl_core.continual.launch import Launch, read_deepspeed_config
from tests.helpers import DIST_SCRIPTS, ROOT

# textvqa then gqa: the same template, so with grouping task 2 re-trains the set (DEMA on)
QUICK = ["run", "--bundled-tasks", "textvqa", "gqa", "--n-train", "32", "--n-test", "8", "--stage1-steps", "10",
         "--steps", "3", "--batch-size", "8", "--max-length", "96", "--quiet"]
DDP = QUICK + ["--methods", "dema", "dema+group"]
MULTIMODAL = QUICK + ["--multimodal", "--methods", "dema+group"]
# the tiny Qwen2-VL under DDP, the tiny Qwen2.5-VL under DeepSpeed ZeRO-0 (cl_core.continual.qwen_vl)
QWEN = {"qw": MULTIMODAL + ["--model-family", "qwen2-vl"], "qwds": MULTIMODAL + ["--model-family", "qwen2.5-vl"]}
ZERO0 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 0}}
# ZeRO-3 with every tensor partitioned: small LoRA tensors stay whole on every rank below the
# default persistence threshold (PLATFORM_NOTES), which would leave the partitioned path untested
ZERO3 = {**ZERO0, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
TOL_NORM, TOL_MAX, ATOL = 1e-4, 1e-3, 1e-5   # per tensor: ‖Δ‖ vs ‖ref‖, max|Δ| vs max|ref| (docstring)


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("content, needle", [
    (None, "no such file"),
    ("{\"zero_optimization\": ", "is not valid JSON"),
    ([1, 2], "is a JSON object"),
    ({**ZERO0, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "parameter offload"),
    ({**ZERO0, "zero_optimization": {"stage": 4}}, "ZeRO stage 4 is not supported"),
    ({**ZERO0, "optimizer": {"type": "AdamW"}}, "drop the 'optimizer' section"),
    ({**ZERO0, "scheduler": {"type": "WarmupLR"}}, "drop the 'scheduler' section"),
    ({**ZERO0, "train_batch_size": 16}, "train_batch_size must be \"auto\""),
    ({**ZERO0, "gradient_clipping": 1.0}, "gradient_clipping must be \"auto\""),
    ({**ZERO0, "fp16": {"enabled": True}}, "fp16 is not supported"),
])
def test_bad_deepspeed_files_are_refused_in_one_line(tmp_path, content, needle):
    path = tmp_path / "ds.json" if content is None else _write(tmp_path / "ds.json", content)
    with pytest.raises(ValueError, match=needle) as err:
        read_deepspeed_config(path)
    assert "--deepspeed" in str(err.value) and "\n" not in str(err.value)


def test_deepspeed_not_installed_names_the_extra(tmp_path, monkeypatch):
    # DeepSpeed is installed here; its absence is what find_spec reports without it
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ValueError, match=r'pip install "\.\[deepspeed\]"'):
        read_deepspeed_config(_write(tmp_path / "ds.json", ZERO0))


def test_launcher_settings_are_refused_before_anything_runs(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    ds = _write(tmp_path / "zero0.json", ZERO0)
    with pytest.raises(ValueError, match="DeepSpeed runs under a launcher.*torchrun --nproc_per_node N -m cl_core run"):
        Launch.from_env(ds)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="as --deepspeed FILE instead"):
        Launch.from_env(flags={"deepspeed": "--deepspeed"})
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    cfg = RunConfig(batch_size=15)
    with pytest.raises(ValueError, match="--batch-size 15 does not divide over the 2 processes"):
        Launch(world_size=2).check_run(cfg, {"batch_size": "--batch-size"})
    with pytest.raises(ValueError, match="stage 1 trains batches of 32.*divides 32"):
        Launch(world_size=3).check_run(RunConfig(batch_size=15))
    Launch(world_size=3).check_run(RunConfig(batch_size=15, model=str(tmp_path)))   # no stage 1: fine

    # through the CLI, as rank 0 of 2 processes: exit 2, one line, before the process group is
    # joined (which would wait for the second process) and before anything is written
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    assert cli(QUICK + ["--batch-size", "15", "--out", str(out)]) == 2
    assert cli(QUICK + ["--deepspeed", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    assert not out.exists()
    assert not torch.distributed.is_initialized()


def test_one_process_launch_runs_everything_here():
    launch = Launch()
    assert launch.is_main and not launch.distributed
    assert launch.map_batches(lambda a, b: list(range(a, b)), 7, 3) == list(range(7))
    assert launch.on_main(lambda x: x + 1, 1) == 2
    with pytest.raises(KeyError):
        launch.on_main(lambda: {}["x"])
    assert launch.trainer_kwargs(16) == {"per_device_train_batch_size": 16}
    assert Launch(world_size=2).trainer_kwargs(16)["per_device_train_batch_size"] == 8


# --------------------------------------------------------------------------- 2 ranks

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The single-process reference runs, then one 2-rank launch of runner_launch.py."""
    pytest.importorskip("deepspeed")
    folder = tmp_path_factory.mktemp("launch")
    z0 = _write(folder / "zero0.json", ZERO0)
    z0b = _write(folder / "zero0_bf16.json", {**ZERO0, "bf16": {"enabled": True}})
    z3 = _write(folder / "zero3.json", ZERO3)
    assert cli(DDP + ["--out", str(folder / "ref")]) == 0
    assert cli(MULTIMODAL + ["--out", str(folder / "mm_ref")]) == 0
    for name, flags in QWEN.items():
        assert cli(flags + ["--out", str(folder / f"{name}_ref")]) == 0
    spec = {"ddp": DDP, "ds0": DDP + ["--deepspeed", z0], "ds0b": QUICK + ["--methods", "lcia", "--deepspeed", z0b],
            "ds3": DDP + ["--deepspeed", z3],
            "mm": MULTIMODAL, "qw": QWEN["qw"], "qwds": QWEN["qwds"] + ["--deepspeed", z0]}
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}",
           str(DIST_SCRIPTS / "runner_launch.py"), str(folder), json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, cwd=str(folder), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun runner_launch.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    return folder, ranks


def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, n), folder) for r, _, fs in os.walk(folder) for n in fs)


def _assert_same_run(ref, other):
    from safetensors.torch import load_file

    a, b = (json.loads((f / "results.json").read_text()) for f in (ref, other))
    assert a["config"] == b["config"]
    assert b["base"]["0"]["zero_shot"] == a["base"]["0"]["zero_shot"]
    for m in a["methods"]:
        sa, sb = a["methods"][m]["seeds"]["0"], b["methods"][m]["seeds"]["0"]
        assert sb["matrix"] == sa["matrix"], m
        assert [sb[k] for k in ("groups", "reused", "ema", "dema", "init_from")] == \
               [sa[k] for k in ("groups", "reused", "ema", "dema", "init_from")], m
        torch.testing.assert_close(torch.tensor(sb["loss"]), torch.tensor(sa["loss"]), rtol=1e-5, atol=0)
        assert [len(x) for x in sb["alpha"]] == [len(x) for x in sa["alpha"]]
        assert any(sa["alpha"]), f"{m}: no DEMA step, the comparison would be vacuous"
        assert sb["alpha_counts"]["n"] == sa["alpha_counts"]["n"] and \
               [sb["alpha_counts"][k] for k in ("numel_min", "numel_max")] == \
               [sa["alpha_counts"][k] for k in ("numel_min", "numel_max")], m
        for x, y in zip(sa["alpha"], sb["alpha"]):
            torch.testing.assert_close(torch.tensor(y), torch.tensor(x), rtol=1e-4, atol=0)
    assert _files(other) == _files(ref)           # rank 0 wrote everything once, the others no extra file
    for f in _files(ref):    # the α records: the whole tensors' sizes (not one rank's fragments under ZeRO)
        if f.startswith("chains") and os.path.basename(f).startswith("alpha_task"):
            ra, rb = (json.loads((d / f).read_text()) for d in (ref, other))
            assert (rb["names"], rb["numel"]) == (ra["names"], ra["numel"]), f
    weights = [f for f in _files(ref) if f.endswith(".safetensors")]
    assert any(f.startswith("base") for f in weights) and any(f.startswith("chains") for f in weights)
    for f in weights:
        ta, tb = load_file(str(ref / f)), load_file(str(other / f))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert tb[k].dtype == ta[k].dtype
            x, d = ta[k].float(), (tb[k].float() - ta[k].float())
            dn, dm = float(d.norm()), float(d.abs().max())
            assert dn <= TOL_NORM * float(x.norm()) + ATOL and dm <= TOL_MAX * float(x.abs().max()) + ATOL, \
                f"{f} {k}: |Δ| {dn:.2e} of {float(x.norm()):.2e} (norm), {dm:.2e} of {float(x.abs().max()):.2e} (max)"
    return b


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_run_interrupted_and_resumed_under_the_launcher_equals_one_process(launched):
    folder, ranks = launched
    assert [r["world"] for r in ranks] == [2, 2]
    for r in ranks:     # every rank read the same state after the interruption, then resumed it
        chains = r["after_interrupt"]["chains"]
        assert {k: len(v["tasks"]) for k, v in chains.items()} == {"dema/seed0": 1}   # stopped after task 1
        assert r["ddp_exit"] == 0
    results = _assert_same_run(folder / "ref", folder / "ddp")
    assert results["launch"]["processes"] == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_multimodal_ddp_run_equals_one_process(launched):
    folder, ranks = launched
    assert [r["mm_exit"] for r in ranks] == [0, 0]
    results = _assert_same_run(folder / "mm_ref", folder / "mm")
    assert results["config"]["multimodal"] and results["launch"]["processes"] == 2
    assert results["model"]["model_type"] == "llava"


@pytest.mark.slow
@pytest.mark.distributed
def test_qwen_vl_runs_under_ddp_and_deepspeed_equal_one_process(launched):
    folder, ranks = launched
    assert [r["qw_exit"] for r in ranks] == [0, 0] and [r["qwds_exit"] for r in ranks] == [0, 0]
    for name, model_type in (("qw", "qwen2_vl"), ("qwds", "qwen2_5_vl")):
        results = _assert_same_run(folder / f"{name}_ref", folder / name)
        assert results["model"]["model_type"] == model_type and results["launch"]["processes"] == 2
    assert json.loads((folder / "qwds" / "results.json").read_text())["launch"]["deepspeed"]["zero_stage"] == 0


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluation_shared_over_ranks_gives_the_answers_of_one_process(launched):
    _, ranks = launched
    for r in ranks:
        assert r["shard"]["equal"] and r["shard"]["n"] == 23
        # batches of 5: batch k on rank k mod 2, gathered back in order
        assert r["shard"]["order"] == [[i, (i // 5) % 2] for i in range(23)]


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_zero0_runs_equal_one_process_and_bf16_uses_the_official_precision(launched):
    folder, ranks = launched
    assert [r["ds0_exit"] for r in ranks] == [0, 0] and [r["ds0b_exit"] for r in ranks] == [0, 0]
    # a later Trainer of these processes without --deepspeed must not run DeepSpeed
    assert [r["ds0_env_after"] for r in ranks] == [None, None]
    results = _assert_same_run(folder / "ref", folder / "ds0")
    assert results["launch"]["deepspeed"]["zero_stage"] == 0 and not results["launch"]["deepspeed"]["bf16"]
    bf16 = json.loads((folder / "ds0b" / "results.json").read_text())
    ds = bf16["launch"]["deepspeed"]
    assert ds["bf16"] and ds["dema_precision"] == {"lcia": "official"}
    seed = bf16["methods"]["lcia"]["seeds"]["0"]
    assert seed["dema"] == [False, True] and len(seed["alpha"][1]) == 3     # DEMA ran on task 2's 3 steps
    from safetensors.torch import load_file

    adapters = [f for f in _files(folder / "ds0b") if f.startswith("chains") and f.endswith(".safetensors")]
    assert adapters and all(t.dtype == torch.bfloat16 for f in adapters
                            for t in load_file(str(folder / "ds0b" / f)).values())


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_zero3_run_interrupted_and_resumed_equals_one_process(launched):
    folder, ranks = launched
    for r in ranks:
        assert r["ds3_exit"] == 0 and r["ds3_env_after"] is None
        # transformers' global ZeRO-3 config is gone: a later from_pretrained loads whole tensors
        assert r["ds3_zero3_after"] is False
        chains = r["ds3_after_interrupt"]["chains"]
        assert {k: len(v["tasks"]) for k, v in chains.items()} == {"dema/seed0": 1}   # stopped after task 1
        # the stage-1 base, then dema's task 1 (interrupted), task 2 (resumed), dema+group's 2 tasks:
        # every parameter was partitioned, every LoRA tensor split over the ranks (threshold 0)
        gathers = r["ds3_gathers"]
        assert len(gathers) == 5 and all(g["partitioned"] == g["total"] > 0 for g in gathers)
        assert gathers[0]["lora_partial"] == 0 and all(g["lora_partial"] > 0 for g in gathers[1:])
    results = _assert_same_run(folder / "ref", folder / "ds3")
    assert results["launch"]["deepspeed"]["zero_stage"] == 3 and not results["launch"]["deepspeed"]["bf16"]
    assert results["launch"]["deepspeed"]["dema_precision"] == {"dema": "fp32", "dema+group": "fp32"}
