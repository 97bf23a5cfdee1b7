"""The bundled benchmark: CoIN-like instruction tasks over synthetic text "scenes".

A scene is one to three objects on a 10 x 10 grid, each with a colour, a size, a shape,
a word written on it and a box ``x1 y1 x2 y2``, described in text (the "image")::

    scene : red small circle stop 1 2 3 5 ; blue big star exit 4 0 8 3 ;

Eight tasks mirror the eight CoIN datasets and their task types (answers in brackets):

    sqa        ScienceQA  multiple choice   how many objects are there? A. one B. two C. three  [letter]
    textvqa    TextVQA    short answer      what is written on the object?           [word]
    imagenet   ImageNet   classification    What is the object in the image?         [shape]
    gqa        GQA        short answer      what color is the star?                  [colour]
    vizwiz     VizWiz     short answer      what is written on the green object?     [word, or "unanswerable"
                                                                                      when no object is green]
    grounding  Grounding  box               ... this sentence describes: red circle  [x1 y1 x2 y2]
    vqav2      VQAv2      counting          how many objects are there?              [digit]
    ocrvqa     OCR-VQA    short answer      what is the title on the star?           [word]

The counting tasks (sqa, vqav2) see 1-3 objects, the others one object: a 2-layer model
trained for a minute on a CPU does not learn to pick one object out of several (a
measured limit, see the runner notes in the README), so the benchmark tests instruction
following and answer conventions rather than scene reasoning. The tasks read the same
scenes and answer with overlapping vocabularies under different conventions (words vs
"unanswerable", digits as counts vs as coordinates, letters vs digits for the same
count), so tuning on one disturbs the others: plain sequential LoRA forgets. Each task
has the three instruction-template sets of the papers (``original``, ``diverse``,
``10type``, from :mod:`cl_core.continual.templates`), laid out as in LLaVA/CoIN files so the
official extraction (:mod:`cl_core.task_files`) returns the template.

Stage 1 (the pre-trained base, like LLaVA-1.5 whose instruction mix already holds VQAv2,
GQA, TextVQA-like and OCR-VQA data) is a multi-task mix: describe the object, count the
objects, and the question forms of TextVQA, GQA, VQAv2 and OCR-VQA with the generic
short-answer instruction. Multiple choice by letter, "unanswerable", classification and
boxes are new in stage 2.

Everything is generated from ``random.Random`` seeded by strings, so the data are the
same on every machine and Python version.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

COLORS = ("red", "blue", "green", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
SIZES = ("small", "big")
WORDS = ("stop", "exit", "open", "sale", "cafe", "bank", "park", "hotel")
GRID = 10
LETTERS = "ABC"
UNANSWERABLE = "unanswerable"
SQA_CHOICES = "A. one B. two C. three"

# CoIN's eight datasets in the "origin" order of the papers, with our short names.
TASK_NAMES = ("sqa", "textvqa", "imagenet", "gqa", "vizwiz", "grounding", "vqav2", "ocrvqa")
COIN_NAMES = {
    "sqa": "ScienceQA", "textvqa": "TextVQA", "imagenet": "ImageNet", "gqa": "GQA",
    "vizwiz": "VizWiz", "grounding": "Grounding", "vqav2": "VQAv2", "ocrvqa": "OCRVQA",
}
# Scoring rule per task (cl_core.continual.evaluation): option letter, exact match, IoU >= 0.5.
TASK_TYPES = {
    "sqa": "mc", "textvqa": "short", "imagenet": "cls", "gqa": "short",
    "vizwiz": "short", "grounding": "box", "vqav2": "count", "ocrvqa": "short",
}
ORDERS = {
    "origin": list(TASK_NAMES),
    "reverse": list(reversed(TASK_NAMES)),
    # CoIN's alphabet order sorts the dataset names.
    "alphabet": sorted(TASK_NAMES, key=lambda t: COIN_NAMES[t].lower()),
}
VARIANTS = ("original", "diverse", "10type")
STAGE1_INSTRUCTION = "Describe the object."
STAGE1_LIST = "List the sizes."
# Stage 1's own answer convention for questions: a full sentence, asked for in three lengths.
STAGE1_SENTENCE = ("Answer with a sentence.", "Answer the question in a full sentence.",
                   "Give your answer as one complete sentence about the scene.")
STAGE1_QUESTION_KINDS = ("word", "color", "title", "shape", "box")
# The kinds whose question line is a stage-2 task's own (_question), asked in stage 1's convention.
_STAGE1_VQA_TASK = {"word": "textvqa", "color": "gqa", "title": "ocrvqa", "count": "vqav2"}
SHORT_ANSWER = "Answer the question using a single word or phrase."
COUNT_TASKS = ("sqa", "vqav2")


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    box: tuple  # (x1, y1, x2, y2), 0 <= x1 < x2 <= 9
    word: str

    def describe(self) -> str:
        return f"{self.color} {self.size} {self.shape} {self.word} {box_text(self.box)}"


@dataclass(frozen=True)
class Scene:
    objects: tuple

    def describe(self) -> str:
        return "scene : " + " ".join(o.describe() + " ;" for o in self.objects)


@dataclass(frozen=True)
class Sample:
    """One instruction example. ``prompt`` is what the model reads (scene, question,
    instruction on separate lines); ``instruction`` is the template text used for
    grouping and routing (for grounding, the part before ':')."""

    prompt: str
    answer: str
    instruction: str
    task: str
    task_type: str


@dataclass
class TaskData:
    name: str
    task_type: str
    train: list
    test: list

    @property
    def instructions(self) -> list[str]:
        """The distinct instruction templates of the training split, in first-seen order."""
        return list(dict.fromkeys(s.instruction for s in self.train))


def box_text(box) -> str:
    return " ".join(str(v) for v in box)


def random_scene(rng: random.Random, n_min: int = 1, n_max: int = 3) -> Scene:
    """A scene of ``n_min..n_max`` objects with distinct colours, shapes, words and boxes."""
    n = rng.randint(n_min, n_max)
    colors = rng.sample(COLORS, n)
    shapes = rng.sample(SHAPES, n)
    words = rng.sample(WORDS, n)
    sizes = [rng.choice(SIZES) for _ in range(n)]
    boxes = set()
    objects = []
    for i in range(n):
        while True:
            x1, x2 = sorted(rng.sample(range(GRID), 2))
            y1, y2 = sorted(rng.sample(range(GRID), 2))
            if (x1, y1, x2, y2) not in boxes:
                boxes.add((x1, y1, x2, y2))
                break
        objects.append(SceneObject(colors[i], shapes[i], sizes[i], (x1, y1, x2, y2), words[i]))
    return Scene(tuple(objects))


# --------------------------------------------------------------------------- templates

def instruction_templates(task: str, variant: str = "original") -> list[str]:
    """The instruction templates of ``task`` under ``variant`` (cl_core.continual.templates)."""
    _check_task(task)
    from cl_core.continual.templates import TEMPLATE_SETS

    if variant not in TEMPLATE_SETS:
        raise ValueError(f"unknown instruction variant {variant!r}; allowed: {', '.join(TEMPLATE_SETS)}")
    return list(TEMPLATE_SETS[variant][COIN_NAMES[task]])


def _check_task(task: str) -> None:
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; the bundled tasks are: {', '.join(TASK_NAMES)}")


# --------------------------------------------------------------------------- questions

def _question(task: str, rng: random.Random, scene: Scene):
    """(question line or None, answer, referring expression or None)."""
    obj = scene.objects[0]
    if task == "sqa":
        # Fixed choices (a tiny model cannot learn to match shuffled choices within the
        # demo's budget); the answer is the option's letter.
        return f"how many objects are there ?\n{SQA_CHOICES}", LETTERS[len(scene.objects) - 1], None
    if task == "textvqa":
        return "what is written on the object ?", obj.word, None
    if task == "imagenet":
        return None, obj.shape, None
    if task == "gqa":
        return f"what color is the {obj.shape} ?", obj.color, None
    if task == "vizwiz":
        if rng.random() < 0.3:
            absent = rng.choice([c for c in COLORS if c not in {o.color for o in scene.objects}])
            return f"what is written on the {absent} object ?", UNANSWERABLE, None
        return f"what is written on the {obj.color} object ?", obj.word, None
    if task == "grounding":
        return None, box_text(obj.box), f"{obj.color} {obj.shape}"
    if task == "vqav2":
        return "how many objects are there ?", str(len(scene.objects)), None
    if task == "ocrvqa":
        return f"what is the title on the {obj.shape} ?", obj.word, None
    raise AssertionError(task)


def _scene_for(task: str, rng: random.Random) -> Scene:
    """Counting tasks see 1-3 objects; the others one object (like a classification or
    single-subject photo: a tiny model cannot learn to pick one of several objects within
    the demo's budget)."""
    return random_scene(rng, 1, 3) if task in COUNT_TASKS else random_scene(rng, 1, 1)


def make_sample(task: str, rng: random.Random, template: str) -> Sample:
    """One sample, laid out as a LLaVA/CoIN first human turn with the scene as the image:
    VQA tasks ``scene / question / template``; grounding ``scene / template: phrase``;
    ImageNet ``scene / template / answer-format line`` (the official extraction of each
    kind returns the template)."""
    scene = _scene_for(task, rng)
    question, answer, ref = _question(task, rng, scene)
    if task == "grounding":
        lines = [scene.describe(), f"{template}: {ref}"]
    elif task == "imagenet":
        lines = [scene.describe(), template, SHORT_ANSWER]
    else:
        lines = [scene.describe(), question, template]
    return Sample("\n".join(lines), answer, template, task, TASK_TYPES[task])


def generate_task(task: str, n: int, *, seed: int = 0, split: str = "train",
                  variant: str = "original") -> list[Sample]:
    """``n`` samples of ``task``; each draws one of the task's templates at random."""
    _check_task(task)
    templates = instruction_templates(task, variant)
    rng = random.Random(f"cl_core/{task}/{split}/{variant}/{seed}")
    return [make_sample(task, rng, rng.choice(templates)) for _ in range(n)]


def stage1_question(rng: random.Random, scene: Scene) -> tuple:
    """(question line, sentence answer) of a stage-1 question about ``scene``: the question
    forms of the VQA tasks and two more (shape, box), answered in stage 1's own convention,
    a sentence that names the field."""
    obj = scene.objects[0]
    kind = rng.choice(STAGE1_QUESTION_KINDS) if len(scene.objects) == 1 else "count"
    if kind == "shape":
        return "what shape is the object ?", f"the shape is {obj.shape}"
    if kind == "box":
        return "where is the object ?", f"the box is {box_text(obj.box)}"
    question, answer, _ = _question(_STAGE1_VQA_TASK[kind], rng, scene)  # these draw nothing from rng
    if kind == "count":
        return question, f"there are {answer} objects"
    return question, f"the {kind} is {answer}"


def stage1_samples(n: int, *, seed: int = 0, questions: bool = True) -> list[Sample]:
    """The stage-1 mix (the "pre-training" analogue, like LLaVA-1.5's instruction mix, which
    already holds VQA questions): describe the object of a one-object scene (35 %: its colour,
    size, shape, word and box), list the sizes of a 1-3 object scene (15 %: it attends to every
    object), and questions about a scene answered in a full sentence that names the field
    (50 %: "the word is stop", "there are 2 objects"; :func:`stage1_question`), under
    instructions of three lengths, so the base has learned to find each field whatever the
    prompt's length. No stage-2 instruction or answer convention is in the mix (no
    single-field answers, no letters, no "unanswerable", no boxes on their own), so the base
    solves no stage-2 task zero-shot; what each stage-2 task must learn is its instruction's
    answer convention, as CoIN's tasks are for LLaVA.

    ``questions=False``: describe (60 %) and list (40 %) only, the mix of the drawn-scene
    benchmark (cl_core.continual.images), whose bottleneck is reading the picture, not finding a
    field: with the questions in the mix its 64-wide tiny LLaVA read the shape and the word codes
    less well (measured, docs/runner.md)."""
    rng = random.Random(f"cl_core/stage1/{seed}")
    out = []
    for _ in range(n):
        r = rng.random()
        kind = ("describe" if r < 0.6 else "list") if not questions else \
            "describe" if r < 0.35 else "list" if r < 0.5 else "question"
        if kind == "describe":
            scene = random_scene(rng, 1, 1)
            prompt, answer = f"{scene.describe()}\n{STAGE1_INSTRUCTION}", scene.objects[0].describe()
        elif kind == "list":
            scene = random_scene(rng, 1, 3)
            prompt, answer = f"{scene.describe()}\n{STAGE1_LIST}", " ".join(o.size for o in scene.objects)
        else:
            scene = random_scene(rng, 1, 3) if rng.random() < 0.2 else random_scene(rng, 1, 1)
            question, answer = stage1_question(rng, scene)
            prompt = f"{scene.describe()}\n{question}\n{rng.choice(STAGE1_SENTENCE)}"
        out.append(Sample(prompt, answer, prompt.split("\n")[-1], "stage1", "exact"))
    return out


def benchmark(tasks=None, *, n_train: int = 256, n_test: int = 64, seed: int = 0,
              variant: str = "original", order: str = "origin") -> list[TaskData]:
    """The bundled tasks (all eight, or the given names) in ``order``, train and test splits."""
    if order not in ORDERS:
        raise ValueError(f"unknown task order {order!r}; allowed: {', '.join(ORDERS)}")
    if tasks is None:
        tasks = ORDERS[order]
    else:  # a given list: "origin" keeps it, "reverse" reverses it, "alphabet" sorts it
        for task in tasks:
            _check_task(task)
        if order == "reverse":
            tasks = list(tasks)[::-1]
        elif order == "alphabet":
            tasks = sorted(tasks, key=lambda t: COIN_NAMES[t].lower())
    out = []
    for task in tasks:
        _check_task(task)
        out.append(TaskData(
            task, TASK_TYPES[task],
            generate_task(task, n_train, seed=seed, split="train", variant=variant),
            generate_task(task, n_test, seed=seed, split="test", variant=variant),
        ))
    return out


def vocabulary_texts() -> list[str]:
    """Every string the generators can emit words from (for the tiny tokenizer's vocabulary)."""
    texts = list(COLORS + SHAPES + SIZES + WORDS) + [str(i) for i in range(GRID)]
    texts += [SQA_CHOICES, UNANSWERABLE, STAGE1_INSTRUCTION, STAGE1_LIST, SHORT_ANSWER, *STAGE1_SENTENCE]
    texts += ["what shape is the object ?", "where is the object ?", "the word color title shape box is",
              "there are objects"]
    texts += [
        "scene : ; . ? :",
        "what color is the ?", "what is written on the object ?", "how many objects are there ?",
        "what is the title on the ?",
    ]
    for task in TASK_NAMES:
        for variant in VARIANTS:
            texts += instruction_templates(task, variant)
    return texts
