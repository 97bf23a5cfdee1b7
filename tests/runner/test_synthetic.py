"""The bundled benchmark: determinism, vocabulary coverage, answers per task type, the
official instruction extraction, task orders, and the tiny model/tokenizer."""
import json
from collections import Counter

import pytest

from cl_core.continual import synthetic as S
from cl_core.continual import tiny_model as T
from cl_core.continual.evaluation import parse_box, parse_letter, score
from cl_core.task_files import load_task_file


@pytest.fixture(scope="module")
def tok():
    return T.build_tokenizer(T.build_vocab(S.vocabulary_texts()))


def test_deterministic_and_split_dependent():
    a = S.generate_task("gqa", 20, seed=3, split="train")
    b = S.generate_task("gqa", 20, seed=3, split="train")
    c = S.generate_task("gqa", 20, seed=3, split="test")
    assert a == b
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert S.stage1_samples(10, seed=1) == S.stage1_samples(10, seed=1)
    assert S.stage1_samples(10, seed=1) != S.stage1_samples(10, seed=2)


def test_stage1_asks_the_vqa_questions_but_never_in_a_stage2_answer_convention():
    """Stage 1 teaches the base to find each field (the VQA question forms are in its mix, as in
    LLaVA's), answered as a sentence that names the field; no stage-2 answer, no stage-2
    instruction and no single-field answer is in it, so every stage-2 task must be learned."""
    stage1 = S.stage1_samples(2000, seed=4)
    questions = Counter(s.prompt.split("\n")[1] for s in stage1 if s.instruction in S.STAGE1_SENTENCE)
    stage2_questions = {s.prompt.split("\n")[1] for t in ("textvqa", "gqa", "vqav2", "ocrvqa")
                        for s in S.generate_task(t, 100)}
    assert stage2_questions <= set(questions)      # every VQA question form, several times
    assert len(questions) >= 12 and min(questions.values()) >= 3
    assert {s.instruction for s in stage1} == {S.STAGE1_INSTRUCTION, S.STAGE1_LIST, *S.STAGE1_SENTENCE}
    stage2_answers = {s.answer for t in S.TASK_NAMES for s in S.generate_task(t, 300)}
    for s in stage1:
        assert s.answer not in stage2_answers, s
        if s.instruction in S.STAGE1_SENTENCE:  # the field's name, then its value(s)
            assert s.answer.startswith(("the word is ", "the color is ", "the title is ", "the shape is ",
                                        "the box is ", "there are ")), s.answer
    # the drawn scenes' base: describe and list only
    assert {s.instruction for s in S.stage1_samples(300, seed=4, questions=False)} == {S.STAGE1_INSTRUCTION,
                                                                                        S.STAGE1_LIST}
    # what the sentence says is the scene's
    from cl_core.continual.images import scene_from_description

    fields = {"word": "word", "title": "word", "color": "color", "shape": "shape"}
    for s in stage1:
        if s.instruction not in S.STAGE1_SENTENCE:
            continue
        scene = scene_from_description(s.prompt.split("\n")[0])
        obj, words = scene.objects[0], s.answer.split()
        if words[0] == "there":
            assert words[2] == str(len(scene.objects))
        elif words[1] == "box":
            assert " ".join(words[3:]) == S.box_text(obj.box)
        else:
            assert words[3] == getattr(obj, fields[words[1]]), s


@pytest.mark.parametrize("variant", S.VARIANTS)
def test_vocabulary_covers_every_sample(tok, variant):
    longest = 0
    for task in S.TASK_NAMES:
        for s in S.generate_task(task, 150, variant=variant):
            ids = tok(s.prompt + "\n" + s.answer)["input_ids"]
            assert tok.unk_token_id not in ids, tok.convert_ids_to_tokens(ids)
            longest = max(longest, len(ids))
    for s in S.stage1_samples(300):
        assert tok.unk_token_id not in tok(s.prompt + "\n" + s.answer)["input_ids"]
    assert longest < 100  # short sequences: the CPU budget depends on it


def test_vocab_is_small_and_sorted():
    vocab = T.build_vocab(S.vocabulary_texts())
    assert vocab[:4] == list(T.SPECIAL_TOKENS)
    assert vocab[4:] == sorted(vocab[4:])
    assert 100 < len(vocab) < 600


