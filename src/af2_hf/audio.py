"""Audio loading for Audio Flamingo 2, reproducing the original ``read_audio``: the ONE loader of the package.

The original AF2 inference code reads a file with soundfile (float64), keeps at most the span the model can see
(``max_num_window * (window_length - window_overlap) + window_overlap`` seconds) BEFORE any normalisation,
divides a float file whose samples leave [-1, 1] by its peak, resamples with ``librosa.resample`` (default
``res_type``: soxr_hq; every channel is resampled, then channel 0 is kept), keeps channel 0 of a multi-channel file
at the target rate (no down-mix), and finally peak-normalises the mono signal. :func:`load_audio` does exactly that
and returns the float64 signal the original ``read_audio`` returns.

:func:`load_audio` also takes every other form users hold audio in, and applies the same steps to it: in-memory
waveforms (numpy / torch / list of numbers, with their sampling rate), ``datasets`` audio values (decoded dicts
``{"array", "sampling_rate"}``, undecoded ``{"path", "bytes"}`` from ``Audio(decode=False)``, and the
``AudioDecoder`` objects of ``datasets`` 4+). The processor, the pipeline, the CLI, training and serving all load
through it.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from collections.abc import Mapping
from typing import Any, BinaryIO, Union

import numpy as np
from transformers.utils import logging

logger = logging.get_logger(__name__)

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

__all__ = ["AudioLoadError", "AudioSource", "is_waveform", "load_audio", "peak_normalize"]


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

# libsndfile's parser log (``SoundFile.extra_info``) of a file whose header claims more than the file holds:
# "data : 32000 (should be 7956)" (WAV), "riff : 64104 (should be 38462)" (W64), "Data Size : 64000 (should be
# 38390)" (AU), "Chunk size 32008 > file length 16027" (AIFF), "Junk after the last page" (a cut Ogg page).
_SIZE_LOG = re.compile(r"^\s*(data|SSND|riff|RIFF|Data Size)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_CHUNK_LOG = re.compile(r"Chunk size (\d+) > file length (\d+)")
_OGG_CUT_LOG = "Junk after the last page"
_OPENING = re.compile(r"^Error opening (<[^>]*>|'[^']*'|\"[^\"]*\"): ")


# Integer PCM -> float as soundfile reads PCM files: signed samples / 2**(bits-1), unsigned 8-bit is offset binary.
_PCM_SCALES = {np.dtype(np.int8): 128.0, np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0,
               np.dtype(np.uint8): 128.0}


def is_waveform(value) -> bool:
    """True for an in-memory waveform (numpy array, torch tensor or non-empty list of numbers): what a feature
    extractor takes as is. Everything else :func:`load_audio` reads (paths, bytes, file objects, ``datasets`` dicts
    and decoders) needs loading first."""
    if isinstance(value, np.ndarray):
        return True
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_number(v) for v in value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _is_file_source(value) -> bool:
    return isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(value, "read")


def _is_decoder(value) -> bool:
    """A torchcodec ``AudioDecoder`` (what ``datasets`` 4+ returns for a decoded audio column), duck-typed."""
    return hasattr(value, "get_all_samples")


# ---------------------------------------------------------------------------------------------------- files


def _claimed_bytes(log: str) -> tuple[int, int] | None:
    """(bytes the header claims, bytes present) when the parser log says the file is shorter than its header."""
    short = {match.group(1).lower(): (int(match.group(2)), int(match.group(3))) for match in _SIZE_LOG.finditer(log)
             if int(match.group(2)) > int(match.group(3))}
    for chunk in ("data", "ssnd", "data size", "riff"):  # the audio data chunk's own size first
        if chunk in short:
            return short[chunk]
    match = _CHUNK_LOG.search(log)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _warn_if_short(audio_file, name: str, expected_frames: int, read_frames: int) -> None:
    """Warns when a file holds less audio than its header says (a file cut short on disk)."""
    log = getattr(audio_file, "extra_info", "") or ""
    claimed = _claimed_bytes(log)
    used = f"the {read_frames} frames present are used ({read_frames / audio_file.samplerate:.2f} s)"
    if claimed is not None:
        logger.warning(f"Audio file {name} is truncated: its header claims {claimed[0]} bytes but the file holds "
                       f"{claimed[1]}; {used}.")
    elif read_frames < expected_frames:
        logger.warning(f"Audio file {name} is truncated or corrupt: its header claims {expected_frames} frames but only "
                       f"{read_frames} could be decoded; those are used ({read_frames / audio_file.samplerate:.2f} s).")
    elif _OGG_CUT_LOG in log:
        logger.warning(f"Audio file {name} ends with an incomplete Ogg page (the file was cut short?); {used}.")


def _read_file(source, max_seconds: float | None, truncation: bool) -> tuple[np.ndarray, int, str]:
    """Reads at most ``max_seconds`` of a file as float64 ``(frames, channels)`` -> (data, rate, format)."""
    import soundfile as sf

    name = _describe(source)
    handle = _open_source(source)
    try:
        # A path is opened here and given to libsndfile as a file object: libsndfile then recognises the format by
        # the content only (given a path whose content it does not recognise, it guesses a headerless format from
        # some extensions, e.g. any bytes named *.au load as 8 kHz u-law).
        with _opened(handle) as stream, sf.SoundFile(stream) as audio_file:
            rate = audio_file.samplerate
            total_frames = audio_file.frames
            frames = total_frames if max_seconds is None else min(int(max_seconds * rate), total_frames)
            if frames < total_frames:
                _truncate_message(name, total_frames, rate, max_seconds, frames, truncation)
            audio_file.seek(0)  # as the original (it seeks to its start offset, 0); matters for MP3 decoding
            data = audio_file.read(frames, dtype="float64", always_2d=True)
            _warn_if_short(audio_file, name, frames, data.shape[0])
            file_format = audio_file.format
    except (sf.LibsndfileError, RuntimeError, EOFError, OSError) as error:
        detail = _OPENING.sub("", str(error)).rstrip(".")
        hint = _FORMAT_HINT if "format not recognised" in detail.lower() else ""
        if "malformed" in detail.lower():
            hint = " The file is corrupt or cut short."
        raise AudioLoadError(f"Could not read audio from {name}: {detail}.{hint}") from error
    if data.size == 0:
        raise AudioLoadError(f"Audio source {name} contains no samples.")
    return data, rate, file_format


@contextlib.contextmanager
def _opened(handle):
    if isinstance(handle, str):
        with open(handle, "rb") as stream:
            yield stream
    else:
        yield handle


def _truncate_message(name, total_frames, rate, max_seconds, frames, truncation) -> None:
    message = (
        f"Audio source {name} lasts {total_frames / rate:.2f} s ({total_frames} frames at {rate} Hz), more than the "
        f"{max_seconds} s the model sees"
    )
    if not truncation:
        raise ValueError(message + " (truncation=False). Cut the audio, or allow truncation.")
    logger.warning(message + f"; only the first {frames} frames are read.")


# ---------------------------------------------------------------------------------------------------- in memory


def _array(value, name: str) -> np.ndarray:
    """A waveform as a float numpy array (float32 / float64 kept, integer PCM scaled as soundfile reads it)."""
    if _is_number(value) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} is a single number ({value!r}), not audio: pass a 1-D waveform.")
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if value.dtype.is_floating_point and value.dtype.itemsize < 4:
            value = value.float()
        value = value.numpy()
    elif isinstance(value, (list, tuple)):
        if not all(_is_number(v) for v in value):
            raise TypeError(f"{name}: a waveform given as a list must contain numbers only.")
        value = np.asarray(value, dtype=np.float64)
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected a waveform (numpy array, torch tensor or list of numbers), got "
                        f"{type(value).__name__}.")
    if value.ndim == 0:
        raise AudioLoadError(f"{name} is a 0-d array (a single number), not audio: pass a 1-D waveform.")
    if value.dtype in _PCM_SCALES:
        samples = value.astype(np.float64)
        if value.dtype == np.uint8:
            samples -= 128.0
        return samples / _PCM_SCALES[value.dtype]
    if value.dtype == np.float16:
        return value.astype(np.float32)
    if value.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} has dtype {value.dtype}: expected floating-point samples or integer PCM "
                        "(int8, int16, int32, uint8).")
    return value


def _channel_zero(waveform: np.ndarray, name: str) -> np.ndarray:
    """Channel 0 of a 2-D waveform, whose channel axis is the shorter one (axis 0 on a tie), as the original keeps
    channel 0 of a file (no down-mix)."""
    if waveform.ndim == 1:
        return waveform
    if waveform.ndim != 2:
        raise AudioLoadError(f"{name} has shape {waveform.shape}: expected a 1-D (mono) or 2-D (multi-channel) "
                             "waveform.")
    if 1 in waveform.shape:
        return waveform.reshape(-1)
    channel_axis = 0 if waveform.shape[0] <= waveform.shape[1] else 1
    logger.warning(
        f"{name} has shape {waveform.shape}: read as {waveform.shape[channel_axis]} channels "
        f"({'channels first' if channel_axis == 0 else 'channels last'}); only channel 0 is kept, as the original "
        "read_audio (no down-mix)."
    )
    return np.take(waveform, 0, axis=channel_axis)


def _check_rate(rate, name: str) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"{name}: sampling_rate must be a positive integer, got {rate!r}.")
    return int(rate)


def _decoded(decoder, name: str) -> tuple[Any, int] | tuple[None, Any]:
    """-> (waveform, rate) of a torchcodec decoder, or (None, encoded source) for a ``datasets`` decoder that still
    knows its file (read with libsndfile then, exactly as the original reads files)."""
    encoded = getattr(decoder, "_hf_encoded", None)
    if isinstance(encoded, Mapping):
        if encoded.get("bytes") is not None:
            return None, encoded["bytes"]
        if encoded.get("path") is not None and os.path.isfile(str(encoded["path"])):
            return None, encoded["path"]
    try:
        samples = decoder.get_all_samples()
    except Exception as error:  # torchcodec raises RuntimeError / ValueError for undecodable streams
        raise AudioLoadError(f"Could not decode {name}: {error}") from error
    return samples.data, int(samples.sample_rate)


def _from_mapping(value: Mapping, name: str):
    """-> (waveform, rate) or (None, file source) of a ``datasets`` audio dict."""
    for key in ("array", "raw"):
        if value.get(key) is not None:
            if value.get("sampling_rate") is None:
                raise ValueError(f"{name}: an audio dict with {key!r} needs its 'sampling_rate', e.g. "
                                 f"{{{key!r}: waveform, 'sampling_rate': 16000}}.")
            return value[key], _check_rate(value["sampling_rate"], name)
    if value.get("bytes") is not None:  # datasets prefers the bytes when both are set
        return None, value["bytes"]
    if value.get("path") is not None:
        return None, value["path"]
    raise ValueError(f"{name}: an audio dict needs 'array' (or 'raw') with 'sampling_rate', 'bytes' or 'path'; got "
                     f"keys {sorted(value)}.")


# ---------------------------------------------------------------------------------------------------- common steps


def _truncate(waveform: np.ndarray, rate: int, max_seconds, truncation: bool, name: str) -> np.ndarray:
    if max_seconds is None:
        return waveform
    frames = int(max_seconds * rate)
    if waveform.shape[0] > frames:
        _truncate_message(name, waveform.shape[0], rate, max_seconds, frames, truncation)
        return waveform[:frames]
    return waveform


def _finish(data: np.ndarray, rate: int, sampling_rate: int, normalize: bool, name: str):
    """The original's steps after reading: divide by the peak when samples leave [-1, 1], keep channel 0 (MP3 files:
    the channel mean, as pydub decodes them), resample, peak-normalise. ``data``: 1-D, or ``(frames, channels)``."""
    if data.size == 0:
        raise AudioLoadError(f"Audio source {name} contains no samples.")
    if not np.isfinite(data).all():
        raise AudioLoadError(f"Audio source {name} contains NaN or infinite samples.")
    if normalize and (data.max() > 1 or data.min() < -1):
        data = data / max(abs(data.max()), abs(data.min()))
    if rate != sampling_rate:
        import librosa

        # every channel is resampled, then channel 0 kept (the original); the signal is float64 as the original's
        data = librosa.resample(np.asarray(data, dtype=np.float64).T if data.ndim == 2 else data.astype(np.float64),
                                orig_sr=rate, target_sr=sampling_rate)
        data = data[0] if data.ndim == 2 else data
    elif data.ndim == 2:
        data = data[:, 0]
    data = np.ascontiguousarray(data.reshape(-1))
    if data.size == 0:
        raise AudioLoadError(f"Audio source {name} is too short to resample to {sampling_rate} Hz.")
    return peak_normalize(data) if normalize else data


def _check_arguments(sampling_rate, max_seconds) -> None:
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, np.integer)) or sampling_rate <= 0:
        raise ValueError(f"sampling_rate must be a positive integer, got {sampling_rate!r}.")
    if max_seconds is not None:
        if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float, np.number)):
            raise ValueError(f"max_seconds must be a positive number or None, got {max_seconds!r}.")
        if not math.isfinite(float(max_seconds)) or max_seconds <= 0:
            raise ValueError(f"max_seconds must be a positive, finite number or None, got {max_seconds!r}.")


def _load_file(source, sampling_rate, max_seconds, truncation, normalize) -> np.ndarray:
    data, rate, file_format = _read_file(source, max_seconds, truncation)
    if data.shape[1] > 1 and file_format == "MP3":
        data = data.mean(axis=1, keepdims=True)
    if data.shape[1] == 1:
        data = data[:, 0]
    return _finish(data, rate, sampling_rate, normalize, _describe(source))


def _load_waveform(waveform, rate, sampling_rate, max_seconds, truncation, normalize, name) -> np.ndarray:
    waveform = _channel_zero(_array(waveform, name), name)
    waveform = _truncate(waveform, rate, max_seconds, truncation, name)
    return _finish(waveform, rate, sampling_rate, normalize, name)


def load_audio(
    source: AudioSource,
    sampling_rate: int = 16000,
    max_seconds: float | None = None,
    truncation: bool = True,
    source_sampling_rate: int | None = None,
    normalize: bool = True,
) -> np.ndarray:
    """Loads audio as the original Audio Flamingo 2 ``read_audio`` does: mono, resampled, peak-normalised.

    Steps: read at most ``int(max_seconds * source_rate)`` frames from the start (truncation happens before any
    normalisation); if a sample lies outside [-1, 1] divide by the peak magnitude; resample to ``sampling_rate`` with
    ``librosa.resample`` (default ``res_type``; for multi-channel audio all channels are resampled and channel 0 is
    kept; at the target rate channel 0 is kept as is); then :func:`peak_normalize`.

    Accepted sources:

    - a file: a path (`str` / `os.PathLike`), `bytes` of a file, or a binary file object; any format libsndfile reads
      (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...), recognised by its content, not its extension. URLs are not
      fetched. Read as float64, as the original.
    - a waveform: numpy array, torch tensor or list of numbers at ``source_sampling_rate`` (default:
      ``sampling_rate``). Integer PCM is scaled as soundfile reads PCM files (int16 / 32768, ...); float32 stays
      float32 when no resampling is needed (so features equal those of the array given to the feature extractor).
      A 2-D waveform is multi-channel, its channel axis the shorter one: channel 0 is kept, with a warning.
    - a ``datasets`` audio value: ``{"array", "sampling_rate"}`` (a decoded column, or ``{"raw", ...}`` as the ASR
      pipeline takes), ``{"path", "bytes"}`` (``Audio(decode=False)``: the bytes, else the path, are read as a file),
      or a torchcodec ``AudioDecoder`` (``datasets`` 4+ with ``decode=True``): a ``datasets`` decoder is read from
      the file it wraps (as the original would read that file); another decoder's samples are taken as a waveform.

    MP3 is decoded by libsndfile here; the original decodes MP3 with pydub/ffmpeg and down-mixes it, so for MP3 this
    function averages the channels (before resampling) instead of keeping channel 0. MP3 results are therefore close
    to, but not bit-identical with, the original's. Every other format follows the original bit for bit.

    Digital silence (all-zero audio) is returned as zeros: the original produces NaN there (see
    :func:`peak_normalize`).

    Audio longer than ``max_seconds`` is cut to its first ``max_seconds`` (as the original) with a warning naming
    the lengths; ``truncation=False`` raises a `ValueError` instead. A file whose header claims more data than it
    holds (a WAV, AIFF or MP3 cut short on disk) yields the samples that are present, with a warning that says so; a
    corrupt stream that libsndfile cannot decode (e.g. a cut FLAC or OGG) raises :class:`AudioLoadError`.

    Args:
        source: see above.
        sampling_rate (`int`, *optional*, defaults to 16000): the rate of the returned signal.
        max_seconds (`float`, *optional*): read at most this many seconds from the start; `None` reads everything.
            The AF2 feature extractor uses ``max_num_windows * (window_length - window_overlap) + window_overlap``.
        truncation (`bool`, *optional*, defaults to `True`): cut longer audio with a warning; `False` raises.
        source_sampling_rate (`int`, *optional*): the rate of a bare waveform ``source`` (default:
            ``sampling_rate``). Files, dicts and decoders carry their own rate; giving it for them is an error.
        normalize (`bool`, *optional*, defaults to `True`): the original's peak steps; `False` returns the samples
            as stored (mono, resampled), for models that normalise themselves.

    Returns:
        `np.ndarray`: 1-D signal at ``sampling_rate``: float64, or float32 for a float32 waveform at that rate.

    Raises:
        AudioLoadError: the source is missing, unreadable, unsupported, corrupt, empty, a 0-d array, or contains
            NaN/inf.
        TypeError: the source is of an unsupported type (e.g. a single number, `None`).
        ValueError: a bad argument, a dict without a usable key, or audio longer than ``max_seconds`` with
            ``truncation=False``.
    """
    _check_arguments(sampling_rate, max_seconds)
    name = "Audio" if not _is_file_source(source) else _describe(source)
    if source is None:
        raise TypeError("No audio source given (None).")
    if isinstance(source, Mapping) or _is_decoder(source):
        kind = "audio dict" if isinstance(source, Mapping) else f"{type(source).__name__} object"
        if source_sampling_rate is not None:
            raise ValueError(f"source_sampling_rate is for bare waveforms; an {kind} carries its own rate.")
        waveform, rate_or_file = _from_mapping(source, kind) if isinstance(source, Mapping) else _decoded(source, kind)
        if waveform is None:
            return _load_file(rate_or_file, sampling_rate, max_seconds, truncation, normalize)
        return _load_waveform(waveform, rate_or_file, sampling_rate, max_seconds, truncation, normalize, kind)
    if _is_file_source(source):
        if source_sampling_rate is not None:
            raise ValueError(f"source_sampling_rate is for bare waveforms; the file {name} carries its own rate.")
        return _load_file(source, sampling_rate, max_seconds, truncation, normalize)
    rate = sampling_rate if source_sampling_rate is None else _check_rate(source_sampling_rate, "source_sampling_rate")
    return _load_waveform(source, rate, sampling_rate, max_seconds, truncation, normalize, "The waveform")
