"""The bundled example clip: 3 s of deterministic synthetic audio at 16 kHz, 16-bit PCM mono (~94 KB).

Content: a 440 Hz tone with a 2 Hz tremolo (0-1 s), a rising chirp 300 Hz -> 3 kHz (1-2 s), and pseudo-random noise
bursts from an integer linear congruential generator over a quiet 220 Hz hum (2-3 s). Only integer arithmetic and
sin() are used, so the file is reproducible across numpy versions (to within one int16 step).

``af2-hf example-audio OUT.wav`` writes it (so the quick start works from an installed wheel, without the checkout);
``examples/data/example.wav`` in the repository is the same clip.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["SAMPLING_RATE", "example_waveform", "write_example_clip"]

SAMPLING_RATE = 16000
SECONDS = 3


def lcg_noise(count: int, seed: int = 12345) -> np.ndarray:
    """Uniform noise in [-1, 1) from the 32-bit LCG x <- (1664525 x + 1013904223) mod 2^32."""
    values = np.empty(count, dtype=np.uint64)
    state = seed
    for index in range(count):
        state = (1664525 * state + 1013904223) % 2**32
        values[index] = state
    return values.astype(np.float64) / 2**31 - 1.0


def example_waveform() -> np.ndarray:
    """The clip as float64 samples in [-1, 1] at :data:`SAMPLING_RATE`."""
    t = np.arange(SAMPLING_RATE * SECONDS, dtype=np.float64) / SAMPLING_RATE
    wave = np.zeros_like(t)
    first = t < 1.0
    wave[first] = 0.5 * np.sin(2 * np.pi * 440.0 * t[first]) * (0.6 + 0.4 * np.sin(2 * np.pi * 2.0 * t[first]))
    second = (t >= 1.0) & (t < 2.0)
    tau = t[second] - 1.0
    f0, f1 = 300.0, 3000.0
    wave[second] = 0.4 * np.sin(2 * np.pi * (f0 * tau + 0.5 * (f1 - f0) * tau**2))
    third = t >= 2.0
    tau = t[third] - 2.0
    bursts = ((tau * 8).astype(np.int64) % 2 == 0).astype(np.float64)
    wave[third] = 0.3 * bursts * lcg_noise(int(third.sum())) + 0.1 * np.sin(2 * np.pi * 220.0 * tau)
    fade = np.minimum(1.0, np.minimum(t, SECONDS - t) / 0.01)  # 10 ms fade in/out
    return wave * fade


def write_example_clip(path: str | os.PathLike) -> Path:
    """Writes the clip as a 16-bit PCM WAV file (parent folders created); returns the path."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.round(example_waveform() * 32767.0).astype(np.int16)
    sf.write(str(path), pcm, SAMPLING_RATE, subtype="PCM_16", format="WAV")
    return path
