"""Method ``replay``: experience replay (rehearsal; e.g. Rolnick et al., NeurIPS 2019; CoIN's
and MCITlib's "Replay"). A bounded buffer of earlier tasks' training records (prompt, answer,
image) is mixed into each later task's batches: ``replay_ratio`` of every batch (rounded to
whole records) comes from the buffer, the rest from the task. The buffer holds at most
``replay_size`` records: ``per-task`` keeps an equal share of each finished task (a seeded
uniform draw; ``replay_per_task`` N: N records of each instead), ``reservoir`` keeps a uniform sample of every record seen (reservoir sampling,
seeded). It is saved with each task's adapters (``replay.json``; image records keep their
image: a path as given, a bundled Scene as its description, a picture in memory as a PNG beside
it) and read back on resume."""
from __future__ import annotations

import json
import random

from cl_core.continual.baselines import Baseline

FILE = "replay.json"
SAMPLING = ("per-task", "reservoir")


def mix(task: list, buffer: list, *, steps: int, batch_size: int, ratio: float, rng: random.Random) -> list:
    """``steps`` batches of ``batch_size`` records in order: round(ratio·batch_size) from
    ``buffer`` (each batch a seeded draw) and the rest from ``task`` (seeded passes through it),
    each batch shuffled."""
    k = min(batch_size, round(ratio * batch_size)) if buffer else 0
    out, order = [], []
    for _ in range(steps):
        batch = []
        for _ in range(batch_size - k):
            if not order:
                order = list(range(len(task)))
                rng.shuffle(order)
            batch.append(task[order.pop()])
        batch += [buffer[rng.randrange(len(buffer))] for _ in range(k)]
        rng.shuffle(batch)
        out += batch
    return out


class Hook(Baseline):
    def __init__(self, cfg, seed):
        super().__init__(cfg, seed)
        self.buffer: list = []        # (task index, record)
        self.seen = 0                 # records offered to the reservoir

    @property
    def ordered(self) -> bool:
        """Mixed batches are read in order; task 1 (no buffer yet) is shuffled as lora's."""
        return bool(self.buffer)

    def _rng(self, *label):
        from cl_core.continual.training import seed_for

        return random.Random(seed_for(self.seed, "replay", *label))

    def examples(self, j, examples):
        if not self.buffer:
            return examples
        return mix(examples, [r for _, r in self.buffer], steps=self.cfg.steps, batch_size=self.cfg.batch_size,
                   ratio=self.cfg.replay_ratio, rng=self._rng("mix", j))

    def end_task(self, model, j, examples, encode):
        self.add(j, examples)

    def add(self, j: int, records: list) -> None:
        """Offer task ``j``'s training records to the buffer."""
        size, rng = self.cfg.replay_size, self._rng("buffer", j)
        if self.cfg.replay_sampling == "per-task":
            tasks = sorted({t for t, _ in self.buffer} | {j})
            share = self.cfg.replay_per_task or size // len(tasks)
            kept = []
            for t in tasks:   # the earlier tasks' draws cut to the new share (their first records)
                kept += [x for x in self.buffer if x[0] == t][:share]
            draw = rng.sample(range(len(records)), min(share, len(records)))
            self.buffer = kept + [(j, records[i]) for i in draw]
            return
        for r in records:   # reservoir (Vitter's algorithm R)
            self.seen += 1
            if len(self.buffer) < size:
                self.buffer.append((j, r))
            else:
                i = rng.randrange(self.seen)
                if i < size:
                    self.buffer[i] = (j, r)

    def save(self, folder):
        rows = []
        for n, (t, (prompt, answer, image)) in enumerate(self.buffer):
            if hasattr(image, "describe"):          # a bundled Scene: its description rebuilds it
                image = {"scene": image.describe()}
            elif image is not None and not isinstance(image, str):   # a picture in memory
                name = f"replay_{n}.png"
                image.save(folder / name)
                image = {"png": name}
            rows.append({"task": t, "prompt": prompt, "answer": answer, "image": image})
        (folder / FILE).write_text(json.dumps({"seen": self.seen, "records": rows}))

    def load(self, folder):
        path = folder / FILE
        if not path.is_file():
            raise FileNotFoundError(f"replay: cannot resume, {path} is missing (the buffer of the finished tasks)")
        data = json.loads(path.read_text())
        self.seen = data["seen"]
        self.buffer = []
        for row in data["records"]:
            image = row["image"]
            if isinstance(image, dict) and "scene" in image:
                from cl_core.continual.images import scene_from_description

                image = scene_from_description(image["scene"])
            elif isinstance(image, dict):
                from PIL import Image

                with Image.open(folder / image["png"]) as im:
                    image = im.convert("RGB")
            self.buffer.append((row["task"], (row["prompt"], row["answer"], image)))
