"""DEMAOptimizer: a drop-in torch.optim.Optimizer that adds the dynamic EMA."""
import copy
import warnings

import pytest
import torch

from cl_core import DEMA, DEMAConfig, DEMAOptimizer


def _model(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    m[0].bias.requires_grad_(False)          # frozen: not averaged
    return m


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(n)]


def _loss(m, x, y):
    return torch.nn.functional.mse_loss(m(x), y)


def _trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.AdamW(ps, lr=0.05),
    lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
], ids=["sgd", "adamw", "adamw-fused"])
def test_step_equals_inner_step_then_engine_update(make_opt):
    cfg = DEMAConfig()
    m1, m2 = _model(), _model()
    # fused=False: the generic path is bit-exact; the fused one is tested in test_fused.py
    wrapped = DEMAOptimizer(make_opt(m1.parameters()), cfg, fused=False)
    inner = make_opt(m2.parameters())
    by_hand = DEMA(_trainable(m2), cfg)
    for x, y in _batches(6):
        _loss(m1, x, y).backward()
        wrapped.step()
        wrapped.zero_grad()
        _loss(m2, x, y).backward()
        inner.step()
        by_hand.update()
        inner.zero_grad()
    assert len(wrapped.engine.params) == 3                     # the frozen bias is left out
    for a, b in zip(wrapped.engine.ema_tensors(), by_hand.ema_tensors()):
        assert torch.equal(a, b)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(wrapped.engine.stats.alpha, by_hand.stats.alpha)


