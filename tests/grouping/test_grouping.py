"""Instruction grouping against the official procedure, written out literally with scikit-learn."""
import functools
import json
import random

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity

import cl_core
from cl_core.continual.templates import TASKS, TEMPLATE_SETS, THRESHOLDS
from cl_core.grouping import (
    CodebookError,
    Decision,
    InstructionGrouper,
    literal_pair_similarity,
    pair_cosines,
)


# ---------------------------------------------------------------- the literal oracle
@functools.lru_cache(maxsize=None)  # the same pairs recur across tests; each fit is ~3 ms
def literal_cos(a, b):
    """One pair, as instruct/LoRASelect.py computes it (0 where sklearn finds no vocabulary)."""
    vectorizer = TfidfVectorizer(stop_words="english")
    try:
        m = vectorizer.fit_transform([a, b])
    except ValueError as exc:
        assert "empty vocabulary" in str(exc)
        return 0.0
    return cosine_similarity(m[0:1], m[1:2])[0][0]


def literal_sim(cur, hist):
    values = [literal_cos(c, h) for c in cur for h in hist]
    return sum(values) / len(values)


def official_run(tasks, threshold):
    """The official select_lora decisions for a sequence of training tasks (codebook in memory).

    Returns [(group, reused)] with groups 0-based.
    """
    codebook = {}  # order (1-based str) -> list of templates
    out = []
    for cur in tasks:
        cur = list(set(cur))
        if not codebook:
            codebook["1"] = list(cur)
            out.append((0, False))
            continue
        sims = []
        for order in range(len(codebook)):
            hist = codebook[str(order + 1)]
            sims.append(literal_sim(cur, hist))
        max_sim = max(sims)
        if max_sim >= threshold:
            chosen = sims.index(max_sim) + 1
            codebook[str(chosen)] += [c for c in cur if c not in codebook[str(chosen)]]
            out.append((chosen - 1, True))
        else:
            codebook[str(len(sims) + 1)] = list(cur)
            out.append((len(sims), False))
    return out, codebook


def official_route(codebook_groups, instruction, threshold):
    """Test-time rule for one instruction: argmax if >= threshold, else the newest group."""
    sims = [literal_sim([instruction], g) for g in codebook_groups]
    m = max(sims)
    return sims.index(m) if m >= threshold else len(sims) - 1


# ------------------------------------------------------------------- generated text
WORDS = (
    "answer question using single word phrase object image option letter choices directly "
    "please provide bounding box coordinate region sentence describes what is the a of in "
    "Answer QUESTION Image café naïve x y 12 3d a1 b_c -- !! ? : ' ".split(" ")
)


def random_text(rng):
    n = rng.choice([0, 1, 2, 3, 5, 8, 12])
    return " ".join(rng.choice(WORDS) for _ in range(n))


def random_set(rng, k):
    return [random_text(rng) for _ in range(k)]


def random_template(rng):
    """Like random_text, but never blank: assign() refuses empty templates."""
    while not (text := random_text(rng)).strip():
        pass
    return text


def random_templates(rng, k):
    return [random_template(rng) for _ in range(k)]


# ------------------------------------------------------------------------ the maths
@pytest.mark.parametrize("seed", range(6))
def test_pair_cosines_match_literal_on_generated_text(seed):
    rng = random.Random(seed)
    a = random_set(rng, 12) + ["", "the of a is", "Answer answer ANSWER"]
    b = random_set(rng, 10) + ["", "what is the", "answer"]
    fast = pair_cosines(a, b).toarray()
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            assert abs(fast[i, j] - literal_cos(x, y)) <= 1e-9, (x, y)


