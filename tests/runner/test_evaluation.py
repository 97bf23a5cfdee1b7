"""Scoring rules per task type (CoIN's truth alignment) and batched greedy generation."""
import pytest
import torch

from cl_core.continual import evaluation as E
from cl_core.continual import synthetic as S
from cl_core.continual import tiny_model as T


@pytest.mark.parametrize("pred, letter", [
    ("B", "B"), ("b", "B"), ("C. triangle", "C"), ("The answer is A", "A"), ("(D)", "D"),
    ("", None), ("circle", None),
])
def test_parse_letter_like_coin_scienceqa(pred, letter):
    assert E.parse_letter(pred) == letter


def test_multiple_choice_accepts_the_letter_alone_or_with_its_text():
    assert E.score("mc", "B", "B")
    assert E.score("mc", "b. two", "B")
    assert not E.score("mc", "A", "B")
    assert not E.score("mc", "two", "B")


@pytest.mark.parametrize("pred, ok", [
    ("1 2 5 6", True),                 # exact
    ("[1, 2, 5, 6]", True),            # CoIN's bracket format
    ("1 2 5 7", True),                 # IoU 16/20 = 0.8
    ("1 2 3 6", True),                 # IoU exactly 0.5: counts (IoU >= 0.5)
    ("1 2 3 5", False),                # IoU 6/16 < 0.5
    ("6 6 9 9", False),                # no overlap
    ("1 2 5", False),                  # three numbers: unparseable
    ("circle", False),
])
def test_box_iou_rule(pred, ok):
    assert E.score("box", pred, "1 2 5 6") is ok


def test_iou_of_boxes_equals_hand_computed_values():
    assert E.iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert E.iou((0, 0, 2, 2), (2, 2, 4, 4)) == 0.0
    assert E.iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)
    assert E.iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0  # degenerate union


def test_exact_and_count():
    for t in ("short", "cls", "exact"):
        assert E.score(t, "Red.", "red")
        assert E.score(t, "  stop  ", "STOP")
        assert not E.score(t, "red circle", "red")
    assert E.score("count", "two", "2")
    assert E.score("count", "3", "three")
    assert not E.score("count", "4", "3")
    with pytest.raises(ValueError, match="unknown task type"):
        E.score("bleu", "a", "a")


