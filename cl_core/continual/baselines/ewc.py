"""Method ``ewc``: Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017) on the LoRA
tensors, in its online form (Schwarz et al., ICML 2018): after each task a diagonal Fisher
F_t = mean over ``ewc_samples`` of the task's own examples of the squared per-example
gradient of the loss (the empirical Fisher, one example at a time), accumulated
F ← γ·F + F_t (``ewc_decay`` γ), and the anchors θ* = the weights at the task's end; every later
step adds λ·Σ F·(θ − θ*)² (``ewc_lambda`` λ)."""
from __future__ import annotations

import logging

from cl_core.continual.baselines import Baseline, trainable

log = logging.getLogger(__name__)

FILE = "ewc.safetensors"


def fisher_diagonal(model, batches, params: dict) -> dict:
    """name -> the mean over ``batches`` (one example each) of the squared gradient of the
    model's loss with respect to ``params``."""
    import torch

    out = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    was = model.training
    model.eval()     # no dropout: the Fisher of the model as it is
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                out[n] += g.detach().float() ** 2
        count += 1
    model.train(was)
    if count:
        for n in out:
            out[n] /= count
    return out


def penalty(params: dict, fisher: dict, anchors: dict, lam: float):
    """λ·Σ F·(θ − θ*)² over the tensors of ``fisher``."""
    total = None
    for n, f in fisher.items():
        p = params[n]
        term = (f.to(p.device, p.dtype) * (p - anchors[n].to(p.device, p.dtype)) ** 2).sum()
        total = term if total is None else total + term
    return None if total is None else lam * total


class Hook(Baseline):
    def __init__(self, cfg, seed):
        super().__init__(cfg, seed)
        self.fisher: dict = {}
        self.anchors: dict = {}
        self.params: dict = {}
        self._on = None            # the device the Fisher and anchors were moved to (the model's)

    def begin_task(self, model, j):
        self.params = trainable(model)
        missing = sorted(set(self.fisher) - set(self.params))
        if missing:   # the set's tensors are the same task after task (one LoRA set)
            raise RuntimeError(f"ewc: {len(missing)} anchored tensors are not trainable now (first: {missing[0]})")

    def loss(self, model, inputs, outputs):
        if not self.fisher:
            return None
        device = next(iter(self.params.values())).device
        if self._on != device:     # once per task: the Trainer may have moved the model (CUDA)
            self.fisher = {k: v.to(device) for k, v in self.fisher.items()}
            self.anchors = {k: v.to(device) for k, v in self.anchors.items()}
            self._on = device
        return penalty(self.params, self.fisher, self.anchors, self.cfg.ewc_lambda)

    def end_task(self, model, j, examples, encode):
        import torch

        from cl_core.continual.training import seed_for

        n = min(self.cfg.ewc_samples, len(examples))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(
            seed_for(self.seed, "ewc", j)))[:n].tolist()
        device = next(iter(self.params.values())).device
        batches = ({k: v.to(device) for k, v in encode([examples[i]]).items()} for i in order)
        new = fisher_diagonal(model, batches, self.params)
        gamma = self.cfg.ewc_decay
        self.fisher = {k: (gamma * self.fisher[k].to(v.device) + v if k in self.fisher else v).cpu()
                       for k, v in new.items()}
        self.anchors = {k: p.detach().float().cpu().clone() for k, p in self.params.items()}
        self._on = None
        log.debug("ewc: Fisher of task %d from %d examples, mean %.3g", j + 1, n,
                  float(sum(v.sum() for v in new.values()) / max(1, sum(v.numel() for v in new.values()))))

    def save(self, folder):
        from safetensors.torch import save_file

        if self.fisher:
            tensors = {f"fisher/{k}": v.cpu().contiguous() for k, v in self.fisher.items()}
            tensors.update({f"anchor/{k}": v.cpu().contiguous() for k, v in self.anchors.items()})
            save_file(tensors, str(folder / FILE))

    def load(self, folder):
        from safetensors.torch import load_file

        path = folder / FILE
        if not path.is_file():
            raise FileNotFoundError(f"ewc: cannot resume, {path} is missing (the Fisher and anchors of the "
                                    "finished tasks)")
        tensors = load_file(str(path))
        self.fisher = {k[len("fisher/"):]: v for k, v in tensors.items() if k.startswith("fisher/")}
        self.anchors = {k[len("anchor/"):]: v for k, v in tensors.items() if k.startswith("anchor/")}