def test_texts_with_control_characters_take_the_analyzer_path():
    # the fast tokenizer joins a batch with "\x1e"; texts holding it use sklearn's analyzer
    a = ["answer\x1equestion word", "İstanbul CAFÉ straße", "ΟΔΟΣ οδος"]
    b = ["question answer", "istanbul café", "οδος", "word\x1e"]
    fast = pair_cosines(a, b).toarray()
    fast2 = pair_cosines(a[1:], b[:3]).toarray()  # no separator: the one-pass tokenizer
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            assert abs(fast[i, j] - literal_cos(x, y)) <= 1e-9, (x, y)
    assert np.allclose(fast2, fast[1:, :3], atol=1e-12, rtol=0)


@pytest.mark.parametrize("set_name", ["original", "diverse", "10type"])
@pytest.mark.slow
def test_set_similarities_match_literal_on_coin_templates(set_name):
    sets = TEMPLATE_SETS[set_name]
    for ti, t in enumerate(TASKS):
        for u in TASKS[: ti + 1]:  # (later task, earlier task): the pairs the decisions need
            g = InstructionGrouper()
            g.assign(sets[u])
            (fast,) = g.similarities(sets[t])
            assert abs(fast - literal_sim(sets[t], sets[u])) <= 1e-9, (t, u)


def test_similarities_one_per_group_match_literal():
    rng = random.Random(7)
    groups = [random_templates(rng, k) for k in (1, 4, 9)]
    g = InstructionGrouper(threshold=1.0)  # never reuse: one group per assign
    for grp in groups:
        g.assign(grp)
    cur = random_set(rng, 6)
    fast = g.similarities(cur)
    cur_unique = list(dict.fromkeys(cur))
    hist = [list(dict.fromkeys(grp)) for grp in groups]
    assert len(fast) == 3
    for f, h in zip(fast, hist):
        assert abs(f - literal_sim(cur_unique, h)) <= 1e-9


def test_literal_reference_in_library_matches_oracle():
    rng = random.Random(3)
    a, b = random_set(rng, 5), random_set(rng, 4)
    assert abs(literal_pair_similarity(a, b) - literal_sim(a, b)) <= 1e-12


@pytest.mark.parametrize(
    "a,b",
    [("", ""), ("the of a", "is what"), ("", "answer the question"), ("of the", "answer"), ("!!", "?")],
)
def test_empty_and_stop_word_only_texts_give_zero(a, b):
    assert pair_cosines([a], [b]).toarray()[0, 0] == 0.0
    if b.strip():  # an empty text cannot be a template (assign refuses it)
        g = InstructionGrouper()
        g.assign([b])
        assert g.similarities([a]) == [0.0]


def test_identical_texts_have_similarity_one():
    c = pair_cosines(["Answer the question using a single word."], ["answer THE question, using a single word"])
    assert abs(c.toarray()[0, 0] - 1.0) < 1e-12


# ----------------------------------------------------------------------- decisions
def test_first_task_opens_group_zero():
    g = InstructionGrouper()
    d = g.assign(["Answer with the option's letter."], name="ScienceQA")
    assert isinstance(d, Decision)
    assert (d.group, d.reused, d.similarities) == (0, False, [])
    assert g.groups == [["Answer with the option's letter."]]
    assert g.tasks == [{"name": "ScienceQA", "group": 0, "reused": False}]


def test_reuse_adds_only_new_templates_and_expand_opens_group():
    g = InstructionGrouper(threshold=0.5)
    g.assign(["answer the question briefly", "answer using one word"])
    d = g.assign(["answer the question briefly", "answer the question with one word"])
    assert d.reused and d.group == 0 and len(d.similarities) == 1
    assert d.new_templates == ["answer the question with one word"]
    assert g.groups[0] == ["answer the question briefly", "answer using one word", "answer the question with one word"]
    d = g.assign(["provide the bounding box coordinates"])
    assert (d.group, d.reused) == (1, False) and len(d.similarities) == 1
    d = g.assign(["bounding box of the region"])
    assert len(d.similarities) == 2


