"""Feature extractor of Audio Flamingo 2: 10-second windows of int16-quantised audio -> log-mel spectrograms.

It reproduces the original pipeline (``inference.load_audio`` + ``CLAP.get_mel``) without torchaudio, in named steps:

1. the waveform inputs as validated tensors (:mod:`.waveform_inputs`; files and ``datasets`` values are loaded by
   :func:`af2_hf.load_audio`, see :meth:`AudioFlamingo2FeatureExtractor.fetch_audio`);
2. truncation to ``max_num_windows`` windows and the window count (``get_num_windows``);
3. peak normalisation (``do_normalize``), zero padding to whole windows and the int16 round trip (``do_quantize``)
   (:func:`.log_mel.quantised_windows`);
4. the log-mel of every window (:func:`.log_mel.log_mel_spectrogram`);
5. the batch: padded with the log-mel of silence and ``input_features_mask`` 0.

With the default settings the log-mel of the original is reproduced bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import logging

from .audio import is_waveform, load_audio
from .log_mel import htk_mel_filter_bank, log_mel_spectrogram, mel_window_and_filters, power_to_db, quantised_windows
from .waveform_inputs import _input_device, _is_scalar_number, _pcm_to_float, waveform_list, waveform_tensor

logger = logging.get_logger(__name__)

__all__ = ["AudioFlamingo2FeatureExtractor", "htk_mel_filter_bank"]

_ = _pcm_to_float  # importable from here as before


def _truncation_enabled(truncation) -> bool:
    """`True`, `False`, `None` (the default: truncate) or a tokenizer truncation strategy (anything but
    ``"do_not_truncate"`` truncates), as processors pass the shared ``truncation`` argument on."""
    if truncation is None:
        return True
    if isinstance(truncation, (bool, np.bool_)):
        return bool(truncation)
    value = getattr(truncation, "value", truncation)
    if isinstance(value, str):
        return value != "do_not_truncate"
    raise ValueError(f"truncation must be a bool or a truncation strategy, got {truncation!r}.")



def padded_batch(mel: torch.Tensor, counts: list[int], total: int, silence: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch step: the windows of every sample (``mel`` holds them sample after sample, ``counts[i]`` each) in
    rows of ``total`` windows, padded with the log-mel of silence (``silence`` dB), as the original collator pads
    with zero clips; and the ``(batch, total)`` int64 mask, 1 for real windows."""
    features = torch.full((len(counts), total, *mel.shape[1:]), silence, dtype=torch.float32, device=mel.device)
    mask = torch.zeros((len(counts), total), dtype=torch.long, device=mel.device)
    offset = 0
    for row, count in enumerate(counts):
        features[row, :count] = mel[offset : offset + count]
        mask[row, :count] = 1
        offset += count
    return features, mask


