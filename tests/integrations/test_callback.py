"""DEMACallback with the real transformers.Trainer and real PEFT LoRA on a tiny Llama."""
import os
import shutil

import pytest
import torch

from cl_core import DEMACallback, DEMAConfig
from cl_core.integrations.selection import select_dema_parameters
from cl_core.integrations.hf import CARRY_KEY, CHECKPOINT_ADAPTER
from tests.dist_scripts.common import RecorderCallback, TokenDataset, replay, sequential_trainer_cls, training_args
from tests.helpers import tiny_llama, tiny_peft_llama


def _train(model, out, callbacks, **kw):
    trainer = sequential_trainer_cls()(model=model, args=training_args(out, **kw), train_dataset=TokenDataset(),
                                       callbacks=callbacks)
    return trainer


@pytest.mark.slow
def test_ema_equals_engine_by_hand_with_accumulation_and_clipping(tmp_path):
    model = tiny_peft_llama()
    cb = DEMACallback(record_alpha=True, fused=False)     # the two-pass path: bit-exact with a replay
    rec = RecorderCallback(select_dema_parameters)
    max_norm = 0.05
    trainer = _train(model, tmp_path, [rec.callback, cb], max_steps=5, gradient_accumulation_steps=2,
                     max_grad_norm=max_norm, per_device_train_batch_size=2)
    trainer.train()

    # only the LoRA tensors of the adapter, in module order
    assert cb.engine.names and all(".lora_" in n and ".default." in n for n in cb.engine.names)
    assert len(cb.engine.names) == 2 * 2 * 2   # 2 layers x (q, v) x (A, B)
    assert cb.engine.num_updates == 5 and len(rec.steps) == 5
    # the EMA saw the accumulated, clipped gradient: one update per optimizer step, norm <= max_norm
    for _, grads in rec.steps:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        assert total <= max_norm * (1 + 1e-5)

    by_hand, alphas = replay(cb.config, rec.steps, names=cb.engine.names)
    for mine, ref in zip(cb.engine.ema_tensors(), by_hand.ema_tensors()):
        assert torch.equal(mine, ref)
    assert len(cb.alpha_history) == 5
    for a, b in zip(cb.alpha_history, alphas):
        assert a.dtype == torch.float32 and a.device.type == "cpu" and a.dim() == 1
        assert torch.equal(a, b)
    # the dynamic formula actually fired (not only the fallback) somewhere
    assert any(((a != cb.config.fallback) & (a > 0)).any() for a in cb.alpha_history)
    # EMA replace at the end of training
    for (_, p), e in zip(select_dema_parameters(model), cb.engine.ema_tensors()):
        assert torch.equal(p.detach(), e)


def test_replace_at_end_off_keeps_live_weights(tmp_path):
    model = tiny_peft_llama()
    cb = DEMACallback(replace_at_end=False)
    rec = RecorderCallback(select_dema_parameters)
    _train(model, tmp_path, [rec.callback, cb], max_steps=3).train()
    last_params = rec.steps[-1][0]
    for (_, p), live in zip(select_dema_parameters(model), last_params):
        assert torch.equal(p.detach(), live)
    assert any(not torch.equal(e, p) for e, p in zip(cb.engine.ema_tensors(), last_params))


def test_plain_model_averages_all_trainable_parameters(tmp_path):
    model = tiny_llama()
    for n, p in model.named_parameters():
        p.requires_grad_(".mlp." in n)
    cb = DEMACallback()
    _train(model, tmp_path, [cb], max_steps=2).train()
    want = [n for n, p in model.named_parameters() if ".mlp." in n]
    assert cb.engine.names == want


def _ema(cb):
    return [t.clone() for t in cb.engine.ema_tensors()]


