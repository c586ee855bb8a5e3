"""Evaluation and batch inference of Audio Flamingo 2 (``af2-hf evaluate``), in one process or many.

* :mod:`.inputs`: examples from a JSONL manifest or a ``datasets`` dataset (a ``save_to_disk`` folder, an
  ``audiofolder``, parquet / arrow files);
* :mod:`.generation`: batched generation, batch plans by audio length, generation shared out over processes;
* :mod:`.metrics`: multiple-choice accuracy, exact / normalised match, caption scores, per-task summaries;
* :mod:`.results`: the resumable JSONL results file;
* :mod:`.runner`: :func:`evaluate_examples`, the run itself (shards, gathers, writes, resumes);
* :mod:`.distributed`: the process group of ``accelerate launch`` / ``torchrun``.
"""

from .generation import batch_plan, generate_answers, generate_answers_sharded, generate_batch
from .inputs import Columns, EvaluationInputError, ExampleTable, load_examples
from .metrics import (
    answer_accuracy,
    caption_scores,
    format_summary,
    match_choice,
    normalize_answer,
    score_answer,
    summarize,
)
from .results import ResultsFile, ResultsFileError
from .runner import evaluate_examples

__all__ = [
    "Columns",
    "EvaluationInputError",
    "ExampleTable",
    "ResultsFile",
    "ResultsFileError",
    "answer_accuracy",
    "batch_plan",
    "caption_scores",
    "evaluate_examples",
    "format_summary",
    "generate_answers",
    "generate_answers_sharded",
    "generate_batch",
    "load_examples",
    "match_choice",
    "normalize_answer",
    "score_answer",
    "summarize",
]
