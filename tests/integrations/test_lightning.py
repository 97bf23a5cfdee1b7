"""cl_core.integrations.lightning.DEMACallback with the real Lightning Trainer and real PEFT LoRA on a tiny Llama (CPU)."""
import importlib
import logging
import os
import re
import sys
import warnings
from functools import partial

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from peft import PeftModel  # noqa: E402

from cl_core import DEMA, DEMAConfig, DEMAOptimizer  # noqa: E402
from cl_core.integrations.lightning import DEMACallback  # noqa: E402
from cl_core.integrations.selection import adapter_named_parameters, select_dema_parameters  # noqa: E402
from tests import helpers  # noqa: E402

VOCAB, SEQ, BATCH, N_BATCHES = helpers.TINY_LLAMA["vocab_size"], 12, 4, 6
# in train mode: Lightning trains a module in the mode it is handed and warns about eval mode
tiny_llama = partial(helpers.tiny_llama, train=True)
tiny_peft_llama = partial(helpers.tiny_peft_llama, train=True)


def batches(n=N_BATCHES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(n)]


def loader(data):
    # each item is one whole batch: fixed order, nothing random in the data path
    return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)


class LitLM(pl.LightningModule):
    """A PEFT Llama trained on next-token loss; records what validation saw."""

    def __init__(self, model, optimizer="adamw", lr=5e-2, scheduler=False):
        super().__init__()
        self.model = model
        self.optimizer_kind = optimizer
        self.lr = lr
        self.scheduler = scheduler
        self.val_weights = []      # LoRA tensors as validation saw them, one list per validation run
        self.callback = None       # the DEMACallback, to read its EMA during validation
        self.test_weights = []     # LoRA tensors as test saw them, one list per test batch

    def forward(self, ids):
        return self.model(input_ids=ids, labels=ids).loss

    def training_step(self, ids, batch_idx):
        return self(ids)

    def validation_step(self, ids, batch_idx):
        if batch_idx == 0:
            lora = [p.detach().clone() for _, p in select_dema_parameters(self.model)]
            ema = [t.clone() for t in self.callback.engine.ema_tensors()] if self.callback.engine.initialized else None
            self.val_weights.append((lora, ema))
        self.log("val_loss", self(ids), batch_size=BATCH)

    def test_step(self, ids, batch_idx):
        self.test_weights.append(clone(lora_of(self)))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_kind == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        elif self.optimizer_kind == "rmsprop":
            opt = torch.optim.RMSprop(params, lr=self.lr / 10)
        elif self.optimizer_kind == "dema":
            opt = DEMAOptimizer(torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01))
        else:
            raise AssertionError(self.optimizer_kind)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(tmp_path, callbacks, **kw):
    args = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=1, deterministic=True, default_root_dir=str(tmp_path))
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


def fit(tmp_path, optimizer="adamw", cb=None, scheduler=False, val=False, seed=0, **kw):
    module = LitLM(tiny_peft_llama(seed), optimizer=optimizer, scheduler=scheduler)
    cb = cb if cb is not None else DEMACallback()
    module.callback = cb
    t = trainer(tmp_path, [cb], **kw)
    data = batches()
    t.fit(module, loader(data), loader(data[:1]) if val else None)
    return module, cb, t


def by_hand(optimizer, steps, fused, scheduler=False, config=None):
    """The plain PyTorch loop the callback must reproduce: step, then DEMA, on the same data."""
    model = tiny_peft_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.01)
    else:
        opt = torch.optim.RMSprop(params, lr=5e-3)
    if fused:
        wrapped = DEMAOptimizer(opt, config)
        assert wrapped.fused
        engine, stepper = wrapped.engine, wrapped
    else:
        engine, stepper = DEMA(select_dema_parameters(model), config), opt
    sched = torch.optim.lr_scheduler.StepLR(stepper, step_size=2, gamma=0.5) if scheduler else None
    for ids in batches()[:steps]:
        stepper.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        stepper.step()
        if not fused:
            engine.update()
        if sched is not None:
            sched.step()
    return model, engine, opt


def clone(ts):
    return [t.detach().clone() for t in ts]


