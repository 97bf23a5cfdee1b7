"""The continual runner: LoRA-tune a causal LM, or an image-text model (LLaVA-style, with the
records' images: cl_core.continual.multimodal), on tasks in order, evaluate every task after
each one, with plain LoRA, fixed-β EMA, DEMA, or DEMA with instruction grouping.

    from cl_core.continual.run import RunConfig, run
    results = run(RunConfig(methods=("lora", "dema"), seeds=(0, 1)), "runs/x")

The methods are the table of cl_core.continual.methods (lora, ema, dema, group, dema+group, the
recipes lcia and cl-next, CoIN's moelora, the paper's baselines replay, ewc, lwf and olora:
cl_core.continual.baselines, whose hook the chain calls around each task). As in the official
code every task is its own training run, the EMA starts lazily at the task's first optimizer
step and replaces the weights at the task's end (docs/design.md §2). Per task the state
records whether DEMA was on (``dema``) and which task's weights the trained set started from
(``init_from``).

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
                                   grouper.json for dema+group; moelora: moelora_config.json and
                                   moelora.safetensors (cl_core.moelora.load_moelora reloads them)
    chains/<method>/seed<s>/alpha_task<j>.json   per-step, per-tensor α of task j
    results.json, report.md, *.png written at the end (cl_core.continual.report)

Running again with the same folder resumes from the last finished task of every chain.
Under torchrun / accelerate launch (and DeepSpeed) every rank runs the chains, rank 0 writes
the folder (cl_core.continual.launch).
"""
from __future__ import annotations

import gc
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cl_core import metrics as cl_metrics
from cl_core.atomic_io import atomic_dir, write_json_atomic
from cl_core.continual import base_cache
from cl_core.continual.run_lock import RunLock
from cl_core.continual.config import ORDERS, RunConfig  # noqa: F401 - re-exported
from cl_core.continual.launch import Launch
from cl_core.continual.methods import METHODS, MethodPlan, method_slug  # noqa: F401 - METHODS re-exported
from cl_core.lora_sets import AdapterSets
from cl_core.continual.state import RunState, TaskRecord, check_run_folder, write_json
from cl_core.continual.tasks import Task, load_tasks  # noqa: F401 - re-exported
from cl_core.continual import baselines
from cl_core.continual.alpha import alpha_counts
from cl_core.dema.config import DEMAConfig
from cl_core.dema.regime import RegimeReport, regime_advice
from cl_core.continual.alpha import merge as merge_alpha
from cl_core.continual.training import (dema_callback, describe_model, load_base, quiet_libraries, seed_for,
                                        stage1_score, train, train_stage1)

log = logging.getLogger(__name__)


