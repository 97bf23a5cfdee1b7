"""Instruction grouping (LCIA, docs/design.md §4): re-train an existing LoRA set or open a new one.

API
---
    from cl_core.grouping import InstructionGrouper, Decision

    g = InstructionGrouper(threshold=0.9)          # 0.9 "Original" sets, 0.3 "Diverse"/"10Type";
                                                   #   any real number in [0, 1], NumPy ones too
    d = g.assign(templates, name="TextVQA")        # -> Decision; records the task's new templates
    d.group, d.reused, d.similarities              # int from 0; bool; one float per group that
                                                   #   existed before the task
    g.similarities(templates) -> list[float]       # the same numbers, codebook untouched
    g.route(instructions) -> list[int]             # one group per instruction (vectorised)
    g.route_set(instructions) -> Decision          # the official test-time rule for a whole test
                                                   #   file: its unique instructions as one set
    assign / route / route_set(..., threshold=T)   # T for that call only; g.threshold unchanged
    g.save(path); InstructionGrouper.load(path)    # readable JSON, written atomically
    g.groups -> list[list[str]]                    # templates per group (copies)
    g.tasks -> list[dict]                          # {"name", "group", "reused"} per assign()
    check_threshold(value) -> float                # the threshold check, for callers' own options

Templates and instructions are lists of strings: a bare string is refused (it would be read
as one template per character), and so is an empty or blank template. A codebook that does
not hold together (a template twice in a group, an id or group that is not an integer in
range, a history without groups, group "tasks" that disagree with the history) is refused
on load with the field named.

    pair_cosines(texts_a, texts_b) -> scipy.sparse.csr_matrix   # all pair similarities, fast
    literal_pair_similarity(a, b) -> float        # the official one-vectorizer-per-pair maths

Exactly the official procedure (``instruct/LoRASelect.py`` of the LCIA code): the similarity
of two template sets C and H is the mean over all pairs (c, h) of the cosine of
``TfidfVectorizer(stop_words="english").fit_transform([c, h])``. A task reuses the group with
the highest similarity when it is >= threshold (ties: lowest group id) and adds its templates
that the group does not have yet; otherwise it opens a new group. At test time an instruction
goes to the most similar group when that similarity is >= threshold, and otherwise to the most
recently opened group. Texts that are empty or only stop words have similarity 0 with
everything (the literal procedure raises "empty vocabulary" when both texts of a pair are).

The fast path. With sklearn's default analyzer (lowercase, token pattern ``\\b\\w\\w+\\b``,
English stop words) a vectorizer fitted on the two texts (x, y) gives idf = 1 to the terms
in both and idf = w = 1 + ln(3/2) to terms in only one (smooth idf, n = 2). With one
CountVectorizer over all texts (counts X for one side, Y for the other, B the binary patterns):

    x·y   = (X Yᵀ)                                   only shared terms, idf 1
    ‖x‖²  = w²·Σ_t tf_x(t)² − (w² − 1)·((X∘X) B_Yᵀ)    shared terms lose the w² weight
    ‖y‖²  = w²·Σ_t tf_y(t)² − (w² − 1)·(B_X (Y∘Y)ᵀ)
    cos   = x·y / (‖x‖·‖y‖), and 0 where x·y = 0

The three sparse products have the same sparsity pattern (a pair is stored exactly when
the two texts share a term), so every pair similarity costs a few sparse products instead of
one vectorizer fit per pair.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from cl_core.atomic_io import write_json_atomic

__all__ = [
    "CODEBOOK_FORMAT",
    "CODEBOOK_VERSION",
    "CodebookError",
    "Decision",
    "check_threshold",
    "InstructionGrouper",
    "literal_pair_similarity",
    "pair_cosines",
]

CODEBOOK_FORMAT = "cl_core.codebook"
CODEBOOK_VERSION = 1

# idf of a term found in only one of the two texts of a pair: ln((1 + 2) / (1 + 1)) + 1.
_W2 = (1.0 + math.log(1.5)) ** 2


class CodebookError(ValueError):
    """A codebook file that cannot be used: corrupt, wrong version or wrong structure."""


class CodebookNotFoundError(FileNotFoundError):
    """The codebook file does not exist."""


@dataclass(frozen=True)
class Decision:
    """What the grouper decided for one task (or one test set, for ``route_set``).

    group:         the group (LoRA set) id, from 0.
    reused:        True when the task continues an existing group (DEMA on), False when
                   it opens a new one (``assign``); for ``route_set``, True when the best
                   similarity reached the threshold (False: the most recent group by rule).
    similarities:  one similarity per group that existed before the call.
    new_templates: the templates this call added to the codebook (empty for route_set).
    threshold:     the threshold the decision was made with.
    """

    group: int
    reused: bool
    similarities: list = field(default_factory=list)
    new_templates: list = field(default_factory=list)
    threshold: float = 0.9

    def to_dict(self) -> dict:
        return {
            "group": self.group,
            "reused": self.reused,
            "similarities": list(self.similarities),
            "new_templates": list(self.new_templates),
            "threshold": self.threshold,
        }


_SEP = "\x1e"  # joins the texts of a batch; a non-word character, so no token spans two texts


def _count_matrices(*text_lists: Sequence[str]):
    """Term counts of every list over one shared vocabulary (float64 CSR, one matrix per list).

    The terms are exactly those of sklearn's ``TfidfVectorizer(stop_words="english")``
    analyzer (lowercase, its token pattern, its stop words). The fast path tokenizes the whole
    batch with one regular-expression pass; texts holding the separator character fall back
    to the analyzer itself, text by text.
    """
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import CountVectorizer

    cv = CountVectorizer(stop_words="english")
    texts = [t for group in text_lists for t in group]
    if any(_SEP in t for t in texts):
        analyze = cv.build_analyzer()
        tokens, sizes = [], []
        for t in texts:
            terms = analyze(t)
            tokens.extend(terms)
            sizes.append(len(terms))
        doc = np.repeat(np.arange(len(texts)), sizes)
        stop = frozenset()
    else:
        # sklearn's preprocessing is lower() per text, then its token pattern, then stop words
        joined = _SEP.join([t.lower() for t in texts])
        tokens = re.findall(cv.token_pattern + "|" + _SEP, joined)
        stop = cv.get_stop_words()
        doc = None
    uniq = set(tokens)
    uniq.discard(_SEP)
    vocab = {t: i for i, t in enumerate(sorted(u for u in uniq if u not in stop))}
    n_terms = max(len(vocab), 1)
    vocab[_SEP] = -1
    vocab.update((w, -2) for w in uniq if w in stop)
    ids = np.fromiter(map(vocab.__getitem__, tokens), dtype=np.int64, count=len(tokens))
    if doc is None:
        doc = np.cumsum(ids == -1)  # for a term: the number of separators before it
        keep = ids >= 0  # drops the separators and the stop words
        ids, doc = ids[keep], doc[keep]
    indptr = np.searchsorted(doc, np.arange(len(texts) + 1), side="left")
    counts = sp.csr_matrix((np.ones(len(ids)), ids, indptr), shape=(len(texts), n_terms))
    counts.sum_duplicates()  # repeated terms of a text become counts
    bounds = np.cumsum([0] + [len(group) for group in text_lists])
    return [counts[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _pair_cosines_from_counts(X, Y):
    """All pair cosines between the rows of X and Y (count matrices over one vocabulary)."""
    import scipy.sparse as sp

    X = sp.csr_matrix(X, dtype=np.float64)
    Y = sp.csr_matrix(Y, dtype=np.float64)
    bx = X.copy()
    bx.data[:] = 1.0
    by = Y.copy()
    by.data[:] = 1.0
    x2 = X.multiply(X).tocsr()
    y2 = Y.multiply(Y).tocsr()
    dot = (X @ Y.T).tocsr()
    px = (x2 @ by.T).tocsr()  # Σ over shared terms of tf_x²
    qy = (bx @ y2.T).tocsr()  # Σ over shared terms of tf_y²
    for m in (dot, px, qy):
        m.sum_duplicates()
        m.sort_indices()
    if not (
        np.array_equal(dot.indptr, px.indptr)
        and np.array_equal(dot.indices, px.indices)
        and np.array_equal(dot.indptr, qy.indptr)
        and np.array_equal(dot.indices, qy.indices)
    ):  # pragma: no cover - the patterns agree for non-negative counts
        raise AssertionError("pair_cosines: sparsity patterns differ")
    sx = np.asarray(x2.sum(axis=1)).ravel()
    sy = np.asarray(y2.sum(axis=1)).ravel()
    rows = np.repeat(np.arange(dot.shape[0]), np.diff(dot.indptr))
    cols = dot.indices
    nx2 = _W2 * sx[rows] - (_W2 - 1.0) * px.data
    ny2 = _W2 * sy[cols] - (_W2 - 1.0) * qy.data
    cos = dot.data / np.sqrt(nx2 * ny2)
    return sp.csr_matrix((cos, dot.indices.copy(), dot.indptr.copy()), shape=dot.shape)


def pair_cosines(texts_a: Sequence[str], texts_b: Sequence[str]):
    """cos(tfidf(a), tfidf(b)) for every pair, each pair's TF-IDF fitted on the pair alone.

    Returns a ``scipy.sparse.csr_matrix`` of shape (len(texts_a), len(texts_b)); pairs that
    share no term (including empty and stop-word-only texts) are 0 and not stored.
    """
    X, Y = _count_matrices(list(texts_a), list(texts_b))
    return _pair_cosines_from_counts(X, Y)


def literal_pair_similarity(cur: Sequence[str], hist: Sequence[str]) -> float:
    """The official procedure, one vectorizer fit per pair (slow; the reference).

    Returns the mean pair cosine; a pair whose two texts are both empty / only stop words
    counts 0 (the official code would stop with sklearn's "empty vocabulary" error).
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    values = []
    for c in cur:
        for h in hist:
            vectorizer = TfidfVectorizer(stop_words="english")
            try:
                m = vectorizer.fit_transform([c, h])
            except ValueError:  # empty vocabulary: both texts empty or only stop words
                values.append(0.0)
                continue
            values.append(cosine_similarity(m[0:1], m[1:2])[0][0])
    return sum(values) / len(values)


def _texts(texts, what: str, require_text: bool = False) -> list:
    """The texts as a list of str, refused with a message that says how to fix the call.

    A bare string is refused (iterating it would give its characters, one "template" each).
    ``require_text``: every text must hold more than whitespace (templates that go into the
    codebook; test instructions may be empty, they then go by the below-threshold rule).
    """
    if isinstance(texts, (str, bytes)):
        shown = texts if len(texts) <= 60 else texts[:57] + "..."
        raise TypeError(
            f"{what} is a single {type(texts).__name__} ({shown!r}), not a list of strings; "
            f"wrap it in a list: [{shown!r}]"
        )
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"{what} must be a list of strings, not {type(texts).__name__}") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, not str")
        if require_text and not t.strip():
            raise ValueError(
                f"{what}[{i}] is {'empty' if not t else 'only whitespace'}; every instruction template "
                "needs text: drop it, or check how the templates were extracted"
            )
    return texts