def lora_of(module):
    return [p for _, p in select_dema_parameters(module.model)]


# --------------------------------------------------------------------------- paths


@pytest.mark.slow
def test_adamw_takes_the_fused_path_and_matches_a_plain_loop_with_a_scheduler(tmp_path):
    cfg = DEMAConfig(formula="paper")          # a non-default config reaches the wrapped optimizer
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        module, cb, t = fit(tmp_path, "adamw", DEMACallback(cfg, replace_at_end=False), scheduler=True)
    assert cb.fused and cb.not_fused_reason is None
    assert isinstance(t.optimizers[0], DEMAOptimizer) and t.optimizers[0].engine is cb.engine
    assert cb.engine.num_updates == N_BATCHES
    assert cb.names == [f"model.{n}" for n, _ in select_dema_parameters(module.model)]
    # the scheduler (built on the inner AdamW) still drives the learning rate, without torch's
    # "lr_scheduler.step() before optimizer.step()" warning
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(5e-2 * 0.5 ** (N_BATCHES // 2))
    assert not [w for w in seen if "lr_scheduler.step()" in str(w.message)]
    assert t.optimizers[0].engine.config == cfg
    model, engine, opt = by_hand("adamw", N_BATCHES, fused=False, scheduler=True, config=cfg)
    assert opt.param_groups[0]["lr"] == t.optimizers[0].param_groups[0]["lr"]
    # fused and two-pass differ by float rounding only (tests/fused/test_fused.py); 1e-5 relative here
    for a, b in zip(cb.engine.ema_tensors(), engine.ema_tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(lora_of(module), (p for _, p in select_dema_parameters(model))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # same maths as DEMAOptimizer in a plain loop: equal bit for bit
    _, engine_f, _ = by_hand("adamw", N_BATCHES, fused=True, scheduler=True, config=cfg)
    for a, b in zip(cb.engine.ema_tensors(), engine_f.ema_tensors()):
        assert torch.equal(a, b)
    _, engine_o, _ = by_hand("adamw", N_BATCHES, fused=True, scheduler=True)    # the official formula differs
    assert any(not torch.equal(a, b) for a, b in zip(cb.engine.ema_tensors(), engine_o.ema_tensors()))


@pytest.mark.slow
def test_other_optimizer_takes_the_two_pass_path_and_says_why(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="cl_core.integrations.attach"):
        module, cb, t = fit(tmp_path, "rmsprop", DEMACallback(replace_at_end=False))
    assert not cb.fused and "RMSprop" in cb.not_fused_reason
    assert sum("not one pass" in r.getMessage() for r in caplog.records) == 1
    assert type(t.optimizers[0]) is torch.optim.RMSprop
    assert cb.engine.num_updates == N_BATCHES
    model, engine, _ = by_hand("rmsprop", N_BATCHES, fused=False)
    for a, b in zip(cb.engine.ema_tensors(), engine.ema_tensors()):
        assert torch.equal(a, b)          # identical ops in the same order: exact
    with pytest.raises(ValueError, match="fused=True.*RMSprop"):
        fit(tmp_path, "rmsprop", DEMACallback(fused=True))


def test_a_module_dema_optimizer_is_shared_not_doubled(tmp_path):
    module, cb, t = fit(tmp_path, "dema", DEMACallback(replace_at_end=False))
    opt = t.optimizers[0]
    assert cb.engine is opt.engine and cb.fused
    assert cb.engine.num_updates == N_BATCHES       # one update per step, not two
    _, engine_f, _ = by_hand("adamw", N_BATCHES, fused=True)
    for a, b in zip(cb.engine.ema_tensors(), engine_f.ema_tensors()):
        assert torch.equal(a, b)


def test_gradient_accumulation_updates_once_per_optimizer_step(tmp_path):
    _, cb, t = fit(tmp_path, "adamw", DEMACallback(), accumulate_grad_batches=2)
    assert t.global_step == N_BATCHES // 2 and cb.engine.num_updates == N_BATCHES // 2


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
def test_a_step_the_grad_scaler_skips_is_counted_not_averaged(tmp_path, optimizer):
    from lightning.pytorch.plugins.precision import MixedPrecision

    class Overflow(LitLM):
        def training_step(self, ids, batch_idx):
            loss = self(ids)
            return loss * float("inf") if batch_idx == 2 else loss     # inf gradients at step 3

    module = Overflow(tiny_peft_llama(), optimizer=optimizer)
    cb = module.callback = DEMACallback()
    scaler = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    t = trainer(tmp_path, [cb], plugins=[scaler])
    t.fit(module, loader(batches()))
    assert cb.fused == (optimizer == "adamw")
    assert cb.engine.skipped_steps == 1 and cb.engine.num_updates == N_BATCHES - 1
    assert all(torch.isfinite(e).all() for e in cb.engine.ema_tensors())


# --------------------------------------------------------------------------- evaluation, end, export


def test_validation_sees_the_ema_and_training_the_live_weights(tmp_path):
    module, cb, t = fit(tmp_path, "adamw", DEMACallback(replace_at_end=False, eval_with_ema=True), val=True,
                        val_check_interval=3, max_epochs=1)
    assert len(module.val_weights) == 2
    for lora, ema in module.val_weights:
        for a, b in zip(lora, ema):
            assert torch.equal(a, b)       # validation ran on θ*
    live, ema = clone(lora_of(module)), clone(cb.engine.ema_tensors())
    assert any(not torch.equal(a, b) for a, b in zip(live, ema))   # the swap was undone
    # trainer.test swaps in the EMA too, and restores the live weights after
    trainer(tmp_path, [cb]).test(module, loader(batches(1)), verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(module.test_weights[0], ema))
    assert all(torch.equal(a, b) for a, b in zip(lora_of(module), live))


def test_replace_at_end(tmp_path):
    module, cb, _ = fit(tmp_path, "adamw", DEMACallback())
    ema = cb.engine.ema_tensors()
    assert all(torch.equal(p.detach(), e) for p, e in zip(lora_of(module), ema))
    module2, cb2, _ = fit(tmp_path, "adamw", DEMACallback(replace_at_end=False))
    assert any(not torch.equal(p.detach(), e) for p, e in zip(lora_of(module2), cb2.engine.ema_tensors()))


def test_export_loads_with_peft_and_equals_the_ema(tmp_path):
    module, cb, _ = fit(tmp_path, "adamw", DEMACallback(replace_at_end=False))
    out = cb.save_ema_adapter(tmp_path / "ema_adapter")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(tiny_llama(), out)
    for a, b in zip((p for _, p in adapter_named_parameters(loaded, "default", trainable_only=False)),
                    cb.engine.ema_tensors()):
        assert torch.equal(a.detach(), b)
    ids = batches(1)[0]
    with torch.no_grad(), cb.swap():
        want = module.model(input_ids=ids).logits
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- checkpoints


def _ckpt_trainer(tmp_path, cb, max_steps):
    # A checkpoint at the end of each epoch. Lightning restarts a plain DataLoader from its first
    # batch when it resumes mid-epoch (exact mid-epoch resume needs a stateful loader), so the
    # run is cut at an epoch boundary; validation every 2 steps swaps the EMA in and out.
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), every_n_epochs=1, save_top_k=-1,
                                        save_on_train_epoch_end=True, filename="{step}")
    return trainer(tmp_path, [cb, ckpt], max_steps=max_steps, max_epochs=-1, enable_checkpointing=True,
                   limit_val_batches=1, val_check_interval=2)


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
@pytest.mark.slow
def test_resume_from_ckpt_ends_with_exactly_the_same_ema(tmp_path, optimizer):
    steps = N_BATCHES + 3
    data = batches()

    def run(folder, max_steps, ckpt_path=None, cb=None):
        module = LitLM(tiny_peft_llama(), optimizer=optimizer, scheduler=True)
        cb = module.callback = cb or DEMACallback()
        t = _ckpt_trainer(folder, cb, max_steps)
        t.fit(module, loader(data), loader(data[:1]), ckpt_path=ckpt_path)
        return module, cb, t

    full, cb_full, _ = run(tmp_path / "full", steps)
    _, cb_a, _ = run(tmp_path / "cut", N_BATCHES)
    ckpt = tmp_path / "cut" / f"step={N_BATCHES}.ckpt"
    sd = torch.load(ckpt, weights_only=False)
    state = next(v for k, v in sd["callbacks"].items() if k.startswith("DEMACallback"))
    assert state["engine"]["num_updates"] == N_BATCHES
    assert all("dema" not in o for o in sd["optimizer_states"])   # one copy, in the callback entry
    resumed, cb_b, t_b = run(tmp_path / "resumed", steps, ckpt_path=str(ckpt))
    assert cb_b.resumed and t_b.global_step == steps
    assert cb_b.engine.num_updates == cb_full.engine.num_updates == steps
    assert cb_b.fused == (optimizer == "adamw")
    for a, b in zip(cb_b.engine.ema_tensors(), cb_full.engine.ema_tensors()):
        assert torch.equal(a, b)
    for a, b in zip(lora_of(resumed), lora_of(full)):   # the EMA replaced both at the end
        assert torch.equal(a, b)
    if optimizer == "adamw":
        # the one-pass run's state also resumes a two-pass run (same tensor order); the two
        # paths differ by float rounding only (tests/fused/test_fused.py), 1e-5 relative here
        _, cb_c, _ = run(tmp_path / "two_pass", steps, ckpt_path=str(ckpt), cb=DEMACallback(fused=False))
        assert cb_c.resumed and not cb_c.fused and cb_c.engine.num_updates == steps
        for a, b in zip(cb_c.engine.ema_tensors(), cb_full.engine.ema_tensors()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class StatefulBatches:
    """Fixed batches that remember how far the epoch got: Lightning keeps a loader's state_dict
    in the .ckpt, which makes a mid-epoch resume continue with the next batch."""

    def __init__(self, data):
        self.data, self.pos, self.start = data, 0, 0

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self.data)):
            self.pos = i + 1
            yield self.data[i]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.start = state["pos"] % len(self.data)


@pytest.mark.slow
def test_mid_epoch_resume_with_a_stateful_loader_is_exact(tmp_path):
    data = batches()

    def run(folder, max_steps, ckpt_path=None):
        module = LitLM(tiny_peft_llama(), scheduler=True)
        cb = module.callback = DEMACallback()
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(folder), every_n_train_steps=3, save_top_k=-1,
                                            filename="{step}")
        t = trainer(folder, [cb, ckpt], max_steps=max_steps, max_epochs=-1, enable_checkpointing=True,
                    val_check_interval=2)
        t.fit(module, StatefulBatches(data), loader(data[:1]), ckpt_path=ckpt_path)
        return cb

    full = run(tmp_path / "full", N_BATCHES + 2)
    run(tmp_path / "cut", 4)                                      # stopped after step 4; resumed from 3
    resumed = run(tmp_path / "resumed", N_BATCHES + 2, str(tmp_path / "cut" / "step=3.ckpt"))
    assert resumed.resumed and resumed.fused and resumed.engine.num_updates == N_BATCHES + 2
    for a, b in zip(resumed.engine.ema_tensors(), full.engine.ema_tensors()):
        assert torch.equal(a, b)


