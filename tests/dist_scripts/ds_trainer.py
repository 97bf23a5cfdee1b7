"""Launched by tests/integrations/test_deepspeed.py as
`DS_ACCELERATOR=cpu torchrun --nproc_per_node N ds_trainer.py OUT CASES_JSON`.

Real DeepSpeed (CPU accelerator, gloo) through transformers.Trainer + accelerate, a tiny
PEFT Llama and DEMACallback(record_alpha=True). Several runs per launch (each DeepSpeed
start costs seconds); for each case {"name", "stage", "bf16", "resume"} every rank writes
into OUT/rank{r}.pt:
  alpha      the callback's per-step α;
  ema        the final EMA, gathered whole (DEMA.full_ema_tensors);
  replay     α and EMA of a plain reference engine fed, step by step, the whole fp32
             parameters and gradients the callback saw (gathered from the partitions), so
             partitioned statistics are checked against unpartitioned ones on the same data;
  live       the model's LoRA tensors after training (the EMA replace), gathered under ZeRO-3;
  adapter    OUT/<name>/ema_adapter written by save_ema_adapter called on every rank;
  resumed    with "resume": the EMA of a second run resumed from checkpoint-2 of the first.
A case with "dema_optimizer": true hands the Trainer a DEMAOptimizer (through
optimizer_cls_and_kwargs, the route DeepSpeed keeps) plus the callback, and records the
error the start of training raises ("error") and the optimizer steps taken ("steps").
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
    cb = DEMACallback(record_alpha=True)
    rep = Replay(cb)
    save = dict(save_strategy="steps", save_steps=2) if case.get("resume") else {}
    trainer = T(model=tiny_peft_llama(), args=training_args(os.path.join(folder, "run"), **kw, **save),
                train_dataset=TokenDataset(), callbacks=[cb, rep])
    trainer.train()
    names = list(cb.engine.names)
    res = {
        "mode": cb._ds_link.mode, "partitioned": cb._ds_link.partitioned, "names": names,
        "alpha": cb.alpha_history, "ema": cb.engine.full_ema_tensors(),
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
        res["resumed_ema"] = cb_res.engine.full_ema_tensors()
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
