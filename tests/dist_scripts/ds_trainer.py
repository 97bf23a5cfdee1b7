"""Launched by tests/integrations/test_deepspeed.py as
`DS_ACCELERATOR=cpu torchrun --nproc_per_node N ds_trainer.py OUT CASES_JSON`.

Real DeepSpeed (CPU accelerator, gloo) through transformers.Trainer + accelerate, a tiny
PEFT Llama and DEMACallback(record_alpha=True). Several runs per launch (each DeepSpeed
start costs seconds); for each case {"name", "stage", "bf16", "resume"} every rank writes
into OUT/rank{r}.pt:
  alpha      the callback's per-step α;
  ema        the final EMA, gathered whole (DEMA.export_ema);
  replay     α and EMA of a plain reference engine fed, step by step, the whole fp32
             parameters and gradients the callback saw (gathered from the partitions), so
             partitioned statistics are checked against unpartitioned ones on the same data;
  live       the model's LoRA tensors after training (the EMA replace), gathered under ZeRO-3;
  adapter    OUT/<name>/ema_adapter written by save_ema_adapter called on every rank;
  resumed    with "resume": the EMA of a second run resumed from checkpoint-2 of the first.
A case with "dema_optimizer": true hands the Trainer a DEMAOptimizer (through
optimizer_cls_and_kwargs, the route DeepSpeed keeps) plus the callback, and records the
error the start of training raises ("error") and the optimizer steps taken ("steps").
A case with "precision": "official" runs DEMACallback(precision="official") beside
OfficialReplay, the official ema_update written out in torch ops on the same bf16 weights and
gradients: per step both α and both EMAs ("official_*"), or, where that mode is refused, the
error and the steps taken.
"""
import json
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import TokenDataset, sequential_trainer_cls, tiny_peft_llama, training_args  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from cl_core import DEMA, DEMACallback, DEMAConfig, DEMAOptimizer  # noqa: E402
from cl_core.integrations.hf import CHECKPOINT_ADAPTER  # noqa: E402
from tests.official_oracle import OfficialEMA  # noqa: E402

STEPS = 4


def ds_config(stage, offload=False):
    # "auto" lets the Trainer fill batch sizes, clipping and bf16 from TrainingArguments
    # (the official LCIA/CoIN scripts' zero1.json has stage 0 and bf16 "auto" the same way).
    cfg = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
           "bf16": {"enabled": "auto"},
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    if offload:   # the optimizer step on the CPU copies (ZeRO-Offload), with the Trainer's torch AdamW
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


class Replay(TrainerCallback):
    """After DEMACallback in the list: gathers the fp32 θ and g the callback just used and
    feeds them to a reference engine over whole tensors."""

    def __init__(self, cb):
        self.cb, self.engine, self.holders, self.alpha = cb, None, None, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        link = self.cb._ds_link
        thetas = link.full_tensors(link.holders)
        grads = link.full_tensors([h.grad if h.grad is not None else torch.zeros_like(h) for h in link.holders])
        if self.engine is None:
            self.holders = [torch.nn.Parameter(t.clone()) for t in thetas]
            self.engine = DEMA(self.holders, DEMAConfig(backend="reference"))
        with torch.no_grad():
            for h, t, g in zip(self.holders, thetas, grads):
                h.copy_(t)
                h.grad = g
        self.engine.update()
        self.alpha.append(self.engine.stats.alpha.clone())


class OfficialReplay(TrainerCallback):
    """After DEMACallback(precision="official"): the official ``ema_update`` (CoIN/peft/tuners/
    lora.py) in bf16 torch ops (tests/official_oracle.py, the oracle of every backend), over the
    very tensors the callback averaged (the model's bf16 weights, the bf16 gradients of the
    step): per tensor, a = ‖θ − θ*‖₁, b = ‖g‖₁, c = ‖g − g_prev‖₁ (each a bf16 number),
    α = float((1 + b) / (a · c) · 2), 0.01 where α leaves (0, 1); θ* ← θ* · (1 − α) + θ · α in
    bf16. The first update of a tensor has no g_prev: the official bare except runs
    θ* · 0.99 + θ · 0.01 on θ* = a copy of θ."""

    def __init__(self, cb):
        self.cb, self.oracle = cb, OfficialEMA(scale=2.0, fallback=0.01)
        self.alpha, self.ema_steps, self.cb_alpha, self.cb_ema_steps, self.same_storage = [], [], [], [], True
        # and a plain engine with the callback's config fed copies of the same bf16 θ and g
        self.copies, self.engine, self.engine_alpha, self.engine_ema_steps = None, None, [], []

    def on_optimizer_step(self, args, state, control, **kwargs):
        link = self.cb._ds_link
        params = dict(self.cb._model.named_parameters())
        with torch.no_grad():
            for name, p in zip(self.cb.engine.names, link.holders):
                self.same_storage &= p.data_ptr() == params[name].data_ptr() and p.dtype == torch.bfloat16
            alphas = self.oracle.update(list(link.holders), [p.grad for p in link.holders])
            if self.engine is None:
                self.copies = [torch.nn.Parameter(h.detach().clone()) for h in link.holders]
                self.engine = DEMA(self.copies, self.cb.config)
            for c, h in zip(self.copies, link.holders):
                c.copy_(h)
                c.grad = h.grad.clone()
        self.engine.update()
        self.engine.flush()
        self.engine_alpha.append(self.engine.stats.alpha.detach().double().cpu().clone())
        self.engine_ema_steps.append([t.detach().clone() for t in self.engine.ema_tensors()])
        self.alpha.append(torch.tensor(alphas, dtype=torch.float64))
        self.ema_steps.append([e.clone() for e in self.oracle.ema_tensors()])
        self.cb.engine.flush()
        self.cb_alpha.append(self.cb.engine.stats.alpha.detach().double().cpu().clone())
        self.cb_ema_steps.append([t.detach().clone() for t in self.cb.engine.ema_tensors()])


