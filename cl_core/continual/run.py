"""The continual runner: LoRA-tune a causal LM on tasks in order, evaluate every task after
each one, with plain LoRA, fixed-β EMA, DEMA, or DEMA with instruction grouping.

    from cl_core.continual.run import RunConfig, run
    results = run(RunConfig(methods=("lora", "dema"), seeds=(0, 1)), "runs/x")

Methods (docs/design.md §2, last paragraph; as in the official code every task is its own
training run, the EMA starts lazily at the task's first optimizer step and replaces the
weights at the task's end):

    lora        plain sequential LoRA fine-tuning, one LoRA set, no EMA
    ema         one LoRA set, fixed-β EMA (DEMAConfig(formula="fixed", beta=0.99)) from task 2
    dema        one LoRA set, dynamic EMA from task 2 (nothing to protect on the first)
    group       instruction grouping without any EMA (dema+group's ablation: grouping's effect alone)
    dema+group  instruction grouping: a task that continues a group's LoRA set gets DEMA, a
                task that opens a new set does not; at evaluation each test instance is routed
                to a group by its instruction and answered by that group's adapter
    lcia        the official LCIA recipe; cl-next: Continual-NExT's (cl_core.continual.config)

The custom methods take the run's flags (new-set start, averaged tensors, clipping, test
routing); the recipes fix their own. Per task the state records whether DEMA was on
(``dema``) and which task's weights the trained set started from (``init_from``).

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

import gc
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from cl_core import metrics as cl_metrics
from cl_core.atomic_io import atomic_dir, write_json_atomic
from cl_core.continual.config import METHODS, ORDERS, RunConfig, method_slug  # noqa: F401 - re-exported
from cl_core.continual.state import RunState, TaskRecord, check_run_folder, write_json
from cl_core.continual.tasks import Task, load_tasks  # noqa: F401 - re-exported
from cl_core.continual.alpha import alpha_counts
from cl_core.continual.alpha import merge as merge_alpha
from cl_core.continual.training import (dema_callback, describe_model, load_base, quiet_libraries, seed_for,
                                        stage1_score, tiny_tokenizer, train, train_stage1, user_tokenizer)

log = logging.getLogger("cl_core.continual.run")


class ContinualRun:
    """One run folder: prepares data and models, runs the chains, resumes them."""

    def __init__(self, cfg: RunConfig, out_dir, *, quiet: bool = False, threads: int | None = None,
                 on_task_end: Callable | None = None):
        cfg.validate()
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
        self.max_new_tokens = cfg.max_new_tokens

    # ------------------------------------------------------------ preparation
    def prepare(self) -> None:
        """Everything that can fail on bad input, before any training."""
        check_run_folder(self.out, self.cfg.to_dict(), RunConfig().to_dict())
        self.tasks = load_tasks(self.cfg)
        if not self.cfg.bundled and self.cfg.model is None:
            raise ValueError("--tasks without --model: the bundled tiny model only knows the bundled benchmark's "
                             "words (yours would become <unk>); give --model DIR, a local causal-LM folder "
                             "with its tokenizer")
        if self.cfg.model is not None:
            self.tokenizer = user_tokenizer(self.cfg.model)
            # Weights that do not match config.json fail here, before anything is written.
            with quiet_libraries():
                load_base(Path(self.cfg.model), self.tokenizer)
        else:
            self.tokenizer = tiny_tokenizer()
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
        key = str(seed)
        shared = self.cfg.model is not None or self.cfg.stage1_seed is not None  # one model for every seed
        if self.cfg.model is None and not (self.base_dir(seed) / "config.json").exists():
            train_stage1(self.cfg, self.tokenizer, self.base_seed(seed), self.base_dir(seed),
                         self.out / ".trainer", quiet=not self.bars)
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
                if self.cfg.model is None:
                    info["stage1"] = stage1_score(model, self.tokenizer, self.base_seed(seed), self.cfg)
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
            adapters = [adapter_name(g) for g in route_groups(grouper, instructions, spans, route)]
        with tqdm(total=len(prompts), desc=progress_desc, disable=not self.bars, leave=False, unit="q") as bar:
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

    def run_chain(self, method: str, seed: int, state: RunState) -> None:
        import torch

        from cl_core.grouping import Decision, InstructionGrouper
        from cl_core.lora_sets import LoRASets

        cfg, tasks = self.cfg, self.tasks
        plan = cfg.plan(method)
        done = state.finished(method, seed)
        if len(done) >= len(tasks):
            return
        cdir = self.chain_dir(method, seed)
        cdir.mkdir(parents=True, exist_ok=True)
        base = self._load_base(seed)
        grouper = InstructionGrouper(threshold=cfg.threshold()) if plan.grouping else None
        if done:
            last = cdir / done[-1].adapters
            log.info("%s seed %d: resuming after task %d/%d (%s)", method, seed, len(done), len(tasks), last)
            sets = LoRASets.from_pretrained(base, last, is_trainable=True, lora_config=self._lora_config())
            if grouper is not None:
                grouper = InstructionGrouper.load(last / "grouper.json")
        else:
            sets = LoRASets(base, self._lora_config())
        last_of_group = {r.group: k for k, r in enumerate(done)}  # the task that last trained each set
        for j in range(len(done), len(tasks)):
            task = tasks[j]
            t0 = time.time()
            if grouper is not None:
                decision = grouper.assign(task.templates, name=task.name)
            else:
                decision = Decision(group=0, reused=j > 0, similarities=[])
            # A new LoRA set draws its initialisation from the seed and the set (group) only, not
            # the method: every method of a seed starts set g from the same weights (paired
            # comparisons), and a resumed chain draws the same ones.
            torch.manual_seed(seed_for(seed, "adapter", decision.group))
            adapter, reused = sets.prepare_task(decision)
            if reused:
                init_from = last_of_group[decision.group]   # the set's own latest weights
            elif plan.new_set_init == "latest" and j > 0:
                init_from = j - 1                            # the most recently trained set's weights
                _copy_adapter(sets.model, done[j - 1].adapter, adapter)
            else:
                init_from = None
            use_ema = cfg.dema_on(method, j, reused)
            callbacks = [dema_callback(plan.ema, plan.params)] if use_ema else []
            if not self.quiet:
                log.info("%s seed %d: task %d/%d %s (adapter %s%s%s)", method, seed, j + 1, len(tasks), task.name,
                         adapter, "" if init_from is None else f", from task {init_from + 1}",
                         ", EMA on" if use_ema else "")
            loss = train(sets.model, self.tokenizer, [(p, a) for p, a, _ in task.train],
                         out_dir=self.out / ".trainer", steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                         warmup=cfg.warmup_steps, seed=seed_for(seed, "data", j), quiet=not self.bars,
                         callbacks=callbacks, max_length=cfg.max_length, max_grad_norm=plan.max_grad_norm)
            train_s = time.time() - t0
            row = self._evaluate(sets.model, grouper, route=plan.route,
                                 progress_desc=f"eval {method} s{seed} t{j + 1}")
            alpha_mean, counts = [], {}
            if callbacks:
                cb = callbacks[0]
                hist = [a.tolist() for a in cb.alpha_history]
                alpha_mean = [sum(a) / len(a) for a in hist if a]
                numel = [p.numel() for p in cb.engine.params]
                fallback = None if plan.ema.formula == "fixed" else plan.ema.fallback
                counts = alpha_counts(hist, fallback, numel)
                write_json_atomic({"task": task.name, "names": list(cb.engine.names), "numel": numel,
                                   "alpha": hist}, cdir / f"alpha_task{j}.json", indent=None)
            # Persist: adapters of this task first, then the state that points at them.
            adir_name = f"task{j}"
            with atomic_dir(cdir / adir_name) as tmp:
                sets.save(tmp)
                if grouper is not None:
                    grouper.save(tmp / "grouper.json")
            done.append(TaskRecord(
                task=task.name, row=row, loss=loss, adapter=adapter, group=decision.group,
                reused=bool(reused), ema=use_ema, dema=use_ema and plan.ema.formula != "fixed",
                init_from=init_from, adapters=adir_name,
                similarities=[round(float(s), 4) for s in getattr(decision, "similarities", [])],
                alpha_mean=alpha_mean, alpha_counts=counts,
                train_seconds=round(train_s, 2), seconds=round(time.time() - t0, 2),
            ))
            last_of_group[decision.group] = j
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

        t0 = time.time()  # the run's wall time: the report and the CLI state this one number
        self.prepare()
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.json", self.cfg.to_dict())
        state = RunState.load(self.out / "state.json")
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
        shutil.rmtree(self.out / ".trainer", ignore_errors=True)
        results = self.collect(state)
        results["wall_seconds_this_call"] = round(time.time() - t0, 2)
        write_json(self.out / "results.json", results)
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
            "config": self.cfg.to_dict(), "base": state.base, "methods": {},
        }
        described = [b["model"] for b in state.base.values() if "model" in b]
        if described:
            out["model"] = described[0]
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
        from cl_core.continual.report import conclusions

        out["conclusions"] = conclusions(out)
        return out


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


def run(cfg: RunConfig, out_dir, *, quiet: bool = False, threads: int | None = None,
        on_task_end: Callable | None = None) -> dict:
    """Run (or resume) a continual run in ``out_dir``; returns the results dict."""
    return ContinualRun(cfg, out_dir, quiet=quiet, threads=threads, on_task_end=on_task_end).run()