@pytest.mark.slow
def test_resume_ends_with_the_same_ema(tmp_path):
    cfg = DEMAConfig()
    full_dir = tmp_path / "full"
    cb_full = DEMACallback(cfg)
    model_full = tiny_peft_llama()
    _train(model_full, full_dir, [cb_full], max_steps=6, save_strategy="steps", save_steps=3).train()
    ema_full = _ema(cb_full)
    ckpt = full_dir / "checkpoint-3"
    assert (ckpt / "dema_state.pt").is_file()             # the standalone copy (callback.load_state)
    assert not [f for f in os.listdir(ckpt) if f.startswith(".")]   # no temp files left behind
    # the state the resume uses travels in the optimizer state the Trainer writes
    opt_sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    carried = opt_sd["param_groups"][0][CARRY_KEY]
    assert carried["names"] == cb_full.engine.names and "dema" not in opt_sd
    os.remove(ckpt / "dema_state.pt")                     # not needed to resume

    # resume by path into another output dir (the path only lives inside Trainer.train)
    cb_res = DEMACallback(cfg)
    model_res = tiny_peft_llama(lora_seed=123)          # other initial weights: the checkpoint must set them
    trainer = _train(model_res, tmp_path / "res", [cb_res], max_steps=6, save_strategy="no")
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert cb_res.resumed_from == "optimizer"
    assert all(CARRY_KEY not in g for g in trainer.optimizer.param_groups)   # taken out again
    assert cb_res.engine.num_updates == 6
    for a, b in zip(_ema(cb_res), ema_full):
        assert torch.equal(a, b)
    for (_, p), (_, q) in zip(select_dema_parameters(model_res), select_dema_parameters(model_full)):
        assert torch.equal(p, q)                  # both ended with the EMA replace

    # resume_from_checkpoint=True: the last checkpoint of output_dir
    last_dir = tmp_path / "last"
    last_dir.mkdir()
    shutil.copytree(ckpt, last_dir / "checkpoint-3")
    cb_last = DEMACallback(cfg)
    _train(tiny_peft_llama(lora_seed=7), last_dir, [cb_last], max_steps=6).train(resume_from_checkpoint=True)
    for a, b in zip(_ema(cb_last), ema_full):
        assert torch.equal(a, b)


def _lora_count(model):
    return sum(1 for n, _ in model.named_parameters() if ".lora_" in n)


def test_resume_keeps_exactly_the_models_adapters(tmp_path):
    """DEMACallback() (save_adapter=True, the default) writes the EMA adapter into every
    checkpoint; resuming from one must leave the model with exactly the adapters it had (names
    and LoRA tensors) and continue as the uninterrupted run. The Trainer's resume loads every
    direct subfolder of the checkpoint holding adapter weights as a model adapter (transformers
    < 5.23: and then never restores the live one; >= 5.23: adds a second one), so the EMA adapter
    sits one level deeper. The same checkpoint with the adapter moved up shows what the test catches."""
    from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME

    cb_full = DEMACallback()
    model_full = tiny_peft_llama()
    _train(model_full, tmp_path / "full", [cb_full], max_steps=4, save_strategy="steps", save_steps=2).train()
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / CHECKPOINT_ADAPTER / ADAPTER_SAFE_WEIGHTS_NAME).is_file()
    scanned = [d for d in os.listdir(ckpt) if os.path.isfile(ckpt / d / ADAPTER_SAFE_WEIGHTS_NAME)]
    assert scanned == []                              # nothing at the depth the resume scans

    model = tiny_peft_llama(lora_seed=9)
    before = (list(model.peft_config), _lora_count(model))
    cb = DEMACallback()
    _train(model, tmp_path / "res", [cb], max_steps=4).train(resume_from_checkpoint=str(ckpt))
    assert (list(model.peft_config), _lora_count(model)) == before == (["default"], 8)
    for a, b in zip(_ema(cb), _ema(cb_full)):
        assert torch.equal(a, b)
    for (_, p), (_, q) in zip(select_dema_parameters(model), select_dema_parameters(model_full)):
        assert torch.equal(p, q)

    # control: the adapter where it used to be (checkpoint-2/ema_adapter/) is taken for a model adapter
    old = tmp_path / "old" / "checkpoint-2"
    shutil.copytree(ckpt, old)
    shutil.move(str(old / CHECKPOINT_ADAPTER), str(old / "ema_adapter"))
    model_old = tiny_peft_llama(lora_seed=9)
    _train(model_old, tmp_path / "res_old", [DEMACallback(save_adapter=False)], max_steps=3).train(
        resume_from_checkpoint=str(old))
    assert (list(model_old.peft_config), _lora_count(model_old)) != before


