"""The numeric steps of Audio Flamingo 2 features, as the original computes them (``inference.load_audio`` +
``CLAP.get_mel``), each a function of its arguments:

1. :func:`quantised_windows`: peak normalisation, zero padding to whole windows, the int16 round trip
   ``clip(x, -1, 1) * 32767 -> int16 (truncation) -> / 32767 -> float32``, and the split into windows;
2. :func:`log_mel_spectrogram`: per window ``torch.stft`` (periodic Hann, centre, reflect padding) -> ``|.|^2`` ->
   HTK triangular mel filterbank (:func:`htk_mel_filter_bank`, computed as torchaudio's
   ``melscale_fbanks(norm=None, mel_scale="htk")``) -> ``10 * log10(max(x, mel_floor))`` (:func:`power_to_db`).

With the default settings the log-mel of the original is reproduced bit for bit.
"""

from __future__ import annotations

import math

import torch

from .audio import peak_normalize

__all__ = ["htk_mel_filter_bank", "log_mel_spectrogram", "mel_window_and_filters", "power_to_db", "quantised_windows"]

# Windows per torch.stft call. On the CPU one window at a time: its spectrum (~4 MB) stays in cache through |.|^2,
# the mel product and the logarithm, which measured faster than one call over all windows (benchmarks/
# bench_features.py). Elsewhere (CUDA) a large batch per call; the bound caps the complex intermediate.
_WINDOWS_PER_STFT = {"cpu": 1}
_MAX_WINDOWS_PER_STFT = 256


def _hz_to_mel_htk(frequency: float) -> float:
    return 2595.0 * math.log10(1.0 + frequency / 700.0)


def htk_mel_filter_bank(
    num_frequency_bins: int, num_mel_bins: int, min_frequency: float, max_frequency: float, sampling_rate: int
) -> torch.Tensor:
    """Triangular HTK mel filterbank without area normalisation, shape ``(num_frequency_bins, num_mel_bins)``.

    Computed in float32 the way torchaudio's ``melscale_fbanks(..., norm=None, mel_scale="htk")`` computes it: the
    FFT bin frequencies are a float32 ``linspace(0, sampling_rate // 2)``, the mel-spaced corner frequencies a
    float32 ``linspace`` of HTK mels mapped back to Hz, and each filter the positive part of the smaller of its
    rising and falling slopes. Matching the float32 arithmetic keeps the original log-mel bit-exact.
    """
    bin_frequencies = torch.linspace(0, sampling_rate // 2, num_frequency_bins, dtype=torch.float32)
    mel_corners = torch.linspace(
        _hz_to_mel_htk(min_frequency), _hz_to_mel_htk(max_frequency), num_mel_bins + 2, dtype=torch.float32
    )
    corner_frequencies = 700.0 * (10.0 ** (mel_corners / 2595.0) - 1.0)
    corner_gaps = corner_frequencies[1:] - corner_frequencies[:-1]
    # offsets[i, j] = corner j - frequency of bin i
    offsets = corner_frequencies.unsqueeze(0) - bin_frequencies.unsqueeze(1)
    rising = (-1.0 * offsets[:, :-2]) / corner_gaps[:-1]
    falling = offsets[:, 2:] / corner_gaps[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def mel_window_and_filters(
    n_fft: int, num_mel_bins: int, f_min: float, f_max: float, sampling_rate: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 periodic Hann window ``(n_fft,)`` and the HTK mel filterbank ``(n_fft // 2 + 1, num_mel_bins)``
    that :func:`log_mel_spectrogram` takes, on the CPU."""
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float32)
    filters = htk_mel_filter_bank(n_fft // 2 + 1, num_mel_bins, float(f_min), float(f_max), sampling_rate)
    return window, filters


def quantised_windows(
    waveform: torch.Tensor,
    num_windows: int,
    window_samples: int,
    window_stride: int,
    do_normalize: bool,
    do_quantize: bool,
) -> torch.Tensor:
    """The ``(num_windows, window_samples)`` float32 windows of one (already truncated) waveform, computed where it
    is: peak normalisation, zero padding to whole windows, the int16 round trip, and the split into windows that
    start ``window_stride`` samples apart (as the original ``inference.load_audio``)."""
    full_length = (num_windows - 1) * window_stride + window_samples
    # One buffer for normalisation and quantisation, updated in place (fresh full-size temporaries cost more
    # than the arithmetic on the CPU); the padding stays zero, as when the original pads after normalising.
    padded = waveform.new_zeros(full_length)
    samples = padded[: waveform.shape[0]]
    samples.copy_(waveform)
    if do_normalize:
        peak_normalize(samples, out=samples)

    if do_quantize:
        # .to(int16) truncates toward zero, as the original's astype; dividing the int16 values in float64 and
        # rounding to float32 is what the original int16_to_float32 does.
        quantised = padded.clamp_(-1.0, 1.0).mul_(32767.0).to(torch.int16)
        exact = padded if padded.dtype == torch.float64 else torch.empty_like(padded, dtype=torch.float64)
        signal = exact.copy_(quantised).div_(32767.0).to(torch.float32)
    else:
        signal = padded.to(torch.float32)
    # consecutive windows start window_stride samples apart (the reshape when they do not overlap)
    return signal.unfold(0, window_samples, window_stride)


def power_to_db(power: torch.Tensor, mel_floor: float) -> torch.Tensor:
    """``10 * log10(max(power, mel_floor))`` (torchaudio's ``AmplitudeToDB(stype="power", top_db=None)``)."""
    return torch.clamp(power, min=mel_floor).log10_().mul_(10.0)


def log_mel_spectrogram(
    clips: torch.Tensor,
    window: torch.Tensor,
    filters: torch.Tensor,
    n_fft: int,
    hop_length: int,
    mel_floor: float,
) -> torch.Tensor:
    """Log-mel (dB) of float32 windows ``(n, samples)`` -> ``(n, frames, mel_bins)``: ``torch.stft`` (periodic Hann
    ``window``, centre, reflect padding) -> ``|.|^2`` -> ``filters`` ``(n_fft // 2 + 1, mel_bins)`` -> dB, the
    operations of the original torchaudio transforms in the same order. Every window is computed alone (the same
    numbers whatever the grouping); windows are grouped into ``torch.stft`` calls by device."""
    step = _WINDOWS_PER_STFT.get(clips.device.type, _MAX_WINDOWS_PER_STFT)
    frames = clips.shape[-1] // hop_length + 1
    output = torch.empty((clips.shape[0], frames, filters.shape[1]), dtype=torch.float32, device=clips.device)
    for start in range(0, clips.shape[0], step):
        spectrum = torch.stft(
            clips[start : start + step],
            n_fft=n_fft,
            hop_length=hop_length,
            win_length=n_fft,
            window=window,
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        power = spectrum.abs().pow_(2.0)
        del spectrum
        mel = output[start : start + step]
        torch.matmul(power.transpose(-1, -2), filters, out=mel)
        mel.clamp_(min=mel_floor).log10_().mul_(10.0)  # power_to_db, in place
    return output
