"""Audio loading for Audio Flamingo 2, reproducing the original ``read_audio``.

The original AF2 inference code reads a file with soundfile (float64), keeps at most the span the model can see
(``max_num_window * (window_length - window_overlap) + window_overlap`` seconds) BEFORE any normalisation,
divides a float file whose samples leave [-1, 1] by its peak, resamples with ``librosa.resample`` (default
``res_type``: soxr_hq; every channel is resampled, then channel 0 is kept), keeps channel 0 of a multi-channel file
at the target rate (no down-mix), and finally peak-normalises the mono signal. :func:`load_audio` does exactly that
and returns the float64 signal the original ``read_audio`` returns.
"""

from __future__ import annotations

import io
import math
import os
from typing import BinaryIO, Union

import numpy as np
from transformers.utils import logging

logger = logging.get_logger(__name__)

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

__all__ = ["AudioLoadError", "AudioSource", "load_audio", "peak_normalize"]


class AudioLoadError(ValueError):
    """An audio source could not be read: missing, unreadable, unsupported, corrupt, empty or non-finite."""


def peak_normalize(waveform, out=None):
    """Peak normalisation of the original AF2 ``read_audio``, in the dtype of ``waveform``.

    A signal with a negative sample is divided by its peak magnitude (the peak becomes exactly +-1). A signal without
    negative samples is mapped with ``2 * x / max - 1`` (so it is shifted, as in the original). The operations and
    their order are the original's, so a float64 input gives bit-identical float64 results. The function is
    idempotent: a peak-normalised signal is returned unchanged (its peak is exactly 1, and ``x / 1.0 == x``).

    An all-zero signal is returned as zeros. (The original divides 0 by 0 here and produces NaN, which its later
    int16 cast happens to turn into 0 on x86-64; returning zeros gives the same all-zero clip without NaN.)

    Args:
        waveform (`np.ndarray` or `torch.Tensor`): 1-D floating-point signal, not empty, finite (a tensor is
            normalised where it is, e.g. on the GPU).
        out (same type as ``waveform``, *optional*): where to write the result (may be ``waveform`` itself).

    Returns:
        `np.ndarray` or `torch.Tensor`: the result (``out`` when given), of the same type, dtype, shape and device.
    """
    if out is None:
        out = waveform.copy() if isinstance(waveform, np.ndarray) else waveform.clone()
    elif out is not waveform:
        out[...] = waveform
    if math.prod(out.shape) == 0:
        raise ValueError("Cannot peak-normalise an empty waveform.")
    lowest, highest = out.min(), out.max()
    if lowest >= 0:
        if highest == 0:
            logger.warning("The waveform is all zeros (digital silence); it stays all zeros (-100 dB log-mel).")
            out *= 0
            return out
        # The original computes 2 * x / max; (x / max) * 2 is the same number (doubling is exact) but cannot
        # overflow for samples above half the largest float.
        out /= abs(highest)
        out *= 2
        out -= 1.0
        return out
    out /= max(abs(highest), abs(lowest))
    return out


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    name = getattr(source, "name", None)
    if isinstance(name, (str, bytes, os.PathLike)):
        return f"file object {name!r}"
    return f"<{type(source).__name__} object>"