class ContinualRun:
    """One run folder: prepares data and models, runs the chains, resumes them."""

    def __init__(self, cfg: RunConfig, out_dir, *, quiet: bool = False, threads: int | None = None,
                 on_task_end: Callable | None = None, launch: Launch | None = None):
        from cl_core.integrations.extras import require

        require("runner", "cl_core.continual.run")   # a missing package said now, not after training
        cfg.validate()
        # The processes of a launcher (torchrun, accelerate launch; cl_core.continual.launch):
        # rank 0 writes the run folder, every rank trains its share and reads the folder.
        self.launch = launch if launch is not None else Launch.from_env(cfg=cfg)
        self.launch.check_run(cfg)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            # refused before anything is written (the CLI checks --threads the same way)
            raise ValueError(f"threads={threads!r}: give a whole number >= 1, or None for torch's default")
        self.cfg = cfg
        self.out = Path(out_dir)
        self.quiet = quiet
        # Progress bars only on a terminal: written to a file or a pipe, every redraw of every
        # bar becomes a \r-joined line of output.
        self.bars = not quiet and _stderr_is_terminal()
        self.threads = threads
        self.on_task_end = on_task_end
        self.tasks: list = []
        self.tokenizer = None
        self.encoder = None
        self.images = None      # the images' summary of a multimodal run (multimodal.image_report)
        self.max_new_tokens = cfg.max_new_tokens

    # ------------------------------------------------------------ preparation
    def prepare(self) -> None:
        """Everything that can fail on bad input, before any training."""
        from cl_core.continual import multimodal

        self.launch.on_main(check_run_folder, self.out, self.cfg.to_dict(), RunConfig().to_dict())
        # Image-text model (or the bundled tasks drawn): every record's image checked here.
        self.tasks = load_tasks(self.cfg, with_images=multimodal.uses_images(self.cfg))
        if not self.cfg.bundled and self.cfg.model is None:
            raise ValueError("--tasks without --model: the bundled tiny model only knows the bundled benchmark's "
                             "words (yours would become <unk>); give --model DIR, a local causal-LM folder "
                             "with its tokenizer")
        # The examples encoder: the causal LM's tokenizer, or the image-text model's processor.
        with quiet_libraries():   # (the PIL image-processor notice when torchvision is missing)
            self.encoder = multimodal.encoder_for(self.cfg)
        self.tokenizer = self.encoder.tokenizer
        if self.cfg.model is not None:
            # Weights that do not match config.json fail here, before anything is written.
            with quiet_libraries():
                base = load_base(Path(self.cfg.model), self.tokenizer)
            self._lora_config(base)   # --train-projector on a model without a projector fails here
            if self.encoder.uses_images:
                self.encoder.check_model(base)   # processor and model agree (qwen_vl: patch and merge sizes)
            del base
        if self.encoder.uses_images:
            self.encoder.check_run(self.tasks, self.cfg)   # qwen_vl: every record's image tokens
            # One example per task through the processor now: an image that does not fit in
            # --max-length (LLaVA-1.5: 576 image tokens) fails here, not in the middle of training.
            for t in self.tasks:
                for (p, a, _), im in zip(t.train, t.train_images):
                    if im is not None:
                        self.encoder.example(p, a, im, self.cfg.max_length)
                        break
        self.images = (multimodal.image_report(self.tasks, self.cfg, self._image_sizes(),
                                               {t.name: t.skipped_images for t in self.tasks if t.skipped_images})
                       if self.encoder.uses_images else None)
        if self.cfg.model is not None:
            _warn_unknown_answers(self.tokenizer, self.tasks)
            if self.cfg.stage1_steps != RunConfig().stage1_steps:
                log.warning("--stage1-steps %d is ignored with --model: stage 1 trains only the bundled tiny "
                            "model; your model is the base as it is", self.cfg.stage1_steps)
        if self.max_new_tokens is None:
            longest = max(len(self.tokenizer(a, add_special_tokens=False)["input_ids"])
                          for t in self.tasks for _, refs, _ in t.test
                          for a in ([refs] if isinstance(refs, str) else refs))
            self.max_new_tokens = min(64, longest + 2)
        for t in self.tasks:
            if not t.train:
                raise ValueError(f"task {t.name} has no training records")

    # ------------------------------------------------------------ base models
    def base_seed(self, seed: int) -> int:
        """The seed whose stage-1 base chains of ``seed`` start from (``stage1_seed``: one
        base for every seed)."""
        return seed if self.cfg.stage1_seed is None else self.cfg.stage1_seed

    def base_dir(self, seed: int) -> Path:
        if self.cfg.model is not None:
            return Path(self.cfg.model)
        return self.out / "base" / f"seed{self.base_seed(seed)}"

    def ensure_base(self, seed: int, state: RunState) -> None:
        """Train (once) and cache the stage-1 base of ``seed``; score it zero-shot."""
        from cl_core.continual import multimodal

        key = str(seed)
        shared = self.cfg.model is not None or self.cfg.stage1_seed is not None  # one model for every seed
        if self.cfg.model is None and not (self.base_dir(seed) / "config.json").exists():
            # One process: the base comes from the cache when these settings trained it before.
            # Under a launcher every rank trains its share, so the cache is left out there.
            single = not (self.launch.distributed or self.launch.deepspeed is not None)
            if not (single and base_cache.fetch(self.cfg, self.encoder, self.base_seed(seed), self.base_dir(seed))):
                train_stage1(self.cfg, self.encoder, self.base_seed(seed), self.base_dir(seed),
                             self.out / ".trainer", quiet=not self.bars, launch=self.launch)
                if single:
                    base_cache.store(self.cfg, self.encoder, self.base_seed(seed), self.base_dir(seed))
        if key not in state.base:
            if shared and state.base:
                info = dict(next(iter(state.base.values())))
                row = info["zero_shot"]
            else:
                model = self._load_base(seed)
                row = self._evaluate(model, None)
                info = {"zero_shot": row,
                        "model": describe_model(model, self.tokenizer, "tiny" if self.cfg.model is None
                                                else str(self.cfg.model))}
                processor = multimodal.describe_processor(self.encoder)
                if processor is not None:
                    info["model"]["processor"] = processor
                if self.cfg.model is None:
                    info["stage1"] = stage1_score(model, self.encoder, self.base_seed(seed), self.cfg)
            state.base[key] = info
            state.save()
            log.info("seed %d base: zero-shot accuracy %s", seed, _fmt_row(row))

    def _load_base(self, seed: int):
        return load_base(self.base_dir(seed), self.tokenizer)

    # ------------------------------------------------------------ evaluation
    def _evaluate(self, model, grouper, route: str = "instance", progress_desc: str = "eval") -> list:
        """Accuracy (%) on every task's test set. With a grouper, each test instance goes to
        a LoRA set by its instruction (``route="instance"``), or every instance of a task's
        test set goes to the set chosen for the set's instructions as a whole (``"file"``,
        the official script's one decision per test file)."""
        from tqdm.auto import tqdm

        from cl_core.continual.evaluation import accuracy, generate
        from cl_core.lora_sets import adapter_name

        if self.cfg.on_cuda():
            import torch

            model.to(torch.device("cuda", torch.cuda.current_device()))  # the base before any Trainer moved it

        prompts, answers, instructions, spans, images = [], [], [], [], []
        for t in self.tasks:
            start = len(prompts)
            for p, a, ins in t.test:
                prompts.append(p)
                answers.append(a)
                instructions.append(ins)
            images += t.test_images or [None] * len(t.test)
            spans.append((start, len(prompts)))
        adapters = None
        if grouper is not None:
            adapters = [adapter_name(g) for g in route_groups(grouper, instructions, spans, route)]
        with tqdm(total=len(prompts), desc=progress_desc, disable=not self.bars, leave=False, unit="q") as bar:
            # under a launcher the ranks share the batches out (the same batches as one process)
            with_images = images if self.encoder.uses_images else None
            preds = self.launch.map_batches(
                lambda a, b: generate(model, self.encoder, prompts[a:b], max_new_tokens=self.max_new_tokens,
                                      batch_size=self.cfg.eval_batch_size, max_prompt_tokens=self.cfg.max_length,
                                      adapter_names=None if adapters is None else adapters[a:b], progress=bar,
                                      images=None if with_images is None else with_images[a:b]),
                len(prompts), self.cfg.eval_batch_size)
        return [round(accuracy(t.task_type, preds[a:b], answers[a:b]), 4)
                for t, (a, b) in zip(self.tasks, spans)]

    # ------------------------------------------------------------ chains
    def chain_dir(self, method: str, seed: int) -> Path:
        return self.out / "chains" / method_slug(method) / f"seed{seed}"

    def _lora_config(self, model):
        """LoRA on ``model``: on a multimodal model the language model only ("all-linear" there),
        with the projector trainable beside it (``train_projector``)."""
        from peft import LoraConfig

        from cl_core.continual.multimodal import lora_targets, projector_modules

        return LoraConfig(r=self.cfg.lora_r, lora_alpha=self.cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=lora_targets(model, self.cfg.target_modules), task_type="CAUSAL_LM",
                          modules_to_save=projector_modules(model) if self.cfg.train_projector else None)

    def _image_sizes(self) -> dict:
        sizes: dict = {}
        for t in self.tasks:
            sizes.update(t.image_sizes)
        return sizes

    def _adapter_sets(self, plan, base, folder=None):
        """The adapters a chain trains on ``base``: PEFT LoRA sets, or (moelora) one MoELoRA
        set; reloaded trainable from ``folder`` when a chain resumes."""
        if plan.adapter == "moelora":
            from cl_core.continual.adapters import MoELoRASet

            if folder is not None:
                return MoELoRASet.from_pretrained(base, folder, is_trainable=True)
            return MoELoRASet(base, self.cfg.moelora_config())
        from cl_core.lora_sets import LoRASets

        if folder is not None:
            return LoRASets.from_pretrained(base, folder, is_trainable=True, lora_config=self._lora_config(base))
        return LoRASets(base, self._lora_config(base))

    def run_chain(self, method: str, seed: int, state: RunState) -> None:
        """Train ``method``'s chain of seed ``seed`` from its last finished task to the end,
        saving the adapters and the state after every task."""
        chain = self._open_chain(method, seed, state)
        if chain is None:
            return
        for j in range(len(chain.done), len(self.tasks)):
            outcome = self.train_task(chain, j)
            self._persist(chain, j, outcome, state)
            log.info("%s seed %d: task %d/%d %s done in %.1f s, loss %.3f, accuracy %s", method, seed, j + 1,
                     len(self.tasks), self.tasks[j].name, time.time() - outcome.started, outcome.loss,
                     _fmt_row(outcome.row[: j + 1]))
            if self.on_task_end is not None:
                self.on_task_end(method, seed, j)

    def _open_chain(self, method: str, seed: int, state: RunState) -> "_Chain | None":
        """The chain's adapters and grouper: fresh, or reloaded after its last finished task
        (None when every task is done)."""
        from cl_core.grouping import InstructionGrouper

        plan = self.cfg.plan(method)
        done = state.finished(method, seed)
        if len(done) >= len(self.tasks):
            return None
        cdir = self.chain_dir(method, seed)
        if self.launch.is_main:       # rank 0 alone writes the run folder
            cdir.mkdir(parents=True, exist_ok=True)
        base = self._load_base(seed)
        grouper = InstructionGrouper(threshold=self.cfg.threshold()) if plan.grouping else None
        hook = baselines.for_method(self.cfg, method, seed)   # replay, ewc, lwf, olora: their own data / loss
        if done:
            last = cdir / done[-1].adapters
            log.info("%s seed %d: resuming after task %d/%d (%s)", method, seed, len(done), len(self.tasks), last)
            sets = self._adapter_sets(plan, base, last)
            if grouper is not None:
                grouper = InstructionGrouper.load(last / "grouper.json")
            if hook is not None:
                hook.load(last)
        else:
            sets = self._adapter_sets(plan, base)
        return _Chain(method=method, seed=seed, plan=plan, sets=sets, grouper=grouper, done=done, dir=cdir,
                      last_of_group={r.group: k for k, r in enumerate(done)}, hook=hook)

    def train_task(self, chain: "_Chain", j: int) -> "TaskOutcome":
        """Task ``j`` of ``chain``: pick (grouping) or reuse its LoRA set, start it, train it
        (with the EMA where the method turns it on), evaluate every task. Writes nothing."""
        import torch

        from cl_core.grouping import Decision

        cfg, plan, sets, method, seed, hook = self.cfg, chain.plan, chain.sets, chain.method, chain.seed, chain.hook
        task = self.tasks[j]
        t0 = time.time()
        decision = hook.decision(j) if hook is not None else None   # olora: a new set per task
        if decision is None and chain.grouper is not None:
            decision = chain.grouper.assign(task.templates, name=task.name)
        elif decision is None:
            decision = Decision(group=0, reused=j > 0, similarities=[])
        # A new LoRA set draws its initialisation from the seed and the set (group) only, not
        # the method: every method of a seed starts set g from the same weights (paired
        # comparisons), and a resumed chain draws the same ones.
        torch.manual_seed(seed_for(seed, "adapter", decision.group))
        adapter, reused = sets.prepare_task(decision)
        if reused:
            init_from = chain.last_of_group[decision.group]   # the set's own latest weights
        elif plan.new_set_init == "latest" and j > 0:
            init_from = j - 1                                  # the most recently trained set's weights
            _copy_adapter(sets.model, chain.done[j - 1].adapter, adapter)
        else:
            init_from = None
        use_ema = cfg.dema_on(method, j, reused)
        callbacks = ([dema_callback(plan.ema, plan.params, self.launch.dema_precision(method))]
                     if use_ema else [])
        if not self.quiet:
            log.info("%s seed %d: task %d/%d %s (adapter %s%s%s)", method, seed, j + 1, len(self.tasks), task.name,
                     adapter, "" if init_from is None else f", from task {init_from + 1}",
                     ", EMA on" if use_ema else "")
        images = task.train_images or [None] * len(task.train)
        examples = [(p, a, im) for (p, a, _), im in zip(task.train, images)]
        if hook is not None:
            hook.begin_task(sets.model, j)
        loss = train(sets.model, self.encoder, examples if hook is None else hook.examples(j, examples),
                     out_dir=self.out / ".trainer", steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                     warmup=cfg.warmup_steps, seed=seed_for(seed, "data", j), quiet=not self.bars,
                     callbacks=callbacks, max_length=cfg.max_length, max_grad_norm=plan.max_grad_norm,
                     launch=self.launch, cuda=cfg.on_cuda(), hook=hook)
        if hook is not None:   # EWC's Fisher, replay's buffer: from the task's own records
            hook.end_task(sets.model, j, examples, self._encode_batch)
        train_s = time.time() - t0
        row = self._evaluate(sets.model, chain.grouper, route=plan.route,
                             progress_desc=f"eval {method} s{seed} t{j + 1}")
        outcome = TaskOutcome(decision=decision, adapter=adapter, reused=bool(reused), init_from=init_from,
                              ema=use_ema, loss=loss, row=row, started=t0, train_seconds=train_s)
        if callbacks:
            cb = callbacks[0]
            outcome.alpha = [a.tolist() for a in cb.alpha_history]
            outcome.regime = cb.regime.to_record() if cb.regime is not None else None
            # the sizes of the whole tensors: under DeepSpeed ZeRO-1/2/3 the engine holds this
            # rank's fragments; the model's parameters are whole again after the training
            whole = dict(sets.model.named_parameters())
            outcome.names = _averaged_names(cb)
            outcome.numel = [whole[n].numel() for n in outcome.names]
        return outcome

    def _encode_batch(self, records: list) -> dict:
        """(prompt, answer, image) records as one training batch (what the Trainer gets)."""
        return self.encoder.collate([self.encoder.example(p, a, im, self.cfg.max_length) for p, a, im in records])

    def _persist(self, chain: "_Chain", j: int, outcome: "TaskOutcome", state: RunState) -> None:
        """Save task ``j``'s α file and adapters, then the state that points at them (rank 0
        writes; every rank keeps the record), and drop the previous task's adapters."""
        plan, main, task = chain.plan, self.launch.is_main, self.tasks[j]
        alpha_mean, counts = [], {}
        if outcome.alpha is not None:
            alpha_mean = [sum(a) / len(a) for a in outcome.alpha if a]
            fallback = None if plan.ema.formula == "fixed" else plan.ema.fallback
            counts = alpha_counts(outcome.alpha, fallback, outcome.numel)
            if main:
                write_json_atomic({"task": task.name, "names": list(outcome.names), "numel": outcome.numel,
                                   "alpha": outcome.alpha}, chain.dir / f"alpha_task{j}.json", indent=None)
        # Persist: adapters of this task first, then the state that points at them.
        adir_name = f"task{j}"
        if main:
            with atomic_dir(chain.dir / adir_name) as tmp:
                chain.sets.save(tmp)
                if chain.grouper is not None:
                    chain.grouper.save(tmp / "grouper.json")
                if chain.hook is not None:
                    chain.hook.save(tmp)   # the buffer, the Fisher and anchors: read back on resume
        decision = outcome.decision
        chain.done.append(TaskRecord(
            task=task.name, row=outcome.row, loss=outcome.loss, adapter=outcome.adapter, group=decision.group,
            reused=outcome.reused, ema=outcome.ema, dema=outcome.ema and plan.ema.formula != "fixed",
            init_from=outcome.init_from, adapters=adir_name,
            similarities=[round(float(s), 4) for s in getattr(decision, "similarities", [])],
            alpha_mean=alpha_mean, alpha_counts=counts, regime=outcome.regime or {},
            train_seconds=round(outcome.train_seconds, 2), seconds=round(time.time() - outcome.started, 2),
        ))
        chain.last_of_group[decision.group] = j
        state.save()
        for old in chain.dir.glob("task*") if main else ():
            if old.is_dir() and old.name != adir_name:
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------ all
    def run(self) -> dict:
        import torch

        t0 = time.time()  # the run's wall time: the report and the CLI state this one number
        # One writer per run folder, taken before anything in it is read or cleaned (rank 0
        # writes the folder under a launcher, so it alone holds the lock).
        lock = RunLock(self.out) if self.launch.is_main else None
        if lock is not None:
            if not self.out.is_dir():   # a file, a read-only place: its one-line refusal, not mkdir's errno
                check_run_folder(self.out, self.cfg.to_dict())
            lock.acquire()
        started = False
        try:
            results = self._run_locked(t0)
            started = True
        except BaseException:
            started = (self.out / "config.json").exists()
            raise
        finally:
            if lock is not None:
                lock.release(undo=not started)
        return results

    def _run_locked(self, t0: float) -> dict:
        import torch

        self.prepare()

        def start_folder():
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "config.json", self.cfg.to_dict())
        self.launch.on_main(start_folder)   # the others read the folder once it is there
        state = RunState.load(self.out / "state.json", writable=self.launch.is_main)
        if self.threads:
            torch.set_num_threads(self.threads)
        with quiet_libraries():
            for seed in self.cfg.seeds:
                self.ensure_base(seed, state)
                for method in self.cfg.methods:
                    # Every Trainer run calls gc.collect() several times (accelerate's
                    # free_memory); a collection walks every live object, torch's and
                    # transformers' module-level ones included: about 0.3 s per task on this
                    # machine. Freezing what lives now (after collecting the previous chain's
                    # garbage) takes those objects out of the walks; results are unchanged.
                    gc.collect()
                    gc.freeze()
                    try:
                        self.run_chain(method, seed, state)
                    finally:
                        gc.unfreeze()
        results = self.collect(state)
        self._warn_regime(results)
        results["wall_seconds_this_call"] = round(time.time() - t0, 2)
        if self.launch.distributed or self.launch.deepspeed is not None:
            results["launch"] = self.launch.describe(self.cfg.methods)

        def finish():
            shutil.rmtree(self.out / ".trainer", ignore_errors=True)
            write_json(self.out / "results.json", results)
            from cl_core.continual import report

            report.write_report(results, self.out)
        self.launch.barrier()              # every rank done with .trainer before it goes
        self.launch.on_main(finish)
        return results

    def _warn_regime(self, results: dict) -> None:
        """Once per method whose DEMA ran out of its regime over all its tasks and seeds: the
        engine's own warning text (each task's engine is told not to say it, one per task)."""
        for method, r in results["methods"].items():
            regime = r.get("regime")
            if not regime or regime.get("total") is None or not r.get("ema_config"):
                continue
            text = regime_advice(RegimeReport.from_records([regime["total"]]), DEMAConfig(**r["ema_config"]))
            if text is not None:
                log.warning("%s: %s", method, text)

    def collect(self, state: RunState) -> dict:
        """results.json: per method the seed-mean matrix and metrics, and per seed."""
        names = [t.name for t in self.tasks]
        out = {
            "format": "cl_core.results", "version": 1,
            "benchmark": "bundled" if self.cfg.bundled else "files",
            "tasks": names, "task_types": [t.task_type for t in self.tasks],
            "config": self.cfg.to_dict(), "base": state.base, "methods": {},
        }
        described = [b["model"] for b in state.base.values() if "model" in b]
        if described:
            out["model"] = described[0]
        if self.images is not None:
            out["images"] = self.images
        for method in self.cfg.methods:
            seeds = {}
            for seed in self.cfg.seeds:
                done = state.finished(method, seed)
                rows = [d.row for d in done]
                if len(rows) < len(names):
                    raise RuntimeError(f"{method} seed {seed}: only {len(rows)} of {len(names)} tasks finished")
                seeds[str(seed)] = {
                    "matrix": rows, "metrics": cl_metrics.summarize(rows),
                    "alpha": [d.alpha_mean for d in done],
                    "groups": [d.group for d in done], "reused": [d.reused for d in done],
                    "ema": [d.ema for d in done], "dema": [d.dema for d in done],
                    "init_from": [d.init_from for d in done], "similarities": [d.similarities for d in done],
                    "alpha_counts": merge_alpha([d.alpha_counts for d in done]),
                    "regime": [d.regime for d in done],
                    "loss": [d.loss for d in done],
                    "train_seconds": sum(d.train_seconds for d in done),
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
                "settings": self.cfg.describe(method),
                "ema_config": None if self.cfg.plan(method).ema is None else self.cfg.plan(method).ema.to_dict(),
                "alpha_counts": merge_alpha([s["alpha_counts"] for s in per]),
                "regime": regime_of_method([s["regime"] for s in per]),
            }
        rows = [state.base[str(seed)]["zero_shot"] for seed in self.cfg.seeds if str(seed) in state.base]
        if len(rows) == len(self.cfg.seeds):
            # The untuned base as a line of its own: its zero-shot accuracy on every task.
            avg = cl_metrics.mean_std([sum(r) / len(r) for r in rows])
            out["base_metrics"] = {
                "zero_shot": [sum(r[i] for r in rows) / len(rows) for i in range(len(names))],
                "zero_shot_std": [cl_metrics.mean_std([r[i] for r in rows])[1] for i in range(len(names))],
                "avg_acc": avg[0], "avg_acc_std": avg[1],
                "per_seed": {str(seed): sum(r) / len(r) for seed, r in zip(self.cfg.seeds, rows)},
            }
        from cl_core.continual.report import conclusions, learned

        out["conclusions"] = conclusions(out)
        out["learned"] = learned(out)
        return out


