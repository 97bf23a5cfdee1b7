"""Training and models for the continual runner: the ``transformers.Trainer`` glue (one
Trainer run per task), the models (the tiny Llama and its tokenizer, a user's model
folder), and stage 1 (training the tiny base on a multi-task mix).

    loss = train(model, tokenizer, [(prompt, answer), ...], out_dir=..., steps=100, ...)
    tok = user_tokenizer(cfg.model)  /  tiny_tokenizer()
    model = load_base(folder, tokenizer)
    train_stage1(cfg, tokenizer, seed, base_folder, scratch, quiet=True)
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from cl_core.atomic_io import atomic_dir
from cl_core.continual.config import RunConfig
from cl_core.continual.state import write_json

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- Trainer glue

class _Dataset:
    """Examples as a map-style dataset, encoded when read (an image example's pixels are made
    per step, as LLaVA's data loader does, instead of held for every example at once)."""

    def __init__(self, examples, encode):
        self.examples = examples
        self.encode = encode

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.encode(*self.examples[i])


def _trainer_args(out_dir: Path, *, steps, batch_size, lr, warmup, seed, quiet, max_grad_norm, launch=None,
                  cuda=False):
    from transformers import TrainingArguments

    # Under a launcher (cl_core.continual.launch) each process trains its share of the batch.
    launched = {} if launch is None else launch.trainer_kwargs(batch_size)
    return TrainingArguments(
        output_dir=str(out_dir), use_cpu=not cuda, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=quiet,
        per_device_train_batch_size=launched.pop("per_device_train_batch_size", batch_size), max_steps=steps, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=warmup,
        weight_decay=0.0, seed=seed, data_seed=seed, dataloader_num_workers=0,
        remove_unused_columns=False, optim="adamw_torch", max_grad_norm=max_grad_norm, **launched,
    )


def train(model, tokenizer, examples, *, out_dir, steps, batch_size, lr, warmup, seed, quiet,
           callbacks=(), max_length, max_grad_norm: float = 1.0, launch=None, cuda: bool = False, hook=None):
    """One Trainer run over (prompt, answer) or (prompt, answer, image) examples; returns the
    mean training loss. ``tokenizer``: a tokenizer or an examples encoder
    (:mod:`cl_core.continual.encoders`; an image-text model's processor). ``max_grad_norm`` 0
    turns gradient clipping off (the Trainer skips it then). ``launch``: the processes of a
    launcher (cl_core.continual.launch), which share the batch. ``cuda``: train on the process's
    GPU (the Trainer moves the model there), else on the CPU (RunConfig.on_cuda()). ``hook``: a
    method's own loss term and batch order (:class:`cl_core.continual.baselines.Baseline`: its
    ``loss(model, inputs, outputs)`` is added to every step's loss; ``ordered``: the examples are
    read in the given order, batch after batch, instead of shuffled)."""
    from transformers import Trainer

    from cl_core.continual.encoders import as_encoder

    encoder = as_encoder(tokenizer)
    examples = [tuple(x) + (None,) * (3 - len(x)) for x in examples]

    def encode(prompt, answer, image):
        return encoder.example(prompt, answer, image, max_length)

    trainer = (Trainer if hook is None else _hooked_trainer(hook))(
        model=model, args=_trainer_args(out_dir, steps=steps, batch_size=batch_size, lr=lr,
                                        warmup=warmup, seed=seed, quiet=quiet, max_grad_norm=max_grad_norm,
                                        launch=launch, cuda=cuda),
        train_dataset=_Dataset(examples, encode), data_collator=encoder.collate, callbacks=list(callbacks),
    )
    if getattr(encoder, "loss_takes_token_count", False):
        # The loss over the whole batch's answer tokens, also when ranks share the batch (the
        # Trainer hands the model num_items_in_batch): see QwenVLEncoder.loss_takes_token_count.
        trainer.model_accepts_loss_kwargs = True
    # The Trainer prints a metrics dict at the end (PrinterCallback / ProgressCallback.on_log);
    # the runner logs its own summary instead.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, ProgressCallback):
            cb.on_log = lambda *a, **k: None
    result = trainer.train()
    if launch is None:
        return float(result.training_loss)
    launch.release(trainer)
    return launch.mean(float(result.training_loss))


def _hooked_trainer(hook):
    """A Trainer whose loss is the model's plus ``hook.loss`` (the one extension point of the
    training step: EWC's penalty, LwF's distillation, O-LoRA's orthogonality), reading the
    examples in order when ``hook.ordered`` (replay's fixed per-batch mixture)."""
    import torch
    from transformers import Trainer

    class HookedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            extra = hook.loss(model, inputs, outputs)
            if extra is not None:
                loss = loss + extra
            return (loss, outputs) if return_outputs else loss

        def _get_train_sampler(self, train_dataset=None):
            if hook.ordered:
                return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)
            return super()._get_train_sampler(train_dataset)

    return HookedTrainer


def seed_for(seed: int, *parts) -> int:
    """A deterministic 31-bit seed derived from the run seed and a label."""
    import zlib

    return zlib.crc32(f"{seed}/{'/'.join(map(str, parts))}".encode()) & 0x7FFFFFFF