def test_behaves_as_an_optimizer():
    m = _model()
    inner = torch.optim.SGD(m.parameters(), lr=0.1)
    opt = DEMAOptimizer(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.inner is inner
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    opt.param_groups[0]["lr"] = 0.3
    assert inner.param_groups[0]["lr"] == 0.3
    _loss(m, *_batches(1)[0]).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    # hooks registered on the wrapper run around its step
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    _loss(m, *_batches(1)[0]).backward()
    opt.step()
    assert seen == ["pre", "post"] and opt.engine.num_updates == 1
    assert "SGD" in repr(opt)


def test_closure_is_passed_through():
    m = _model()
    opt = DEMAOptimizer(torch.optim.LBFGS(m.parameters(), lr=0.1, max_iter=3))
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = _loss(m, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and opt.engine.num_updates == 1


def test_lr_schedulers_accept_it():
    m = _model()
    opt = DEMAOptimizer(torch.optim.SGD(m.parameters(), lr=1.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # no "scheduler.step() before optimizer.step()" warning
        for x, y in _batches(3):
            _loss(m, x, y).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(0.125)
    assert opt.engine.num_updates == 3
    # and one that reads param_groups differently
    torch.optim.lr_scheduler.OneCycleLR(DEMAOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1)),
                                        max_lr=0.1, total_steps=10)


def test_state_dict_round_trip_continues_exactly(tmp_path):
    cfg = DEMAConfig()
    batches = _batches(8)
    m_full = _model()
    opt_full = DEMAOptimizer(torch.optim.AdamW(m_full.parameters(), lr=0.05), cfg)
    for i, (x, y) in enumerate(batches):
        _loss(m_full, x, y).backward()
        opt_full.step()
        opt_full.zero_grad()
        if i == 3:
            torch.save({"model": m_full.state_dict(), "opt": opt_full.state_dict()}, tmp_path / "ck.pt")

    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert set(ck["opt"]) == {"state", "param_groups", "dema"}
    m = _model(seed=5)
    m.load_state_dict(ck["model"])
    opt = DEMAOptimizer(torch.optim.AdamW(m.parameters(), lr=0.05), cfg)
    opt.load_state_dict(ck["opt"])
    assert opt.engine.num_updates == 4
    for x, y in batches[4:]:
        _loss(m, x, y).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(opt.engine.ema_tensors(), opt_full.engine.ema_tensors()):
        assert torch.equal(a, b)
    for a, b in zip(m.parameters(), m_full.parameters()):
        assert torch.equal(a, b)


def test_load_state_dict_mismatch_is_clear_and_changes_nothing():
    m = _model()
    opt = DEMAOptimizer(torch.optim.AdamW(m.parameters(), lr=0.05))
    _loss(m, *_batches(1)[0]).backward()
    opt.step()
    sd = opt.state_dict()

    other = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    other[0].bias.requires_grad_(False)
    opt2 = DEMAOptimizer(torch.optim.AdamW(other.parameters(), lr=0.05))
    before = copy.deepcopy(opt2.inner.state_dict())
    with pytest.raises(ValueError, match=r"shape"):
        opt2.load_state_dict(sd)
    assert opt2.inner.state_dict() == before and not opt2.engine.initialized

    # a plain inner state dict (e.g. from before DEMA was added) loads the inner state only
    plain = {k: v for k, v in sd.items() if k != "dema"}
    opt3 = DEMAOptimizer(torch.optim.AdamW(_model().parameters(), lr=0.05))
    opt3.load_state_dict(plain)
    assert len(opt3.inner.state) == 3 and not opt3.engine.initialized


def test_grad_scaler_skipped_step_is_not_averaged():
    """torch.amp.GradScaler on CPU with fp16 autocast: an overflow step is neither taken nor
    averaged; the others equal the engine driven by hand."""
    cfg = DEMAConfig()
    m = _model()
    opt = DEMAOptimizer(torch.optim.AdamW(m.parameters(), lr=0.05), cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    ref = _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05)
    by_hand = DEMA(_trainable(ref), cfg)
    for i, (x, y) in enumerate(_batches(5)):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = _loss(m, x, y)
        scaler.scale(loss.float()).backward()
        if i == 2:
            m[2].weight.grad[0, 0] = float("inf")        # overflow: the scaler skips this step
        before = [p.detach().clone() for p in m.parameters()]
        ema_before = [e.clone() for e in opt.engine.ema_tensors()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
            assert all(torch.equal(a, b) for a, b in zip(ema_before, opt.engine.ema_tensors()))
            continue
        # reference: the same unscaled gradients, plain inner step + engine update
        with torch.autocast("cpu", dtype=torch.float16):
            rloss = _loss(ref, x, y)
        rloss.float().backward()
        ref_opt.step()
        by_hand.update()
        ref_opt.zero_grad()
    assert opt.engine.num_updates == 4
    assert scaler.get_scale() < 2.0 ** 10
    for a, b in zip(opt.engine.ema_tensors(), by_hand.ema_tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_trainable_parameters_is_a_clear_error():
    m = _model()
    m.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        DEMAOptimizer(torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        DEMAOptimizer(object())


def test_add_param_group_before_training_only():
    m = _model()
    opt = DEMAOptimizer(torch.optim.SGD([m[0].weight], lr=0.1))
    opt.add_param_group({"params": [m[2].weight, m[2].bias], "lr": 0.01})
    assert len(opt.engine.params) == 3 and opt.inner.param_groups[1]["lr"] == 0.01
    _loss(m, *_batches(1)[0]).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="after the first step"):
        opt.add_param_group({"params": [m[0].bias]})


@pytest.mark.slow
def test_inside_the_trainer_with_checkpoint_resume(tmp_path):
    """Trainer(optimizers=(DEMAOptimizer(...), None)): accelerate wraps it, the LR scheduler
    drives it, optimizer.pt carries the DEMA state and resuming continues exactly."""
    from tests.dist_scripts.common import TokenDataset, sequential_trainer_cls, training_args
    from tests.helpers import tiny_peft_llama

    def run(out, resume=None, lora_seed=None):
        model = tiny_peft_llama(lora_seed=lora_seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = DEMAOptimizer(torch.optim.AdamW(params, lr=5e-2))
        trainer = sequential_trainer_cls()(
            model=model, args=training_args(out, max_steps=4, save_strategy="steps", save_steps=2,
                                            lr_scheduler_type="linear"),
            train_dataset=TokenDataset(), optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return opt

    full = run(tmp_path / "full")
    assert full.engine.num_updates == 4
    sd = torch.load(tmp_path / "full" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert sd["dema"]["num_updates"] == 2
    resumed = run(tmp_path / "res", resume=str(tmp_path / "full" / "checkpoint-2"), lora_seed=5)
    assert resumed.engine.num_updates == 4
    for a, b in zip(resumed.engine.ema_tensors(), full.engine.ema_tensors()):
        assert torch.equal(a, b)


def test_replaced_param_groups_are_refused_before_anything_moves():
    # DeepSpeed ZeRO (through optimizer_cls_and_kwargs) swaps the groups' lists for its own
    # flat partitions; stepping would average tensors the engine was never built for.
    model = torch.nn.Linear(4, 3)
    opt = DEMAOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1))
    model(torch.randn(2, 4)).sum().backward()
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    flat.grad = torch.ones_like(flat)
    opt.inner.param_groups[0]["params"] = [flat]
    before = flat.detach().clone()
    with pytest.raises(RuntimeError, match="was not built"):
        opt.step()
    assert torch.equal(flat.detach(), before) and opt.engine.num_updates == 0
    flat._hp_mapping = object()  # what DeepSpeed's ZeRO-1/2 attach to the partitions they step
    with pytest.raises(RuntimeError, match="DEMACallback"):
        opt.step()


def test_scheduler_on_the_inner_optimizer_sees_the_fused_step(recwarn):
    model = torch.nn.Linear(4, 3)
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=0.5)  # built before wrapping
    opt = DEMAOptimizer(inner)
    assert opt.fused
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
