"""Instruction templates of the eight CoIN tasks, as test data for instruction grouping.

    from cl_core.continual.templates import TASKS, TEMPLATE_SETS, THRESHOLDS, synthetic_records

    TASKS                       the CoIN order: ScienceQA, TextVQA, ImageNet, GQA, VizWiz,
                                Grounding, VQAv2, OCRVQA
    TEMPLATE_SETS[set][task]    list of templates, as the official extraction yields them
                                (set: "original", "diverse", "10type")
    THRESHOLDS[set]             the official threshold (0.9 original, 0.3 diverse / 10type)
    TASK_KIND[task]             "vqa" | "grounding" | "classification" (how to extract)
    synthetic_records(task, set, n, seed=0)
                                n LLaVA-format conversation records of that task whose
                                instructions are the set's templates (for tests and the demo)

Provenance. The "original" templates are the LLaVA-1.5 / CoIN prompt strings (the ScienceQA one
is in the CoIN evaluation code; the others are the standard LLaVA-1.5 task prompts), written as
the official extraction returns them: the last line of the first human turn, the part before
':' for Grounding, and the second line (the question) for ImageNet training files.
The "diverse" and "10type" sets follow the CoIN / LCIA papers' descriptions (one reworded
template per task; ten templates per task) but their exact wording could not be checked
against the released files from here: treat them as representative data, not as a copy of the
benchmark files. Grouping decisions for them are always computed, in the tests, by the literal
official procedure, so the tests do not depend on the exact wording.
"""
from __future__ import annotations

import random

TASKS = ("ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCRVQA")

TASK_KIND = {t: "vqa" for t in TASKS}
TASK_KIND["ImageNet"] = "classification"
TASK_KIND["Grounding"] = "grounding"

THRESHOLDS = {"original": 0.9, "diverse": 0.3, "10type": 0.3}

_SQA = "Answer with the option's letter from the given choices directly."
_SHORT = "Answer the question using a single word or phrase."
_BOX = "Please provide the bounding box coordinate of the region this sentence describes"

ORIGINAL = {
    "ScienceQA": [_SQA],
    "TextVQA": [_SHORT],
    "ImageNet": ["What is the object in the image?"],
    "GQA": [_SHORT],
    "VizWiz": [_SHORT],
    "Grounding": [_BOX],
    "VQAv2": [_SHORT],
    "OCRVQA": [_SHORT],
}

DIVERSE = {
    "ScienceQA": [_SQA],
    "TextVQA": ["Capture the essence of your response in a single word or a concise phrase."],
    "ImageNet": ["Express your answer in a single word or a short, descriptive phrase."],
    "GQA": ["Respond to the question briefly, using only one word or a phrase."],
    "VizWiz": ["Provide a succinct response with a single word or phrase."],
    "Grounding": ["Identify the region that this sentence refers to and give its bounding box coordinates"],
    "VQAv2": ["Answer the question with just one word or a brief phrase."],
    "OCRVQA": ["Condense your answer for each question into a single word or concise phrase."],
}