class AudioFlamingo2FeatureExtractor(SequenceFeatureExtractor):
    r"""
    Turns 16 kHz mono waveforms into the windowed log-mel features of Audio Flamingo 2.

    Each waveform is cut into windows of ``window_length`` seconds (at most ``max_num_windows``; longer audio is
    truncated with a warning), zero-padded to whole windows, int16-quantised, and turned into a
    ``(num_frames, num_mel_bins)`` log-mel in dB per window (``num_frames = window_samples // hop_length + 1``, 1001
    for 10 s). A batch is padded to the largest number of windows in it with the log-mel of a zero clip (-100 dB
    everywhere) and ``input_features_mask`` 0, exactly as the original collator pads with zero clips. Windows are
    always padded at the end, whatever the tokenizer's padding side.

    All windows of the whole batch go through one batched ``torch.stft``; ``device`` runs it on another device with
    the same float32 numerics.

    Args:
        num_mel_bins (`int`, *optional*, defaults to 64): mel filters (the feature size).
        sampling_rate (`int`, *optional*, defaults to 16000): the rate every input must have.
        window_length (`float`, *optional*, defaults to 10.0): window length in seconds.
        window_overlap (`float`, *optional*, defaults to 0.0): overlap between consecutive windows in seconds.
        max_num_windows (`int`, *optional*, defaults to 30): windows kept per audio (30 x 10 s = 5 minutes).
        n_fft (`int`, *optional*, defaults to 1024): FFT size and (periodic Hann) window size of the STFT.
        hop_length (`int`, *optional*, defaults to 160): STFT hop in samples.
        f_min (`float`, *optional*, defaults to 50.0), f_max (`float`, *optional*, defaults to 8000.0): mel range in Hz.
        mel_floor (`float`, *optional*, defaults to 1e-10): power floor before the logarithm (-100 dB).
        do_normalize (`bool`, *optional*, defaults to `True`): peak-normalise each waveform as the original
            ``read_audio`` does (idempotent, so audio from [`af2_hf.load_audio`] is unchanged by it).
        do_quantize (`bool`, *optional*, defaults to `True`): apply the original int16 round trip.
        padding_value (`float`, *optional*, defaults to 0.0): the WAVEFORM value of padding (a zero clip); padded
            windows therefore hold the log-mel of silence.
        return_attention_mask (`bool`, *optional*, defaults to `True`): return ``input_features_mask``.

    Peak normalisation and quantisation run in float64 for float64 input (as the original, whose float64 signal is
    needed for bit-exact clips) and in float32 otherwise; the STFT and the mel run in float32.

    Inputs and edge cases:

    - Waveforms: numpy arrays, torch tensors or lists of numbers. float16/bfloat16 are computed in float32. Integer
      PCM is converted to float64 exactly as soundfile reads PCM files: int8 / 128, int16 / 32768, int32 / 2**31,
      and uint8 as offset binary (x - 128) / 128; so an int16 array gives the features of the 16-bit WAV file
      holding it. Other integer, bool or complex dtypes raise `TypeError`.
    - A 2-D array is a batch ``(batch, samples)``, unless it has more rows than columns: then it is one
      ``(samples, channels)`` waveform. A 2-D item inside a list is one multi-channel waveform whose channel axis
      is the shorter one (the first on a tie). Of multi-channel audio only channel 0 is kept, with a warning, as the
      original ``read_audio`` keeps channel 0 (no down-mix); a ``(1, n)`` or ``(n, 1)`` array is plain mono.
    - Empty audio raises `ValueError`; NaN or infinite samples raise `ValueError` naming the count and the first
      position. A 1-sample or sub-window waveform becomes one zero-padded window. All-zero audio (digital silence)
      gives the -100 dB log-mel of silence, never NaN (the original divides 0 by 0 here).
    - ``sampling_rate`` must equal the extractor's (`ValueError` otherwise, with how to resample); when it is missing
      a warning is logged and the extractor's rate is assumed, as transformers' audio feature extractors do.
    - Audio longer than ``max_num_windows`` windows is truncated with a warning (as the original); pass
      ``truncation=False`` to get a `ValueError` instead.
    """

    model_input_names = ["input_features", "input_features_mask"]

    def __init__(
        self,
        num_mel_bins: int = 64,
        sampling_rate: int = 16000,
        window_length: float = 10.0,
        window_overlap: float = 0.0,
        max_num_windows: int = 30,
        n_fft: int = 1024,
        hop_length: int = 160,
        f_min: float = 50.0,
        f_max: float = 8000.0,
        mel_floor: float = 1e-10,
        do_normalize: bool = True,
        do_quantize: bool = True,
        padding_value: float = 0.0,
        return_attention_mask: bool = True,
        **kwargs,
    ):
        feature_size = kwargs.pop("feature_size", num_mel_bins)
        if feature_size != num_mel_bins:
            raise ValueError(f"feature_size ({feature_size}) must equal num_mel_bins ({num_mel_bins}).")
        super().__init__(
            feature_size=num_mel_bins,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        self.num_mel_bins = num_mel_bins
        self.window_length = window_length
        self.window_overlap = window_overlap
        self.max_num_windows = max_num_windows
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.f_min = f_min
        self.f_max = f_max
        self.mel_floor = mel_floor
        self.do_normalize = do_normalize
        self.do_quantize = do_quantize
        self._validate_config()
        self._device_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ configuration

    def _validate_config(self):
        for name in ("num_mel_bins", "sampling_rate", "n_fft", "hop_length", "max_num_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("window_length", "window_overlap", "f_min", "f_max", "mel_floor"):
            value = getattr(self, name)
            if not _is_scalar_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if self.window_samples <= 0:
            raise ValueError(f"window_length ({self.window_length} s) is shorter than one sample.")
        if not 0 <= self.overlap_samples < self.window_samples:
            raise ValueError(
                f"window_overlap ({self.window_overlap} s) must be >= 0 and shorter than window_length "
                f"({self.window_length} s)."
            )
        if self.window_samples <= self.n_fft // 2:
            raise ValueError(
                f"A window of {self.window_samples} samples is too short for the reflect padding of n_fft={self.n_fft}."
            )
        if not 0 <= self.f_min < self.f_max <= self.sampling_rate / 2:
            raise ValueError(
                f"Need 0 <= f_min < f_max <= sampling_rate / 2, got f_min={self.f_min}, f_max={self.f_max}, "
                f"sampling_rate={self.sampling_rate}."
            )
        if self.mel_floor <= 0:
            raise ValueError(f"mel_floor must be positive, got {self.mel_floor}.")

    @property
    def window_samples(self) -> int:
        """Samples per window (``int(window_length * sampling_rate)``, as the original)."""
        return int(float(self.window_length) * self.sampling_rate)

    @property
    def overlap_samples(self) -> int:
        return int(float(self.window_overlap) * self.sampling_rate)

    @property
    def window_stride(self) -> int:
        """Samples between the starts of consecutive windows."""
        return self.window_samples - self.overlap_samples

    @property
    def num_frames(self) -> int:
        """STFT frames per window (centred STFT)."""
        return self.window_samples // self.hop_length + 1

    def max_samples(self, max_num_windows: int | None = None) -> int:
        """Longest waveform (in samples) that ``max_num_windows`` windows cover; longer input is truncated."""
        n = self.max_num_windows if max_num_windows is None else max_num_windows
        return n * self.window_samples - (n - 1) * self.overlap_samples

    def max_audio_seconds(self, max_num_windows: int | None = None) -> float:
        """Seconds read from an audio file: ``max_num_windows * (window_length - window_overlap) + window_overlap``."""
        n = self.max_num_windows if max_num_windows is None else max_num_windows
        return n * (self.window_length - self.window_overlap) + self.window_overlap

    def get_num_windows(self, num_samples: int, max_num_windows: int | None = None) -> int:
        """Windows for a waveform of ``num_samples`` samples (the original ``get_num_windows``)."""
        n_max = self.max_num_windows if max_num_windows is None else max_num_windows
        if num_samples <= self.window_samples:
            return 1
        if num_samples >= self.max_samples(n_max):
            return n_max
        return 1 + math.ceil((num_samples - self.window_samples) / self.window_stride)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for key in [key for key in output if key.startswith("_")]:
            del output[key]
        return output

    # ------------------------------------------------------------------ inputs

    def fetch_audio(self, audio_url_or_urls, sampling_rate: int | None = None):
        """Loads what is not a waveform (paths, bytes, file objects, ``datasets`` audio dicts and decoders) with
        [`af2_hf.load_audio`] (the original ``read_audio``: at most ``max_audio_seconds()`` seconds, resampled to
        ``sampling_rate``, peak-normalised); waveforms pass through. A list is processed element-wise, unless it is
        a plain list of numbers (one waveform)."""
        sampling_rate = self.sampling_rate if sampling_rate is None else sampling_rate
        return self._fetch(audio_url_or_urls, sampling_rate, self.max_audio_seconds())

    def _fetch(self, audio, sampling_rate: int, max_seconds: float):
        if isinstance(audio, (list, tuple)) and not is_waveform(audio):
            return [self._fetch(item, sampling_rate, max_seconds) for item in audio]
        if is_waveform(audio):
            return audio
        return load_audio(audio, sampling_rate=sampling_rate, max_seconds=max_seconds)

    def _check_sampling_rate(self, sampling_rate: int | None):
        if sampling_rate is None:
            logger.warning(
                f"No sampling_rate passed to {self.__class__.__name__}; assuming {self.sampling_rate} Hz. Pass "
                "sampling_rate to catch silently wrong inputs."
            )
        elif sampling_rate != self.sampling_rate:
            raise ValueError(
                f"{self.__class__.__name__} expects audio sampled at {self.sampling_rate} Hz, got sampling_rate="
                f"{sampling_rate}. Resample first, e.g. librosa.resample(x, orig_sr={sampling_rate}, "
                f"target_sr={self.sampling_rate}), or load the file with af2_hf.load_audio(path, "
                f"sampling_rate={self.sampling_rate})."
            )

    def _resolve_max_windows(self, max_num_windows: int | None) -> int:
        if max_num_windows is None:
            return self.max_num_windows
        valid = isinstance(max_num_windows, (int, np.integer)) and not isinstance(max_num_windows, bool)
        if not valid or max_num_windows <= 0:
            raise ValueError(f"max_num_windows must be a positive integer, got {max_num_windows!r}.")
        return int(max_num_windows)

    # ------------------------------------------------------------------ windows

    def clips_from_waveform(
        self,
        waveform: np.ndarray,
        do_normalize: bool | None = None,
        do_quantize: bool | None = None,
        max_num_windows: int | None = None,
        index: int = 0,
        truncation: bool = True,
    ) -> np.ndarray:
        """The window clips of one waveform, ``(num_windows, window_samples)`` float32: truncation to
        ``max_num_windows`` windows (with a warning; ``truncation=False`` raises a `ValueError` instead), peak
        normalisation, zero padding to whole windows and the int16 round trip, as the original
        ``inference.load_audio``."""
        waveform = waveform_tensor(waveform, index, torch.device("cpu"))
        return self._clips(waveform, do_normalize, do_quantize, max_num_windows, index, truncation).numpy()

    def _clips(self, waveform: torch.Tensor, do_normalize, do_quantize, max_num_windows, index, truncation):
        """:meth:`clips_from_waveform` on a validated waveform tensor, computed where the tensor is."""
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        do_quantize = self.do_quantize if do_quantize is None else do_quantize
        max_windows = self._resolve_max_windows(max_num_windows)

        limit = self.max_samples(max_windows)
        if waveform.shape[0] > limit:
            message = (
                f"Audio {index} has {waveform.shape[0]} samples ({waveform.shape[0] / self.sampling_rate:.2f} s), more "
                f"than the {limit} ({max_windows} windows, {limit / self.sampling_rate:.2f} s) the model sees"
            )
            if not truncation:
                raise ValueError(
                    message + " (truncation=False). Cut the audio, raise max_num_windows, or allow truncation."
                )
            logger.warning(message + f"; only the first {limit} are used and {waveform.shape[0] - limit} samples are "
                           "dropped.")
            waveform = waveform[:limit]

        num_windows = self.get_num_windows(waveform.shape[0], max_windows)
        return quantised_windows(waveform, num_windows, self.window_samples, self.window_stride, do_normalize,
                                 do_quantize)

    def window_clips(
        self,
        raw_audio,
        sampling_rate: int | None = None,
        do_normalize: bool | None = None,
        do_quantize: bool | None = None,
        max_num_windows: int | None = None,
        padding: bool | str = True,
        truncation: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The quantised window clips of a batch, as the original feeds them to CLAP (for testing and debugging).

        Returns:
            `tuple[np.ndarray, np.ndarray]`: clips ``(batch, windows, window_samples)`` float32, zero clips in
            padded windows, and the window mask ``(batch, windows)`` int64.
        """
        self._check_sampling_rate(sampling_rate)
        truncation = _truncation_enabled(truncation)
        per_audio = self._clips_per_audio(raw_audio, do_normalize, do_quantize, max_num_windows, truncation,
                                          torch.device("cpu"))
        total = self._padded_windows(per_audio, padding, max_num_windows)
        clips = np.zeros((len(per_audio), total, self.window_samples), dtype=np.float32)
        mask = np.zeros((len(per_audio), total), dtype=np.int64)
        for row, audio_clips in enumerate(per_audio):
            clips[row, : len(audio_clips)] = audio_clips.numpy()
            mask[row, : len(audio_clips)] = 1
        return clips, mask

    def _clips_per_audio(
        self, raw_audio, do_normalize, do_quantize, max_num_windows, truncation=True, device=None
    ) -> list[torch.Tensor]:
        waveforms = waveform_list(raw_audio, device)
        return [
            self._clips(waveform, do_normalize, do_quantize, max_num_windows, index, truncation)
            for index, waveform in enumerate(waveforms)
        ]

    def _padded_windows(self, per_audio: list[torch.Tensor], padding, max_num_windows) -> int:
        longest = max(len(clips) for clips in per_audio)
        if padding is True or padding == "longest":
            return longest
        if padding == "max_length":
            return self._resolve_max_windows(max_num_windows)
        if padding is False or padding == "do_not_pad":
            if any(len(clips) != longest for clips in per_audio):
                raise ValueError(
                    "padding=False needs the same number of windows for every audio; use padding=True to pad "
                    "with zero clips (mask 0)."
                )
            return longest
        raise ValueError(f"padding must be True/'longest', 'max_length' or False/'do_not_pad', got {padding!r}.")

    # ------------------------------------------------------------------ log-mel

    def _window_and_filters(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._device_cache:
            window, filters = mel_window_and_filters(
                self.n_fft, self.num_mel_bins, self.f_min, self.f_max, self.sampling_rate
            )
            self._device_cache[key] = (window.to(device), filters.to(device))
        return self._device_cache[key]

    def silence_db(self) -> float:
        """The log-mel value of a zero clip (``10 * log10(mel_floor)`` in float32, -100 dB by default)."""
        return power_to_db(torch.zeros(1, dtype=torch.float32), self.mel_floor).item()

    def log_mel(self, clips: torch.Tensor) -> torch.Tensor:
        """Log-mel (dB) of window clips ``(n, window_samples)`` float32 -> ``(n, num_frames, num_mel_bins)``.

        ``torch.stft`` (periodic Hann, centre, reflect padding) -> ``|.|^2`` -> mel filterbank ->
        ``10 * log10(max(x, mel_floor))``, the operations of the original torchaudio transforms in the same order
        (:func:`.log_mel.log_mel_spectrogram`).
        """
        if clips.ndim != 2 or clips.shape[-1] != self.window_samples:
            raise ValueError(
                f"Expected clips of shape (n, {self.window_samples}), got {tuple(clips.shape)}."
            )
        clips = clips.to(torch.float32)
        window, filters = self._window_and_filters(clips.device)
        return log_mel_spectrogram(clips, window, filters, self.n_fft, self.hop_length, self.mel_floor)

    # ------------------------------------------------------------------ call

    def __call__(
        self,
        raw_audio,
        sampling_rate: int | None = None,
        return_tensors: str | None = None,
        device: str | torch.device | None = None,
        do_normalize: bool | None = None,
        do_quantize: bool | None = None,
        max_num_windows: int | None = None,
        padding: bool | str = True,
        return_attention_mask: bool | None = None,
        truncation: bool = True,
    ) -> BatchFeature:
        """Featurises one waveform or a batch.

        Args:
            raw_audio (`np.ndarray`, `torch.Tensor`, `list[float]`, or a list of those): waveform(s) at
                ``sampling_rate``, float or integer PCM. A 2-D array is a batch of equally long waveforms (or one
                ``(samples, channels)`` waveform when it has more rows than columns); see the class docstring.
            sampling_rate (`int`, *optional*): the rate of ``raw_audio``; must equal the extractor's.
            return_tensors (`str`, *optional*): ``"pt"`` for torch tensors, ``"np"`` (or `None`) for numpy arrays.
            device (`str` or `torch.device`, *optional*): where to compute (and, with ``"pt"``, return) features:
                everything after reading the input (checks, normalisation, int16 round trip, STFT, mel) runs
                there. Defaults to the device of the input tensor(s) (so CUDA waveforms stay on the GPU), else CPU.
            do_normalize, do_quantize, max_num_windows: override the extractor's settings for this call.
            padding (`bool` or `str`, *optional*, defaults to `True`): pad to the most windows in the batch
                (`True`/``"longest"``) or to ``max_num_windows`` (``"max_length"``).
            return_attention_mask (`bool`, *optional*): return ``input_features_mask`` (default: the extractor's).
            truncation (`bool`, *optional*, defaults to `True`): audio longer than ``max_num_windows`` windows is
                cut with a warning (as the original); `False` raises a `ValueError` instead.

        Returns:
            [`BatchFeature`]: ``input_features`` float32 ``(batch, windows, num_frames, num_mel_bins)`` log-mel in dB
            and ``input_features_mask`` int64 ``(batch, windows)``, 1 for real windows.
        """
        self._check_sampling_rate(sampling_rate)
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        return_attention_mask = self.return_attention_mask if return_attention_mask is None else return_attention_mask
        device = _input_device(raw_audio) if device is None else torch.device(device)
        truncation = _truncation_enabled(truncation)

        per_audio = self._clips_per_audio(raw_audio, do_normalize, do_quantize, max_num_windows, truncation, device)
        total = self._padded_windows(per_audio, padding, max_num_windows)
        counts = [len(clips) for clips in per_audio]

        mel = self.log_mel(torch.cat(per_audio))
        features, mask = padded_batch(mel, counts, total, self.silence_db())

        data = {"input_features": features}
        if return_attention_mask:
            data["input_features_mask"] = mask
        if return_tensors != "pt":
            data = {key: value.cpu().numpy() for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)