def official_case(out, case, T, kw):
    cb = DEMACallback(record_alpha=True, precision="official")
    rep = OfficialReplay(cb)
    trainer = T(model=tiny_peft_llama(), args=training_args(os.path.join(out, case["name"]), **kw),
                train_dataset=TokenDataset(), callbacks=[cb, rep])
    try:
        trainer.train()
    except RuntimeError as exc:
        return {"error": str(exc), "steps": trainer.state.global_step}
    names = list(cb.engine.names)
    return {"error": None, "steps": trainer.state.global_step, "mode": cb._ds_link.mode, "names": names,
            "captures": cb._ds_link.captures, "num_updates": cb.engine.num_updates,
            "same_storage": rep.same_storage, "official_alpha": rep.alpha, "official_ema": rep.ema_steps,
            "alpha": rep.cb_alpha, "ema": rep.cb_ema_steps, "engine_alpha": rep.engine_alpha,
            "engine_ema": rep.engine_ema_steps, "ema_dtype": str(cb.engine.ema_tensors()[0].dtype),
            "live": [p.detach().clone() for n, p in cb._model.named_parameters() if n in set(names)],
            "masters": [hp.detach().clone() for _, hp in cb._ds_link._lp_hp]}


def live_lora(model, names):
    params = dict(model.named_parameters())
    ps = [params[n] for n in names]
    if hasattr(ps[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(ps):
            return [p.detach().float().clone() for p in ps]
    return [p.detach().float().clone() for p in ps]


class DEMAAdamW(DEMAOptimizer):
    """What a user might hand to optimizer_cls_and_kwargs: AdamW wrapped in a DEMAOptimizer."""

    def __init__(self, params, **kw):
        super().__init__(torch.optim.AdamW(params, **kw))


def refused_case(out, case, T, kw):
    cb = DEMACallback()
    model = tiny_peft_llama()
    trainer = T(model=model, args=training_args(os.path.join(out, case["name"]), **kw), train_dataset=TokenDataset(),
                callbacks=[cb], optimizer_cls_and_kwargs=(DEMAAdamW, {"lr": 5e-2}))
    try:
        trainer.train()
    except RuntimeError as exc:
        return {"error": str(exc), "steps": trainer.state.global_step}
    return {"error": None, "steps": trainer.state.global_step}


def run_case(out, case, rank):
    T = sequential_trainer_cls()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = 4 // world
    folder = os.path.join(out, case["name"])
    kw = dict(per_device_train_batch_size=per_device, max_steps=STEPS, deepspeed=ds_config(case["stage"], case.get("offload", False)),
              bf16=case["bf16"])
    if case.get("dema_optimizer"):
        return refused_case(out, case, T, kw)
    if case.get("precision") == "official":
        return official_case(out, case, T, kw)
    cb = DEMACallback(record_alpha=True)
    rep = Replay(cb)
    save = dict(save_strategy="steps", save_steps=2) if case.get("resume") else {}
    trainer = T(model=tiny_peft_llama(), args=training_args(os.path.join(folder, "run"), **kw, **save),
                train_dataset=TokenDataset(), callbacks=[cb, rep])
    trainer.train()
    names = list(cb.engine.names)
    res = {
        "mode": cb._ds_link.mode, "partitioned": cb._ds_link.partitioned, "names": names,
        "alpha": cb.alpha_history, "ema": cb.engine.export_ema(),
        "num_updates": cb.engine.num_updates, "captures": cb._ds_link.captures,
        "reducer_calls": getattr(cb._ds_link.reduce_stats, "calls", None),
        "replay_alpha": rep.alpha, "replay_ema": [t.clone() for t in rep.engine.ema_tensors()],
        "live": live_lora(cb._model, names),
        "local_numel": [h.numel() for h in cb._ds_link.holders],
        "missing_grads": (cb.engine.stats.missing_grads.tolist()
                          if hasattr(cb.engine.stats, "missing_grads") else None),
    }
    cb.save_ema_adapter(os.path.join(folder, "ema_adapter"))          # on every rank
    if case.get("resume"):
        ckpt = os.path.join(folder, "run", "checkpoint-2")
        res["state_files"] = sorted(f for f in os.listdir(ckpt) if f.startswith("dema_state"))
        res["ckpt_adapter"] = sorted(os.listdir(os.path.join(ckpt, CHECKPOINT_ADAPTER)))
        cb_res = DEMACallback(record_alpha=True)
        tr2 = T(model=tiny_peft_llama(lora_seed=99), args=training_args(os.path.join(folder, "res"), **kw),
                train_dataset=TokenDataset(), callbacks=[cb_res])
        tr2.train(resume_from_checkpoint=ckpt)
        res["resumed_from"] = cb_res.resumed_from
        res["resumed_alpha"] = cb_res.alpha_history
        res["resumed_ema"] = cb_res.engine.export_ema()
    return res


def main(out, cases):
    import torch.distributed as dist

    results = {}
    for case in cases:
        results[case["name"]] = run_case(out, case, int(os.environ.get("RANK", "0")))
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
