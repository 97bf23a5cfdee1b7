"""cl_core.DEMAOptimizer in a hand-written accelerate loop (CPU): gradient accumulation, an LR
scheduler, and save_state/load_state in the middle of the run."""
import pytest
import torch
from accelerate import Accelerator

from cl_core import DEMAConfig, DEMAOptimizer
from tests.helpers import TINY_LLAMA, tiny_peft_llama

VOCAB, SEQ, MICRO, ACCUM, N_MICRO = TINY_LLAMA["vocab_size"], 12, 2, 2, 16
CFG = DEMAConfig()


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=N_MICRO * MICRO, seed=1):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i]


def make():
    model = tiny_peft_llama()
    opt = DEMAOptimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2), CFG)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    loader = torch.utils.data.DataLoader(Tokens(), batch_size=MICRO, shuffle=False)
    return model, opt, sched, loader


def run(accelerator, model, opt, sched, loader):
    """The usual accelerate loop; returns how many real optimizer steps it took."""
    steps = 0
    for ids in loader:
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
        steps += accelerator.sync_gradients
    return steps


def prepared():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model, dema_opt, sched, loader = make()
    model, opt, loader, sched = accelerator.prepare(model, dema_opt, loader, sched)
    return accelerator, model, dema_opt, opt, sched, loader


def lora(model):
    return [p.detach() for n, p in model.named_parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def uninterrupted():
    accelerator, model, dema_opt, opt, sched, loader = prepared()
    steps = run(accelerator, model, opt, sched, loader)
    return steps, dema_opt, model


def test_one_update_per_real_step_and_equal_to_a_plain_loop(uninterrupted):
    steps, dema_opt, model = uninterrupted
    assert steps == N_MICRO // ACCUM
    assert dema_opt.fused                                  # AdamW on CPU: the one-pass step
    assert dema_opt.engine.num_updates == steps            # per optimizer step, not per micro-batch

    # the same loop without accelerate: the loss divided by the accumulation count, one step per 2
    ref_model, ref_opt, ref_sched, ref_loader = make()
    for i, ids in enumerate(ref_loader):
        (ref_model(input_ids=ids, labels=ids).loss / ACCUM).backward()
        if (i + 1) % ACCUM == 0:
            ref_opt.step()
            ref_sched.step()
            ref_opt.zero_grad()
    assert ref_opt.engine.num_updates == steps
    assert_same_run(dema_opt, model, ref_opt, ref_model)


def assert_same_run(opt, model, ref_opt, ref_model):
    """Bit-identical EMA, LoRA weights and learning rates."""
    for a, b in zip(opt.engine.ema_tensors(), ref_opt.engine.ema_tensors()):
        assert torch.equal(a, b)
    for a, b in zip(lora(model), lora(ref_model)):
        assert torch.equal(a, b)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]


def test_save_state_load_state_mid_run_ends_with_the_same_ema(tmp_path, uninterrupted):
    steps_full, full_opt, full_model = uninterrupted
    half = N_MICRO // 2

    accelerator, model, dema_opt, opt, sched, loader = prepared()
    first = run(accelerator, model, opt, sched, _take(loader, half))     # stopped half-way
    assert first == half // ACCUM and dema_opt.engine.num_updates == first
    accelerator.save_state(str(tmp_path / "state"))
    saved = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=False)
    assert saved["dema"]["num_updates"] == first            # the EMA travels in the optimizer state

    # a new process would rebuild everything, then load the state and skip the batches seen
    accelerator, model, dema_opt, opt, sched, loader = prepared()
    accelerator.load_state(str(tmp_path / "state"))
    assert dema_opt.engine.num_updates == first
    second = run(accelerator, model, opt, sched, accelerator.skip_first_batches(loader, half))
    assert first + second == steps_full
    assert dema_opt.engine.num_updates == steps_full
    assert_same_run(dema_opt, model, full_opt, full_model)


def _take(loader, n):
    for i, ids in enumerate(loader):
        if i == n:
            return
        yield ids
