"""DEMA under torch.distributed, 2 processes on CPU over gloo (one torchrun launch each):

* DDP through the real Trainer + accelerate: every rank ends with the same EMA as a
  single-process run with the same global batch; resume from a DDP checkpoint is exact.
* FSDP2 (DTensor shards) and FSDP1 (flat slices): per-tensor α and the EMA equal an
  unsharded run, with one all_reduce per DEMA update.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

from cl_core import DEMACallback
from tests.dist_scripts.common import TokenDataset, sequential_trainer_cls, training_args
from tests.helpers import DIST_SCRIPTS, ROOT as ROOT_PATH, tiny_llama, tiny_peft_llama

SCRIPTS = str(DIST_SCRIPTS)
ROOT = str(ROOT_PATH)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, out, nproc=2, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}",
           os.path.join(SCRIPTS, script), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=str(out), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(nproc)]


@pytest.mark.distributed
def test_ddp_trainer_every_rank_equals_single_process(tmp_path):
    from peft import PeftModel

    ranks = torchrun("ddp_trainer.py", tmp_path)
    r0, r1 = ranks
    assert r0["world"] == 2 and r0["model_type"] == "PeftModelForCausalLM"     # the unwrapped model, not DDP
    assert r0["num_updates"] == 4 and len(r0["alpha"]) == 4
    # every rank: the same EMA and the same α, bit for bit
    for a, b in zip(r0["ema"], r1["ema"]):
        assert torch.equal(a, b)
    for a, b in zip(r0["alpha"], r1["alpha"]):
        assert torch.equal(a, b)

    # single process, global batch 4 = 2 ranks x 2
    cb = DEMACallback(record_alpha=True)
    sequential_trainer_cls()(model=tiny_peft_llama(), args=training_args(tmp_path / "single", max_steps=4,
                                                                         per_device_train_batch_size=4),
                             train_dataset=TokenDataset(), callbacks=[cb]).train()
    assert cb.engine.names == r0["names"]
    for a, b in zip(cb.engine.ema_tensors(), r0["ema"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for a, b in zip(cb.alpha_history, r0["alpha"]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
    assert any(((a != cb.config.fallback) & (a > 0)).any() for a in cb.alpha_history)

    # checkpoint written once (rank 0), resumed on both ranks, exact
    assert r0["state_files"] == ["dema_state.pt"]
    for r in ranks:
        assert r["resumed_from"] == "optimizer"                 # carried by optimizer.pt
        for a, b in zip(r["ema_resumed"], r0["ema"]):
            assert torch.equal(a, b)

    # both ranks saved the adapter into one folder at once: no error, the folder holds exactly
    # the two PEFT files (no temporary folder left), loads into PEFT and equals the EMA
    assert r0["adapter_files"] == r1["adapter_files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".ema_adapter")]
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ema_adapter"))
    got = dict(loaded.named_parameters())
    for name, ema in zip(r0["names"], r0["ema"]):
        assert torch.equal(got[name], ema)


@pytest.mark.distributed
def test_sharded_stats_one_all_reduce_per_step_equal_unsharded(tmp_path):
    ranks = torchrun("fsdp_stats.py", tmp_path)
    for formula in ("official", "paper"):
        dyn_seen = False
        for r in ranks:
            res = r[formula]
            ref_alpha, ref_ema = res["ref_alpha"], res["ref_ema"]
            dyn_seen |= any(((a > 0) & (a != 0.01)).any() for a in ref_alpha)

            f2 = res["fsdp2"]
            assert f2["all_reduce_per_step"] == [1] * len(ref_alpha), "one all_reduce per step, not per tensor"
            assert f2["reducer_calls"] == len(ref_alpha) and f2["groups"] == 1
            assert f2["local_shapes"][2] in ([4, 10], [3, 10])           # uneven shards
            for a, b in zip(f2["alpha"], ref_alpha):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            for a, b in zip(f2["ema"], ref_ema):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert f2["state_round_trip"]
            assert f2["callback_sharded"] and f2["callback_same_ema"] and f2["callback_resumed"]
            assert f2["callback_files"] == ["dema_state_rank0.pt", "dema_state_rank1.pt"]

            f1 = res["fsdp1"]
            assert f1["all_reduce_per_step"] == [1] * len(ref_alpha)
            assert 0 in f1["local_numel"]                               # some slices are empty here
            held = torch.tensor(f1["local_numel"]) > 0
            for a, b in zip(f1["alpha"], ref_alpha):
                # α of a tensor with no elements on this rank is only this rank's bookkeeping
                torch.testing.assert_close(a[held], b[held], rtol=1e-5, atol=1e-6)
            for a, b in zip(f1["ema"], ref_ema):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert dyn_seen, f"{formula}: the dynamic α never left the fallback; the test would be vacuous"
    # every tensor is held (non-empty) on some rank, so the union covers all of them
    assert (torch.tensor(ranks[0]["official"]["fsdp1"]["local_numel"]) +
            torch.tensor(ranks[1]["official"]["fsdp1"]["local_numel"]) > 0).all()


def test_auto_reduce_stats_is_none_without_sharding():
    from cl_core.dema import distributed as cl_dist
    from cl_core.integrations import fsdp as cl_fsdp

    params = list(torch.nn.Linear(3, 2).parameters())
    assert cl_dist.auto_reduce_stats(params) is None
    assert cl_fsdp.auto_reduce_stats(params, torch.nn.Linear(2, 2)) is None
    assert not cl_fsdp.is_sharded(params)
    assert cl_dist.world_size() == 1 and cl_dist.rank() == 0