@dataclass
class _Chain:
    """One method's chain of one seed while it trains (ContinualRun.run_chain)."""

    method: str
    seed: int
    plan: MethodPlan
    sets: AdapterSets
    grouper: object                 # InstructionGrouper, or None without grouping
    done: list                      # TaskRecord of the finished tasks, in order (state.json's list)
    dir: Path
    last_of_group: dict             # set (group) -> the task that last trained it
    hook: object = None             # the method's Baseline (cl_core.continual.baselines), or None


@dataclass
class TaskOutcome:
    """What training one task produced (ContinualRun.train_task), before anything is written."""

    decision: object                # grouping.Decision: the task's set, re-used or new
    adapter: str                    # the adapter (set) trained
    reused: bool
    init_from: Optional[int]        # the task whose weights the set started from (None: fresh)
    ema: bool                       # the EMA was on
    loss: float
    row: list                       # accuracy on every task after this one
    started: float                  # time.time() at the task's start
    train_seconds: float
    alpha: Optional[list] = None    # per optimizer step, per averaged tensor α (EMA on)
    regime: Optional[dict] = None   # the task's DEMA regime and lag (RegimeReport.to_record; EMA on)
    names: list = field(default_factory=list)   # the averaged tensors
    numel: list = field(default_factory=list)   # their whole sizes


