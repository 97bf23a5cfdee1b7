"""Task loading: the task sequence of a run, from the bundled benchmark or the user's task
files (LLaVA/CoIN conversation or instruction JSON/JSONL), in the configured order.

    tasks = load_tasks(cfg)          # list[Task]; each test record (prompt, answer, instruction)
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from cl_core.continual.config import RunConfig


@dataclass
class Task:
    """One task of the sequence: name, scoring rule, train/test (prompt, answer, instruction)."""

    name: str
    task_type: str
    train: list        # list of (prompt, answer, instruction)
    test: list
    templates: list = field(default_factory=list)


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
        refs = reference_answers(Path(cfg.test_files[k]) if cfg.test_files else path)
        tasks.append(Task(name, task_type,
                          [(r.prompt, str(r.answer), r.instruction) for r in train],
                          [(r.prompt, refs.get(r.index) or str(r.answer), r.instruction) for r in test_records],
                          templates(train)))
    if cfg.order == "reverse":
        tasks = tasks[::-1]
    elif cfg.order == "alphabet":
        tasks = sorted(tasks, key=lambda t: t.name.lower())
    return tasks




def reference_answers(path: Path) -> dict:
    """Record index -> list of reference answers, for the records of a JSON / JSONL task file
    that carry an ``answers`` list (strings, or VQA-annotation objects ``{"answer": ...}``);
    such test records are scored with VQA accuracy. Records without one are not listed."""
    import json

    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        rows = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:  # JSONL (the task-file reader has already validated the file)
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    out = {}
    for i, rec in enumerate(rows):
        refs = rec.get("answers") if isinstance(rec, dict) else None
        if not isinstance(refs, list) or not refs:
            continue
        values = [r.get("answer") if isinstance(r, dict) else r for r in refs]
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"task file {path}: record {i} has an 'answers' list with a non-text entry; give "
                             "strings or {\"answer\": \"...\"} objects")
        out[i] = values
    return out
