"""Method ``lwf``: Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2018) for an
instruction-tuned LM: the model as it was before the current task (its LoRA tensors, kept as a
copy; the base is shared, so no second model is held) gives soft targets on the current
task's inputs, and T²·KL(p_old^T ‖ p_new^T) over the answer tokens (mean per answer token;
temperature ``lwf_temperature`` T) times ``lwf_weight`` is added to each step's loss. Task 1
has no earlier model and trains as lora."""
from __future__ import annotations

from cl_core.continual.baselines import Baseline, answer_mask, trainable


def distillation(new_logits, old_logits, labels, temperature: float):
    """T²·mean over answer positions of KL(softmax(old/T) ‖ softmax(new/T))."""
    import torch.nn.functional as F

    mask = answer_mask(labels)
    new = new_logits[:, :-1][mask].float() / temperature
    old = old_logits[:, :-1][mask].float() / temperature
    if new.shape[0] == 0:
        return new_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(new, -1), F.log_softmax(old, -1), log_target=True, reduction="batchmean")
    return kl * temperature ** 2


class Hook(Baseline):
    def __init__(self, cfg, seed):
        super().__init__(cfg, seed)
        self.old: dict = {}
        self.params: dict = {}

    def begin_task(self, model, j):
        self.model = model
        self.params = trainable(model)
        # the earlier model: the set's weights before this task (none on task 1)
        self.old = {n: p.detach().clone() for n, p in self.params.items()} if j > 0 else {}

    def teacher_logits(self, inputs):
        """The logits of the model with the pre-task LoRA tensors in place of the current ones
        (torch.func.functional_call: the trained tensors are not touched), no gradient, no
        dropout."""
        import torch

        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return torch.func.functional_call(self.model, self.old, args=(), strict=False,
                                                  kwargs={k: v for k, v in inputs.items() if k != "labels"}).logits
        finally:
            self.model.train(was)

    def loss(self, model, inputs, outputs):
        if not self.old:
            return None
        device = next(iter(self.params.values())).device
        if next(iter(self.old.values())).device != device:   # the Trainer moved the model (CUDA)
            self.old = {n: t.to(device) for n, t in self.old.items()}
        old = self.teacher_logits(inputs)
        return self.cfg.lwf_weight * distillation(outputs.logits, old, inputs["labels"], self.cfg.lwf_temperature)