def test_final_export_loads_with_peft_and_is_the_ema(tmp_path):
    """After training (EMA replace), trainer.save_model(output_dir) is the standard PEFT export of
    the EMA: PeftModel.from_pretrained loads it with exactly one adapter, equal to the EMA."""
    from peft import PeftModel

    cb = DEMACallback()
    trainer = _train(tiny_peft_llama(), tmp_path / "out", [cb], max_steps=3, save_strategy="steps", save_steps=3)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out"))
    assert list(loaded.peft_config) == ["default"]
    got = dict(loaded.named_parameters())
    for name, e in zip(cb.engine.names, _ema(cb)):
        assert torch.equal(got[name], e), name


def _carry_other_state(ckpt, other):
    """Put the DEMA state of another run into the checkpoint's optimizer state."""
    path = ckpt / "optimizer.pt"
    sd = torch.load(path, weights_only=True)
    sd["param_groups"][0][CARRY_KEY] = other.state_dict()
    torch.save(sd, path)


@pytest.mark.slow
def test_resume_with_mismatched_dema_state_fails_clearly(tmp_path):
    run = tmp_path / "run"
    _train(tiny_peft_llama(), run, [DEMACallback()], max_steps=2, save_strategy="steps", save_steps=2).train()
    ckpt = run / "checkpoint-2"
    # the DEMA state of a model with another LoRA rank
    other = DEMACallback()
    _train(tiny_peft_llama(r=2), tmp_path / "other", [other], max_steps=1).train()
    _carry_other_state(ckpt, other)
    cb = DEMACallback()
    trainer = _train(tiny_peft_llama(), tmp_path / "res", [cb], max_steps=3)
    with pytest.raises(ValueError, match=r"resumed optimizer state \(step 2.*does not match.*lora_A"):
        trainer.train(resume_from_checkpoint=str(ckpt))

    # a state saved for other tensors (q only vs q and v)
    other = DEMACallback()
    _train(tiny_peft_llama(target_modules=["q_proj"]), tmp_path / "other2", [other], max_steps=1).train()
    _carry_other_state(ckpt, other)
    trainer = _train(tiny_peft_llama(), tmp_path / "res2", [DEMACallback()], max_steps=3)
    with pytest.raises(ValueError, match=r"does not match the model's trainable tensors.*v_proj"):
        trainer.train(resume_from_checkpoint=str(ckpt))


@pytest.mark.slow
def test_resume_without_dema_state_warns(tmp_path, caplog):
    run = tmp_path / "run"
    _train(tiny_peft_llama(), run, [], max_steps=2, save_strategy="steps", save_steps=2).train()
    cb = DEMACallback()
    with caplog.at_level("WARNING", logger="cl_core.integrations.hf"):
        _train(tiny_peft_llama(), tmp_path / "res", [cb], max_steps=3).train(
            resume_from_checkpoint=str(run / "checkpoint-2"))
    assert "carries no DEMA state" in caplog.text
    assert cb.engine.num_updates == 1 and cb.resumed_from is None


@pytest.mark.slow
def test_resume_from_save_only_model_names_the_state_file(tmp_path, caplog):
    """save_only_model=True: no optimizer state, but checkpoint-2/dema_state.pt exists; the
    warning names it and says how to use it (issue 27, case 10)."""
    run = tmp_path / "run"
    _train(tiny_peft_llama(), run, [DEMACallback()], max_steps=2, save_strategy="steps", save_steps=2,
           save_only_model=True).train()
    state_file = run / "checkpoint-2" / "dema_state.pt"
    assert state_file.is_file()
    with caplog.at_level("WARNING", logger="cl_core.integrations.hf"):
        _train(tiny_peft_llama(), run, [DEMACallback()], max_steps=3, save_only_model=True).train(
            resume_from_checkpoint=True)  # the latest checkpoint of output_dir
    assert str(state_file) in caplog.text and "callback.load_state(" in caplog.text, caplog.text


def test_no_trainable_parameters_is_a_clear_error(tmp_path):
    from transformers import TrainerControl, TrainerState

    args = training_args(tmp_path)
    frozen = tiny_llama()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        DEMACallback().on_train_begin(args, TrainerState(), TrainerControl(), model=frozen)

    # a PEFT model whose active adapter is frozen (but something else trains)
    pm = tiny_peft_llama()
    for n, p in pm.named_parameters():
        p.requires_grad_("lm_head" in n)
    with pytest.raises(ValueError, match=r"no trainable adapter parameters.*\['default'\]"):
        DEMACallback().on_train_begin(args, TrainerState(), TrainerControl(), model=pm)


