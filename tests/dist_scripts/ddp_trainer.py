"""Launched by tests/integrations/test_distributed.py as `torchrun --nproc_per_node 2 ddp_trainer.py OUT`.

Real DDP over gloo through transformers.Trainer + accelerate, 2 ranks x 2 sequences per
step (global batch 4). Several checks in one launch:
  run   4 optimizer steps with DEMACallback(record_alpha=True), checkpoint at step 2;
  res   a fresh model resumed from run/checkpoint-2 for the last 2 steps;
  ema   the EMA adapter (PEFT folder), saved by both ranks at once into one folder.
Each rank writes OUT/rank{r}.pt with its EMA, α history and what the callback saw.
"""
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import TokenDataset, sequential_trainer_cls, tiny_peft_llama, training_args  # noqa: E402

from cl_core import DEMACallback  # noqa: E402


def main(out):
    import torch.distributed as dist

    T = sequential_trainer_cls()
    cb = DEMACallback(record_alpha=True)
    model = tiny_peft_llama()
    trainer = T(model=model, args=training_args(os.path.join(out, "run"), per_device_train_batch_size=2,
                                                 max_steps=4, save_strategy="steps", save_steps=2),
                train_dataset=TokenDataset(), callbacks=[cb])
    trainer.train()
    rank = dist.get_rank()
    world = dist.get_world_size()
    # every rank saves into the same folder at once (the rank that lost the rename race
    # used to fail with "Directory not empty")
    dist.barrier()
    for _ in range(3):
        cb.save_ema_adapter(os.path.join(out, "ema_adapter"))   # the EMA was copied in: same as live now

    cb_res = DEMACallback()
    trainer_res = T(model=tiny_peft_llama(lora_seed=99),
                    args=training_args(os.path.join(out, "res"), per_device_train_batch_size=2, max_steps=4),
                    train_dataset=TokenDataset(), callbacks=[cb_res])
    trainer_res.train(resume_from_checkpoint=os.path.join(out, "run", "checkpoint-2"))

    torch.save({
        "world": world,
        "model_type": type(cb._model).__name__,
        "names": list(cb.engine.names),
        "ema": [t.clone() for t in cb.engine.ema_tensors()],
        "alpha": cb.alpha_history,
        "num_updates": cb.engine.num_updates,
        "ema_resumed": [t.clone() for t in cb_res.engine.ema_tensors()],
        "resumed_from": cb_res.resumed_from,
        "adapter_files": sorted(os.listdir(os.path.join(out, "ema_adapter"))),
        "state_files": sorted(f for f in os.listdir(os.path.join(out, "run", "checkpoint-2")) if "dema" in f),
    }, os.path.join(out, f"rank{rank}.pt"))
    # Tear the gloo group down before interpreter exit: left to the atexit order, its
    # threads were seen to abort the process ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
