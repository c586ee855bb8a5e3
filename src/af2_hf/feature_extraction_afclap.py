"""Feature extractor of AF-CLAP: a clip -> the four 10 s log-mel views of the original's ``aff_2d`` fusion input.

It reproduces ``CLAP_Module.get_audio_embedding_from_filelist(files, sr=16000)`` of the original (``AFClap/``):

1. loading (:func:`load_afclap_audio`): ``librosa.load(path, sr=16000)``: channel mean, soxr_hq resampling, float32;
2. the int16 round trip ``(clip(x, -1, 1) * 32767).astype(int16) / 32767`` (``do_quantize``);
3. a clip of at most 10 s (160000 samples) is repeated ``int(160000 / len)`` times and zero-padded to 10 s; its
   log-mel (1001 frames) is used 4 times and ``is_longer`` is False;
4. a longer clip: the log-mel of the WHOLE clip (``T = len // 160 + 1`` frames); if ``T == 1001`` as in 3.; else
   the frame starts ``range(T - 1001 + 1)`` are split in three (``np.array_split``) and one 1001-frame crop is taken
   from each third, and the view is ``[whole mel resized to (1001, 64) (bilinear, antialiased), front, middle,
   back]`` with ``is_longer`` True.

The log-mel is torchaudio's ``MelSpectrogram(n_fft=1024, hop 160, power 2, htk, norm=None, 50-8000 Hz)`` +
``AmplitudeToDB(top_db=None)`` computed with ``torch.stft`` (:func:`af2_hf.log_mel.log_mel_spectrogram`, as the AF2
extractor); the resize is ``torchvision.transforms.Resize`` of torchvision >= 0.17 (antialias on).

Fusion crops: the original draws them from numpy's global RNG even at inference. Here they are deterministic by
default: the FIRST start of the first third, the MIDDLE start of the middle third (``ranges[1][len // 2]``) and
the LAST start of the last third, i.e. the clip's first and last 10 s and a 10 s crop around its middle. Pass
``crop_indices`` (one ``(front, middle, back)`` per clip, ``None`` for clips of at most 10 s) to use given crops,
or ``generator`` (a ``np.random.RandomState`` or ``np.random.Generator``) to draw them as the original does: for
every clip over 10 s, in order, three ``choice`` calls and one ``randint`` (the original's unused waveform crop),
so ``np.random.RandomState(seed)`` reproduces the original run after ``np.random.seed(seed)``. Where the call cannot
be given one (transformers' ``zero-shot-audio-classification`` pipeline), set ``feature_extractor.crop_generator``:
it is used by every call that passes neither, in call order, like the original's global RNG (it is not saved).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import logging

from .audio import AudioLoadError
from .log_mel import log_mel_spectrogram, mel_window_and_filters

logger = logging.get_logger(__name__)

__all__ = ["AFClapFeatureExtractor", "load_afclap_audio", "quantize_int16", "waveform_to_mono"]

_INT16_SCALE = 32767.0


def load_afclap_audio(source, sampling_rate: int = 16000) -> np.ndarray:
    """Reads an audio file as the original AF-CLAP does: ``librosa.load(source, sr=sampling_rate)`` (mono = channel
    mean, soxr_hq resampling, float32). ``source``: a path, bytes, a binary file object, or a ``datasets`` audio
    dict (``{"array", "sampling_rate"}`` or ``{"path", "bytes"}``)."""
    import io

    import librosa

    if isinstance(source, dict):
        if source.get("array") is not None:
            return waveform_to_mono(np.asarray(source["array"]), source.get("sampling_rate"), sampling_rate)
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    name = source if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise AudioLoadError(f"Audio file {str(source)!r} does not exist.")
    try:
        waveform, _ = librosa.load(source, sr=sampling_rate)
    except Exception as error:  # librosa/soundfile/audioread raise many types for unreadable input
        raise AudioLoadError(f"Could not read audio from {name}: {error}") from error
    return waveform


def waveform_to_mono(waveform: np.ndarray, source_rate: int | None, sampling_rate: int) -> np.ndarray:
    """A float waveform ``(samples,)`` or ``(channels, samples)`` -> mono float32 at ``sampling_rate``, as
    ``librosa.load`` makes it (channel mean, then soxr_hq resampling)."""
    import librosa

    waveform = np.asarray(waveform)
    if waveform.ndim == 2:
        waveform = librosa.to_mono(waveform.astype(np.float32))
    elif waveform.ndim != 1:
        raise ValueError(f"Expected a waveform of shape (samples,) or (channels, samples), got {waveform.shape}.")
    waveform = waveform.astype(np.float32)
    if source_rate is not None and source_rate != sampling_rate:
        waveform = librosa.resample(waveform, orig_sr=source_rate, target_sr=sampling_rate)
    return waveform


def quantize_int16(waveform: np.ndarray) -> np.ndarray:
    """The original's ``int16_to_float32(float32_to_int16(x))`` on a float32 waveform."""
    quantized = (np.clip(waveform.astype(np.float32), -1.0, 1.0) * np.float32(_INT16_SCALE)).astype(np.int16)
    return (quantized / _INT16_SCALE).astype(np.float32)


