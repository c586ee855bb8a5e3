"""The waveform of one example row, whatever form a manifest, a ``datasets`` column or a caller gives it.

Every form goes through the package's one loader, :func:`af2_hf.audio.load_audio` (the original ``read_audio``), at
the feature extractor's rate and window limit. Used by the training collator, :func:`af2_hf.evaluation.generate_answers`
and ``af2-hf evaluate``.
"""

from __future__ import annotations

import numpy as np

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



def load_example_audio(audio, feature_extractor, max_num_windows: int | None = None, where: str = "audio"):
    """The waveform of one example at the feature extractor's rate, read by [`af2_hf.load_audio`] (the original
    ``read_audio``) up to the feature extractor's window limit (``max_num_windows`` lowers it).

    Every form ``load_audio`` accepts works: a path / bytes / binary file object; a waveform (array, tensor or list)
    at the feature extractor's rate; a ``datasets`` audio dict ``{"array", "sampling_rate"}`` (resampled if needed)
    or ``{"path", "bytes"}`` (what ``Audio(decode=False)`` gives: no torchcodec needed); a decoder object
    (torchcodec's ``AudioDecoder``, what ``datasets`` 4+ returns with ``decode=True``). Errors keep their type
    (:class:`AudioLoadError`, ``ValueError``, ``TypeError``) and name the example (``where``).
    """
    try:
        return load_audio(audio, sampling_rate=feature_extractor.sampling_rate,
                          max_seconds=feature_extractor.max_audio_seconds(max_num_windows))
    except (ValueError, TypeError) as error:  # AudioLoadError is a ValueError
        raise type(error)(f"{where}: {error}") from error
