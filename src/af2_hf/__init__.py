"""Audio Flamingo 2 as a native Hugging Face Transformers model."""

from .audio import AudioLoadError, load_audio
from .configuration_audioflamingo2 import AudioFlamingo2Config
from .feature_extraction_audioflamingo2 import AudioFlamingo2FeatureExtractor
from .modeling_audioflamingo2 import (
    AudioFlamingo2ForConditionalGeneration,
    AudioFlamingo2Model,
    AudioFlamingo2PreTrainedModel,
)
from .processing_audioflamingo2 import AudioFlamingo2Processor
from .tokenization_audioflamingo2 import prepare_af2_tokenizer

__all__ = [
    "AudioFlamingo2Config",
    "AudioFlamingo2ForConditionalGeneration",
    "AudioFlamingo2Model",
    "AudioFlamingo2PreTrainedModel",
    "AudioFlamingo2FeatureExtractor",
    "AudioFlamingo2Processor",
    "AudioLoadError",
    "load_audio",
    "prepare_af2_tokenizer",
]

# Training utilities (issue #6), imported on first use: they pull in transformers' Trainer.
_TRAINING_EXPORTS = (
    "AudioFlamingo2DataCollator",
    "AudioFlamingo2Trainer",
    "GenerationAccuracyCallback",
    "count_trainable_parameters",
    "read_manifest",
    "set_trainable",
)
__all__ += list(_TRAINING_EXPORTS)


def __getattr__(name):
    if name in _TRAINING_EXPORTS:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