TEN_TYPE = {
    "ScienceQA": [
        _SQA,
        "Select the correct answer from the given choices and reply with its letter.",
        "Choose the right option and respond with the letter only.",
        "Pick the best choice; answer with the corresponding option letter.",
        "Reply with the letter of the correct option from the choices above.",
        "Which option is correct? Give only its letter.",
        "From the listed choices, output the letter of the right answer.",
        "Answer by stating the letter of the option you choose.",
        "Respond with a single letter that marks the correct choice.",
        "Identify the correct choice and write down its option letter.",
    ],
    "TextVQA": [
        _SHORT,
        "Read the text in the image and answer with a word or a short phrase.",
        "Use the text visible in the picture to give a brief answer.",
        "Answer briefly, based on the words written in the image.",
        "Look at the scene text and reply with one word or a phrase.",
        "Give a concise answer using the text shown in the image.",
        "Respond with a short phrase read from the image.",
        "Based on the written text in the picture, answer in a few words.",
        "Answer the question with a word or phrase found in the image text.",
        "Provide a brief reply that relies on the text in the image.",
    ],
    "ImageNet": [
        "What is the object in the image?",
        "Which object is shown in this picture?",
        "Name the main object in the image.",
        "What kind of object does this photo show?",
        "Identify the object depicted in the picture.",
        "What category does the object in the image belong to?",
        "Classify the object shown in the photo.",
        "What is the main thing pictured here?",
        "Tell me the class of the object in this image.",
        "Which class best describes the object in the picture?",
    ],
    "GQA": [
        _SHORT,
        "Reason about the objects in the scene and answer in a word or phrase.",
        "Answer the compositional question about the scene briefly.",
        "Give a short answer about the relations between objects in the picture.",
        "Respond with a single word or phrase after reasoning about the scene.",
        "Answer concisely, considering the attributes and positions of objects.",
        "Use the scene layout to answer with a word or a phrase.",
        "Reply briefly to the question about the objects and their relations.",
        "Answer the scene question using a short phrase.",
        "Provide a concise answer grounded in the scene graph of the image.",
    ],
    "VizWiz": [
        _SHORT,
        "When the provided information is insufficient, respond with 'Unanswerable'.",
        "Answer briefly; if the photo does not show enough, reply 'Unanswerable'.",
        "Help a blind user: answer in a word or phrase, or say 'Unanswerable'.",
        "Give a short answer for the visually impaired user who took this photo.",
        "Reply concisely, or state 'Unanswerable' if the image is unclear.",
        "Answer the blind user's question with a single word or phrase.",
        "If the picture is too blurry to tell, answer 'Unanswerable'; otherwise answer briefly.",
        "Provide a brief answer to the question asked by a blind person.",
        "Answer in a few words; say 'Unanswerable' when the answer cannot be seen.",
    ],
    "Grounding": [
        _BOX,
        "Give the bounding box of the region described by this sentence",
        "Locate the object this sentence refers to and return its box coordinates",
        "Output the coordinates of the region that matches this description",
        "Find the area described below and provide its bounding box",
        "Return the box [x1, y1, x2, y2] for the region this phrase describes",
        "Where is the object described by this sentence? Answer with box coordinates",
        "Provide the region coordinates for the following referring expression",
        "Mark the described region with a bounding box and give its coordinates",
        "Detect the region referred to by this expression and output its box",
    ],
    "VQAv2": [
        _SHORT,
        "Answer the question about the image in a word or a short phrase.",
        "Look at the picture and give a brief answer.",
        "Respond to the visual question with a single word or phrase.",
        "Give a short answer based on what the image shows.",
        "Answer concisely using the content of the picture.",
        "Reply to the question about the photo in a few words.",
        "Provide a one-word or short-phrase answer about the image.",
        "Use the image to answer the question briefly.",
        "Answer the open-ended question about the picture concisely.",
    ],
    "OCRVQA": [
        _SHORT,
        "Read the book cover and answer with a word or phrase.",
        "Answer the question about the book cover briefly.",
        "Use the title, author and genre on the cover to answer concisely.",
        "Look at the book cover and give a short answer.",
        "Reply in a few words based on the text printed on the cover.",
        "What does the book cover tell you? Answer briefly.",
        "Answer the question about this book using a short phrase.",
        "Give a concise answer from the information on the book cover.",
        "Respond with a word or phrase read from the cover of the book.",
    ],
}

TEMPLATE_SETS = {"original": ORIGINAL, "diverse": DIVERSE, "10type": TEN_TYPE}

_QUESTIONS = [
    "what color is the car",
    "how many people are in the photo",
    "what is written on the sign",
    "is the light on",
    "what brand is the laptop",
    "which animal is on the left",
]
_REFS = ["the man in the red shirt", "left zebra", "the cup on the table", "small dog near the door"]
_CHOICES = "A. red\nB. blue\nC. green"


def synthetic_records(task: str, set_name: str = "original", n: int = 10, seed: int = 0) -> list:
    """n LLaVA-format conversation records of a CoIN task using the set's templates.

    The first human turn is built so that the official extraction returns the template:
    VQA tasks "<image>\\n{question}\\n{template}"; Grounding "<image>\\n{template}: {phrase}";
    ImageNet "<image>\\n{template}\\n{answer-format line}"; ScienceQA puts the choices first.
    """
    if task not in TASK_KIND:
        raise ValueError(f"unknown CoIN task {task!r}; known: {', '.join(TASKS)}")
    if set_name not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {set_name!r}; known: {', '.join(TEMPLATE_SETS)}")
    rng = random.Random(f"{task}/{set_name}/{seed}")
    templates = TEMPLATE_SETS[set_name][task]
    kind = TASK_KIND[task]
    records = []
    for i in range(n):
        template = templates[i % len(templates)]
        if kind == "grounding":
            human = f"<image>\n{template}: {rng.choice(_REFS)}"
            answer = "[0.1, 0.2, 0.5, 0.7]"
        elif kind == "classification":
            human = f"<image>\n{template}\n{_SHORT}"
            answer = rng.choice(["tabby cat", "golden retriever", "espresso"])
        elif task == "ScienceQA":
            human = f"<image>\nContext: a science question.\nWhich color is shown?\n{_CHOICES}\n{template}"
            answer = rng.choice("ABC")
        else:
            human = f"<image>\n{rng.choice(_QUESTIONS)}?\n{template}"
            answer = rng.choice(["red", "2", "stop", "yes"])
        records.append(
            {
                "id": f"{task}-{i}",
                "image": f"{task}/{i}.jpg",
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
            }
        )
    return records
