"""Shared pieces of the integration tests and the torchrun scripts: a fixed token data set,
quiet TrainingArguments, a Trainer with sequential batches, a recorder of what each
optimizer step saw and its replay on a plain engine. The tiny Llama and its LoRA come from
tests/helpers.py, their one home; they are importable from here too, because the scripts
torchrun launches from this folder import this module as ``common``.

Imported as ``tests.dist_scripts.common`` by the tests and as ``common`` by the scripts (the
launchers put the checkout on PYTHONPATH, so ``tests.helpers`` imports in both).
"""
from __future__ import annotations

import torch

from tests.helpers import TINY_LLAMA, lora_config, tiny_llama, tiny_peft_llama  # noqa: F401  (for the scripts)

SEQ_LEN = 8
VOCAB = TINY_LLAMA["vocab_size"]


class TokenDataset(torch.utils.data.Dataset):
    """n fixed random sequences of SEQ_LEN tokens (labels = input_ids), the same for a seed."""

    def __init__(self, n: int = 32, seed: int = 0, seq_len: int = SEQ_LEN):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, seq_len), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def training_args(output_dir, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(output_dir), use_cpu=True, per_device_train_batch_size=4, learning_rate=5e-2,
                max_steps=4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                data_seed=0, dataloader_num_workers=0, max_grad_norm=1.0, ddp_find_unused_parameters=False)
    base.update(kw)
    return TrainingArguments(**base)


class SequentialTrainerMixin:
    """Trainer whose training batches come in data set order (same global batches in
    one process and under DDP)."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def sequential_trainer_cls():
    from transformers import Trainer

    return type("SequentialTrainer", (SequentialTrainerMixin, Trainer), {})


class RecorderCallback:
    """Records (params, grads) of the given tensors at each on_optimizer_step; put it before
    the DEMACallback in the callback list (callbacks run in list order)."""

    def __init__(self, pick):
        from transformers import TrainerCallback

        self.pick = pick
        self.steps = []
        self.skipped = []
        outer = self

        class _CB(TrainerCallback):
            def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
                named = outer.pick(model)
                outer.steps.append(([p.detach().clone() for _, p in named],
                                    [None if p.grad is None else p.grad.detach().clone() for _, p in named]))
                outer.skipped.append(bool(getattr(optimizer, "step_was_skipped", False)))

        self.callback = _CB()


def replay(config, records, names=None, skipped=None):
    """Drive a fresh cl_core.DEMA by hand with recorded (params, grads); returns the engine
    and the per-step α."""
    from cl_core import DEMA

    first_params = records[0][0]
    holders = [torch.nn.Parameter(p.clone()) for p in first_params]
    engine = DEMA(holders, config, names=names)
    alphas = []
    for k, (params, grads) in enumerate(records):
        with torch.no_grad():
            for h, p, g in zip(holders, params, grads):
                h.copy_(p)
                h.grad = None if g is None else g.clone()
        if skipped is not None and skipped[k]:
            engine.skip_step()
            alphas.append(torch.zeros(len(holders)))
        else:
            engine.update()
            alphas.append(engine.stats.alpha.clone())
    return engine, alphas