def test_ties_go_to_lowest_group_and_threshold_is_inclusive():
    g = InstructionGrouper(threshold=1.0)
    g.assign(["red apple"])
    g.assign(["green pear"])
    g.threshold = 0.0
    d = g.assign(["apple pear"])  # shares one term with each group: a tie
    assert d.similarities[0] == d.similarities[1] > 0
    assert d.group == 0 and d.reused
    # a similarity exactly at the threshold reuses (>=), one just above it does not
    for threshold, reused in ((None, True), ("above", False)):
        g3 = InstructionGrouper(threshold=1.0)
        g3.assign(["red apple"])
        sim = g3.similarities(["red apple", "green pear"])[0]
        g3.threshold = sim if threshold is None else float(np.nextafter(sim, 2.0))
        assert g3.assign(["red apple", "green pear"]).reused is reused


def test_duplicates_in_templates_are_ignored():
    g = InstructionGrouper()
    g.assign(["a b c words", "other words here"])
    s1 = g.similarities(["a b c words", "a b c words", "zebra"])
    s2 = g.similarities(["a b c words", "zebra"])
    assert s1 == s2


def test_bad_inputs_and_thresholds_are_refused():
    g = InstructionGrouper()
    with pytest.raises(ValueError, match="no instruction templates"):
        g.assign([])
    with pytest.raises(ValueError, match="no groups"):
        g.route(["x"])
    with pytest.raises(TypeError):
        g.assign([1])
    for bad in (-0.1, 1.5, float("nan"), "0.9", True):
        with pytest.raises(ValueError):
            InstructionGrouper(threshold=bad)


def test_bare_string_is_refused_not_split_into_characters():
    g = InstructionGrouper()
    g.assign(["What is in the image?"], name="a")
    before = (g.groups, g.tasks)
    # Before the fix assign("...") opened a group of one-letter "templates".
    with pytest.raises(TypeError, match=r"templates is a single str \('Answer briefly.'\).*wrap it in a list: \['Answer briefly.'\]"):
        g.assign("Answer briefly.")
    with pytest.raises(TypeError, match=r"instructions is a single str.*wrap it in a list"):
        g.route("What is in the image?")
    with pytest.raises(TypeError, match=r"instructions is a single str"):
        g.route_set("What is in the image?")
    with pytest.raises(TypeError, match=r"templates is a single str"):
        g.similarities("What is in the image?")
    with pytest.raises(TypeError, match=r"templates must be a list of strings, not NoneType"):
        g.assign(None)
    assert (g.groups, g.tasks) == before
    assert g.route(iter(["What is in the image?"])) == [0]  # any iterable of strings is fine


def test_empty_templates_are_refused_before_anything_changes():
    g = InstructionGrouper()
    g.assign(["first template here"])
    before = (g.groups, g.tasks)
    with pytest.raises(ValueError, match=r"templates\[1\] is empty; every instruction template needs text"):
        g.assign(["Answer briefly.", ""])
    with pytest.raises(ValueError, match=r"templates\[0\] is only whitespace"):
        g.assign([" \n\t"])
    with pytest.raises(TypeError, match="name is int"):
        g.assign(["Answer briefly."], name=3)  # would make a codebook that cannot be loaded
    assert (g.groups, g.tasks) == before
    # test instructions may be empty: they go by the below-threshold rule
    assert g.route([""]) == [0]


@pytest.mark.parametrize("value", [np.float64(0.3), np.float32(0.5), np.float16(0.25), np.int64(1), np.int8(0)])
def test_numpy_numbers_are_thresholds(value):
    g = InstructionGrouper(threshold=value)  # before the fix: "must be a finite number"
    assert g.threshold == float(value) and type(g.threshold) is float
    g.threshold = value
    assert type(g.to_dict()["threshold"]) is float  # JSON-serialisable
    g.assign(["red apple"])
    assert g.assign(["red apple", "green pear"], threshold=value).threshold == float(value)


@pytest.mark.parametrize("value", [np.bool_(True), np.float64("nan"), np.float32(1.5), np.int64(-1), np.float64("inf"),
                                   True, np.array([0.5])])