class AFClapFeatureExtractor(SequenceFeatureExtractor):
    r"""
    Constructs the AF-CLAP feature extractor (see the module docstring for every step).

    Args:
        feature_size (`int`, *optional*, defaults to 64): mel bins.
        sampling_rate (`int`, *optional*, defaults to 16000): the rate the model reads; other rates are resampled.
        hop_length (`int`, *optional*, defaults to 160), n_fft (`int`, *optional*, defaults to 1024),
        f_min (`float`, *optional*, defaults to 50), f_max (`float`, *optional*, defaults to 8000): the mel
            spectrogram.
        max_length_s (`int`, *optional*, defaults to 10): the length of one view in seconds.
        mel_floor (`float`, *optional*, defaults to 1e-10): power floor of the dB conversion.
        do_quantize (`bool`, *optional*, defaults to `True`): apply the original's int16 round trip.
        padding_value (`float`, *optional*, defaults to 0.0): value of the zero padding after repeat-padding.
    """

    model_input_names = ["input_features", "is_longer"]

    def __init__(
        self,
        feature_size: int = 64,
        sampling_rate: int = 16000,
        hop_length: int = 160,
        n_fft: int = 1024,
        f_min: float = 50.0,
        f_max: float = 8000.0,
        max_length_s: int = 10,
        mel_floor: float = 1e-10,
        do_quantize: bool = True,
        padding_value: float = 0.0,
        return_attention_mask: bool = False,
        **kwargs,
    ):
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        self.hop_length = hop_length
        self.n_fft = n_fft
        self.f_min = f_min
        self.f_max = f_max
        self.max_length_s = max_length_s
        self.mel_floor = mel_floor
        self.do_quantize = do_quantize
        # A generator used when a call passes none (e.g. inside a pipeline); never saved.
        self.crop_generator = None

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("crop_generator", None)
        return output

    @property
    def max_samples(self) -> int:
        return self.max_length_s * self.sampling_rate

    @property
    def chunk_frames(self) -> int:
        """Frames of one 10 s view (the +1 of a centred STFT)."""
        return self.max_samples // self.hop_length + 1

    # ------------------------------------------------------------------ inputs

    def fetch_audio(self, audio_url_or_urls, sampling_rate: int | None = None):
        """Paths, bytes or ``datasets`` dicts -> mono float32 waveforms at ``self.sampling_rate``
        (:func:`load_afclap_audio`); arrays are returned unchanged."""
        if isinstance(audio_url_or_urls, (list, tuple)):
            return [self.fetch_audio(item, sampling_rate) for item in audio_url_or_urls]
        if isinstance(audio_url_or_urls, (str, os.PathLike, bytes, bytearray, memoryview, dict)):
            return load_afclap_audio(audio_url_or_urls, self.sampling_rate)
        return audio_url_or_urls

    def _as_clips(self, raw_audio, sampling_rate: int | None) -> list[np.ndarray]:
        if isinstance(raw_audio, (np.ndarray, torch.Tensor)):
            # As transformers' feature extractors: a 1-D array is one clip, a 2-D array a batch of mono clips.
            raw_audio = [raw_audio] if raw_audio.ndim == 1 else list(raw_audio)
        elif isinstance(raw_audio, (str, os.PathLike, bytes, dict)):
            raw_audio = [raw_audio]
        if not isinstance(raw_audio, (list, tuple)) or len(raw_audio) == 0:
            raise ValueError("No audio given: pass a waveform, a path, or a non-empty list of them.")
        clips = []
        for index, item in enumerate(raw_audio):
            if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview, dict)):
                clip = self.fetch_audio(item)
            else:
                if isinstance(item, torch.Tensor):
                    item = item.detach().cpu().numpy()
                clip = waveform_to_mono(np.asarray(item), sampling_rate, self.sampling_rate)
            clips.append(self._checked(clip, index))
        return clips

    def _checked(self, clip: np.ndarray, index: int) -> np.ndarray:
        if clip.size == 0:
            raise ValueError(f"Audio {index} is empty (0 samples).")
        if not np.isfinite(clip).all():
            raise ValueError(f"Audio {index} contains NaN or infinite samples.")
        if not np.any(clip):
            logger.warning(
                f"Audio {index} is digital silence: its log-mel is the {10 * math.log10(self.mel_floor):.0f} dB floor "
                "everywhere, so its embedding carries no information about the sound."
            )
        return clip

    # ------------------------------------------------------------------ features

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """``(samples,)`` float32 -> ``(frames, mel_bins)`` log-mel in dB, as the original ``get_mel``."""
        window, filters = mel_window_and_filters(
            self.n_fft, self.feature_size, self.f_min, self.f_max, self.sampling_rate
        )
        return log_mel_spectrogram(waveform[None], window, filters, self.n_fft, self.hop_length, self.mel_floor)[0]

    def repeat_pad(self, waveform: np.ndarray) -> np.ndarray:
        """A clip of at most 10 s repeated ``int(max_samples / len)`` times, zero-padded to ``max_samples``."""
        repeated = np.tile(waveform, int(self.max_samples / len(waveform)))
        return np.pad(repeated, (0, self.max_samples - len(repeated)), constant_values=self.padding_value)

    def crop_ranges(self, total_frames: int) -> list[np.ndarray]:
        """The three ranges of 1001-frame crop starts of the original (an empty one becomes ``[0]``)."""
        ranges = np.array_split(np.arange(0, total_frames - self.chunk_frames + 1), 3)
        return [r if len(r) > 0 else np.array([0]) for r in ranges]

    def _crops(self, ranges, given, generator, overflow: int) -> tuple[int, int, int]:
        if given is not None:
            crops = tuple(int(i) for i in given)
            if len(crops) != 3:
                raise ValueError(f"crop_indices entries must be (front, middle, back), got {given!r}.")
            last_start = max(int(r[-1]) for r in ranges)
            if any(index < 0 or index > last_start for index in crops):
                raise ValueError(f"crop indices {crops} must lie in 0..{last_start} (starts of 1001-frame crops).")
            return crops
        if generator is not None:
            crops = tuple(int(generator.choice(r)) for r in ranges)
            self._draw_waveform_crop(generator, overflow)
            return crops
        return int(ranges[0][0]), int(ranges[1][len(ranges[1]) // 2]), int(ranges[2][-1])

    @staticmethod
    def _draw_waveform_crop(generator, overflow: int) -> None:
        """The original also draws a waveform crop start (unused by the fused model); drawing it keeps a generator
        in step with the original's global RNG."""
        if isinstance(generator, np.random.Generator):
            generator.integers(0, overflow + 1)
        else:
            generator.randint(0, overflow + 1)

    def fusion_views(self, waveform: np.ndarray, crops=None, generator=None) -> tuple[torch.Tensor, bool]:
        """One clip (float32, quantised if asked) -> ``((4, 1001, mel_bins), is_longer)``."""
        if len(waveform) <= self.max_samples:
            mel = self.log_mel(torch.from_numpy(self.repeat_pad(waveform)))
            return mel.expand(4, -1, -1).clone(), False
        mel = self.log_mel(torch.from_numpy(np.ascontiguousarray(waveform)))
        overflow = len(waveform) - self.max_samples
        if mel.shape[0] == self.chunk_frames:
            if generator is not None:
                self._draw_waveform_crop(generator, overflow)
            return mel.expand(4, -1, -1).clone(), False
        front, middle, back = self._crops(self.crop_ranges(mel.shape[0]), crops, generator, overflow)
        shrunk = torch.nn.functional.interpolate(
            mel[None, None], size=(self.chunk_frames, mel.shape[1]), mode="bilinear", align_corners=False,
            antialias=True,
        )[0, 0]
        views = [shrunk] + [mel[start : start + self.chunk_frames] for start in (front, middle, back)]
        return torch.stack(views), True

    def __call__(
        self,
        raw_audio,
        sampling_rate: int | None = None,
        crop_indices: Sequence[Sequence[int] | None] | None = None,
        generator: np.random.RandomState | np.random.Generator | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Fusion inputs of one clip or a list of clips.

        Args:
            raw_audio: a waveform (`np.ndarray`/`torch.Tensor` `(samples,)`), a path / bytes / ``datasets`` audio
                dict, or a list of them; in a list, a `(channels, samples)` array is one multi-channel clip (its
                channels are averaged); a 2-D array outside a list is a batch of mono clips.
            sampling_rate: the rate of array inputs (resampled to 16 kHz if different; default: 16 kHz).
            crop_indices: per clip ``(front, middle, back)`` frame starts of the fusion crops, or `None` (clips of
                at most 10 s, or the default rule). See the module docstring.
            generator: draw the crops as the original does (``np.random.RandomState(seed)`` reproduces it).

        Returns:
            [`BatchFeature`] with `input_features` `(num_clips, 4, 1001, mel_bins)` float32 and `is_longer`
            `(num_clips, 1)` bool.
        """
        if crop_indices is not None and generator is not None:
            raise ValueError("Pass either crop_indices or generator, not both.")
        if crop_indices is None and generator is None:
            generator = self.crop_generator
        clips = self._as_clips(raw_audio, sampling_rate)
        if crop_indices is not None and len(crop_indices) != len(clips):
            raise ValueError(f"crop_indices has {len(crop_indices)} entries for {len(clips)} clips.")
        features, longer = [], []
        for index, clip in enumerate(clips):
            clip = quantize_int16(clip) if self.do_quantize else clip.astype(np.float32)
            views, is_longer = self.fusion_views(
                clip, None if crop_indices is None else crop_indices[index], generator
            )
            features.append(views)
            longer.append([is_longer])
        data = {"input_features": torch.stack(features), "is_longer": torch.tensor(longer, dtype=torch.bool)}
        if return_tensors in (None, "np"):
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data, tensor_type=return_tensors)
