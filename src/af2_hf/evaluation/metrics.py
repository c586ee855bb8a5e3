"""Scores of generated answers for AF2's task types: multiple choice (option letter or text), open questions (exact
and normalised match) and captions (BLEU, ROUGE-L, CIDEr-D of the COCO caption toolkit, ``pycocoevalcap``), with
per-task and overall summaries."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "TASK_KINDS",
    "answer_accuracy",
    "caption_scores",
    "format_summary",
    "match_choice",
    "normalize_answer",
    "score_answer",
    "score_row",
    "summarize",
]

#: What a row is scored as: ``multiple_choice`` (it has ``choices``), ``caption`` (it has ``references``, or its task is
#: named a caption task), ``open`` (an ``answer`` without choices) or ``unlabelled`` (prediction only).
TASK_KINDS = ("multiple_choice", "open", "caption", "unlabelled")

_PUNCTUATION = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")
_LETTER_OPTION = re.compile(r"^\(?([a-z])[\).:]\s*(.*)$")
_BARE_LETTER = re.compile(r"^\(?([a-z])\)?[.:]?$")


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed (for exact-match accuracy)."""
    text = _PUNCTUATION.sub(" ", str(text).lower())
    return _SPACES.sub(" ", text).strip()


def match_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The choice a free-text prediction selects, or ``None``.

    In order: a choice equal to the prediction (after :func:`normalize_answer`); a leading option letter
    ("(b) ...", "b) ...", "b. ...") selecting the choice at that position; the one choice
    contained in the prediction as whole words (a choice inside a longer contained one does not count; two or more
    distinct choices give ``None``)."""
    if not choices:
        raise ValueError("match_choice needs a non-empty list of choices.")
    normalized = [normalize_answer(choice) for choice in choices]
    raw = str(prediction).strip().lower()
    pred = normalize_answer(prediction)
    for choice, norm in zip(choices, normalized):
        if pred == norm:
            return choice
    letter = _LETTER_OPTION.match(raw)
    if letter:
        index = ord(letter.group(1)) - ord("a")
        rest = normalize_answer(letter.group(2))
        if 0 <= index < len(choices) and (not rest or rest == normalized[index]):
            return choices[index]
    padded = f" {pred} "
    contained = [(norm, choice) for choice, norm in zip(choices, normalized) if norm and f" {norm} " in padded]
    # A choice inside a longer contained choice ("rain" in "heavy rain") does not count on its own.
    maximal = [
        (norm, choice) for norm, choice in contained
        if not any(other != norm and f" {norm} " in f" {other} " for other, _ in contained)
    ]
    return maximal[0][1] if len(maximal) == 1 else None


def _answer_choice(answer: str, choices: Sequence[str]) -> str:
    """The choice an answer names: the choice itself, or an option letter ("B", "(b)") when no choice reads so."""
    normalized = normalize_answer(answer)
    if any(normalize_answer(choice) == normalized for choice in choices):
        return answer
    letter = _BARE_LETTER.match(str(answer).strip().lower())
    if letter and 0 <= ord(letter.group(1)) - ord("a") < len(choices):
        return choices[ord(letter.group(1)) - ord("a")]
    return answer


def score_answer(prediction: str, answer: str, choices: Sequence[str] | None = None) -> tuple[bool, str | None]:
    """``(correct, selected)`` for one prediction: with ``choices`` the prediction selects a choice
    (:func:`match_choice`, ``selected`` may be ``None``) that must equal the answer after :func:`normalize_answer`
    (an answer given as an option letter, "B" or "(b)", names the choice at that position); without, the normalised
    prediction must equal the normalised answer (``selected`` is the prediction)."""
    if choices:
        selected = match_choice(prediction, choices)
        expected = _answer_choice(answer, choices)
        return selected is not None and normalize_answer(selected) == normalize_answer(expected), selected
    return normalize_answer(prediction) == normalize_answer(answer), prediction


def answer_accuracy(predictions: Sequence[str], answers: Sequence[str],
                    choices: Sequence[Sequence[str] | None] | None = None) -> dict[str, float]:
    """Accuracy of generated answers. With ``choices[i]`` (multiple choice) the prediction is mapped to a choice
    with :func:`match_choice` and compared with the answer; without, the normalised texts must be equal.

    Returns:
        ``{"accuracy", "correct", "total", "unmatched"}`` (``unmatched``: multiple-choice predictions selecting no
        choice)."""
    if len(predictions) != len(answers):
        raise ValueError(f"Got {len(predictions)} predictions for {len(answers)} answers.")
    if choices is not None and len(choices) != len(answers):
        raise ValueError(f"Got {len(choices)} choice lists for {len(answers)} answers.")
    correct = unmatched = 0
    for i, (prediction, answer) in enumerate(zip(predictions, answers)):
        options = choices[i] if choices is not None else None
        is_correct, selected = score_answer(prediction, answer, options)
        correct += is_correct
        unmatched += bool(options) and selected is None
    total = len(answers)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total, "unmatched": unmatched}


def score_row(row: Mapping) -> dict:
    """The per-example scores of one result row (``kind``, ``prediction`` and the labels): ``selected`` and
    ``correct`` for multiple choice, ``exact_match`` and ``correct`` (normalised match) for open questions, nothing
    for captions (their scores are corpus-level, see :func:`caption_scores`). A row with an ``error`` scores as
    wrong."""
    kind = row["kind"]
    prediction = row.get("prediction")
    if kind == "multiple_choice":
        if prediction is None:
            return {"selected": None, "correct": False}
        correct, selected = score_answer(prediction, row["answer"], row["choices"])
        return {"selected": selected, "correct": bool(correct)}
    if kind == "open":
        if prediction is None:
            return {"exact_match": False, "correct": False}
        return {"exact_match": prediction.strip() == str(row["answer"]).strip(),
                "correct": normalize_answer(prediction) == normalize_answer(row["answer"])}
    return {}


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus-level BLEU-1..4, ROUGE-L and CIDEr-D of the COCO caption toolkit (``pycocoevalcap``, the scorers behind
    the AudioCaps / Clotho / DCASE evaluation tools; ``pip install "af2-hf[eval]"``).

    Captions are lower-cased and stripped of punctuation (:func:`normalize_answer`) instead of going through the
    toolkit's Java PTB tokenizer, so the scores need no Java and no download; they can differ slightly from the Java
    toolkit's for words with apostrophes. METEOR and SPICE (Java, and SPICE downloads models) are not computed.
    CIDEr-D weighs n-grams by their document frequency over the references given, so score the whole test set at
    once."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as error:
        raise ImportError(
            'Caption scores need pycocoevalcap: pip install "af2-hf[eval]" (or pip install pycocoevalcap).'
        ) from error
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} captions for {len(references)} reference lists.")
    if not predictions:
        raise ValueError("caption_scores needs at least one caption.")
    candidates = {i: [normalize_answer(p)] for i, p in enumerate(predictions)}
    targets = {}
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"Caption {i}: references must be a non-empty list of strings.")
        targets[i] = [normalize_answer(r) for r in refs]
    bleu, _ = Bleu(4).compute_score(targets, candidates, verbose=0)
    rouge, _ = Rouge().compute_score(targets, candidates)
    cider, _ = Cider().compute_score(targets, candidates)
    scores = {f"bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)}
    scores.update(rouge_l=float(rouge), cider_d=float(cider))
    return scores


def _summarize_group(rows: Sequence[Mapping]) -> dict:
    kinds = sorted({row["kind"] for row in rows})
    errors = sum(1 for row in rows if row.get("error"))
    entry = {"kind": kinds[0] if len(kinds) == 1 else "mixed", "examples": len(rows), "errors": errors}
    graded = [row for row in rows if row["kind"] in ("multiple_choice", "open")]
    if graded:
        correct = sum(bool(row.get("correct")) for row in graded)
        entry.update(accuracy=correct / len(graded), correct=correct, graded=len(graded))
        mc = [row for row in graded if row["kind"] == "multiple_choice"]
        if mc:
            entry["unmatched"] = sum(1 for row in mc if row.get("prediction") is not None and row["selected"] is None)
        open_rows = [row for row in graded if row["kind"] == "open"]
        if open_rows:
            entry["exact_match"] = sum(bool(row.get("exact_match")) for row in open_rows) / len(open_rows)
    captions = [row for row in rows if row["kind"] == "caption" and row.get("prediction") is not None]
    if captions:
        entry.update(caption_scores([row["prediction"] for row in captions],
                                    [row["references"] for row in captions]))
        entry["captions_scored"] = len(captions)
    return entry


def summarize(rows: Iterable[Mapping]) -> dict:
    """Per-task and overall summary of scored result rows (see :func:`score_row`).

    ``tasks`` maps each task name to ``{"kind", "examples", "errors"}`` plus, where they apply, ``accuracy`` /
    ``correct`` / ``graded`` (multiple choice: the selected choice is the answer; open: normalised match),
    ``unmatched`` (multiple-choice predictions selecting no choice), ``exact_match`` (open questions, texts equal up
    to surrounding spaces) and the caption scores of :func:`caption_scores` (rows with an error are left out of
    them; they count as wrong everywhere else). ``overall`` holds the same over all rows (``accuracy`` micro-averaged
    over the graded rows) and ``overall["by_kind"]`` one entry per task kind."""
    rows = list(rows)
    if not rows:
        return {"tasks": {}, "overall": {"examples": 0, "errors": 0, "by_kind": {}}}
    by_task: dict[str, list] = {}
    by_kind: dict[str, list] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
        by_kind.setdefault(row["kind"], []).append(row)
    overall = _summarize_group(rows)
    overall.pop("kind")
    overall["by_kind"] = {kind: _summarize_group(group) for kind, group in sorted(by_kind.items())}
    for entry in overall["by_kind"].values():
        entry.pop("kind")
    if len(by_kind) > 1:  # corpus-level caption scores belong to the caption rows only, not to a mix of kinds
        for key in [k for k in overall if k.startswith(("bleu_", "rouge_", "cider_", "captions_"))]:
            overall.pop(key)
    return {"tasks": {task: _summarize_group(group) for task, group in sorted(by_task.items())}, "overall": overall}


_COLUMNS = ("examples", "errors", "accuracy", "exact_match", "unmatched", "bleu_4", "rouge_l", "cider_d")


def format_summary(summary: Mapping) -> str:
    """The per-task and overall tables of :func:`summarize` as plain text."""
    header = f"{'task':<24}{'kind':<17}" + "".join(f"{name:>12}" for name in _COLUMNS)

    def line(name, kind, entry):
        cells = []
        for column in _COLUMNS:
            value = entry.get(column)
            cells.append(f"{'-':>12}" if value is None else
                         f"{value:>12.4f}" if isinstance(value, float) else f"{value:>12}")
        return f"{name[:23]:<24}{kind:<17}" + "".join(cells)

    lines = ["per task:", header]
    lines += [line(task, entry["kind"], entry) for task, entry in summary["tasks"].items()]
    lines += ["", "overall:", header]
    lines += [line("(" + kind + ")", kind, entry) for kind, entry in summary["overall"]["by_kind"].items()]
    lines.append(line("all", "", summary["overall"]))
    return "\n".join(lines)