def test_callback_without_optimizer_step_is_a_clear_error(tmp_path):
    from transformers import TrainerControl, TrainerState

    args, state, control = training_args(tmp_path), TrainerState(), TrainerControl()
    cb = DEMACallback()
    with pytest.raises(RuntimeError, match="before on_train_begin"):
        cb.on_optimizer_step(args, state, control)
    cb.on_train_begin(args, state, control, model=tiny_peft_llama())
    with pytest.raises(RuntimeError, match="without on_optimizer_step"):
        cb.on_step_end(args, state, control)


class _SkippingOptimizer:
    step_was_skipped = True


def test_skipped_step_is_counted_not_averaged(tmp_path):
    from transformers import TrainerControl, TrainerState

    args, state, control = training_args(tmp_path), TrainerState(), TrainerControl()
    model = tiny_peft_llama()
    cb = DEMACallback(record_alpha=True)
    cb.on_train_begin(args, state, control, model=model)
    named = select_dema_parameters(model)
    for _, p in named:
        p.grad = torch.ones_like(p)
    cb.on_optimizer_step(args, state, control, optimizer=object())
    cb.on_step_end(args, state, control)
    before = _ema(cb)
    with torch.no_grad():
        for _, p in named:
            p.add_(1.0)
    cb.on_optimizer_step(args, state, control, optimizer=_SkippingOptimizer())
    cb.on_step_end(args, state, control)
    assert cb.engine.stats.skipped_steps == 1 and cb.engine.num_updates == 1
    for a, b in zip(_ema(cb), before):
        assert torch.equal(a, b)
    assert torch.equal(cb.alpha_history[-1], torch.zeros(len(named)))


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
@pytest.mark.slow
def test_overflow_step_skipped_by_accelerate_scaler_is_not_averaged(tmp_path, optim):
    """The real accelerate path: the AcceleratedOptimizer steps through a GradScaler; an inf
    gradient makes the step be skipped and the callback counts it without averaging.
    adamw_torch: the scaler does not call step, accelerate reports step_was_skipped.
    adamw_torch_fused (the Trainer's default): the optimizer skips inside its fused step,
    accelerate reports nothing, the callback sees the scaler back off.
    (accelerate makes no GradScaler for fp16 on CPU, so the test hands it torch's CPU
    GradScaler, which accelerate then uses as it would on a GPU.)"""
    model = tiny_peft_llama()
    calls = []

    def poison_second_backward(grad):      # an overflow in the 2nd backward, before unscaling
        calls.append(1)
        if len(calls) == 2:
            grad = grad.clone()
            grad[0, 0] = float("inf")
        return grad

    select_dema_parameters(model)[0][1].register_hook(poison_second_backward)
    cb = DEMACallback(record_alpha=True, fused=False)
    rec = RecorderCallback(select_dema_parameters)
    trainer = _train(model, tmp_path, [rec.callback, cb], max_steps=3, max_grad_norm=0.0, optim=optim)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    trainer.train()
    assert rec.skipped == ([False, True, False] if optim == "adamw_torch" else [False] * 3)
    assert torch.isfinite(rec.steps[2][0][0]).all()      # the overflow step did not reach the weights
    assert cb.engine.stats.skipped_steps == 1 and cb.engine.num_updates == 2
    by_hand, _ = replay(cb.config, rec.steps, names=cb.engine.names, skipped=[False, True, False])
    for a, b in zip(cb.engine.ema_tensors(), by_hand.ema_tensors()):
        assert torch.equal(a, b)
    assert torch.equal(cb.alpha_history[1], torch.zeros(len(cb.engine.names)))


def test_first_step_without_any_gradient_refuses_to_run(tmp_path):
    """An engine that hides gradients from callbacks (as DeepSpeed did before it was supported)
    must not turn DEMA into a fixed EMA at the fallback α: the first step raises."""
    from transformers import TrainerControl, TrainerState

    args, state, control = training_args(tmp_path), TrainerState(), TrainerControl()
    cb = DEMACallback()
    cb.on_train_begin(args, state, control, model=tiny_peft_llama())
    with pytest.raises(RuntimeError, match=r"no averaged tensor has a gradient.*DeepSpeed ZeRO 0-3"):
        cb.on_optimizer_step(args, state, control, optimizer=object())
    assert cb.engine.num_updates == 0


