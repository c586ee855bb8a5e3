"""Waveform inputs of the Audio Flamingo 2 feature extractor: what a call may pass, as validated 1-D tensors.

Numpy arrays, torch tensors and lists of numbers; float16/bfloat16 computed in float32; integer PCM scaled as soundfile
reads PCM files; multi-channel audio reduced to channel 0 (as the original ``read_audio``); empty, non-finite and
unsupported inputs rejected with an error that names the input. Paths, bytes and ``datasets`` values are not
waveforms: :func:`af2_hf.load_audio` reads them.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["waveform_list", "waveform_tensor"]


def _is_scalar_number(value) -> bool:
    return isinstance(value, (float, int, np.number)) and not isinstance(value, bool)


# Integer PCM -> float64 as soundfile reads PCM files (dtype="float64"): signed samples are divided by 2**(bits-1),
# unsigned 8-bit PCM is offset binary (128 is zero).
_PCM_INTEGER_DTYPES = {torch.int8: 128.0, torch.int16: 32768.0, torch.int32: 2147483648.0, torch.uint8: 128.0}


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pcm_to_float(waveform: torch.Tensor) -> torch.Tensor:
    scale = _PCM_INTEGER_DTYPES[waveform.dtype]
    samples = waveform.to(torch.float64)
    if waveform.dtype == torch.uint8:
        samples -= 128.0
    return samples / scale


def _numpy_to_torch(waveform: np.ndarray, index: int) -> torch.Tensor:
    """A numpy waveform as a tensor sharing its memory where torch allows it (a copy for read-only, negatively
    strided or non-native byte order arrays)."""
    if not waveform.dtype.isnative:
        waveform = waveform.astype(waveform.dtype.newbyteorder("="))
    elif not waveform.flags.writeable or any(stride < 0 for stride in waveform.strides):
        waveform = np.array(waveform)
    try:
        return torch.from_numpy(waveform)
    except TypeError:
        raise TypeError(
            f"Audio {index} has dtype {waveform.dtype}: expected floating-point samples in [-1, 1] or integer PCM "
            f"({', '.join(sorted(_dtype_name(d) for d in _PCM_INTEGER_DTYPES))})."
        ) from None


def _input_device(raw_audio) -> torch.device:
    """Where a call's input lives: the device of its first tensor (a batch tensor or a list of them), else CPU."""
    items = raw_audio if isinstance(raw_audio, (list, tuple)) else [raw_audio]
    for item in items:
        if isinstance(item, torch.Tensor):
            return item.device
    return torch.device("cpu")


def _first_channel(waveform: torch.Tensor, index: int) -> torch.Tensor:
    """The first channel of a 2-D waveform; the channel axis is the shorter one (axis 0 when both are equal)."""
    if 1 in waveform.shape:
        return waveform.reshape(-1)
    channel_axis = 0 if waveform.shape[0] <= waveform.shape[1] else 1
    channels = waveform.shape[channel_axis]
    logger.warning(
        f"Audio {index} has shape {tuple(waveform.shape)}: read as {channels} channels x "
        f"{waveform.shape[1 - channel_axis]} samples ({'channels first' if channel_axis == 0 else 'channels last'}); "
        "only channel 0 is kept, as the original read_audio (no down-mix). Pass a 1-D array to choose yourself."
    )
    return waveform.select(channel_axis, 0)


def waveform_tensor(waveform, index: int, device: torch.device | None = None) -> torch.Tensor:
    """One waveform as a validated 1-D float32/float64 tensor on ``device`` (default: where it already is), see
    the class docstring for the accepted inputs. The waveform moves first, so the checks run on ``device``."""
    if _is_scalar_number(waveform) or isinstance(waveform, (bool, np.bool_)):
        raise TypeError(f"Audio {index} is a single number ({waveform!r}), not audio: pass a 1-D waveform.")
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach()
    elif isinstance(waveform, (list, tuple)):
        if not all(_is_scalar_number(v) for v in waveform):
            raise TypeError(
                f"Audio {index}: a waveform given as a list must contain numbers only; got a nested list or "
                "other values. Pass a list of 1-D arrays for a batch."
            )
        waveform = torch.from_numpy(np.asarray(waveform, dtype=np.float64))
    elif isinstance(waveform, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise TypeError(
            f"Audio {index} is a path or bytes: load it first with af2_hf.load_audio(...) (or pass it to "
            "AudioFlamingo2Processor, which loads it)."
        )
    elif isinstance(waveform, np.ndarray):
        waveform = _numpy_to_torch(waveform, index)
    else:
        raise TypeError(
            f"Audio {index}: expected a numpy array, torch tensor or list of floats, got {type(waveform).__name__}."
        )
    if device is not None:
        waveform = waveform.to(device)
    if waveform.ndim == 0:
        raise ValueError(f"Audio {index} is a 0-d array (a single number), not audio: pass a 1-D waveform.")
    if waveform.ndim == 2:
        waveform = _first_channel(waveform, index)
    elif waveform.ndim != 1:
        raise ValueError(
            f"Audio {index} has shape {tuple(waveform.shape)}: expected a 1-D mono waveform (or a 2-D "
            "multi-channel one)."
        )
    if waveform.dtype in (torch.float16, torch.bfloat16):
        waveform = waveform.to(torch.float32)
    elif waveform.dtype in _PCM_INTEGER_DTYPES:
        waveform = _pcm_to_float(waveform)
    if waveform.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"Audio {index} has dtype {_dtype_name(waveform.dtype)}: expected floating-point samples in [-1, 1] "
            f"or integer PCM ({', '.join(sorted(_dtype_name(d) for d in _PCM_INTEGER_DTYPES))}). Convert it to "
            "float first (e.g. x / 32768 for 16-bit PCM), or load files with af2_hf.load_audio."
        )
    if waveform.numel() == 0:
        raise ValueError(f"Audio {index} is empty (0 samples).")
    # min and max are NaN or infinite exactly when some sample is (one pass, no full-size temporary).
    if not bool(torch.isfinite(torch.stack(torch.aminmax(waveform))).all()):
        finite = torch.isfinite(waveform)
        nan = int(torch.isnan(waveform).sum())
        infinite = int(waveform.numel() - finite.sum()) - nan
        first = int(torch.argmin(finite.to(torch.uint8)))
        raise ValueError(
            f"Audio {index} contains NaN or infinite samples ({nan} NaN, {infinite} infinite, the first at "
            f"sample {first}): clean it first, e.g. np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)."
        )
    return waveform



def waveform_list(raw_audio, device: torch.device | None = None) -> list[torch.Tensor]:
    if isinstance(raw_audio, (np.ndarray, torch.Tensor)):
        if raw_audio.ndim == 2:
            # (batch, samples); more rows than columns can only be one (samples, channels) waveform.
            items = [raw_audio] if raw_audio.shape[0] > raw_audio.shape[1] else list(raw_audio)
        elif raw_audio.ndim == 1:
            items = [raw_audio]
        elif raw_audio.ndim == 0:
            raise ValueError("Got a 0-d array (a single number): that is not audio. Pass a 1-D waveform.")
        else:
            raise ValueError(
                f"Expected a 1-D waveform or a 2-D batch (batch, samples), got shape {tuple(raw_audio.shape)}."
            )
    elif isinstance(raw_audio, (list, tuple)):
        if len(raw_audio) == 0:
            raise ValueError("Received an empty list of audio.")
        items = [raw_audio] if all(_is_scalar_number(v) for v in raw_audio) else list(raw_audio)
    else:
        items = [raw_audio]
    return [waveform_tensor(item, index, device) for index, item in enumerate(items)]
