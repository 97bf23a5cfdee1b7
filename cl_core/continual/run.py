"""The continual runner: LoRA-tune a causal LM on tasks in order, evaluate every task after
each one, with plain LoRA, fixed-β EMA, DEMA, or DEMA with instruction grouping.

    from cl_core.continual.run import RunConfig, run
    results = run(RunConfig(methods=("lora", "dema"), seeds=(0, 1)), "runs/x")

Methods (DESIGN.md §2, last paragraph; as in the official code every task is its own
training run, the EMA starts lazily at the task's first optimizer step and replaces the
weights at the task's end):

    lora        plain sequential LoRA fine-tuning, one LoRA set, no EMA
    ema         one LoRA set, fixed-β EMA (DEMAConfig(formula="fixed", beta=0.99)) from task 2
    dema        one LoRA set, dynamic EMA from task 2 (nothing to protect on the first)
    dema+group  instruction grouping: a task that continues a group's LoRA set gets DEMA, a
                task that opens a new set does not; at evaluation each test instance is routed
                to a group by its instruction and answered by that group's adapter

Every method sees the same seeds, data, steps and learning rate. Stage 2 uses the real
``transformers.Trainer`` (and ``cl_core.DEMACallback``); with the bundled benchmark a tiny
Llama is first trained on a multi-task mix (stage 1), once per seed, cached in the run
folder, so all methods start from the identical base.

Run folder::

    config.json                    the run's settings (a resumed run must match them)
    state.json                     finished (method, seed, task) units with their results,
                                   written atomically after every task
    base/seed<s>/                  stage-1 base model + tokenizer (bundled benchmark)
    chains/<method>/seed<s>/task<j>/   the adapters after task j (only the latest is kept;
                                   after the last task these are the final adapters), with
                                   grouper.json for dema+group
    chains/<method>/seed<s>/alpha_task<j>.json   per-step, per-tensor α of task j
    results.json, report.md, *.png written at the end (cl_core.continual.report)

Running again with the same folder resumes from the last finished task of every chain.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cl_core import metrics as cl_metrics
from cl_core.atomic_io import atomic_dir, write_json_atomic

log = logging.getLogger("cl_core.continual.run")

METHODS = ("lora", "ema", "dema", "dema+group")
ORDERS = ("origin", "reverse", "alphabet")
STATE_FORMAT = "cl_core.runner.state"  # the on-disk tag, kept from before the move
STATE_VERSION = 1


# --------------------------------------------------------------------------- config

@dataclass
class RunConfig:
    """Settings of a continual run. Everything here is part of the run's identity: a
    folder is only resumed with an equal config."""

    methods: tuple = METHODS
    seeds: tuple = (0,)
    # Data: the bundled benchmark (cl_core.continual.synthetic) unless task_files is given.
    tasks: Optional[tuple] = None          # bundled task names, in order (None: the order preset)
    order: str = "origin"                  # origin | reverse | alphabet (CoIN's presets)
    variant: str = "original"              # instruction templates: original | diverse | 10type
    n_train: int = 1600                    # bundled: training samples per task
    n_test: int = 100                      # bundled: test samples per task
    task_files: tuple = ()                 # your own tasks: LLaVA/CoIN or instruction JSON/JSONL
    test_files: tuple = ()                 # optional test files, one per task file
    task_types: tuple = ()                 # optional scoring rule per task file (else inferred)
    test_fraction: float = 0.1             # held out of each task file when no test files
    max_test: int = 500                    # at most this many held-out test samples per task
    skip_bad: bool = False                 # skip malformed records instead of failing
    # Model: a local causal-LM folder, or (None) the tiny Llama trained in stage 1.
    model: Optional[str] = None
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    stage1_steps: int = 1200
    stage1_batch_size: int = 32
    stage1_lr: float = 3e-3
    # Stage 2 (per task): the same for every method.
    steps: int = 100
    batch_size: int = 16
    lr: float = 5e-3
    warmup_steps: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: str = "all-linear"
    max_length: int = 256
    max_new_tokens: Optional[int] = None   # None: from the longest test answer (+2)
    eval_batch_size: int = 128
    # EMA settings.
    ema_beta: float = 0.99
    dema_formula: str = "official"
    dema_scale: float = 2.0
    dema_fallback: float = 0.01
    group_threshold: Optional[float] = None  # None: the official 0.9 (original) / 0.3 (diverse, 10type)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown run settings {sorted(unknown)}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)

    @property
    def bundled(self) -> bool:
        return not self.task_files

    def threshold(self) -> float:
        if self.group_threshold is not None:
            return float(self.group_threshold)
        from cl_core.continual.templates import THRESHOLDS

        return THRESHOLDS.get(self.variant, 0.9) if self.bundled else 0.9


def method_slug(method: str) -> str:
    return method.replace("+", "_")


# --------------------------------------------------------------------------- tasks

@dataclass
class Task:
    """One task of the sequence: name, scoring rule, train/test (prompt, answer, instruction)."""

    name: str
    task_type: str
    train: list        # list of (prompt, answer, instruction)
    test: list
    templates: list = field(default_factory=list)


def _check_positive(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError(f"{name}={value!r} must be a number >= {minimum}")


def validate_config(cfg: RunConfig) -> None:
    """Raise ValueError for settings that cannot work (before anything is trained)."""
    from cl_core.config import DEMAConfig
    from cl_core.continual.evaluation import check_task_type

    methods = list(cfg.methods)
    if not methods:
        raise ValueError("no methods given")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods listed twice: {methods}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"seeds must be distinct and at least one: {list(cfg.seeds)}")
    for s in cfg.seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"seed {s!r} must be an int >= 0")
    if cfg.order not in ORDERS:
        raise ValueError(f"unknown task order {cfg.order!r}; allowed: {', '.join(ORDERS)}")
    from cl_core.continual.templates import TEMPLATE_SETS

    if cfg.variant not in TEMPLATE_SETS:
        raise ValueError(f"unknown instruction variant {cfg.variant!r}; allowed: {', '.join(TEMPLATE_SETS)}")
    for name in ("n_train", "n_test", "steps", "batch_size", "lora_r", "lora_alpha", "max_length",
                 "eval_batch_size", "stage1_batch_size", "hidden_size", "num_layers", "num_heads", "max_test"):
        _check_positive(name, getattr(cfg, name))
    _check_positive("stage1_steps", cfg.stage1_steps, 0)
    _check_positive("warmup_steps", cfg.warmup_steps, 0)
    if cfg.max_new_tokens is not None:
        _check_positive("max_new_tokens", cfg.max_new_tokens)
    for name in ("lr", "stage1_lr"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name}={v!r} must be a positive number")
    if not 0 < cfg.test_fraction < 1:
        raise ValueError(f"test_fraction={cfg.test_fraction!r} must be in (0, 1)")
    # EMA settings go through DEMAConfig's own validation.
    DEMAConfig(formula="fixed", beta=cfg.ema_beta)
    DEMAConfig(formula=cfg.dema_formula, scale=cfg.dema_scale, fallback=cfg.dema_fallback)
    if cfg.group_threshold is not None and not 0 <= cfg.group_threshold <= 1:
        raise ValueError(f"group_threshold={cfg.group_threshold!r} must be in [0, 1]")
    if cfg.bundled:
        if cfg.test_files or cfg.task_types:
            raise ValueError("test files and task types go with task files (--tasks FILE ...)")
        if cfg.tasks is not None:
            from cl_core.continual.synthetic import TASK_NAMES

            if not cfg.tasks:
                raise ValueError("the task list is empty")
            for t in cfg.tasks:
                if t not in TASK_NAMES:
                    raise ValueError(f"unknown bundled task {t!r}; the bundled tasks are: {', '.join(TASK_NAMES)}")
            if len(set(cfg.tasks)) != len(cfg.tasks):
                raise ValueError(f"a task is listed twice: {list(cfg.tasks)}")
    else:
        if cfg.test_files and len(cfg.test_files) != len(cfg.task_files):
            raise ValueError(f"{len(cfg.test_files)} test files for {len(cfg.task_files)} task files; "
                             "give one test file per task file, or none")
        if cfg.task_types:
            if len(cfg.task_types) != len(cfg.task_files):
                raise ValueError(f"{len(cfg.task_types)} task types for {len(cfg.task_files)} task files")
            for t in cfg.task_types:
                check_task_type(t)
        if cfg.tasks is not None:
            raise ValueError("bundled task names and task files cannot be mixed")
    if cfg.model is not None:
        p = Path(cfg.model)
        if not p.is_dir():
            raise ValueError(f"--model {cfg.model}: not a folder (give a local causal-LM folder "
                             "with config.json, weights and a tokenizer)")
        if not (p / "config.json").is_file():
            raise ValueError(f"--model {cfg.model}: no config.json inside; not a Hugging Face model folder")


def _task_name_for(path: Path, taken: set) -> str:
    stem = path.stem
    name = path.parent.name if stem.lower() in {"train", "test", "val", "data"} and path.parent.name else stem
    base, k = name, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def load_tasks(cfg: RunConfig) -> list:
    """The task sequence (bundled benchmark, or the task files), in the configured order."""
    from cl_core.continual.evaluation import infer_task_type

    if cfg.bundled:
        from cl_core.continual import synthetic

        data = synthetic.benchmark(list(cfg.tasks) if cfg.tasks else None, n_train=cfg.n_train,
                                   n_test=cfg.n_test, seed=0, variant=cfg.variant, order=cfg.order)
        return [Task(td.name, td.task_type,
                     [(s.prompt, s.answer, s.instruction) for s in td.train],
                     [(s.prompt, s.answer, s.instruction) for s in td.test],
                     td.instructions) for td in data]
    from cl_core.task_files import load_task_file, templates

    tasks, taken = [], set()
    for k, path in enumerate(cfg.task_files):
        path = Path(path)
        records = load_task_file(path, skip_bad=cfg.skip_bad)
        no_answer = [r.index for r in records if r.answer is None or not str(r.answer).strip()]
        if no_answer:
            raise ValueError(f"task file {path}: record {no_answer[0]} has no answer "
                             f"({len(no_answer)} records without one); training needs answers")
        name = _task_name_for(path, taken)
        if cfg.test_files:
            test_records = load_task_file(Path(cfg.test_files[k]), skip_bad=cfg.skip_bad)
            bad = [r.index for r in test_records if r.answer is None or not str(r.answer).strip()]
            if bad:
                raise ValueError(f"test file {cfg.test_files[k]}: record {bad[0]} has no answer to score against")
            train = records
        else:
            if len(records) < 2:
                raise ValueError(f"task file {path}: {len(records)} record; need at least 2 to hold one out "
                                 "for testing (or give --test-tasks)")
            idx = list(range(len(records)))
            random.Random(f"cl_core/split/{name}").shuffle(idx)
            n_test = min(cfg.max_test, max(1, int(round(len(records) * cfg.test_fraction))))
            test_set = set(idx[:n_test])
            test_records = [records[i] for i in sorted(test_set)]
            train = [r for i, r in enumerate(records) if i not in test_set]
        answers = [str(r.answer) for r in test_records]
        task_type = cfg.task_types[k] if cfg.task_types else infer_task_type(answers)
        tasks.append(Task(name, task_type,
                          [(r.prompt, str(r.answer), r.instruction) for r in train],
                          [(r.prompt, str(r.answer), r.instruction) for r in test_records],
                          templates(train)))
    if cfg.order == "reverse":
        tasks = tasks[::-1]
    elif cfg.order == "alphabet":
        tasks = sorted(tasks, key=lambda t: t.name.lower())
    return tasks


# --------------------------------------------------------------------------- files

def _write_json(path, obj) -> None:
    write_json_atomic(obj, path, indent=1)


def _read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON ({exc.msg}); the run folder is damaged") from None


class RunState:
    """``state.json``: per chain (method, seed) the finished tasks, in order."""

    def __init__(self, path: Path, data: dict | None = None):
        self.path = Path(path)
        self.data = data or {"format": STATE_FORMAT, "version": STATE_VERSION, "chains": {}, "base": {}}

    @classmethod
    def load(cls, path: Path) -> "RunState":
        path = Path(path)
        if not path.exists():
            return cls(path)
        data = _read_json(path, "state file")
        if data.get("format") != STATE_FORMAT or data.get("version") != STATE_VERSION:
            raise ValueError(f"state file {path} is not a cl_core run state (version {STATE_VERSION})")
        return cls(path, data)

    def save(self) -> None:
        _write_json(self.path, self.data)

    def chain(self, method: str, seed: int) -> dict:
        return self.data["chains"].setdefault(f"{method}/seed{seed}", {"method": method, "seed": seed, "tasks": []})

    def finished(self, method: str, seed: int) -> list:
        return self.chain(method, seed)["tasks"]


# --------------------------------------------------------------------------- training pieces

class _Dataset:
    """A list of encoded examples as a map-style dataset."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _collate(pad_id: int):
    def collate(batch):
        import torch

        width = max(len(x["input_ids"]) for x in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, x in enumerate(batch):
            n = len(x["input_ids"])
            ids[row, :n] = torch.tensor(x["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(x["labels"], dtype=torch.long)
            attention[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attention}
    return collate


def _trainer_args(out_dir: Path, *, steps, batch_size, lr, warmup, seed, quiet):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir), use_cpu=True, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=quiet, per_device_train_batch_size=batch_size,
        max_steps=steps, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=warmup,
        weight_decay=0.0, seed=seed, data_seed=seed, dataloader_num_workers=0,
        remove_unused_columns=False, optim="adamw_torch",
    )


def _train(model, tokenizer, examples, *, out_dir, steps, batch_size, lr, warmup, seed, quiet,
           callbacks=(), max_length):
    """One Trainer run over (prompt, answer) pairs; returns the mean training loss."""
    from transformers import Trainer

    from cl_core.continual.evaluation import encode_example

    items = [encode_example(tokenizer, p, a, max_length) for p, a in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(
        model=model, args=_trainer_args(out_dir, steps=steps, batch_size=batch_size, lr=lr,
                                        warmup=warmup, seed=seed, quiet=quiet),
        train_dataset=_Dataset(items), data_collator=_collate(pad), callbacks=list(callbacks),
    )
    # The Trainer prints a metrics dict at the end (PrinterCallback / ProgressCallback.on_log);
    # the runner logs its own summary instead.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, ProgressCallback):
            cb.on_log = lambda *a, **k: None
    result = trainer.train()
    return float(result.training_loss)


def _seed_for(seed: int, *parts) -> int:
    """A deterministic 31-bit seed derived from the run seed and a label."""
    import zlib

    return zlib.crc32(f"{seed}/{'/'.join(map(str, parts))}".encode()) & 0x7FFFFFFF


@contextlib.contextmanager
def _quiet_libraries():
    """Silence transformers/peft info and progress chatter (saving/loading bars, notices)."""
    import warnings

    from transformers.utils import logging as hf_logging

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


# --------------------------------------------------------------------------- the run

class ContinualRun:
    """One run folder: prepares data and models, runs the chains, resumes them."""

    def __init__(self, cfg: RunConfig, out_dir, *, quiet: bool = False, threads: int | None = None,
                 on_task_end: Callable | None = None):
        validate_config(cfg)
        self.cfg = cfg
        self.out = Path(out_dir)
        self.quiet = quiet
        self.threads = threads
        self.on_task_end = on_task_end
        self.tasks: list = []
        self.tokenizer = None
        self.max_new_tokens = cfg.max_new_tokens

    # ------------------------------------------------------------ preparation
    def prepare(self) -> None:
        """Everything that can fail on bad input, before any training."""
        self._check_folder()
        self.tasks = load_tasks(self.cfg)
        if self.cfg.model is not None:
            self.tokenizer = self._load_user_tokenizer()
        else:
            self.tokenizer = self._tiny_tokenizer()
        if self.max_new_tokens is None:
            longest = max(len(self.tokenizer(a, add_special_tokens=False)["input_ids"])
                          for t in self.tasks for _, a, _ in t.test)
            self.max_new_tokens = min(64, longest + 2)
        for t in self.tasks:
            if not t.train:
                raise ValueError(f"task {t.name} has no training records")

    def _check_folder(self) -> None:
        cfg_path = self.out / "config.json"
        if cfg_path.exists():
            saved = _read_json(cfg_path, "run config")
            mine = self.cfg.to_dict()
            diff = [k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)]
            if diff:
                detail = ", ".join(f"{k}: {saved.get(k)!r} there vs {mine.get(k)!r} now" for k in diff[:4])
                raise ValueError(f"{self.out} holds a run with other settings ({detail}); resume it with its "
                                 "own settings, or choose another --out folder")
        elif self.out.exists() and any(self.out.iterdir()):
            raise ValueError(f"{self.out} exists and is not a cl_core run folder (no config.json); "
                             "choose an empty or new --out folder")

    def _tiny_tokenizer(self):
        from cl_core.continual import synthetic, tiny_model

        return tiny_model.build_tokenizer(tiny_model.build_vocab(synthetic.vocabulary_texts()))

    def _load_user_tokenizer(self):
        from transformers import AutoConfig, AutoTokenizer

        path = self.cfg.model
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - any loader failure is a bad folder
            raise ValueError(f"--model {path}: cannot read the model config ({exc})") from None
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"--model {path}: model type {config.model_type!r} is not a causal LM")
        if not any((Path(path) / f).is_file() for f in
                   ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")):
            raise ValueError(f"--model {path}: no weights (model.safetensors / pytorch_model.bin) inside")
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"--model {path}: cannot load its tokenizer ({exc})") from None
        if tok.eos_token_id is None:
            raise ValueError(f"--model {path}: the tokenizer has no end-of-sequence token")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok

    # ------------------------------------------------------------ base models
    def base_dir(self, seed: int) -> Path:
        if self.cfg.model is not None:
            return Path(self.cfg.model)
        return self.out / "base" / f"seed{seed}"

    def ensure_base(self, seed: int, state: RunState) -> None:
        """Train (once) and cache the stage-1 base of ``seed``; score it zero-shot."""
        key = str(seed)
        if self.cfg.model is None and not (self.base_dir(seed) / "config.json").exists():
            self._train_stage1(seed)
        if key not in state.data["base"]:
            if self.cfg.model is not None and state.data["base"]:  # one model for every seed
                info = dict(next(iter(state.data["base"].values())))
                row = info["zero_shot"]
            else:
                model = self._load_base(seed)
                row = self._evaluate(model, None)
                info = {"zero_shot": row}
                if self.cfg.model is None:
                    info["stage1"] = self._stage1_score(model, seed)
            state.data["base"][key] = info
            state.save()
            log.info("seed %d base: zero-shot accuracy %s", seed, _fmt_row(row))

    def _train_stage1(self, seed: int) -> None:
        from cl_core.continual import synthetic, tiny_model

        cfg = self.cfg
        t0 = time.time()
        log.info("seed %d: stage 1, training the tiny base model (%d steps)", seed, cfg.stage1_steps)
        model = tiny_model.build_model(len(self.tokenizer), hidden_size=cfg.hidden_size,
                                       num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                       max_positions=max(cfg.max_length, 128), seed=_seed_for(seed, "init"))
        samples = synthetic.stage1_samples(cfg.stage1_steps * cfg.stage1_batch_size, seed=seed)
        loss = None
        if cfg.stage1_steps > 0:
            loss = _train(model, self.tokenizer, [(s.prompt, s.answer) for s in samples],
                          out_dir=self.out / ".trainer", steps=cfg.stage1_steps,
                          batch_size=cfg.stage1_batch_size, lr=cfg.stage1_lr,
                          warmup=max(1, cfg.stage1_steps // 20), seed=_seed_for(seed, "stage1"),
                          quiet=self.quiet, max_length=cfg.max_length)
        with atomic_dir(self.base_dir(seed)) as tmp:
            model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            _write_json(tmp / "stage1.json", {"loss": loss, "steps": cfg.stage1_steps,
                                              "seconds": round(time.time() - t0, 2)})
        del model
        log.info("seed %d: stage 1 done in %.1f s (loss %s)", seed, time.time() - t0,
                 "-" if loss is None else f"{loss:.3f}")

    def _stage1_score(self, model, seed: int) -> float:
        from cl_core.continual import synthetic
        from cl_core.continual.evaluation import accuracy, generate

        test = synthetic.stage1_samples(100, seed=10_000 + seed)
        preds = generate(model, self.tokenizer, [s.prompt for s in test], max_new_tokens=12,
                         batch_size=self.cfg.eval_batch_size, max_prompt_tokens=self.cfg.max_length)
        return accuracy("exact", preds, [s.answer for s in test])

    def _load_base(self, seed: int):
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(str(self.base_dir(seed)))
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot load the model from {self.base_dir(seed)}: {exc}") from None
        model.float()
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        return model

    # ------------------------------------------------------------ evaluation
    def _evaluate(self, model, grouper, progress_desc: str = "eval") -> list:
        """Accuracy (%) on every task's test set; with a grouper, each instance is routed."""
        from tqdm.auto import tqdm

        from cl_core.continual.evaluation import accuracy, generate
        from cl_core.lora_sets import adapter_name

        prompts, answers, instructions, spans = [], [], [], []
        for t in self.tasks:
            start = len(prompts)
            for p, a, ins in t.test:
                prompts.append(p)
                answers.append(a)
                instructions.append(ins)
            spans.append((start, len(prompts)))
        adapters = None
        if grouper is not None:
            adapters = [adapter_name(g) for g in grouper.route(instructions)]
        with tqdm(total=len(prompts), desc=progress_desc, disable=self.quiet, leave=False, unit="q") as bar:
            preds = generate(model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                             batch_size=self.cfg.eval_batch_size, max_prompt_tokens=self.cfg.max_length,
                             adapter_names=adapters, progress=bar)
        return [round(accuracy(t.task_type, preds[a:b], answers[a:b]), 4)
                for t, (a, b) in zip(self.tasks, spans)]

    # ------------------------------------------------------------ chains
    def chain_dir(self, method: str, seed: int) -> Path:
        return self.out / "chains" / method_slug(method) / f"seed{seed}"

    def _lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=self.cfg.target_modules, task_type="CAUSAL_LM")

    def _dema_config(self, method: str):
        from cl_core.config import DEMAConfig

        if method == "ema":
            return DEMAConfig(formula="fixed", beta=self.cfg.ema_beta)
        return DEMAConfig(formula=self.cfg.dema_formula, scale=self.cfg.dema_scale,
                          fallback=self.cfg.dema_fallback)

    def run_chain(self, method: str, seed: int, state: RunState) -> None:
        import torch

        from cl_core.callback import DEMACallback
        from cl_core.grouping import Decision, InstructionGrouper
        from cl_core.lora_sets import LoRASets

        cfg, tasks = self.cfg, self.tasks
        done = state.finished(method, seed)
        if len(done) >= len(tasks):
            return
        cdir = self.chain_dir(method, seed)
        cdir.mkdir(parents=True, exist_ok=True)
        base = self._load_base(seed)
        grouper = InstructionGrouper(threshold=cfg.threshold()) if method == "dema+group" else None
        if done:
            last = cdir / done[-1]["adapters"]
            log.info("%s seed %d: resuming after task %d/%d (%s)", method, seed, len(done), len(tasks), last)
            sets = LoRASets.from_pretrained(base, last, is_trainable=True, lora_config=self._lora_config())
            if grouper is not None:
                grouper = InstructionGrouper.load(last / "grouper.json")
        else:
            sets = LoRASets(base, self._lora_config())
        for j in range(len(done), len(tasks)):
            task = tasks[j]
            t0 = time.time()
            if grouper is not None:
                decision = grouper.assign(task.templates, name=task.name)
            else:
                decision = Decision(group=0, reused=j > 0, similarities=[])
            torch.manual_seed(_seed_for(seed, method, "adapter", j))  # new adapters: same init on resume
            adapter, reused = sets.prepare_task(decision)
            use_ema = method != "lora" and reused
            callbacks = []
            if use_ema:
                callbacks.append(DEMACallback(self._dema_config(method), replace_at_end=True, record_alpha=True))
            if not self.quiet:
                log.info("%s seed %d: task %d/%d %s (adapter %s%s)", method, seed, j + 1, len(tasks), task.name,
                         adapter, ", EMA on" if use_ema else "")
            loss = _train(sets.model, self.tokenizer, [(p, a) for p, a, _ in task.train],
                          out_dir=self.out / ".trainer", steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                          warmup=cfg.warmup_steps, seed=_seed_for(seed, "data", j), quiet=self.quiet,
                          callbacks=callbacks, max_length=cfg.max_length)
            train_s = time.time() - t0
            row = self._evaluate(sets.model, grouper, progress_desc=f"eval {method} s{seed} t{j + 1}")
            alpha_mean = []
            if callbacks:
                cb = callbacks[0]
                hist = [a.tolist() for a in cb.alpha_history]
                alpha_mean = [sum(a) / len(a) for a in hist if a]
                write_json_atomic({"task": task.name, "names": list(cb.engine.names), "alpha": hist},
                                  cdir / f"alpha_task{j}.json", indent=None)
            # Persist: adapters of this task first, then the state that points at them.
            adir_name = f"task{j}"
            with atomic_dir(cdir / adir_name) as tmp:
                sets.save(tmp)
                if grouper is not None:
                    grouper.save(tmp / "grouper.json")
            done.append({
                "task": task.name, "row": row, "loss": loss, "adapter": adapter, "group": decision.group,
                "reused": bool(reused), "ema": use_ema,
                "similarities": [round(float(s), 4) for s in getattr(decision, "similarities", [])],
                "alpha_mean": alpha_mean, "adapters": adir_name,
                "train_seconds": round(train_s, 2), "seconds": round(time.time() - t0, 2),
            })
            state.save()
            for old in cdir.glob("task*"):
                if old.is_dir() and old.name != adir_name:
                    shutil.rmtree(old, ignore_errors=True)
            log.info("%s seed %d: task %d/%d %s done in %.1f s, loss %.3f, accuracy %s", method, seed, j + 1,
                     len(tasks), task.name, time.time() - t0, loss, _fmt_row(row[: j + 1]))
            if self.on_task_end is not None:
                self.on_task_end(method, seed, j)

    # ------------------------------------------------------------ all
    def run(self) -> dict:
        import torch

        self.prepare()
        self.out.mkdir(parents=True, exist_ok=True)
        _write_json(self.out / "config.json", self.cfg.to_dict())
        state = RunState.load(self.out / "state.json")
        if self.threads:
            torch.set_num_threads(self.threads)
        t0 = time.time()
        with _quiet_libraries():
            for seed in self.cfg.seeds:
                self.ensure_base(seed, state)
                for method in self.cfg.methods:
                    self.run_chain(method, seed, state)
        shutil.rmtree(self.out / ".trainer", ignore_errors=True)
        results = self.collect(state)
        results["wall_seconds_this_call"] = round(time.time() - t0, 2)
        _write_json(self.out / "results.json", results)
        from cl_core.continual import report

        report.write_report(results, self.out)
        return results

    def collect(self, state: RunState) -> dict:
        """results.json: per method the seed-mean matrix and metrics, and per seed."""
        names = [t.name for t in self.tasks]
        out = {
            "format": "cl_core.results", "version": 1,
            "benchmark": "bundled" if self.cfg.bundled else "files",
            "tasks": names, "task_types": [t.task_type for t in self.tasks],
            "config": self.cfg.to_dict(), "base": state.data["base"], "methods": {},
        }
        for method in self.cfg.methods:
            seeds = {}
            for seed in self.cfg.seeds:
                done = state.finished(method, seed)
                rows = [d["row"] for d in done]
                if len(rows) < len(names):
                    raise RuntimeError(f"{method} seed {seed}: only {len(rows)} of {len(names)} tasks finished")
                seeds[str(seed)] = {
                    "matrix": rows, "metrics": cl_metrics.summarize(rows),
                    "alpha": [d["alpha_mean"] for d in done],
                    "groups": [d["group"] for d in done], "reused": [d["reused"] for d in done],
                    "ema": [d["ema"] for d in done], "similarities": [d["similarities"] for d in done],
                    "loss": [d["loss"] for d in done],
                    "train_seconds": sum(d["train_seconds"] for d in done),
                }
            t = len(names)
            per = list(seeds.values())
            matrix = [[sum(s["matrix"][j][i] for s in per) / len(per) for i in range(t)] for j in range(t)]
            matrix_std = [[cl_metrics.mean_std([s["matrix"][j][i] for s in per])[1] for i in range(t)]
                          for j in range(t)]
            mean, std = {}, {}
            for name in cl_metrics.METRIC_NAMES:
                mean[name], std[name] = cl_metrics.mean_std([s["metrics"][name] for s in per])
            out["methods"][method] = {
                "matrix": matrix, "matrix_std": matrix_std, "metrics": mean, "metrics_std": std,
                "metrics_of_mean_matrix": cl_metrics.summarize(matrix), "seeds": seeds,
            }
        return out


def _fmt_row(row) -> str:
    return "[" + " ".join(f"{v:.0f}" for v in row) + "]"


def run(cfg: RunConfig, out_dir, *, quiet: bool = False, threads: int | None = None,
        on_task_end: Callable | None = None) -> dict:
    """Run (or resume) a continual run in ``out_dir``; returns the results dict."""
    return ContinualRun(cfg, out_dir, quiet=quiet, threads=threads, on_task_end=on_task_end).run()
