"""Lightning manual optimization (automatic_optimization=False) with DEMACallback: every
`opt.step()` the training_step takes is averaged, none counted as skipped (issue 27, case 9)."""
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from cl_core.integrations.lightning import DEMACallback  # noqa: E402
from tests.integrations.test_lightning import LitLM, batches, loader, tiny_peft_llama, trainer  # noqa: E402


class ManualLM(LitLM):
    def __init__(self, model, optimizer="adamw"):
        super().__init__(model, optimizer=optimizer)
        self.automatic_optimization = False

    def training_step(self, ids, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = self(ids)
        self.manual_backward(loss)
        opt.step()
        return loss


@pytest.mark.parametrize("optimizer", ["adamw", "dema"])
def test_manual_optimization_counts_no_skipped_step(tmp_path, optimizer):
    module = ManualLM(tiny_peft_llama(0), optimizer=optimizer)
    cb = DEMACallback()
    module.callback = cb
    data = batches()
    trainer(tmp_path, [cb]).fit(module, loader(data))
    assert cb.engine.stats.skipped_steps == 0
    assert cb.engine.stats.updates == len(data)