def test_bad_numpy_thresholds_are_refused(value):
    with pytest.raises(ValueError, match="threshold="):
        InstructionGrouper(threshold=value)
    g = InstructionGrouper()
    g.assign(["red apple"])
    with pytest.raises(ValueError, match="threshold="):
        g.assign(["red apple"], threshold=value)
    with pytest.raises(ValueError, match="threshold="):
        g.route(["red apple"], threshold=value)
    assert g.num_groups == 1 and len(g.tasks) == 1 and g.threshold == 0.9


def test_one_off_threshold_leaves_the_codebook_threshold_alone():
    g = InstructionGrouper(threshold=0.9)
    g.assign(["red apple small"])
    d = g.assign(["red apple small", "green pear big"], threshold=0.3)  # similarity 0.5
    assert (d.group, d.reused, d.threshold) == (0, True, 0.3) and g.threshold == 0.9
    assert g.route(["red apple"]) == [0]
    assert g.route_set(["red apple"], threshold=1.0).threshold == 1.0 and g.threshold == 0.9


@pytest.mark.parametrize("set_name", ["original", "diverse", "10type"])
@pytest.mark.slow
def test_coin_eight_tasks_same_decisions_as_official(set_name):
    """Done means: the eight CoIN tasks in order give the official re-train / expand decisions."""
    threshold = THRESHOLDS[set_name]
    tasks = [TEMPLATE_SETS[set_name][t] for t in TASKS]
    expected, official_codebook = official_run(tasks, threshold)
    g = InstructionGrouper(threshold=threshold)
    got = []
    for name, templates in zip(TASKS, tasks):
        d = g.assign(templates, name=name)
        got.append((d.group, d.reused))
    assert got == expected
    assert [sorted(v) for _, v in sorted(official_codebook.items(), key=lambda kv: int(kv[0]))] == [
        sorted(grp) for grp in g.groups
    ]


def test_coin_original_decisions_are_the_expected_four_groups():
    g = InstructionGrouper(threshold=0.9)
    decisions = [g.assign(TEMPLATE_SETS["original"][t]) for t in TASKS]
    assert [(d.group, d.reused) for d in decisions] == [
        (0, False), (1, False), (2, False), (1, True), (1, True), (3, False), (1, True), (1, True)
    ]


@pytest.mark.parametrize("seed", range(4))
def test_generated_task_sequences_same_decisions_as_official(seed):
    rng = random.Random(100 + seed)
    base = [random_templates(rng, rng.randint(1, 4)) for _ in range(3)]
    # tasks re-use, mix and perturb a few base sets so that both branches happen
    tasks = []
    for _ in range(7):
        b = rng.choice(base)
        tasks.append([t if rng.random() < 0.7 else random_template(rng) for t in b] + ["answer"])
    threshold = rng.choice([0.3, 0.5, 0.9])
    expected, _ = official_run(tasks, threshold)
    g = InstructionGrouper(threshold)
    assert [(d.group, d.reused) for d in (g.assign(t) for t in tasks)] == expected


# -------------------------------------------------------------------------- routing
@pytest.mark.slow
def test_route_matches_official_rule_per_instruction():
    rng = random.Random(11)
    g = InstructionGrouper(threshold=0.4)
    for set_name in ("original", "diverse"):
        for t in TASKS:
            g.assign(TEMPLATE_SETS[set_name][t])
    pool = [x for grp in g.groups for x in grp] + TEMPLATE_SETS["10type"]["VQAv2"]
    tests = [rng.choice(pool) for _ in range(15)]
    tests += [random_text(rng) for _ in range(20)] + ["", "the of"]
    routed = g.route(tests)
    assert routed == [official_route(g.groups, x, 0.4) for x in tests]
    # below threshold goes to the most recently opened group
    assert g.route(["zzz qqq"]) == [g.num_groups - 1]


