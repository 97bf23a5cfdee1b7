"""cl_core.DEMACallback in TRL's SFTTrainer: a tiny PEFT Llama built from a config, a word-level
tokenizer and a text data set made here (nothing downloaded), on CPU."""
import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

from cl_core import DEMA, DEMACallback, DEMAConfig  # noqa: E402
from cl_core.integrations.selection import select_dema_parameters  # noqa: E402
from tests.helpers import tiny_llama, tiny_peft_llama  # noqa: E402

WORDS = "red green blue small big circle square stop go one two three what is the color of answer".split()
# Continual-NExT's settings: with these tiny LoRA tensors the official scale 2 puts α above 1 (the
# fallback) at every step, so the dynamic formula would not be exercised.
CFG = DEMAConfig(scale=0.01, fallback=0.001)
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]


def tokenizer():
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    colors, shapes = ["red", "green", "blue"], ["circle", "square"]
    rows = []
    for _ in range(n):
        c, s = colors[torch.randint(3, (1,), generator=g)], shapes[torch.randint(2, (1,), generator=g)]
        rows.append({"text": f"what is the color of the {s} {c} {s} answer {c}"})
    return Dataset.from_list(rows)


class Recorder(TrainerCallback):
    """Before the DEMA callback: the LoRA tensors and the gradients each optimizer step used."""

    def __init__(self):
        self.steps = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        named = select_dema_parameters(model)
        self.steps.append(([p.detach().clone() for _, p in named], [p.grad.detach().clone() for _, p in named]))


@pytest.mark.slow
def test_sft_trainer_updates_dema_each_step_and_replaces_at_end(tmp_path):
    tok = tokenizer()
    model = tiny_peft_llama(base=tiny_llama(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    rec, dema = Recorder(), DEMACallback(CFG)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=2e-2, max_length=16, logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                         bf16=False, fp16=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset(), processing_class=tok,
                             callbacks=[rec, dema])
    trainer.train()

    assert trainer.state.global_step == 5
    assert dema.engine.num_updates == len(rec.steps) == 5        # once per optimizer step, not per micro-batch
    lora = select_dema_parameters(model)
    assert dema.engine.names == [n for n, _ in lora] and all(".lora_" in n for n in dema.engine.names)

    # the EMA equals a DEMA engine fed the same parameters and gradients by hand
    replay = [p.clone() for p in rec.steps[0][0]]
    engine, alphas = DEMA(replay, CFG), []
    for params, grads in rec.steps:
        with torch.no_grad():
            for r, p, g in zip(replay, params, grads):
                r.copy_(p)
                r.grad = g
        engine.update()
        alphas.append(engine.stats.alpha.clone())
    ema = dema.engine.ema_tensors()
    if dema.fused:
        # the callback runs the Trainer's AdamW and DEMA as one pass; it differs from the separate
        # pass by float rounding only (tests/fused/test_fused.py): 1e-5 relative here
        for a, b in zip(ema, engine.ema_tensors()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    else:
        for a, b in zip(ema, engine.ema_tensors()):
            assert torch.equal(a, b)
    # it is a real average: different from the weights the last step left, which it then replaced
    assert any(not torch.equal(e, p) for e, p in zip(ema, rec.steps[-1][0]))
    for (_, p), e in zip(lora, ema):
        assert torch.equal(p.detach(), e)
    # the dynamic α (not only the fallback) was applied at some step
    assert any(((a > 0) & (a != CFG.fallback)).any() for a in alphas[1:])
