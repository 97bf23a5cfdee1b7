"""A LLaVA-architecture model (tiny config, offline) trains with DEMACallback: LoRA on the
language model only; the vision tower stays frozen and is not averaged."""
import pytest
import torch

from cl_core import DEMACallback
from tests.dist_scripts.common import RecorderCallback, replay, sequential_trainer_cls, training_args
from tests.helpers import tiny_llama_config

IMAGE_TOKEN = 63
N_IMAGE_TOKENS = (32 // 8) ** 2
TEXT_LEN = 6


def tiny_llava(seed=0):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=tiny_llama_config(),
        image_token_id=IMAGE_TOKEN)
    return LlavaForConditionalGeneration(cfg)


class ImageTextDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(n, 3, 32, 32, generator=g)
        self.text = torch.randint(3, IMAGE_TOKEN, (n, TEXT_LEN), generator=g)

    def __len__(self):
        return len(self.text)

    def __getitem__(self, i):
        ids = torch.cat([torch.full((N_IMAGE_TOKENS,), IMAGE_TOKEN), self.text[i]])
        labels = ids.clone()
        labels[:N_IMAGE_TOKENS] = -100
        return {"input_ids": ids, "labels": labels, "pixel_values": self.pixels[i],
                "attention_mask": torch.ones_like(ids)}


@pytest.mark.slow
def test_llava_lora_trains_with_dema_vision_tower_frozen(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llava()
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    vision_before = {n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n}
    assert vision_before and not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)

    from cl_core.integrations.selection import select_dema_parameters

    cb = DEMACallback(record_alpha=True)
    rec = RecorderCallback(select_dema_parameters)
    trainer = sequential_trainer_cls()(model=model, args=training_args(tmp_path, max_steps=3,
                                                                       per_device_train_batch_size=2),
                                       train_dataset=ImageTextDataset(), callbacks=[rec.callback, cb])
    trainer.train()

    names = cb.engine.names
    assert len(names) == 2 * 2 * 2                                # 2 text layers x (q, v) x (A, B)
    assert all("language_model" in n and ".lora_" in n for n in names)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in names)
    for n, p in model.named_parameters():
        if "vision_tower" in n:
            assert torch.equal(p, vision_before[n]), n
    assert cb.engine.num_updates == 3
    # the gradients reached the LoRA tensors through the image-conditioned sequence
    assert all(g is not None and g.abs().sum() > 0 for g in rec.steps[-1][1])
    by_hand, _ = replay(cb.config, rec.steps, names=names)
    # The callback runs the one-pass fused step here (the Trainer's AdamW), equal to the
    # two-pass replay to float rounding, not bit for bit.
    assert cb.fused
    for a, b in zip(cb.engine.ema_tensors(), by_hand.ema_tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (_, p), e in zip(select_dema_parameters(model), cb.engine.ema_tensors()):
        assert torch.equal(p.detach(), e)                          # EMA replace at the end
