"""The regime in the trainers' logs (issue 33): a real Trainer (tiny Llama, peft LoRA r=8 on
q/v of 2 layers: 8 LoRA tensors) and a real Lightning run, logging every step. Each log line
carries the window's regime (fallback share by cause, jumps, α quantiles); the run out of
regime is warned once, in the first log lines, although each window holds only 8
tensor-updates (the judgement is over the run so far)."""
import logging

import pytest
import torch

import cl_core.dema.regime as R
from tests.dist_scripts.common import TokenDataset, sequential_trainer_cls, tiny_peft_llama, training_args

STEPS, LR = 12, 5e-3
REGIME_KEYS = ("dema/fallback_share", "dema/fallback_start", "dema/fallback_raw_ge1", "dema/fallback_raw_le0",
               "dema/fallback_raw_nan", "dema/jump_share", "dema/out_of_regime")


class StepOfWarning(logging.Handler):
    """The training step at which cl_core.dema.regime warned (read from `step()` at emit)."""

    def __init__(self, step):
        super().__init__(logging.WARNING)
        self.step, self.at, self.messages = step, [], []

    def emit(self, record):
        self.at.append(self.step())
        self.messages.append(record.getMessage())


@pytest.fixture
def regime_warnings():
    logger = logging.getLogger(R.__name__)
    handlers = []

    def attach(step):
        h = StepOfWarning(step)
        logger.addHandler(h)
        handlers.append(h)
        return h

    yield attach
    for h in handlers:
        logger.removeHandler(h)


def _check_lines(lines, warned):
    assert len(lines) == STEPS
    for k, line in enumerate(lines, start=1):
        for key in REGIME_KEYS:
            assert key in line, (key, sorted(line))
        assert line["dema/updates"] == k
        # each window is one update of the 8 tensors: shares are multiples of 1/8
        assert line["dema/fallback_share"] * 8 == pytest.approx(round(line["dema/fallback_share"] * 8))
        assert line["dema/out_of_regime"] == (1.0 if k >= R.MIN_UPDATES else 0.0)
    assert lines[0]["dema/fallback_start"] == 1.0  # the first update of every tensor
    assert sum(line["dema/fallback_share"] for line in lines) / len(lines) > 0.5  # out of regime
    assert all(line["dema/fallback_share"] + line["dema/jump_share"] == 1.0 for line in lines)
    assert warned.at == [R.MIN_UPDATES]  # once, at the 8th log line (8 updates x 8 tensors = 64)
    text = warned.messages[0]
    assert "out of its regime" in text and "≥ 1" in text and "docs/regime.md" in text


@pytest.mark.slow
def test_trainer_logging_every_step_is_warned_in_its_first_lines(tmp_path, regime_warnings):
    from cl_core import DEMACallback

    model = tiny_peft_llama(r=8)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    start = [p.detach().clone() for p in lora]
    cb = DEMACallback(measure_lag=True, replace_at_end=False)
    args = training_args(tmp_path, max_steps=STEPS, learning_rate=LR, logging_strategy="steps", logging_steps=1)
    trainer = sequential_trainer_cls()(model=model, args=args, train_dataset=TokenDataset(), callbacks=[cb])
    warned = regime_warnings(lambda: trainer.state.global_step)
    trainer.train()
    assert len(cb.engine.params) == 8
    lines = [h for h in trainer.state.log_history if "loss" in h]
    _check_lines(lines, warned)
    # the whole run's regime at its end, and the EMA's lag by hand
    assert cb.regime.updates == STEPS and cb.regime.tensor_updates == 8 * STEPS and not cb.regime.in_regime
    ema = cb.engine.ema_tensors()
    num = sum(float((e - p.detach()).abs().sum()) for e, p in zip(ema, lora))
    den = sum(float((s - p.detach()).abs().sum()) for s, p in zip(start, lora))
    assert 0 < cb.regime.lag < 1 and cb.regime.lag == pytest.approx(num / den, rel=1e-6)


@pytest.mark.slow
def test_lightning_logging_every_step_is_warned_in_its_first_lines(tmp_path, regime_warnings):
    pl = pytest.importorskip("lightning.pytorch")
    from cl_core.integrations.lightning import DEMACallback

    class Collect(pl.loggers.Logger):
        name, version = "collect", 0

        def __init__(self):
            super().__init__()
            self.rows = []

        def log_hyperparams(self, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            if any(k.startswith("dema/") for k in metrics):
                self.rows.append(metrics)

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_peft_llama(r=8)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=LR)

    logger, cb = Collect(), DEMACallback(measure_lag=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=logger, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb], default_root_dir=str(tmp_path))
    warned = regime_warnings(lambda: trainer.global_step)
    loader = torch.utils.data.DataLoader(TokenDataset(), batch_size=4, shuffle=False)
    trainer.fit(Lit(), loader)
    assert len(cb.engine.params) == 8
    _check_lines(logger.rows, warned)
    assert cb.regime.updates == STEPS and 0 < cb.regime.lag < 1