@pytest.mark.slow
def test_params_trainable_averages_every_trainable_tensor(tmp_path):
    model = tiny_peft_llama()
    head = model.base_model.model.lm_head.weight
    head.requires_grad_(True)                        # e.g. LLaVA's projector, trained beside the LoRA
    cb = DEMACallback(params="trainable")
    _train(model, tmp_path, [cb], max_steps=2).train()
    want = [n for n, p in model.named_parameters() if p.requires_grad]
    assert cb.engine.names == want and any("lm_head" in n for n in want)
    assert any(".lora_" in n for n in want)
    lora_only = DEMACallback()
    _train(tiny_peft_llama(), tmp_path / "lora", [lora_only], max_steps=1).train()
    assert all(".lora_" in n for n in lora_only.engine.names)
    with pytest.raises(ValueError, match="params='all'.*'lora'.*'trainable'"):
        DEMACallback(params="all")


@pytest.mark.slow
def test_one_pass_in_the_trainer_equals_two_passes_with_scheduler_and_clipping(tmp_path):
    """callbacks=[DEMACallback()] with the Trainer's default optimizer (fused torch AdamW) runs the
    one-pass optimizer+DEMA step inside the Trainer's optimizer. The LR schedule (cosine with
    warm-up) and the gradient clipping still act: the trajectory equals the plain two-pass run.
    Tolerance: the fused kernel sums in another order than torch (1e-5 relative, 1e-6 absolute)."""
    kw = dict(max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=2, max_grad_norm=0.05,
              lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.01, save_strategy="steps", save_steps=3)
    one = DEMACallback(record_alpha=True)
    m1 = tiny_peft_llama()
    t1 = _train(m1, tmp_path / "one", [one], **kw)
    t1.train()
    assert one.fused and one.not_fused_reason is None
    assert type(t1.optimizer.optimizer).__name__ == "DEMAOptimizer" and t1.optimizer.optimizer.engine is one.engine
    two = DEMACallback(record_alpha=True, fused=False)
    m2 = tiny_peft_llama()
    _train(m2, tmp_path / "two", [two], **kw).train()
    assert not two.fused and two.not_fused_reason == "fused=False"
    assert one.engine.names == two.engine.names and one.engine.num_updates == two.engine.num_updates == 6
    for a, b in zip(one.alpha_history, two.alpha_history):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(((a != one.config.fallback) & (a > 0)).any() for a in one.alpha_history)
    for a, b in zip(_ema(one), _ema(two)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (_, p), (_, q) in zip(select_dema_parameters(m1), select_dema_parameters(m2)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)      # the same training (schedule, clipping)
    # the Trainer's optimizer.pt carries the DEMA state (once: not also the wrapper's own "dema"
    # entry), and checkpoint-*/cl_core/ema_adapter/ is the EMA then
    ckpt = tmp_path / "one" / "checkpoint-3"
    opt_sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert CARRY_KEY in opt_sd["param_groups"][0] and "dema" not in opt_sd
    assert sorted(os.listdir(ckpt / CHECKPOINT_ADAPTER)) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("route", ["one_pass", "two_pass", "user_optimizer"])
@pytest.mark.slow
def test_resume_through_the_optimizer_state_is_exact(tmp_path, route):
    """Whichever optimizer runs (the callback's one-pass wrapper, the Trainer's plain AdamW
    with a separate DEMA pass, or the user's own DEMAOptimizer), the DEMA state rides in the
    optimizer state the Trainer saves, and a resumed run ends bit-identical."""
    from cl_core import DEMAOptimizer

    def run(out, resume=None, lora_seed=None):
        model = tiny_peft_llama(lora_seed=lora_seed)
        cb = DEMACallback(fused=route != "two_pass", record_alpha=True)
        kw = {}
        if route == "user_optimizer":
            kw["optimizers"] = (DEMAOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                                                lr=5e-2)), None)
        trainer = sequential_trainer_cls()(model=model, args=training_args(out, max_steps=4, save_strategy="steps",
                                                                           save_steps=2, lr_scheduler_type="linear"),
                                           train_dataset=TokenDataset(), callbacks=[cb], **kw)
        trainer.train(resume_from_checkpoint=resume)
        return cb

    full = run(tmp_path / "full")
    assert full.fused == (route != "two_pass")
    # a DEMAOptimizer outside any Trainer loads what the Trainer wrote, whichever entry holds it
    opt_sd = torch.load(tmp_path / "full" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert CARRY_KEY in opt_sd["param_groups"][0] and ("dema" in opt_sd) == (route == "user_optimizer")
    lora = [p for p in tiny_peft_llama().parameters() if p.requires_grad]
    groups = [{"params": lora if i == 0 else []} for i in range(len(opt_sd["param_groups"]))]  # as saved
    fresh = DEMAOptimizer(torch.optim.AdamW(groups, lr=5e-2))
    fresh.load_state_dict(opt_sd)
    assert fresh.engine.num_updates == 2 and CARRY_KEY not in fresh.param_groups[0]
    res = run(tmp_path / "res", resume=str(tmp_path / "full" / "checkpoint-2"), lora_seed=5)
    assert res.resumed_from == "optimizer" and res.engine.num_updates == 4
    for a, b in zip(_ema(res), _ema(full)):
        assert torch.equal(a, b)
    assert len(res.alpha_history) == 4           # the recorded α of the first two steps came along
    for a, b in zip(res.alpha_history, full.alpha_history):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_checkpoint_ema_adapter_loads_and_resume_of_one_pass_is_exact(tmp_path):
    from peft import PeftModel

    cb = DEMACallback()
    _train(tiny_peft_llama(), tmp_path / "run", [cb], max_steps=4, save_strategy="steps", save_steps=2,
           lr_scheduler_type="cosine").train()
    ema_full = _ema(cb)
    res = DEMACallback()
    _train(tiny_peft_llama(lora_seed=5), tmp_path / "res", [res], max_steps=4, lr_scheduler_type="cosine").train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert res.fused and res.engine.num_updates == 4
    for a, b in zip(_ema(res), ema_full):
        assert torch.equal(a, b)
    # the adapter of checkpoint-4 is the EMA at step 4: PEFT loads it unchanged
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "run" / "checkpoint-4" / CHECKPOINT_ADAPTER))
    got = dict(loaded.named_parameters())
    for name, e in zip(cb.engine.names, ema_full):
        assert torch.equal(got[name], e), name


