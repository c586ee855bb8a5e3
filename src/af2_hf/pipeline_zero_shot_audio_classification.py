"""transformers' ``zero-shot-audio-classification`` pipeline with clear errors for bad labels and, for AF-CLAP, the
original's audio loading of paths and bytes.

``import af2_hf`` makes this class the task's implementation (the task's models and default stay transformers'):

* an empty ``candidate_labels`` list or an empty/whitespace label raises a ``ValueError`` naming it (transformers'
  pipeline fails inside the tokenizer with an ``IndexError``, or scores an empty text);
* with an AF-CLAP model, a path, ``bytes`` or a ``datasets`` audio dict is read as the original reads files
  (``librosa.load(sr=16000)``: channel mean, soxr_hq; :func:`af2_hf.load_afclap_audio`) instead of through ffmpeg.
  URLs and every input of other models go to transformers' code unchanged.
"""

from __future__ import annotations

import os

from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.zero_shot_audio_classification import ZeroShotAudioClassificationPipeline

from .feature_extraction_afclap import AFClapFeatureExtractor

__all__ = ["ZERO_SHOT_AUDIO_CLASSIFICATION_TASK", "CheckedZeroShotAudioClassificationPipeline", "register_pipeline"]

ZERO_SHOT_AUDIO_CLASSIFICATION_TASK = "zero-shot-audio-classification"


def _check_labels(candidate_labels) -> list[str]:
    labels = [candidate_labels] if isinstance(candidate_labels, str) else candidate_labels
    if labels is None or len(labels) == 0:
        raise ValueError("candidate_labels is empty: give at least one label to score the audio against.")
    empty = [i for i, label in enumerate(labels) if not isinstance(label, str) or not label.strip()]
    if empty:
        raise ValueError(f"candidate_labels {empty} are empty, whitespace only or not strings.")
    return list(labels)


def _is_local_source(audio) -> bool:
    if isinstance(audio, (bytes, bytearray, os.PathLike, dict)):
        return True
    return isinstance(audio, str) and not audio.startswith(("http://", "https://"))


class CheckedZeroShotAudioClassificationPipeline(ZeroShotAudioClassificationPipeline):
    """[`ZeroShotAudioClassificationPipeline`] with label checks and AF-CLAP's file loading (module docstring)."""

    def preprocess(self, audio, candidate_labels=None, hypothesis_template="This is a sound of {}."):
        candidate_labels = _check_labels(candidate_labels)
        if isinstance(self.feature_extractor, AFClapFeatureExtractor) and _is_local_source(audio):
            audio = self.feature_extractor.fetch_audio(audio)
        return super().preprocess(audio, candidate_labels=candidate_labels, hypothesis_template=hypothesis_template)


def register_pipeline() -> None:
    """Makes :class:`CheckedZeroShotAudioClassificationPipeline` the task's implementation (idempotent; the task's
    model classes and default checkpoint are kept)."""
    entry = PIPELINE_REGISTRY.supported_tasks.get(ZERO_SHOT_AUDIO_CLASSIFICATION_TASK)
    if entry is not None:
        entry["impl"] = CheckedZeroShotAudioClassificationPipeline