def test_test_from_a_ckpt_uses_its_ema(tmp_path):
    module = LitLM(tiny_peft_llama(), scheduler=False)
    cb = module.callback = DEMACallback(replace_at_end=False, eval_with_ema=True)
    t = _ckpt_trainer(tmp_path, cb, N_BATCHES)
    t.fit(module, loader(batches()), loader(batches(1)))
    ema = clone(cb.engine.ema_tensors())
    fresh = LitLM(tiny_peft_llama())
    cb2 = DEMACallback(eval_with_ema=True)
    trainer(tmp_path, [cb2]).test(fresh, loader(batches(1)), ckpt_path=str(tmp_path / f"step={N_BATCHES}.ckpt"), verbose=False)
    assert cb2.resumed and all(torch.equal(a, b) for a, b in zip(fresh.test_weights[0], ema))


def test_state_that_does_not_match_is_refused_before_training(tmp_path):
    module, cb, t = fit(tmp_path, "adamw", DEMACallback())
    sd = cb.state_dict()
    sd["names"] = sd["names"][1:] + ["model.not.there"]
    other = DEMACallback()
    other.load_state_dict(sd)
    with pytest.raises(ValueError, match="does not match the averaged tensors"):
        fit(tmp_path, "adamw", other)
    with pytest.raises(ValueError, match="not a cl_core.integrations.lightning.DEMACallback state"):
        DEMACallback().load_state_dict({"format": "something else"})


