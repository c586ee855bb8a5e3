"""Audio Flamingo 2 as a native Hugging Face Transformers model."""

from ._version import __version__
from .audio import AudioLoadError, load_audio
from .configuration_audioflamingo2 import AudioFlamingo2Config
from .feature_extraction_audioflamingo2 import AudioFlamingo2FeatureExtractor
from .modeling_audioflamingo2 import (
    AudioFlamingo2ForConditionalGeneration,
    AudioFlamingo2Model,
    AudioFlamingo2PreTrainedModel,
)
from .processing_audioflamingo2 import AudioFlamingo2Processor
from .configuration_afclap import AFClapConfig
from .feature_extraction_afclap import AFClapFeatureExtractor, load_afclap_audio
from .modeling_afclap import AFClapModel, AFClapPreTrainedModel
from .processing_afclap import AFClapProcessor
from .tokenization_audioflamingo2 import prepare_af2_tokenizer

# Auto classes, the audio-question-answering pipeline, remote-code export and SoundCoT decoding.
from .auto import AUDIO_QUESTION_ANSWERING_TASK  # noqa: E402  (importing registers the Auto classes)
from .export import add_remote_code, save_with_remote_code
from .pipeline_audio_question_answering import AudioQuestionAnsweringPipeline
from .soundcot import soundcot_generate

__all__ = [
    "AUDIO_QUESTION_ANSWERING_TASK",
    "AFClapConfig",
    "AFClapFeatureExtractor",
    "AFClapModel",
    "AFClapPreTrainedModel",
    "AFClapProcessor",
    "AudioFlamingo2Config",
    "AudioFlamingo2ForConditionalGeneration",
    "AudioFlamingo2Model",
    "AudioFlamingo2PreTrainedModel",
    "AudioFlamingo2FeatureExtractor",
    "AudioFlamingo2Processor",
    "AudioLoadError",
    "AudioQuestionAnsweringPipeline",
    "add_remote_code",
    "load_afclap_audio",
    "load_audio",
    "prepare_af2_tokenizer",
    "save_with_remote_code",
    "soundcot_generate",
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
