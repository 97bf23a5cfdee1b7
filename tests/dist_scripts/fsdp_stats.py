"""Launched by tests/integrations/test_distributed.py as `torchrun --nproc_per_node 2 fsdp_stats.py OUT`.

Sharded parameters on CPU over gloo, compared on every rank with an unsharded copy of the
same model trained on the same global batch in the same process:
  fsdp2  fully_shard (DTensor, Shard(0), one layer with an odd row count so the shards are
         uneven), cl_core.DEMAOptimizer(AdamW) with reduce_stats="auto";
  fsdp1  FullyShardedDataParallel(use_orig_params=True) (flat 1-D slices, some empty),
         a cl_core.DEMA engine with cl_core.integrations.fsdp.auto_reduce_stats(params, model).
Per step: α per tensor, and the number of all_reduce calls inside the DEMA update.
At the end: the full EMA tensors (gathered) and a state_dict round trip; for FSDP2 also a
DEMACallback driven as the Trainer drives it (sharding detected, per-rank state files). Both for the
official formula and the paper formula (which also sums d across ranks).
Each rank writes OUT/rank{r}.pt.
"""
import os
import sys
from types import SimpleNamespace

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402

from cl_core import DEMA, DEMACallback, DEMAConfig, DEMAOptimizer  # noqa: E402
from cl_core.dema import distributed as cl_dist  # noqa: E402
from cl_core.integrations import fsdp as cl_fsdp  # noqa: E402

STEPS = 5
GLOBAL_BATCH = 8
# the official formula with a scale that keeps many α inside (0, 1), and the paper formula (uses d)
CONFIGS = {"official": DEMAConfig(scale=0.02), "paper": DEMAConfig(formula="paper")}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 4))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g))
            for _ in range(STEPS)]


def loss_fn(m, x, y):
    return torch.nn.functional.mse_loss(m(x), y)


class CountAllReduce:
    def __init__(self):
        self.n = 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def counted(*a, **k):
            self.n += 1
            return self._orig(*a, **k)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def reference(cfg):
    """Unsharded: full global batch, AdamW, engine by hand. α per step and final EMA."""
    m = make_model()
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    engine = DEMA(list(m.parameters()), cfg)
    alphas = []
    for x, y in batches():
        loss_fn(m, x, y).backward()
        opt.step()
        engine.update()
        opt.zero_grad()
        alphas.append(engine.stats.alpha.clone())
    return alphas, [t.clone() for t in engine.ema_tensors()]


def my_rows(x, rank, world):
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def run_fsdp2(cfg, rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    m = make_model()
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    params = list(m.parameters())
    assert all(cl_dist.is_dtensor(p) for p in params)
    opt = DEMAOptimizer(torch.optim.AdamW(params, lr=0.05), cfg)      # reduce_stats="auto"
    assert isinstance(opt.engine.reduce_stats, cl_dist.StatsReducer)
    # the Trainer callback over the same sharded model, driven as the Trainer drives it
    cb = DEMACallback(cfg)
    args = SimpleNamespace(output_dir=out, should_save=rank == 0)
    tstate = SimpleNamespace(global_step=0)
    cb.on_train_begin(args, tstate, None, model=m)
    alphas, reduces = [], []
    for x, y in batches():
        loss_fn(m, my_rows(x, rank, world), my_rows(y, rank, world)).backward()
        with CountAllReduce() as c:
            opt.step()
        reduces.append(c.n)
        cb.on_optimizer_step(args, tstate, None, optimizer=opt)
        cb.on_step_end(args, tstate, None)
        opt.zero_grad()
        alphas.append(opt.engine.stats.alpha.clone())
    ema_full = [cl_dist.full_tensor(e, p) for e, p in zip(opt.engine.ema_tensors(), params)]
    cb_same = all(torch.equal(a, b) for a, b in zip(cb.engine.ema_tensors(), opt.engine.ema_tensors()))
    # per-rank checkpoint file, loaded back by a fresh callback
    ckpt = os.path.join(out, "checkpoint-5")
    tstate.global_step = 5
    cb.on_save(args, tstate, None)
    dist.barrier()
    cb_files = sorted(f for f in os.listdir(ckpt) if f.startswith("dema_state"))
    cb2 = DEMACallback(cfg)
    cb2.on_train_begin(args, tstate, None, model=m)           # FSDP shards: from out/checkpoint-5's files
    cb_resumed = cb2.resumed_from == os.path.join(ckpt, f"dema_state_rank{rank}.pt") and all(
        torch.equal(a, b) for a, b in zip(cb2.engine.ema_tensors(), cb.engine.ema_tensors()))
    # state_dict round trip on the shards
    sd = opt.state_dict()
    opt2 = DEMAOptimizer(torch.optim.AdamW(params, lr=0.05), cfg)
    opt2.load_state_dict(sd)
    rt_ok = all(torch.equal(a, b) for a, b in zip(opt.engine.ema_tensors(), opt2.engine.ema_tensors()))
    return {"alpha": alphas, "ema": ema_full, "all_reduce_per_step": reduces,
            "reducer_calls": opt.engine.reduce_stats.calls, "groups": len(opt.engine.groups),
            "local_shapes": [list(p.to_local().shape) for p in params], "state_round_trip": rt_ok,
            "callback_sharded": cb._sharded, "callback_same_ema": cb_same, "callback_files": cb_files,
            "callback_resumed": cb_resumed}


def run_fsdp1(cfg, rank, world):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    m = FSDP(make_model(), device_id=torch.device("cpu"), use_orig_params=True)
    params = list(m.parameters())
    reducer = cl_fsdp.auto_reduce_stats(params, m)
    assert isinstance(reducer, cl_dist.StatsReducer)
    opt = torch.optim.AdamW(params, lr=0.05)
    engine = DEMA(params, cfg, reduce_stats=reducer)
    alphas, reduces = [], []
    for x, y in batches():
        loss_fn(m, my_rows(x, rank, world), my_rows(y, rank, world)).backward()
        opt.step()
        with CountAllReduce() as c:
            engine.update()
        reduces.append(c.n)
        opt.zero_grad()
        alphas.append(engine.stats.alpha.clone())
    local_numel = [p.numel() for p in params]
    with engine.swap(), FSDP.summon_full_params(m):
        ema_full = [p.detach().clone() for p in m.module.parameters()]
    return {"alpha": alphas, "ema": ema_full, "all_reduce_per_step": reduces, "local_numel": local_numel}


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"world": world}
    for key, cfg in CONFIGS.items():
        ref_alpha, ref_ema = reference(cfg)
        result[key] = {"ref_alpha": ref_alpha, "ref_ema": ref_ema,
                       "fsdp2": run_fsdp2(cfg, rank, world, os.path.join(out, key)), "fsdp1": run_fsdp1(cfg, rank, world)}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