class _DeepSpeedCPUNotice(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU. If you have GPU ..." notice, and only
    it. Once DeepSpeed is installed, accelerate imports it inside every Trainer (to unwrap
    the model), and the import probes for a GPU and warns when it finds none. The runner
    trains on the CPU on purpose (``use_cpu=True``), so the notice tells a user of this
    run nothing; every other DeepSpeed message still goes through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


_DS_NOTICE = _DeepSpeedCPUNotice()


def silence_deepspeed_cpu_notice() -> None:
    """Install the filter on DeepSpeed's logger ("DeepSpeed"). The logger object is created
    here when DeepSpeed is not imported yet; DeepSpeed's own set-up later fetches the same
    object, so the filter is in place when the import warns. Idempotent."""
    ds = logging.getLogger("DeepSpeed")
    if _DS_NOTICE not in ds.filters:
        ds.addFilter(_DS_NOTICE)


@contextlib.contextmanager
def quiet_libraries():
    """Silence transformers/peft info and progress chatter (saving/loading bars, notices),
    and DeepSpeed's CPU notice (silence_deepspeed_cpu_notice)."""
    import warnings

    from transformers.utils import logging as hf_logging

    silence_deepspeed_cpu_notice()

    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(peft|transformers|torch)\b.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            yield
        finally:
            hf_logging.set_verbosity(old)
            if bars:
                hf_logging.enable_progress_bar()


def dema_callback(config, params: str, precision: str = "fp32"):
    """A recording ``DEMACallback`` (α per step kept) that averages ``params``: "lora" (the
    LoRA tensors of the active adapter) or "trainable" (every trainable tensor, as the
    official code does: LoRA A/B and, in LLaVA, the trainable projector). ``precision``
    "official" (DeepSpeed ZeRO-0 bf16 only, cl_core.continual.launch) averages the bf16
    weights with a bf16 EMA as the official run does."""
    import dataclasses

    from cl_core.integrations.hf import DEMACallback

    if precision == "official":
        config = dataclasses.replace(config, ema_dtype="param")
    # the task's regime and the EMA's lag at its end (callback.regime); the runner says once per
    # method when it ran out of regime, not once per task's engine
    return DEMACallback(config, params=params, replace_at_end=True, record_alpha=True, precision=precision,
                        measure_lag=True, warn_regime=False)


# --------------------------------------------------------------------------- models

def tiny_tokenizer():
    """The bundled benchmark's word-level tokenizer."""
    from cl_core.continual import synthetic, tiny_model

    return tiny_model.build_tokenizer(tiny_model.build_vocab(synthetic.vocabulary_texts()))


def user_tokenizer(path: str):
    """The tokenizer of a user's model folder, after checking the folder is a causal LM
    with weights (ValueError otherwise)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad folder
        raise ValueError(f"--model {path}: cannot read the model config ({exc})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"--model {path}: model type {config.model_type!r} is neither a causal LM nor an "
                         "image-text-to-text model")
    check_weights_present(path)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    if not any((Path(path) / f).is_file() for f in tokenizer_files):
        raise ValueError(f"--model {path}: no tokenizer inside (none of {', '.join(tokenizer_files)}); save it "
                         "with the model: tokenizer.save_pretrained(DIR)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - transformers' messages run to pages: keep the first line
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"--model {path}: cannot load its tokenizer ({first[:200]})") from None
    return ready_tokenizer(tok, path)


def ready_tokenizer(tok, path):
    """The tokenizer of the model folder ``path``, checked and made ready to batch: refused
    (naming --model) without an end-of-sequence token; padding with it when it has no pad
    token. The one rule for text models and image-text models' processors."""
    if tok.eos_token_id is None:
        raise ValueError(f"--model {path}: the tokenizer has no end-of-sequence token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_weights_present(path) -> None:
    """ValueError naming --model when the folder holds no weights file."""
    if not any((Path(path) / f).is_file() for f in
               ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")):
        raise ValueError(f"--model {path}: no weights (model.safetensors / pytorch_model.bin) inside")


def load_base(folder: Path, tokenizer):
    """The base model of a chain (fp32), with the tokenizer's pad id for generation: a causal
    LM, or an image-text-to-text model (LLaVA-style) when the folder's config is one."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from cl_core.continual.model_folder import is_image_text_folder

    auto = AutoModelForImageTextToText if is_image_text_folder(folder) else AutoModelForCausalLM
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)   # an encoder: its tokenizer
    try:
        model, info = auto.from_pretrained(str(folder), output_loading_info=True)
    except Exception as exc:  # noqa: BLE001
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"cannot load the model from {folder}: {first[:300]}") from None
    # A config that does not match the weights leaves tensors randomly initialised, with only
    # a warning (which the runner silences): refuse instead of training a random model.
    bad = list(info.get("missing_keys") or []) + [str(k[0]) if isinstance(k, tuple) else str(k)
                                                  for k in info.get("mismatched_keys") or []]
    if bad:
        raise ValueError(f"the model in {folder} does not match its config.json: {len(bad)} weight tensors are "
                         f"missing or of another shape (first: {bad[0]}); they would be random. Check that "
                         "config.json belongs to these weights")
    model.float()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def describe_model(model, tokenizer, source: str) -> dict:
    """What the report says about the model: where it came from, its type and size."""
    c = getattr(model.config, "text_config", None) or model.config   # a multimodal model: its language model
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return {
        "source": source, "model_type": getattr(model.config, "model_type", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "hidden_size": getattr(c, "hidden_size", None), "num_layers": getattr(c, "num_hidden_layers", None),
        "vocab_size": len(tokenizer),
    }


# --------------------------------------------------------------------------- stage 1

def train_stage1(cfg: RunConfig, tokenizer, seed: int, folder: Path, scratch: Path, *, quiet: bool,
                 launch=None) -> None:
    """Train the tiny base model of ``seed`` on the stage-1 mix and save it (with the
    tokenizer and ``stage1.json``) into ``folder``, atomically. Under a launcher every process
    trains (one data-parallel training: the same model on every rank), rank 0 saves, and the
    others wait for the folder."""
    from cl_core.continual import tiny_model

    t0 = time.time()
    log.info("seed %d: stage 1, training the tiny base model (%d steps)", seed, cfg.stage1_steps)
    if getattr(tokenizer, "uses_images", False):   # the multimodal benchmark: the tiny LLaVA, all of it trained
        from cl_core.continual import images, qwen_vl

        family = cfg.model_family
        size = dict(hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                    image_size=images.IMAGE_SIZE, max_positions=max(cfg.max_length, 128), seed=seed_for(seed, "init"))
        if family == "llava":
            model = tiny_model.build_llava(tokenizer.tokenizer, patch_size=images.PATCH_SIZE, **size)
        else:   # a tiny Qwen-VL: half-size patches merged 2 x 2, the LLaVA's 16 image tokens per picture
            model = qwen_vl.build_tiny(qwen_vl.DEMO_FAMILIES[family], tokenizer.tokenizer,
                                       patch_size=images.PATCH_SIZE // 2, **size)
    else:
        model = tiny_model.build_model(len(getattr(tokenizer, "tokenizer", tokenizer)), hidden_size=cfg.hidden_size,
                                       num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                       max_positions=max(cfg.max_length, 128), seed=seed_for(seed, "init"))
    loss = None
    if cfg.stage1_steps > 0:
        loss = train(model, tokenizer, _stage1_examples(cfg.stage1_steps * cfg.stage1_batch_size, seed, tokenizer),
                     out_dir=scratch, steps=cfg.stage1_steps,
                     batch_size=cfg.stage1_batch_size, lr=cfg.stage1_lr,
                     warmup=max(1, cfg.stage1_steps // 20), seed=seed_for(seed, "stage1"),
                     quiet=quiet, max_length=cfg.max_length,
                     launch=None if launch is None else launch.for_whole_model(), cuda=cfg.on_cuda())

    def save():
        with atomic_dir(folder) as tmp:
            model.save_pretrained(str(tmp))
            getattr(tokenizer, "processor", getattr(tokenizer, "tokenizer", tokenizer)).save_pretrained(str(tmp))
            write_json(tmp / "stage1.json", {"loss": loss, "steps": cfg.stage1_steps,
                                             "seconds": round(time.time() - t0, 2)})
    if launch is None:
        save()
    else:
        launch.on_main(save)       # every rank returns once the folder is complete
    del model
    log.info("seed %d: stage 1 done in %.1f s (loss %s)", seed, time.time() - t0,
             "-" if loss is None else f"{loss:.3f}")


def stage1_score(model, tokenizer, seed: int, cfg: RunConfig) -> float:
    """Accuracy (%) of a stage-1 base on held-out stage-1 samples."""
    from cl_core.continual.evaluation import accuracy, generate

    test = _stage1_examples(100, 10_000 + seed, tokenizer)
    preds = generate(model, tokenizer, [p for p, _, _ in test], max_new_tokens=12,
                     batch_size=cfg.eval_batch_size, max_prompt_tokens=cfg.max_length,
                     images=[im for _, _, im in test])
    return accuracy("exact", preds, [a for _, a, _ in test])


def _stage1_examples(n: int, seed: int, encoder) -> list:
    """(prompt, answer, image) of ``n`` stage-1 samples of ``seed``: for an image-text encoder
    the describe-and-list mix with the scene line drawn instead of written
    (cl_core.continual.images; synthetic.stage1_samples says why that mix), else the text
    mix with its questions and no image."""
    from cl_core.continual import synthetic

    pictures = getattr(encoder, "uses_images", False)
    samples = synthetic.stage1_samples(n, seed=seed, questions=not pictures)
    if not pictures:
        return [(s.prompt, s.answer, None) for s in samples]
    from cl_core.continual.images import split_scene_prompt

    out = []
    for s in samples:
        prompt, scene = split_scene_prompt(s.prompt)
        out.append((prompt, s.answer, scene))
    return out
