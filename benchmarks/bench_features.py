"""Feature extraction speed of AudioFlamingo2FeatureExtractor on one CPU thread (random audio, no files).

Times the whole call (peak normalisation, windowing, int16 round trip, STFT, mel, dB) for 10 s, 60 s and 300 s of
16 kHz audio (float64 input, as af2_hf.load_audio returns it), the split between the clip stage and the log-mel
stage, and, in the same run and interleaved with ours, a faithful re-implementation of the ORIGINAL preprocessing
(``inference.load_audio`` + ``CLAP.get_mel`` as ../shared/golden/tiny/README.md describes them: numpy float64
padding and int16 round trip, then per window a torchaudio ``MelSpectrogram`` built for the call -- Hann window and
HTK filterbank -- ``torch.stft`` -> ``abs().pow(2)`` -> mel matmul -> ``AmplitudeToDB(top_db=None)`` -> ``.T``).
Both give the same log-mel (checked before timing); the ratio column is ours / original (target <= 1 at 300 s).

    python benchmarks/bench_features.py
    python benchmarks/bench_features.py --threads 2 --repeats 10
    python benchmarks/bench_features.py --device cuda
"""

import argparse
import statistics
import time

import numpy as np
import torch

from af2_hf import AudioFlamingo2FeatureExtractor
from af2_hf.audio import peak_normalize
from af2_hf.log_mel import htk_mel_filter_bank


def original_features(extractor, waveform: np.ndarray) -> torch.Tensor:
    """The original's preprocessing of one float64 waveform (see the module docstring), ``(windows, frames, mels)``."""
    window_samples = extractor.window_samples
    windows = extractor.get_num_windows(waveform.shape[0])
    signal = peak_normalize(waveform[: extractor.max_samples()])
    padded = np.zeros(windows * window_samples)
    padded[: signal.shape[0]] = signal
    quantised = (np.clip(padded, -1.0, 1.0) * 32767.0).astype(np.int16)
    clips = torch.from_numpy((quantised / 32767.0).astype(np.float32)).reshape(windows, window_samples)
    mels = []
    for clip in clips:  # CLAP.get_mel runs once per window and builds its transforms each time
        window = torch.hann_window(extractor.n_fft, periodic=True)
        filters = htk_mel_filter_bank(extractor.n_fft // 2 + 1, extractor.num_mel_bins, float(extractor.f_min),
                                      float(extractor.f_max), extractor.sampling_rate)
        spectrum = torch.stft(clip, extractor.n_fft, extractor.hop_length, extractor.n_fft, window, center=True,
                              pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
        power = spectrum.abs().pow(2.0)
        mel = torch.matmul(power.transpose(-1, -2), filters).transpose(-1, -2)
        mels.append((10.0 * torch.log10(torch.clamp(mel, min=1e-10))).T)
    return torch.stack(mels)


def best_of(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up (allocations, FFT plans, filterbank cache)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0, 300.0])
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    extractor = AudioFlamingo2FeatureExtractor(max_num_windows=30)
    rng = np.random.default_rng(0)
    rate = extractor.sampling_rate

    print(f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}, best/median of {args.repeats}")
    header = ("audio", "windows", "total s", "median s", "clips s", "log-mel s", "x realtime", "original s", "ours/orig")
    widths = (8, 7, 9, 9, 8, 9, 10, 10, 9)
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, widths)))
    for seconds in args.seconds:
        waveform = rng.uniform(-0.8, 0.8, int(seconds * rate))
        windows = extractor.get_num_windows(waveform.shape[0])

        def full():
            extractor(waveform, sampling_rate=rate, return_tensors="pt", device=args.device)
            synchronize(args.device)

        def clips():
            extractor.clips_from_waveform(waveform)

        clip_array = torch.from_numpy(extractor.clips_from_waveform(waveform)).to(args.device)

        def log_mel():
            extractor.log_mel(clip_array)
            synchronize(args.device)

        def original():
            original_features(extractor, waveform)

        ours_mel = extractor(waveform, sampling_rate=rate, return_tensors="pt")["input_features"][0]
        if not torch.equal(ours_mel, original_features(extractor, waveform)):
            raise SystemExit("The original re-implementation and the extractor disagree: the comparison is void.")
        # interleaved: ours, original, ours, ... so that a change in machine load affects both alike
        ours_times, original_times = [], []
        for _ in range(args.repeats):
            ours_times.append(best_of(full, 1)[0])
            original_times.append(best_of(original, 1)[0])
        total, median = min(ours_times), statistics.median(ours_times)
        original_time = min(original_times)
        clip_time, _ = best_of(clips, args.repeats)
        mel_time, _ = best_of(log_mel, args.repeats)
        print(
            f"{seconds:>7.0f}s {windows:>7d} {total:>9.3f} {median:>9.3f} {clip_time:>8.3f} {mel_time:>9.3f} "
            f"{seconds / total:>10.0f} {original_time:>10.3f} {total / original_time:>9.2f}"
        )


if __name__ == "__main__":
    main()