def _open_source(source):
    """Returns something soundfile can open, or raises AudioLoadError / TypeError."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if path.startswith(("http://", "https://")):
            raise AudioLoadError(
                f"Cannot load audio from URL {path!r}: af2_hf.load_audio reads local files, bytes and file objects "
                "only. Download the file first (e.g. huggingface_hub.hf_hub_download) and pass its path or bytes."
            )
        if not os.path.exists(path):
            raise AudioLoadError(f"Audio file {path!r} does not exist.")
        if os.path.isdir(path):
            raise AudioLoadError(f"Audio path {path!r} is a directory, not an audio file.")
        if os.path.getsize(path) == 0:
            raise AudioLoadError(f"Audio file {path!r} is empty (0 bytes).")
        return path
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioLoadError("Cannot load audio from an empty bytes object.")
        return io.BytesIO(bytes(source))
    if hasattr(source, "read"):
        seekable = getattr(source, "seekable", None)
        data = source.read() if seekable is None or not seekable() else source.read(0)
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(
                f"The file object {_describe(source)} returned {type(data).__name__} from read(): a binary file "
                "object (opened with 'rb') is needed."
            )
        return source if seekable is not None and seekable() else io.BytesIO(bytes(data))
    raise TypeError(
        "Audio source must be a path (str or os.PathLike), bytes, or a binary file object, "
        f"got {type(source).__name__}."
    )


_FORMAT_HINT = (
    " The data is not audio, or its format is not one libsndfile reads (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, AU, "
    "CAF, W64, ...): convert it first, e.g. `ffmpeg -i input.m4a output.wav`."
)


def load_audio(
    source: AudioSource,
    sampling_rate: int = 16000,
    max_seconds: float | None = None,
    truncation: bool = True,
) -> np.ndarray:
    """Loads audio as the original Audio Flamingo 2 ``read_audio`` does: mono, resampled, peak-normalised, float64.

    Steps (all in float64): read at most ``int(max_seconds * file_rate)`` frames from the start (truncation happens
    before any normalisation); if a sample lies outside [-1, 1] (float files) divide by the peak magnitude; resample
    to ``sampling_rate`` with ``librosa.resample`` (default ``res_type``; for multi-channel audio all channels are
    resampled and channel 0 is kept; at the target rate channel 0 is kept as is); then :func:`peak_normalize`.

    MP3 is decoded by libsndfile here; the original decodes MP3 with pydub/ffmpeg and down-mixes it, so for MP3 this
    function averages the channels (before resampling) instead of keeping channel 0. MP3 results are therefore close
    to, but not bit-identical with, the original's. Every other format follows the original bit for bit.

    Digital silence (all-zero audio) is returned as zeros: the original produces NaN there (see
    :func:`peak_normalize`).

    A file longer than ``max_seconds`` is cut to its first ``max_seconds`` (as the original) with a warning naming
    the lengths; ``truncation=False`` raises a `ValueError` instead. A file cut short on disk (e.g. a WAV or MP3
    whose data ends early) yields the samples that are present, as libsndfile decodes them; a corrupt stream that
    libsndfile cannot decode (e.g. a cut FLAC or OGG) raises :class:`AudioLoadError`.

    Args:
        source (`str`, `os.PathLike`, `bytes` or binary file object): the audio file (any format libsndfile reads:
            WAV, FLAC, OGG/Vorbis, MP3, ...). URLs are not fetched.
        sampling_rate (`int`, *optional*, defaults to 16000): the rate of the returned signal.
        max_seconds (`float`, *optional*): read at most this many seconds from the start; `None` reads everything.
            The AF2 feature extractor uses ``max_num_windows * (window_length - window_overlap) + window_overlap``.
        truncation (`bool`, *optional*, defaults to `True`): cut a longer file with a warning; `False` raises.

    Returns:
        `np.ndarray`: 1-D float64 signal at ``sampling_rate``.

    Raises:
        AudioLoadError: the source is missing, unreadable, unsupported, corrupt, empty or contains NaN/inf.
        TypeError: the source is of an unsupported type.
        ValueError: ``sampling_rate`` or ``max_seconds`` is not a positive number, or the file is longer than
            ``max_seconds`` and ``truncation=False``.
    """
    import soundfile as sf

    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, np.integer)) or sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive integer, got {sampling_rate!r}.")
    if max_seconds is not None:
        if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float, np.number)):
            raise ValueError(f"max_seconds must be a positive number or None, got {max_seconds!r}.")
        if not math.isfinite(float(max_seconds)) or max_seconds <= 0:
            raise ValueError(f"max_seconds must be a positive, finite number or None, got {max_seconds!r}.")

    name = _describe(source)
    handle = _open_source(source)
    try:
        with sf.SoundFile(handle) as audio_file:
            file_rate = audio_file.samplerate
            channels = audio_file.channels
            file_format = audio_file.format
            total_frames = audio_file.frames
            frames = total_frames if max_seconds is None else min(int(max_seconds * file_rate), total_frames)
            if frames < total_frames:
                message = (
                    f"Audio source {name} lasts {total_frames / file_rate:.2f} s ({total_frames} frames at {file_rate} "
                    f"Hz), more than the {max_seconds} s the model sees"
                )
                if not truncation:
                    raise ValueError(message + " (truncation=False). Cut the audio, or allow truncation.")
                logger.warning(message + f"; only the first {frames} frames are read.")
            audio_file.seek(0)  # as the original (it seeks to its start offset, 0); matters for MP3 decoding
            data = audio_file.read(frames, dtype="float64")
    except (sf.LibsndfileError, RuntimeError, EOFError, OSError) as error:
        hint = _FORMAT_HINT if "format not recognised" in str(error).lower() else ""
        raise AudioLoadError(f"Could not read audio from {name}: {str(error).rstrip('.')}.{hint}") from error

    if data.size == 0:
        raise AudioLoadError(f"Audio source {name} contains no samples.")
    if not np.isfinite(data).all():
        raise AudioLoadError(f"Audio source {name} contains NaN or infinite samples.")

    if data.max() > 1 or data.min() < -1:
        data = data / max(abs(data.max()), abs(data.min()))

    if data.ndim == 2 and channels > 1 and file_format == "MP3":
        data = data.mean(axis=1)
        channels = 1

    if file_rate != sampling_rate:
        import librosa

        if channels == 1:
            data = librosa.resample(data.flatten(), orig_sr=file_rate, target_sr=sampling_rate)
        else:
            data = librosa.resample(data.T, orig_sr=file_rate, target_sr=sampling_rate)[0]
    elif channels != 1:
        data = data.T[0]

    data = np.ascontiguousarray(data.reshape(-1), dtype=np.float64)
    if data.size == 0:
        raise AudioLoadError(f"Audio source {name} is too short to resample to {sampling_rate} Hz.")
    return peak_normalize(data)
