"""Feature extraction speed of AudioFlamingo2FeatureExtractor on one CPU thread (random audio, no files).

Times the whole call (peak normalisation, windowing, int16 round trip, batched STFT, mel, dB) for 10 s, 60 s and
300 s of 16 kHz audio (float64 input, as af2_hf.load_audio returns it), and the split between the numpy clip stage
and the torch log-mel stage. Target: 300 s well under 1 s on one core.

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
    header = ("audio", "windows", "total s", "median s", "clips s", "log-mel s", "x realtime")
    widths = (8, 7, 9, 9, 8, 9, 10)
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

        total, median = best_of(full, args.repeats)
        clip_time, _ = best_of(clips, args.repeats)
        mel_time, _ = best_of(log_mel, args.repeats)
        print(
            f"{seconds:>7.0f}s {windows:>7d} {total:>9.3f} {median:>9.3f} {clip_time:>8.3f} {mel_time:>9.3f} "
            f"{seconds / total:>10.0f}"
        )


if __name__ == "__main__":
    main()