def _unique(texts: Iterable[str], what: str, require_text: bool = False) -> list:
    return list(dict.fromkeys(_texts(texts, what, require_text)))


class InstructionGrouper:
    """Codebook of groups (LoRA sets) -> instruction templates, and the LCIA decisions."""

    def __init__(self, threshold: float = 0.9):
        self.threshold = threshold
        self._groups: list = []  # list[list[str]], templates in insertion order
        self._tasks: list = []  # list[dict]: {"name", "group", "reused"}

    # ----------------------------------------------------------------- inspection
    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value) -> None:
        self._threshold = check_threshold(value)

    @property
    def groups(self) -> list:
        return [list(g) for g in self._groups]

    @property
    def tasks(self) -> list:
        return [dict(t) for t in self._tasks]

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    def __repr__(self) -> str:
        sizes = [len(g) for g in self._groups]
        return f"InstructionGrouper(threshold={self.threshold}, groups={len(sizes)}, templates={sizes})"

    # ------------------------------------------------------------------ the maths
    def _group_means(self, texts: list):
        """(len(texts) x num_groups) mean pair cosine of each text with each group."""
        import scipy.sparse as sp

        flat = [t for g in self._groups for t in g]
        owner = np.repeat(np.arange(len(self._groups)), [len(g) for g in self._groups])
        cos = pair_cosines(texts, flat)
        weights = 1.0 / np.asarray([len(g) for g in self._groups], dtype=np.float64)
        average = sp.csr_matrix(
            (weights[owner], (np.arange(len(flat)), owner)), shape=(len(flat), len(self._groups))
        )
        return np.asarray((cos @ average).todense()).reshape(len(texts), len(self._groups))

    def _threshold_for(self, threshold) -> float:
        """The codebook's threshold, or a one-off one given to a single call (checked)."""
        return self.threshold if threshold is None else check_threshold(threshold)

    def similarities(self, templates: Iterable[str]) -> list:
        """Similarity of a template set with every group (mean over all template pairs)."""
        templates = _unique(templates, "templates")
        if not templates:
            raise ValueError("similarities: no templates given")
        if not self._groups:
            return []
        return [float(v) for v in self._group_means(templates).mean(axis=0)]

    def assign(self, templates: Iterable[str], name: str | None = None, *, threshold=None) -> Decision:
        """Decide re-train (existing group) or expand (new group) for a task, and record it.

        ``templates``: the task's instruction templates, a list of non-empty strings
        (duplicates are ignored, as the official ``list(set(...))``). ``name``: an optional
        task name kept in the codebook. ``threshold``: for this decision only (the
        codebook's own threshold is unchanged); None uses the codebook's.
        """
        templates = _unique(templates, "templates", require_text=True)
        if not templates:
            raise ValueError("assign: the task has no instruction templates")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name is {type(name).__name__}; give the task name as a string (or None)")
        threshold = self._threshold_for(threshold)
        sims = self.similarities(templates)
        best = int(np.argmax(sims)) if sims else None  # first maximum: ties -> lowest group id
        if best is not None and sims[best] >= threshold:
            group = best
            known = set(self._groups[group])
            new = [t for t in templates if t not in known]
            self._groups[group].extend(new)
            reused = True
        else:
            group = len(self._groups)
            new = list(templates)
            self._groups.append(new[:])
            reused = False
        self._tasks.append({"name": name, "group": group, "reused": reused})
        return Decision(group, reused, sims, new, threshold)

    def route(self, instructions: Sequence[str], *, threshold=None) -> list:
        """The group of every instruction: most similar if >= threshold, else the newest group.

        ``threshold``: for this call only; None uses the codebook's."""
        instructions = _texts(instructions, "instructions")
        threshold = self._threshold_for(threshold)
        if not self._groups:
            raise ValueError("route: the codebook has no groups yet (assign a task first)")
        index: dict = {}
        inverse = np.empty(len(instructions), dtype=np.int64)
        for i, text in enumerate(instructions):
            inverse[i] = index.setdefault(text, len(index))
        if not index:
            return []
        means = self._group_means(list(index))
        best = np.argmax(means, axis=1)
        ok = means[np.arange(len(best)), best] >= threshold
        unique_groups = np.where(ok, best, len(self._groups) - 1)
        return unique_groups[inverse].tolist()

    def route_set(self, instructions: Iterable[str], *, threshold=None) -> Decision:
        """The official test-time decision for a whole test file (its unique instructions
        as one set): the most similar group if >= threshold, else the newest group.

        ``threshold``: for this call only; None uses the codebook's."""
        instructions = _unique(instructions, "instructions")
        threshold = self._threshold_for(threshold)
        if not self._groups:
            raise ValueError("route_set: the codebook has no groups yet (assign a task first)")
        sims = self.similarities(instructions)
        best = int(np.argmax(sims))  # first maximum: ties -> lowest group id
        if sims[best] >= threshold:
            return Decision(best, True, sims, [], threshold)
        return Decision(len(self._groups) - 1, False, sims, [], threshold)

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        members: list = [[] for _ in self._groups]
        for t in self._tasks:
            if t["name"] is not None:
                members[t["group"]].append(t["name"])
        return {
            "format": CODEBOOK_FORMAT,
            "version": CODEBOOK_VERSION,
            "threshold": self.threshold,
            "groups": [
                {"id": i, "tasks": members[i], "templates": list(g)} for i, g in enumerate(self._groups)
            ],
            "history": [dict(t) for t in self._tasks],
        }

    @classmethod
    def from_dict(cls, d, where: str = "codebook") -> "InstructionGrouper":
        """A grouper from ``to_dict``'s structure; a malformed one raises CodebookError naming
        the field. Rules beyond the types: templates are non-empty and not repeated within a
        group (the same template may be in two groups: the official procedure opens a new
        group with all of a task's templates); each group's "tasks" is written from
        "history" on every save, so it must agree with it (edit names in "history")."""

        def bad(msg):
            return CodebookError(f"{where}: {msg}")

        def is_int(v):  # JSON true/false are not ids (in Python True == 1)
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(d, dict):
            raise bad(f"expected a JSON object, found {type(d).__name__}")
        if d.get("format") != CODEBOOK_FORMAT:
            raise bad(f"not a cl_core codebook (format {d.get('format')!r}, expected {CODEBOOK_FORMAT!r})")
        if not is_int(d.get("version")) or d["version"] != CODEBOOK_VERSION:
            raise bad(f"unsupported codebook version {d.get('version')!r} (this cl_core reads version {CODEBOOK_VERSION})")
        try:
            grouper = cls(d.get("threshold", 0.9))
        except ValueError as exc:
            raise bad(f"'threshold': {exc}") from None
        groups = d.get("groups")
        if not isinstance(groups, list):
            raise bad(f"'groups' must be a list, found {type(groups).__name__}")
        for i, g in enumerate(groups):
            if not isinstance(g, dict):
                raise bad(f"groups[{i}] must be an object, found {type(g).__name__}")
            if not is_int(g.get("id")) or g["id"] != i:
                raise bad(f"groups[{i}].id is {g.get('id')!r}; groups are numbered in order: it must be {i}")
            templates = g.get("templates")
            if not isinstance(templates, list) or not templates:
                raise bad(f"groups[{i}].templates must be a non-empty list of strings")
            seen: dict = {}
            for k, t in enumerate(templates):
                if not isinstance(t, str) or not t.strip():
                    what = type(t).__name__ if not isinstance(t, str) else "empty"
                    raise bad(f"groups[{i}].templates[{k}] is {what}; templates are non-empty strings")
                if t in seen:
                    raise bad(f"groups[{i}].templates[{k}] repeats templates[{seen[t]}] ({t!r}); remove the duplicate")
                seen[t] = k
            grouper._groups.append(list(templates))
        history = d.get("history", [])
        if not isinstance(history, list):
            raise bad(f"'history' must be a list, found {type(history).__name__}")
        for i, t in enumerate(history):
            if not isinstance(t, dict):
                raise bad(f"history[{i}] must be an object {{\"name\", \"group\", \"reused\"}}, found {type(t).__name__}")
            group = t.get("group")
            if not groups:
                raise bad(f"history[{i}] refers to group {group!r} but 'groups' is empty; restore the groups, "
                          "or remove the history to start a new codebook")
            if not is_int(group) or not 0 <= group < len(groups):
                raise bad(f"history[{i}].group is {group!r}; it must be a group id, 0..{len(groups) - 1}")
            if not isinstance(t.get("reused"), bool):
                raise bad(f"history[{i}].reused is {t.get('reused')!r}; it must be true or false")
            if t.get("name") is not None and not isinstance(t.get("name"), str):
                raise bad(f"history[{i}].name is {t.get('name')!r}; it must be a string or null")
            grouper._tasks.append({"name": t.get("name"), "group": group, "reused": t["reused"]})
        derived = grouper.to_dict()["groups"]
        for i, g in enumerate(groups):
            if "tasks" in g and g["tasks"] != derived[i]["tasks"]:
                raise bad(f"groups[{i}].tasks is {g['tasks']!r} but 'history' gives {derived[i]['tasks']!r}; "
                          "'tasks' is rewritten from 'history' on every save: edit the task names in "
                          "'history' (or delete 'tasks')")
        return grouper

    def save(self, path) -> None:
        """Write the codebook as JSON, atomically (temporary file in the same folder, then rename)."""
        write_json_atomic(self.to_dict(), path, ensure_ascii=False)

    @classmethod
    def load(cls, path) -> "InstructionGrouper":
        """Read a codebook written by ``save``; errors name the file and what is wrong."""
        path = Path(path)
        try:
            raw = path.read_text(encoding="utf-8-sig")  # a BOM (some Windows editors) is fine
        except FileNotFoundError:
            raise CodebookNotFoundError(f"codebook {path}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CodebookError(f"codebook {path}: cannot be read ({exc})") from None
        if not raw.strip():
            raise CodebookError(f"codebook {path}: the file is empty; restore it, or delete it to start a new codebook")
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CodebookError(
                f"codebook {path}: corrupt, not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
            ) from None
        return cls.from_dict(d, where=f"codebook {path}")


def check_threshold(threshold, name: str = "threshold") -> float:
    """A threshold as float: any real number (Python or NumPy) in [0, 1]; not bool, not NaN.

    ``name`` is how the value is called in the error message (an option name, for a CLI)."""
    shown = f"{name} {threshold!r}" if name.startswith("-") else f"{name}={threshold!r}"
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"{shown} must be a number between 0 and 1, not {type(threshold).__name__}")
    value = float(threshold)
    if not math.isfinite(value):
        raise ValueError(f"{shown} must be a finite number between 0 and 1")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{shown} is out of range; allowed: 0 <= threshold <= 1")
    return value

