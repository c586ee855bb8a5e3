"""The waveform of one example row, whatever form a manifest, a ``datasets`` column or a caller gives it.

Paths, bytes and file objects are read with :func:`af2_hf.audio.load_audio` (the original ``read_audio``); in-memory
waveforms and ``datasets`` audio dicts / decoders are brought to the feature extractor's rate with the same steps. Used
by the training collator, :func:`af2_hf.evaluation.generate_answers` and ``af2-hf evaluate``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch

from .audio import load_audio

__all__ = ["load_example_audio", "text_field"]


def text_field(value, name: str, index: int) -> str:
    """A prompt / answer field as text. The original applies ``str()`` to prompt and output; strings and plain
    numbers are accepted, anything else (``None`` would silently become ``"None"``) raises ``TypeError``."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"Example {index}: {name!r} must be a string, got {type(value).__name__}.")



def _array_to_rate(array, rate, target_rate: int, max_seconds: float, where: str) -> np.ndarray:
    """An in-memory waveform at ``rate`` -> mono float64 at ``target_rate``, with ``load_audio``'s steps: truncate to
    ``max_seconds`` first, divide by the peak if samples leave [-1, 1], resample with librosa. (Peak normalisation
    follows in the feature extractor.)"""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"{where}: sampling_rate must be a positive integer, got {rate!r}.")
    if isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    data = np.asarray(array, dtype=np.float64)
    if data.ndim != 1:
        raise ValueError(f"{where}: expected a 1-D (mono) waveform, got shape {tuple(data.shape)}.")
    if data.size == 0:
        raise ValueError(f"{where}: the waveform is empty.")
    if not np.isfinite(data).all():
        raise ValueError(f"{where}: the waveform contains NaN or infinite samples.")
    data = data[: int(max_seconds * rate)]
    if data.max() > 1 or data.min() < -1:
        data = data / max(abs(data.max()), abs(data.min()))
    if rate != target_rate:
        import librosa

        data = librosa.resample(data, orig_sr=int(rate), target_sr=target_rate)
        if data.size == 0:
            raise ValueError(f"{where}: the waveform is too short to resample to {target_rate} Hz.")
    return data


def load_example_audio(audio, feature_extractor, max_num_windows: int | None = None, where: str = "audio"):
    """The waveform of one example at the feature extractor's rate.

    Accepted: a path / bytes / binary file object (read with [`af2_hf.load_audio`], the original ``read_audio``); a
    1-D array, tensor or list of numbers already at the feature extractor's rate; a ``datasets`` audio dict
    ``{"array", "sampling_rate"}`` (resampled if needed) or ``{"path", "bytes"}`` (what ``Audio(decode=False)``
    gives: decoded here with soundfile, so torchcodec is not needed); or a decoder object with
    ``get_all_samples()`` (torchcodec's ``AudioDecoder``, what ``datasets`` 4+ returns with ``decode=True``; channel
    0 is kept).
    """
    rate = feature_extractor.sampling_rate
    max_seconds = feature_extractor.max_audio_seconds(max_num_windows)
    if isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(audio, "read"):
        return load_audio(audio, sampling_rate=rate, max_seconds=max_seconds)
    if isinstance(audio, Mapping):
        if audio.get("array") is not None:
            if "sampling_rate" not in audio:
                raise ValueError(f"{where}: an audio dict with 'array' needs 'sampling_rate'.")
            return _array_to_rate(audio["array"], audio["sampling_rate"], rate, max_seconds, where)
        if audio.get("bytes") is not None:
            return load_audio(audio["bytes"], sampling_rate=rate, max_seconds=max_seconds)
        if audio.get("path") is not None:
            return load_audio(audio["path"], sampling_rate=rate, max_seconds=max_seconds)
        raise ValueError(
            f"{where}: an audio dict needs 'array' + 'sampling_rate', 'bytes' or 'path'; got keys {sorted(audio)}."
        )
    if hasattr(audio, "get_all_samples"):
        samples = audio.get_all_samples()
        data = samples.data
        if data.dim() == 2:
            data = data[0]
        return _array_to_rate(data, int(samples.sample_rate), rate, max_seconds, where)
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        if audio.ndim != 1:
            raise ValueError(f"{where}: expected a 1-D waveform at {rate} Hz, got shape {tuple(audio.shape)}.")
        return audio
    if isinstance(audio, (list, tuple)):
        return np.asarray(audio, dtype=np.float64)  # the feature extractor validates the values
    raise TypeError(
        f"{where}: unsupported audio of type {type(audio).__name__}; pass a path, bytes, a 1-D waveform at {rate} Hz "
        "or a datasets audio dict."
    )
