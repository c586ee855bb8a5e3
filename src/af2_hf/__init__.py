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