def test_accuracy_and_inference():
    assert E.accuracy("short", ["a", "b", "c", "d"], ["a", "b", "x", "y"]) == 50.0
    with pytest.raises(ValueError, match="predictions"):
        E.accuracy("short", ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no answers"):
        E.accuracy("short", [], [])
    assert E.infer_task_type(["[0.1, 0.2, 0.3, 0.4]", "1 2 3 4"]) == "box"
    assert E.infer_task_type(["A", "C", "b"]) == "mc"
    assert E.infer_task_type(["red", "A"]) == "exact"


@pytest.fixture(scope="module")
def tiny():
    tok = T.build_tokenizer(T.build_vocab(S.vocabulary_texts()))
    torch.manual_seed(0)
    model = T.build_model(len(tok), hidden_size=32, num_layers=1, seed=1)
    return model, tok


@pytest.mark.parametrize("text, norm", [
    ("Two", "2"), ("the Dog.", "dog"), ("yes!", "yes"), ("1,000", "1000"), ("3.5", "3.5"),
    ("don't", "dont"), ("red-white", "red white"), ("a cat , dog", "cat dog"), ("  Stop\n", "stop"),
    ("none", "0"), ("An apple", "apple"),
])
def test_vqa_normalisation_gives_the_expected_text(text, norm):
    assert E.normalize_vqa(text) == norm


def test_vqa_accuracy_hand_computed():
    refs = ["two", "2", "2", "three", "2 ", "Two.", "two", "3", "2", "tree"]   # "2" after normalising: 7 times
    assert E.vqa_accuracy("2", refs) == 1.0                 # min(7/3, 1)
    assert E.vqa_accuracy("three", refs) == pytest.approx(2 / 3)   # "three" -> "3": 2 matches
    assert E.vqa_accuracy("tree", refs) == pytest.approx(1 / 3)
    assert E.vqa_accuracy("four", refs) == 0.0
    assert E.vqa_accuracy("stop", ["stop", "stop", "stop"]) == 1.0
    with pytest.raises(ValueError, match="at least one reference"):
        E.vqa_accuracy("x", [])
    # accuracy(): a list of references is scored with VQA accuracy (whatever the task type),
    # a single answer with the task type's rule.
    preds = ["tree", "stop", "B"]
    answers = [refs, "STOP.", "B"]
    assert E.accuracy("short", preds, answers) == pytest.approx(100 * (1 / 3 + 1 + 1) / 3)


def test_reference_answers_from_test_files(tmp_path):
    import json

    from cl_core.continual.tasks import reference_answers

    f = tmp_path / "t.json"
    f.write_text(json.dumps([{"text": "q", "answer": "a"},
                             {"text": "q", "answer": "a", "answers": ["a", "b"]},
                             {"text": "q", "answers": [{"answer": "x"}, {"answer": "y"}]}]))
    assert reference_answers(f) == {1: ["a", "b"], 2: ["x", "y"]}
    g = tmp_path / "t.jsonl"
    g.write_text('{"instruction": "i", "output": "o"}\n\n{"instruction": "i", "answers": ["o", "p"]}\n')
    assert reference_answers(g) == {1: ["o", "p"]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": "q", "answers": ["a", 3]}]))
    with pytest.raises(ValueError, match="record 0 has an 'answers' list with a non-text entry"):
        reference_answers(bad)


def test_encode_example_masks_the_prompt(tiny):
    _, tok = tiny
    ex = E.encode_example(tok, "scene : red big circle 1 2 3 5 stop ;", "1 2 3 5", max_length=64)
    n_answer = 4 + 1  # four numbers and </s>
    assert ex["labels"][-n_answer:] == ex["input_ids"][-n_answer:]
    assert ex["labels"][:-n_answer] == [-100] * (len(ex["input_ids"]) - n_answer)
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert ex["input_ids"][: len(ex["input_ids"]) - n_answer] == E.encode_prompt(tok, "scene : red big circle 1 2 3 5 stop ;")
    short = E.encode_example(tok, "scene : " + "red " * 100, "stop", max_length=20)
    assert len(short["input_ids"]) == 20 and short["labels"][-2:] == short["input_ids"][-2:]


def test_batched_generation_equals_one_by_one(tiny):
    """Left padding in a batch must not change any row's greedy answer."""
    model, tok = tiny
    prompts = [s.prompt for s in S.generate_task("grounding", 3)] + [s.prompt for s in S.generate_task("sqa", 3)]
    batched = E.generate(model, tok, prompts, max_new_tokens=5, batch_size=6)
    single = [E.generate(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert len(batched) == 6 and all(isinstance(x, str) for x in batched)
    assert model.training  # mode restored


def test_routed_generation_matches_per_adapter(tiny):
    """adapter_names routes each row to its LoRA set, as if generated with that adapter alone."""
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    import copy

    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(model), cfg, adapter_name="group_0")
    pm.add_adapter("group_1", cfg)
    prompts = [s.prompt for s in S.generate_task("textvqa", 4)]
    names = ["group_0", "group_1", "group_1", "group_0"]
    routed = E.generate(pm, tok, prompts, max_new_tokens=4, adapter_names=names)
    for name in ("group_0", "group_1"):
        pm.set_adapter(name)
        alone = E.generate(pm, tok, prompts, max_new_tokens=4)
        assert [r for r, n in zip(routed, names) if n == name] == [a for a, n in zip(alone, names) if n == name]
    with pytest.raises(ValueError, match="adapter names"):
        E.generate(pm, tok, prompts, adapter_names=["group_0"])