def test_route_is_vectorised_over_duplicates_and_keeps_order():
    g = InstructionGrouper(threshold=0.9)
    for t in TASKS:
        g.assign(TEMPLATE_SETS["original"][t])
    xs = ["What is the object in the image?", "Please provide the bounding box coordinate of the region this sentence describes"] * 50
    assert g.route(xs) == [2, 3] * 50
    assert g.route([]) == []


def test_route_set_is_the_official_file_level_rule():
    g = InstructionGrouper(threshold=0.9)
    for t in TASKS:
        g.assign(TEMPLATE_SETS["original"][t])
    d = g.route_set(["Answer the question using a single word or phrase."])
    assert (d.group, d.reused) == (1, True) and len(d.similarities) == 4
    d = g.route_set(["something else entirely"])
    assert (d.group, d.reused) == (3, False)
    assert g.groups == [[t] for t in (
        TEMPLATE_SETS["original"]["ScienceQA"][0], TEMPLATE_SETS["original"]["TextVQA"][0],
        TEMPLATE_SETS["original"]["ImageNet"][0], TEMPLATE_SETS["original"]["Grounding"][0])]


# ---------------------------------------------------------------------- persistence
def test_save_load_roundtrip_is_readable_json(tmp_path):
    g = InstructionGrouper(threshold=0.3)
    for t in TASKS:
        g.assign(TEMPLATE_SETS["diverse"][t], name=t)
    path = tmp_path / "sub" / "cb.json"
    g.save(path)
    d = json.loads(path.read_text())
    assert d["format"] == "cl_core.codebook" and d["version"] == 1 and d["threshold"] == 0.3
    assert [grp["templates"] for grp in d["groups"]] == g.groups
    assert [t["name"] for t in d["history"]] == list(TASKS)
    h = InstructionGrouper.load(path)
    assert h.groups == g.groups and h.tasks == g.tasks and h.threshold == 0.3
    x = TEMPLATE_SETS["diverse"]["GQA"]
    assert h.similarities(x) == g.similarities(x)
    assert [p.name for p in path.parent.iterdir()] == ["cb.json"]  # no temporary file left


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    import os

    g = InstructionGrouper()
    g.assign(["first template"])
    path = tmp_path / "cb.json"
    g.save(path)
    before = path.read_text()
    g.assign(["second different template"])

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        g.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cb.json"]


def test_load_errors_say_which_and_where(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=r"nope\.json: file not found"):
        InstructionGrouper.load(missing)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "cl_core.codebook", "version": 1, ')
    with pytest.raises(CodebookError, match=r"corrupt\.json: corrupt, not valid JSON .*line 1"):
        InstructionGrouper.load(corrupt)
    wrong = tmp_path / "v2.json"
    wrong.write_text(json.dumps({"format": "cl_core.codebook", "version": 2, "groups": []}))
    with pytest.raises(CodebookError, match=r"v2\.json: unsupported codebook version 2"):
        InstructionGrouper.load(wrong)
    other = tmp_path / "other.json"
    other.write_text(json.dumps([1, 2]))
    with pytest.raises(CodebookError, match=r"other\.json: expected a JSON object"):
        InstructionGrouper.load(other)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "cl_core.codebook", "version": 1, "groups": [{"id": 0, "templates": []}]}))
    with pytest.raises(CodebookError, match=r"bad\.json: groups\[0\]\.templates"):
        InstructionGrouper.load(bad)
    assert issubclass(CodebookError, ValueError)


def test_public_name_and_decision_dict():
    assert cl_core.InstructionGrouper is InstructionGrouper
    g = cl_core.InstructionGrouper(threshold=0.9)
    d = g.assign(["x y z words"])
    assert d.to_dict() == {"group": 0, "reused": False, "similarities": [], "new_templates": ["x y z words"], "threshold": 0.9}
    assert np.isfinite(g.similarities(["words"])[0])