def _averaged_names(callback) -> list:
    """The names of the tensors a DEMACallback averaged. DEMACallback has no public accessor
    for them (only ``alpha_history``); its engine's ``names`` is the one place they are."""
    return list(callback.engine.names)


def route_groups(grouper, instructions: list, spans: list, route: str) -> list:
    """The LoRA set (group) of every test instance. ``spans``: (start, end) of each task's
    test set in ``instructions``. ``route="instance"``: each instance by its own instruction;
    ``"file"``: every instance of a test set goes to the group chosen for that set's
    instructions as a whole (the official script's one decision per test file)."""
    if route == "instance":
        return grouper.route(instructions)
    if route != "file":
        raise ValueError(f"route={route!r}; allowed: instance, file")
    groups = []
    for a, b in spans:
        groups += [grouper.route_set(instructions[a:b]).group] * (b - a)
    return groups


def _copy_adapter(model, source: str, target: str) -> None:
    """Warm start: every tensor of adapter ``target`` (LoRA A/B, and any trainable module
    copy PEFT keeps per adapter) takes the values of adapter ``source``."""
    import torch

    params = dict(model.named_parameters())
    src_tag, dst_tag = f".{source}.", f".{target}."
    copied = 0
    with torch.no_grad():
        for name, p in params.items():
            if dst_tag in name:
                src = params.get(name.replace(dst_tag, src_tag))
                if src is None or src.shape != p.shape:
                    raise RuntimeError(f"warm start: adapter {source!r} has no tensor matching {name}")
                p.copy_(src)
                copied += 1
    if not copied:
        raise RuntimeError(f"warm start: adapter {target!r} has no tensors to copy into")