# --------------------------------------------------------------------------- logging, options, errors


def test_stats_go_to_the_loggers_on_the_logging_interval(tmp_path):
    logger = pl.loggers.CSVLogger(str(tmp_path), name="logs")
    _, cb, _ = fit(tmp_path, "adamw", DEMACallback(), logger=logger, log_every_n_steps=2)
    logger.save()
    import csv

    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("dema/alpha_mean")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    for r in rows:
        assert 0 < float(r["dema/alpha_mean"]) < 1
        assert 0 <= float(r["dema/fallback_share"]) <= 1
        assert float(r["dema/nonfinite_skips"]) == 0 and float(r["dema/skipped_steps"]) == 0
        assert float(r["dema/missing_grads"]) == 0
    assert [float(r["dema/updates"]) for r in rows] == [2, 4, 6]


@pytest.mark.slow
def test_params_option_selects_lora_or_every_trainable_parameter(tmp_path):
    _, cb, _ = fit(tmp_path, "adamw", DEMACallback(params="trainable"))
    assert cb.names and all(".lora_" in n for n in cb.names)   # only LoRA is trainable here

    class Plain(LitLM):
        def __init__(self):
            super().__init__(tiny_llama())
            for n, p in self.model.named_parameters():
                p.requires_grad_(".mlp." in n)

    module = Plain()
    cb = module.callback = DEMACallback()          # no PEFT model: every trainable parameter
    trainer(tmp_path, [cb], max_steps=2).fit(module, loader(batches()))
    assert cb.names == [f"model.{n}" for n, p in module.model.named_parameters() if ".mlp." in n]
    assert cb.fused
    # a callable picks a subset; the optimizer then updates more than is averaged: two-pass
    pick = DEMACallback(params=lambda m: [(n, p) for n, p in m.named_parameters() if "lora_A" in n])
    _, cb3, _ = fit(tmp_path, "adamw", pick)
    assert cb3.names and all("lora_A" in n for n in cb3.names) and not cb3.fused
    assert "not averaged" in cb3.not_fused_reason and cb3.engine.num_updates == N_BATCHES


