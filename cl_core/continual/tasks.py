"""Task loading: the task sequence of a run, from the bundled benchmark or the user's task
files (LLaVA/CoIN conversation or instruction JSON/JSONL), in the configured order.

    tasks = load_tasks(cfg)          # list[Task]; each test record (prompt, answer, instruction)
    tasks = load_tasks(cfg, with_images=True)   # and each record's image (Task.train_images/test_images)

With images (a multimodal run, cl_core.continual.multimodal): the bundled tasks' scene line is
taken out of every prompt and drawn instead (cl_core.continual.images); a task file's records
keep their ``image`` field resolved under ``cfg.image_folder``, every image checked before
training (a bad one stops the run naming the record, or with ``skip_bad`` the record is dropped
and counted in ``Task.skipped_images``).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from cl_core.continual.config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One task of the sequence: name, scoring rule, train/test (prompt, answer, instruction)."""

    name: str
    task_type: str
    train: list        # list of (prompt, answer, instruction)
    test: list
    templates: list = field(default_factory=list)
    # With images (multimodal runs): one per train/test record, parallel to train/test (a path,
    # a synthetic Scene, or None for a text-only record); empty lists for text runs.
    train_images: list = field(default_factory=list)
    test_images: list = field(default_factory=list)
    skipped_images: int = 0            # records dropped for a missing/unreadable image (skip_bad)
    image_sizes: dict = field(default_factory=dict)   # image path -> (width, height), as opened


def _with_images(task: Task) -> Task:
    """A bundled task with its scene lines drawn: prompts without the scene, images the Scenes."""
    from cl_core.continual.images import split_scene_prompt

    def split(records):
        out, images = [], []
        for p, a, ins in records:
            prompt, scene = split_scene_prompt(p)
            out.append((prompt, a, ins))
            images.append(scene)
        return out, images

    task.train, task.train_images = split(task.train)
    task.test, task.test_images = split(task.test)
    return task


def _task_name_for(path: Path, taken: set) -> str:
    stem = path.stem
    name = path.parent.name if stem.lower() in {"train", "test", "val", "data"} and path.parent.name else stem
    base, k = name, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def load_tasks(cfg: RunConfig, with_images: bool = False) -> list:
    """The task sequence (bundled benchmark, or the task files), in the configured order;
    ``with_images``: with each record's image (see the module docstring)."""
    from cl_core.continual.evaluation import infer_task_type

    if cfg.bundled:
        from cl_core.continual import synthetic

        data = synthetic.benchmark(list(cfg.tasks) if cfg.tasks else None, n_train=cfg.n_train,
                                   n_test=cfg.n_test, seed=0, variant=cfg.variant, order=cfg.order)
        tasks = [Task(td.name, td.task_type,
                      [(s.prompt, s.answer, s.instruction) for s in td.train],
                      [(s.prompt, s.answer, s.instruction) for s in td.test],
                      td.instructions) for td in data]
        return [_with_images(t) for t in tasks] if with_images else tasks
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
        train_images, test_images, skipped, sizes = [], [], 0, {}
        if with_images:
            from cl_core.continual.multimodal import check_images

            train, train_images, n, found = check_images(train, folder=cfg.image_folder, skip_bad=cfg.skip_bad,
                                                         where=f"task file {path}")
            skipped += n
            sizes.update(found)
            test_path = cfg.test_files[k] if cfg.test_files else path
            test_records, test_images, n, found = check_images(test_records, folder=cfg.image_folder,
                                                               skip_bad=cfg.skip_bad,
                                                               where=f"{'test' if cfg.test_files else 'task'} "
                                                                     f"file {test_path}")
            skipped += n
            sizes.update(found)
            if not train or not test_records:
                raise ValueError(f"task file {path}: no {'training' if not train else 'test'} records left after "
                                 f"skipping {skipped} with bad images")
        elif any(r.image for r in records):
            log.warning("task file %s: its records name images, but --model is a text model: the images are "
                        "not used (give an image-text model folder to train on them)", path)
        answers = [str(r.answer) for r in test_records]
        task_type = cfg.task_types[k] if cfg.task_types else infer_task_type(answers)
        refs = reference_answers(Path(cfg.test_files[k]) if cfg.test_files else path)
        tasks.append(Task(name, task_type,
                          [(r.prompt, str(r.answer), r.instruction) for r in train],
                          [(r.prompt, refs.get(r.index) or str(r.answer), r.instruction) for r in test_records],
                          templates(train), train_images, test_images, skipped, sizes))
    if cfg.order == "reverse":
        tasks = tasks[::-1]
    elif cfg.order == "alphabet":
        tasks = sorted(tasks, key=lambda t: t.name.lower())
    return tasks




def reference_answers(path: Path) -> dict:
    """Record index -> list of reference answers, for the records of a JSON / JSONL task file
    that carry an ``answers`` list (strings, or VQA-annotation objects ``{"answer": ...}``);
    such test records are scored with VQA accuracy. Records without one are not listed."""
    from cl_core.task_files import raw_records

    # The task-file reader's own reading (a BOM, JSONL, lines --skip-bad dropped), never a
    # second parse that could refuse what the reader accepted.
    rows = raw_records(path)
    out = {}
    for i, rec in rows:
        refs = rec.get("answers") if isinstance(rec, dict) else None
        if not isinstance(refs, list) or not refs:
            continue
        values = [r.get("answer") if isinstance(r, dict) else r for r in refs]
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"task file {path}: record {i} has an 'answers' list with a non-text entry; give "
                             "strings or {\"answer\": \"...\"} objects")
        out[i] = values
    return out