@pytest.mark.slow
def test_not_one_pass_says_why(tmp_path, caplog):
    model = tiny_peft_llama()
    model.base_model.model.lm_head.weight.requires_grad_(True)     # trained but not averaged
    cb = DEMACallback()
    with caplog.at_level("INFO", logger="cl_core.integrations.attach"):
        _train(model, tmp_path, [cb], max_steps=1).train()
    assert not cb.fused and "not averaged" in cb.not_fused_reason and "not one pass" in caplog.text
    with pytest.raises(ValueError, match="fused=True.*not averaged"):
        _train(model, tmp_path / "f", [DEMACallback(fused=True)], max_steps=1).train()
    every = DEMACallback(params="trainable")                       # averages the head too: one pass
    _train(model, tmp_path / "t", [every], max_steps=1).train()
    assert every.fused


@pytest.mark.slow
def test_eval_with_ema_evaluates_on_the_ema_during_and_after_training(tmp_path):
    from transformers import TrainerCallback

    seen = []

    class AtEvaluate(TrainerCallback):                 # before the DEMACallback: EMA still swapped in
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            live = [p.detach().clone() for _, p in select_dema_parameters(model)]
            seen.append(all(torch.equal(a, b) for a, b in zip(live, cb.engine.ema_tensors())))

    cb = DEMACallback(eval_with_ema=True, replace_at_end=False)
    model = tiny_peft_llama()
    trainer = sequential_trainer_cls()(
        model=model, args=training_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2),
        train_dataset=TokenDataset(), eval_dataset=TokenDataset(n=8, seed=1), callbacks=[AtEvaluate(), cb])
    trainer.train()
    assert seen == [True, True]                       # both evaluations during training ran on the EMA
    live = [p.detach().clone() for _, p in select_dema_parameters(model)]
    assert any(not torch.equal(a, b) for a, b in zip(live, cb.engine.ema_tensors()))
    on_ema = trainer.evaluate()["eval_loss"]
    assert seen[-1] and all(torch.equal(a, p) for a, (_, p) in zip(live, select_dema_parameters(model)))
    cb.eval_with_ema = False
    on_live = trainer.evaluate()["eval_loss"]
    with cb.swap():
        by_hand = trainer.evaluate()["eval_loss"]
    assert on_ema == by_hand and on_live != on_ema