@pytest.mark.parametrize("optimizer", ["adamw", "rmsprop"])
def test_no_gradient_on_the_averaged_tensors_stops_training(tmp_path, optimizer):
    class AdapterOff(LitLM):
        def __init__(self):
            super().__init__(tiny_peft_llama(), optimizer=optimizer)
            self.offset = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, ids, batch_idx):
            with self.model.disable_adapter():          # the LoRA tensors get no gradient
                return self(ids) + self.offset

        def configure_optimizers(self):                 # the LoRA tensors only (one pass for AdamW)
            lora = lora_of(self)
            return torch.optim.AdamW(lora) if optimizer == "adamw" else torch.optim.RMSprop(lora)

    module = AdapterOff()
    cb = module.callback = DEMACallback()
    with pytest.raises(RuntimeError, match="no averaged tensor has a gradient"):
        trainer(tmp_path, [cb]).fit(module, loader(batches()))
    assert cb.fused == (optimizer == "adamw")


def test_bad_arguments_raise_at_construction():
    with pytest.raises(ValueError, match="params='everything'"):
        DEMACallback(params="everything")
    with pytest.raises(TypeError, match="DEMAConfig"):
        DEMACallback(config={"scale": 2.0})
    with pytest.raises(ValueError, match="fused='yes'"):
        DEMACallback(fused="yes")


def test_import_without_lightning_says_how_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "cl_core.integrations.lightning"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    with pytest.raises(ImportError, match=re.escape('pip install ".[lightning]"')):
        importlib.import_module("cl_core.integrations.lightning")