def test_answers_match_their_task_types():
    for task in S.TASK_NAMES:
        samples = S.generate_task(task, 200)
        assert all(s.task == task and s.task_type == S.TASK_TYPES[task] for s in samples)
        for s in samples:
            assert score(s.task_type, s.answer, s.answer)  # the gold answer scores as correct
        if task == "sqa":
            assert {parse_letter(s.answer) for s in samples} == {"A", "B", "C"}
        if task == "grounding":
            boxes = [parse_box(s.answer) for s in samples]
            assert all(b is not None and b[0] < b[2] and b[1] < b[3] for b in boxes)
        if task == "vqav2":
            assert {s.answer for s in samples} == {"1", "2", "3"}
        if task == "vizwiz":
            share = sum(s.answer == S.UNANSWERABLE for s in samples) / len(samples)
            assert 0.15 < share < 0.45
    # Answer vocabularies overlap across tasks (digits: counts and coordinates; words; shapes).
    words = {t: Counter(s.answer for s in S.generate_task(t, 200)) for t in S.TASK_NAMES}
    assert set(words["textvqa"]) & set(words["ocrvqa"]) & set(words["vizwiz"])


def test_templates_come_from_the_papers_sets():
    from cl_core.continual.templates import TEMPLATE_SETS

    for variant in S.VARIANTS:
        for task in S.TASK_NAMES:
            assert S.instruction_templates(task, variant) == TEMPLATE_SETS[variant][S.COIN_NAMES[task]]
    tenth = S.generate_task("textvqa", 300, variant="10type")
    assert len({s.instruction for s in tenth}) == 10
    with pytest.raises(ValueError, match="unknown instruction variant"):
        S.instruction_templates("gqa", "fancy")
    with pytest.raises(ValueError, match="unknown task"):
        S.generate_task("mnist", 3)


@pytest.mark.parametrize("task", S.TASK_NAMES)
def test_official_extraction_recovers_the_instruction(tmp_path, task):
    """Written as LLaVA conversation files in a folder named after the CoIN dataset, the
    samples read back (cl_core.task_files, official extraction) with the same instruction."""
    samples = S.generate_task(task, 12, variant="10type")
    folder = tmp_path / S.COIN_NAMES[task]
    folder.mkdir()
    # The scene line stands where LLaVA files have the "<image>" line.
    records = [{"id": i, "image": f"{i}.png",
                "conversations": [{"from": "human", "value": s.prompt},
                                  {"from": "gpt", "value": s.answer}]} for i, s in enumerate(samples)]
    (folder / "train.json").write_text(json.dumps(records))
    back = load_task_file(folder / "train.json")
    assert [r.instruction for r in back] == [s.instruction for s in samples]
    assert [r.prompt for r in back] == [s.prompt for s in samples]
    assert [r.answer for r in back] == [s.answer for s in samples]


def test_task_orders_origin_reverse_alphabet_and_unknown_refused():
    assert S.ORDERS["origin"] == ["sqa", "textvqa", "imagenet", "gqa", "vizwiz", "grounding", "vqav2", "ocrvqa"]
    assert S.ORDERS["reverse"] == S.ORDERS["origin"][::-1]
    coin = [S.COIN_NAMES[t] for t in S.ORDERS["alphabet"]]
    assert coin == sorted(coin, key=str.lower)
    assert [t.name for t in S.benchmark(order="reverse", n_train=2, n_test=2)] == S.ORDERS["reverse"]
    assert [t.name for t in S.benchmark(["vqav2", "gqa", "sqa"], order="reverse", n_train=1, n_test=1)] == \
        ["sqa", "gqa", "vqav2"]
    assert [t.name for t in S.benchmark(["vqav2", "gqa", "sqa"], order="alphabet", n_train=1, n_test=1)] == \
        ["gqa", "sqa", "vqav2"]
    with pytest.raises(ValueError, match="unknown task order"):
        S.benchmark(order="random")


def test_tokenizer_round_trip_and_model(tmp_path, tok):
    ids = tok("Scene : red big circle 1 2 3 5 stop ;")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "scene : red big circle 1 2 3 5 stop ;"
    assert tok("2 3 4 5", add_special_tokens=False)["input_ids"] == tok("2 3 4 5")["input_ids"][1:]
    m1 = T.build_model(len(tok), hidden_size=32, num_layers=1, seed=4)
    m2 = T.build_model(len(tok), hidden_size=32, num_layers=1, seed=4)
    assert all((a == b).all() for a, b in zip(m1.parameters(), m2.parameters()))
    assert sum(p.numel() for p in m1.parameters()) < 100_000
    m1.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back("red circle")["input_ids"] == tok("red circle")["input_ids"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.vocab_size == len(tok)
    with pytest.raises(ValueError, match="special tokens"):
        T.build_tokenizer(["a", "b"])