def _stderr_is_terminal() -> bool:
    import sys

    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _fmt_row(row) -> str:
    return "[" + " ".join(f"{v:.0f}" for v in row) + "]"


def _warn_unknown_answers(tokenizer, tasks) -> None:
    """Warn, before training, about answers the tokenizer cannot spell (a word-level
    vocabulary, another script): they become the unknown token, and a model that learns to
    say it scores 0 % on them. Counted per task, with one example."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    for t in tasks:
        answers = {a for _, a, _ in t.train} | {a for _, refs, _ in t.test
                                                  for a in ([refs] if isinstance(refs, str) else refs)}
        bad = sorted(a for a in answers if unk in tokenizer(a, add_special_tokens=False)["input_ids"])
        if bad:
            log.warning("task %s: %d of %d distinct answers hold words the model's tokenizer does not know "
                        "(they become %s, e.g. %r): those answers cannot be learned or scored; use a model whose "
                        "tokenizer covers them", t.name, len(bad), len(answers), tokenizer.unk_token, bad[0])


def run(cfg: RunConfig, out_dir, *, quiet: bool = False, threads: int | None = None,
        on_task_end: Callable | None = None, launch: Launch | None = None) -> dict:
    """Run (or resume) a continual run in ``out_dir``; returns the results dict (on every
    rank of a launcher; rank 0 writes the folder). ``launch``: None reads the launcher's
    environment (one process without one)."""
    return ContinualRun(cfg, out_dir, quiet=quiet, threads=threads, on_task_end=on_task_end, launch=launch).run()


def regime_of_method(per_seed: list) -> Optional[dict]:
    """results.json's regime of one method from each seed's per-task records ({} where the
    task ran without an EMA): per task the records merged over the seeds, and all of them
    merged ("total"); each a `to_record` (mergeable counts) with its `to_dict` summary. None
    when no task ran an EMA."""
    tasks = max((len(s) for s in per_seed), default=0)
    per_task = []
    for j in range(tasks):
        recs = [s[j] for s in per_seed if j < len(s) and s[j]]
        per_task.append(_regime_entry(recs))
    every = [r for s in per_seed for r in s if r]
    if not every:
        return None
    return {"total": RegimeReport.from_records(every).to_record(), "summary": _regime_entry(every)["summary"],
            "per_task": per_task}


def _regime_entry(records: list) -> Optional[dict]:
    if not records:
        return None
    merged = RegimeReport.from_records(records)
    return {"record": merged.to_record(), "summary": merged.to_dict()}