def _codebook(**fields):
    d = {"format": "cl_core.codebook", "version": 1, "threshold": 0.9,
         "groups": [{"id": 0, "tasks": ["a"], "templates": ["red apple"]},
                    {"id": 1, "tasks": ["b"], "templates": ["green pear", "blue sky"]}],
         "history": [{"name": "a", "group": 0, "reused": False}, {"name": "b", "group": 1, "reused": False}]}
    d.update(fields)
    return d


def test_the_codebook_helper_is_valid():
    g = InstructionGrouper.from_dict(_codebook())
    assert g.to_dict() == _codebook()


@pytest.mark.parametrize("edit,needle", [
    # each was accepted, or refused with a message naming no field, before the fix
    (lambda d: d["groups"][1]["templates"].append("green pear"),
     r"groups\[1\]\.templates\[2\] repeats templates\[0\] \('green pear'\); remove the duplicate"),
    (lambda d: d["history"][1].update(group=True), r"history\[1\]\.group is True; it must be a group id, 0\.\.1"),
    (lambda d: d["history"][0].update(group=5), r"history\[0\]\.group is 5; it must be a group id, 0\.\.1"),
    (lambda d: d["groups"][1].update(id=True), r"groups\[1\]\.id is True; .* it must be 1"),
    (lambda d: d.update(version=True), r"unsupported codebook version True"),
    (lambda d: d.update(groups=[]), r"history\[0\] refers to group 0 but 'groups' is empty; restore the groups, "
                                    r"or remove the history"),
    (lambda d: d["groups"][0]["tasks"].__setitem__(0, "renamed"),
     r"groups\[0\]\.tasks is \['renamed'\] but 'history' gives \['a'\]; .*edit the task names in 'history'"),
    (lambda d: d["groups"][0]["templates"].append(""), r"groups\[0\]\.templates\[1\] is empty"),
    (lambda d: d["groups"][0]["templates"].append(7), r"groups\[0\]\.templates\[1\] is int"),
    (lambda d: d["history"][0].update(reused="no"), r"history\[0\]\.reused is 'no'; it must be true or false"),
    (lambda d: d["history"][0].update(name=3), r"history\[0\]\.name is 3"),
    (lambda d: d.update(threshold=np.nan), r"'threshold': threshold=nan"),
    (lambda d: d.update(groups={}), r"'groups' must be a list, found dict"),
])
def test_malformed_codebooks_name_the_field(tmp_path, edit, needle):
    d = _codebook()
    edit(d)
    path = tmp_path / "cb.json"
    path.write_text(json.dumps(d))
    with pytest.raises(CodebookError, match=r"cb\.json: " + needle):
        InstructionGrouper.load(path)


def test_task_names_are_edited_in_the_history_and_kept(tmp_path):
    d = _codebook()
    d["history"][0]["name"] = "renamed"
    del d["groups"][0]["tasks"]  # "tasks" is optional: it is derived from the history
    path = tmp_path / "cb.json"
    path.write_text(json.dumps(d))
    g = InstructionGrouper.load(path)
    g.save(path)
    assert json.loads(path.read_text())["groups"][0]["tasks"] == ["renamed"]


def test_a_template_in_two_groups_comes_from_the_official_rule_and_loads(tmp_path):
    g = InstructionGrouper(threshold=0.9)
    g.assign(["red apple small"])
    d = g.assign(["red apple small", "green pear big"])  # mean similarity 0.5 < 0.9: a new group
    assert (d.group, d.reused) == (1, False)
    assert g.groups == [["red apple small"], ["red apple small", "green pear big"]]
    g.save(tmp_path / "cb.json")
    assert InstructionGrouper.load(tmp_path / "cb.json").groups == g.groups


def test_codebook_with_bom_loads_and_empty_file_says_empty(tmp_path):
    path = tmp_path / "cb.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_codebook()).encode())  # as Notepad saves UTF-8
    assert InstructionGrouper.load(path).groups == [["red apple"], ["green pear", "blue sky"]]
    path.write_bytes(b"")
    with pytest.raises(CodebookError, match=r"cb\.json: the file is empty; restore it, or delete it"):
        InstructionGrouper.load(path)
