"""Training with Hugging Face ``Trainer``: the original AF2 batch format, curriculum presets and generation metrics.

* :mod:`.labels`: the original training text and label masking (:func:`format_training_text`,
  :func:`build_training_labels`).
* :mod:`.collator`: :class:`AudioFlamingo2DataCollator` turns ``{"audio", "prompt", "answer"}`` examples into
  training batches exactly as the original ``AudioTextData`` + ``DataCollator`` + label masking of ``train_utils.py``.
* :mod:`.stages`: :func:`set_trainable` applies the curriculum stages of the paper (``pretrain``, ``sft``, ``long``)
  plus ``full`` and ``lora``, and reports trainable parameters per component.
* :mod:`.trainer`: :class:`AudioFlamingo2Trainer` (``Trainer`` with the original's weight-decay grouping) and
  :class:`GenerationAccuracyCallback` (generation accuracy in ``Trainer.evaluate``, shared out over DDP processes).

Re-exported here as well: the answer scoring and batched generation of :mod:`af2_hf.evaluation`, the example audio
loader and the JSONL manifest reader that ``examples/finetune.py`` uses.
"""

from ..evaluation.generation import generate_answers, generate_answers_sharded
from ..evaluation.metrics import answer_accuracy, match_choice, normalize_answer, score_answer
from ..example_audio import load_example_audio
from ..manifest import ManifestError, read_manifest
from .collator import AudioFlamingo2DataCollator
from .labels import IGNORE_INDEX, build_training_labels, format_training_text
from .stages import (
    AF2_LORA_TARGET_MODULES,
    TRAINING_STAGES,
    count_trainable_parameters,
    format_parameter_counts,
    set_trainable,
)
from .trainer import AudioFlamingo2Trainer, GenerationAccuracyCallback

__all__ = [
    "AF2_LORA_TARGET_MODULES",
    "IGNORE_INDEX",
    "TRAINING_STAGES",
    "AudioFlamingo2DataCollator",
    "AudioFlamingo2Trainer",
    "GenerationAccuracyCallback",
    "ManifestError",
    "answer_accuracy",
    "build_training_labels",
    "count_trainable_parameters",
    "format_parameter_counts",
    "format_training_text",
    "generate_answers",
    "generate_answers_sharded",
    "load_example_audio",
    "match_choice",
    "normalize_answer",
    "read_manifest",
    "score_answer",
    "set_trainable",
]
