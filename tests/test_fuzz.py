"""Property-based fuzzing (issue #8): random waveforms through the feature extractor and the tiny random model.

Hypothesis draws the recipe of a waveform (length from 0 samples to beyond the window limit, dtype, signal shape,
amplitude over the whole range of the dtype, DC offset, clipping, input container); numpy builds it from a drawn
seed, which keeps 1000 examples fast. Every finite, non-empty waveform must give finite features of the documented
shape; an empty one must be refused with a ValueError. The search is derandomised (reproducible in CI) and writes
no example database. Both tests run on one torch thread.
"""

import numpy as np
import pytest
import torch
from af2_testing import random_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from af2_hf import AudioFlamingo2FeatureExtractor

RATE = 16000
WINDOW = 10 * RATE
MAX_WINDOWS = 3

FLOAT_DTYPES = ["float64", "float32", "float16", "torch.float32", "torch.bfloat16", "list"]
INT_DTYPES = ["int16", "int32", "int8", "uint8", "torch.int16"]
SHAPES = ["noise", "sine", "square", "impulses", "constant", "zeros"]

FE = AudioFlamingo2FeatureExtractor(max_num_windows=MAX_WINDOWS)
SILENCE_DB = FE.silence_db()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Thousands of small STFTs and forwards run faster on one thread (and do not stall when the cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@st.composite
def waveforms(draw, max_windows: int = MAX_WINDOWS, min_length: int = 0):
    limit = max_windows * WINDOW
    length = draw(
        st.one_of(
            st.integers(min_length, 8),  # empty, one sample, a few samples
            st.integers(9, 4096),  # shorter than an STFT frame or a few frames
            st.integers(4097, WINDOW + 2),  # sub-window, exactly one window, one window + 1
            st.integers(WINDOW + 3, limit + WINDOW // 2),  # several windows, up to truncation
        )
    )
    dtype = draw(st.sampled_from(FLOAT_DTYPES + INT_DTYPES))
    shape = draw(st.sampled_from(SHAPES))
    seed = draw(st.integers(0, 2**32 - 1))
    dc_offset = draw(st.one_of(st.just(0.0), st.floats(-3.0, 3.0)))
    clip = draw(st.one_of(st.none(), st.floats(0.001, 1.0)))
    if dtype in INT_DTYPES:
        log_amplitude = draw(st.floats(-5.0, 0.0))  # relative to full scale
    else:
        top = {"float16": 4.0, "torch.bfloat16": 37.0, "float32": 37.0, "torch.float32": 37.0}.get(dtype, 300.0)
        bottom = {"float16": -7.0, "torch.bfloat16": -35.0, "float32": -40.0, "torch.float32": -40.0}.get(dtype, -310.0)
        log_amplitude = draw(st.floats(bottom, top))
    return dict(length=length, dtype=dtype, shape=shape, seed=seed, dc_offset=dc_offset, clip=clip,
                log_amplitude=log_amplitude)


def build(recipe):
    rng = np.random.default_rng(recipe["seed"])
    n = recipe["length"]
    t = np.arange(n)
    shape = recipe["shape"]
    if shape == "noise":
        base = rng.uniform(-1.0, 1.0, n)
    elif shape == "sine":
        base = np.sin(2 * np.pi * rng.uniform(20, 8000) * t / RATE + rng.uniform(0, 6.3))
    elif shape == "square":
        base = np.sign(np.sin(2 * np.pi * rng.uniform(20, 2000) * t / RATE) + 1e-9)
    elif shape == "impulses":
        base = np.zeros(n)
        if n:
            base[rng.integers(0, n, size=max(1, n // 5000))] = rng.choice([-1.0, 1.0])
    elif shape == "constant":
        base = np.ones(n)
    else:
        base = np.zeros(n)
    base = base + recipe["dc_offset"] * (shape != "zeros")
    if recipe["clip"] is not None:
        base = np.clip(base, -recipe["clip"] * 4, recipe["clip"] * 4)
    base /= max(1.0, np.abs(base).max(initial=0.0))  # in [-1, 1] before scaling to the dtype's range

    dtype = recipe["dtype"]
    if dtype in INT_DTYPES:
        numpy_dtype = np.int16 if dtype == "torch.int16" else np.dtype(dtype)
        info = np.iinfo(numpy_dtype)
        scaled = base * 10.0 ** recipe["log_amplitude"] * (info.max - info.min) / 2 + (info.max + info.min) / 2
        values = np.clip(np.round(scaled), info.min, info.max).astype(numpy_dtype)
        return torch.from_numpy(values) if dtype.startswith("torch") else values
    amplitude = 10.0 ** recipe["log_amplitude"]
    if dtype == "list":
        return (base * amplitude).tolist()
    if dtype.startswith("torch"):
        return torch.from_numpy(base * amplitude).to(getattr(torch, dtype.split(".")[1]))
    with np.errstate(over="ignore", under="ignore"):
        return (base * amplitude).astype(dtype)


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(recipe=waveforms())
def test_feature_extractor_on_random_waveforms(recipe):
    waveform = build(recipe)
    event(f"dtype {recipe['dtype']}")
    event(f"{FE.get_num_windows(recipe['length'])} window(s)" if recipe["length"] else "empty")
    if recipe["length"] == 0:
        with pytest.raises(ValueError, match="empty"):
            FE(waveform, sampling_rate=RATE)
        return
    out = FE(waveform, sampling_rate=RATE, return_tensors="pt")
    windows = FE.get_num_windows(min(recipe["length"], FE.max_samples()))
    features = out["input_features"]
    assert features.shape == (1, windows, FE.num_frames, FE.num_mel_bins)
    assert features.dtype == torch.float32
    assert torch.isfinite(features).all(), recipe
    assert features.min() >= SILENCE_DB
    assert out["input_features_mask"].tolist() == [[1] * windows]


MODEL_MAX_WINDOWS = 2
MODEL_FE = AudioFlamingo2FeatureExtractor(max_num_windows=MODEL_MAX_WINDOWS)
MODEL = random_model()
# A prompt of the tiny config: <audio> (116) ... <SEP> (119); the text tokens are arbitrary ids.
PROMPT = torch.tensor([[116, 5, 17, 42, 9, 119]])


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(recipes=st.lists(waveforms(max_windows=MODEL_MAX_WINDOWS, min_length=1), min_size=1, max_size=2))
def test_random_model_on_random_waveforms(recipes):
    event(f"batch {len(recipes)}, windows {[MODEL_FE.get_num_windows(r['length']) for r in recipes]}")
    inputs = MODEL_FE([build(r) for r in recipes], sampling_rate=RATE, return_tensors="pt")
    ids = PROMPT.expand(len(recipes), -1)
    with torch.no_grad():
        logits = MODEL(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits
    assert logits.shape == (len(recipes), ids.shape[1], MODEL.config.text_config.vocab_size)
    assert torch.isfinite(logits).all(), recipes