@pytest.mark.slow
def test_dema_numbers_go_into_the_trainer_logs(tmp_path):
    from transformers import TrainerCallback

    sent = []

    class Backend(TrainerCallback):                   # a report_to backend listed after the callback
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                sent.append(dict(logs))

    cb = DEMACallback(record_alpha=True, fused=False)
    trainer = _train(tiny_peft_llama(), tmp_path, [cb, Backend()], max_steps=4, logging_strategy="steps",
                     logging_steps=2)
    trainer.train()
    lines = [h for h in trainer.state.log_history if "loss" in h]
    assert len(lines) == 2 and [s["dema/alpha_mean"] for s in sent] == [h["dema/alpha_mean"] for h in lines]
    for k, line in enumerate(lines):
        window = torch.stack(cb.alpha_history[2 * k:2 * k + 2])
        assert line["dema/alpha_mean"] == pytest.approx(float(window.mean()), rel=1e-6)
        assert line["dema/fallback_share"] == pytest.approx(float((window == cb.config.fallback).float().mean()))
        assert line["dema/nonfinite_skips"] == 0 and line["dema/missing_grads"] == 0
        assert line["dema/skipped_steps"] == 0
    assert 0 < lines[1]["dema/fallback_share"] < 1


def _tensorboard_scalars(folder) -> dict:
    """{tag: [(step, value)]} from the TensorBoard event files under ``folder`` (TFRecord
    framing: length u64, its crc u32, the Event bytes, their crc u32)."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True):
        data, pos = open(path, "rb").read(), 0
        while pos < len(data):
            n = struct.unpack("<Q", data[pos:pos + 8])[0]
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.mark.slow
def test_dema_numbers_reach_a_report_to_backend(tmp_path):
    """report_to=["tensorboard"] (the real TensorBoardCallback, writing through tensorboardX):
    transformers lists it before the user's callbacks, so the callback moves itself before it
    and the backend writes the same DEMA numbers as log_history."""
    pytest.importorskip("tensorboardX")
    from transformers.integrations import TensorBoardCallback

    cb = DEMACallback(fused=False)
    trainer = _train(tiny_peft_llama(), tmp_path / "out", [cb], max_steps=4, logging_strategy="steps",
                     logging_steps=2, report_to=["tensorboard"])
    order = [type(c) for c in trainer.callback_handler.callbacks]
    assert order.index(DEMACallback) < order.index(TensorBoardCallback)
    trainer.train()
    lines = [h for h in trainer.state.log_history if "loss" in h]
    written = _tensorboard_scalars(str(tmp_path / "out"))        # the event files under out/runs/
    for key in ("dema/alpha_mean", "dema/fallback_share", "dema/nonfinite_skips", "dema/skipped_steps"):
        assert [step for step, _ in written["train/" + key]] == [2, 4]
        for (_, value), line in zip(written["train/" + key], lines):
            assert value == pytest.approx(line[key], rel=1e-6)
    assert 0 < written["train/dema/alpha_mean"][0][1] < 1


@pytest.mark.slow
def test_user_dema_optimizer_and_callback_share_one_engine(tmp_path):
    from cl_core import DEMAOptimizer

    model = tiny_peft_llama()
    lora = [p for _, p in select_dema_parameters(model)]
    opt = DEMAOptimizer(torch.optim.AdamW(lora, lr=5e-2, weight_decay=0.0))
    cb = DEMACallback(record_alpha=True)
    trainer = sequential_trainer_cls()(model=model, args=training_args(tmp_path, max_steps=3),
                                       train_dataset=TokenDataset(), callbacks=[cb], optimizers=(opt, None))
    trainer.train()
    assert cb.engine is opt.engine and cb.fused == opt.fused
    assert opt.engine.num_updates == 3 and len(cb.alpha_history) == 3     # one update per step, not two
    assert cb.engine.names == [n for n, _ in select_dema_parameters(model)]
