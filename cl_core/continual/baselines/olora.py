"""Method ``olora``: O-LoRA (Wang et al., "Orthogonal Subspace Learning for Language Model
Continual Learning", EMNLP Findings 2023). Each task trains a new LoRA set (``group_<j>``); the
earlier sets stay in the model, frozen and active, so the model (in training and at inference)
is the base plus the sum of every set. Each step adds
λ₁·Σ_layers Σ_old ‖A_old·A_newᵀ‖²_F (``olora_lambda1``; PEFT's A is r×d, so this is the paper's
Σ‖A_newᵀ A_old‖² with A as d×r) plus λ₂·Σ ‖θ_new‖₂ (``olora_lambda2``; the L2 norm of each of the
new set's tensors, as O-LoRA's code sums them)."""
from __future__ import annotations

from cl_core.continual.baselines import Baseline


def lora_a(model, adapter: str) -> dict:
    """layer -> lora_A weight of ``adapter`` (PEFT names ``<layer>.lora_A.<adapter>.weight``)."""
    tag = f".lora_A.{adapter}.weight"
    return {n[: -len(tag)]: p for n, p in model.named_parameters() if n.endswith(tag)}


def orthogonality(new: dict, olds: list):
    """Σ over layers and earlier sets of ‖A_old·A_newᵀ‖²_F."""
    total = None
    for old in olds:
        for layer, a in new.items():
            term = (old[layer].detach().to(a.dtype) @ a.T).pow(2).sum()
            total = term if total is None else total + term
    return total


def l2(params) -> object:
    """Σ of each tensor's L2 norm."""
    total = None
    for p in params:
        term = p.norm(p=2)
        total = term if total is None else total + term
    return total


class Hook(Baseline):
    def __init__(self, cfg, seed):
        super().__init__(cfg, seed)
        self.new: dict = {}
        self.olds: list = []
        self.new_params: list = []

    def decision(self, j: int):
        """Every task opens its own set."""
        from cl_core.grouping import Decision

        return Decision(group=j, reused=False, similarities=[])

    def begin_task(self, model, j):
        from cl_core.lora_sets import adapter_name

        names = [adapter_name(g) for g in range(j + 1)]
        missing = [n for n in names if n not in model.peft_config]
        if missing:
            raise RuntimeError(f"olora: task {j + 1} needs the sets {', '.join(missing)}, which the model lacks")
        model.base_model.set_adapter(names)        # every set active: the model is their sum
        new = names[-1]
        for n, p in model.named_parameters():      # set_adapter made them all trainable: freeze the old
            if p.requires_grad and f".{new}." not in n:
                p.requires_grad_(False)
        self.new = lora_a(model, new)
        self.olds = [lora_a(model, n) for n in names[:-1]]
        self.new_params = [p for p in model.parameters() if p.requires_grad]

    def loss(self, model, inputs, outputs):
        total = None
        if self.olds and self.cfg.olora_lambda1:
            total = self.cfg.olora_lambda1 * orthogonality(self.new, self.olds)
        if self.cfg.olora_lambda2:
            term = self.cfg.olora_lambda2 * l2(self.new_params)
            total = term if total is None else total + term
        return total
