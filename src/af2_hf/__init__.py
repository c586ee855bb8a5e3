"""Audio Flamingo 2 as a native Hugging Face Transformers model."""

from .configuration_audioflamingo2 import AudioFlamingo2Config

__all__ = ["AudioFlamingo2Config"]
