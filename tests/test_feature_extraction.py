"""AudioFlamingo2FeatureExtractor against the golden window clips and log-mels of the original implementation."""

import logging

import numpy as np
import pytest
import torch

from af2_hf import AudioFlamingo2FeatureExtractor
from af2_hf.feature_extraction_audioflamingo2 import htk_mel_filter_bank

CASES = ["a", "b", "c"]
# The project's acceptance bar for float stages.
MAX_RELATIVE_ERROR = 1e-4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).norm() / expected.norm()).item()


def rate_of(extractor) -> int:
    return extractor.sampling_rate


@pytest.mark.parametrize("case", CASES)
def test_window_clips_match_golden(case, golden, golden_feature_extractor):
    fe = golden_feature_extractor
    clips, mask = fe.window_clips(golden[f"{case}.waveform"].numpy(), sampling_rate=rate_of(fe))
    expected = golden[f"{case}.window_clips"].numpy()
    assert clips.dtype == np.float32 and clips.shape == (1, *expected.shape)
    np.testing.assert_array_equal(clips[0], expected)
    np.testing.assert_array_equal(mask[0], golden[f"{case}.window_mask"].numpy())


@pytest.mark.parametrize("case", CASES)
def test_features_match_golden_mel(case, golden, golden_feature_extractor):
    fe = golden_feature_extractor
    out = fe(golden[f"{case}.waveform"].numpy(), sampling_rate=rate_of(fe), return_tensors="pt")
    expected = golden[f"{case}.mel"]
    features = out["input_features"]
    assert features.dtype == torch.float32
    assert features.shape == (1, *expected.shape) == (1, expected.shape[0], fe.num_frames, fe.num_mel_bins)
    error = relative_error(features[0], expected)
    max_abs = (features[0] - expected).abs().max().item()
    print(f"{case}.mel: relative error {error:.3g}, max abs error {max_abs:.3g} dB")
    assert error <= MAX_RELATIVE_ERROR
    loud = expected > -60
    assert (features[0] - expected)[loud].abs().max().item() <= 0.09
    assert out["input_features_mask"].dtype == torch.long
    torch.testing.assert_close(out["input_features_mask"][0], golden[f"{case}.window_mask"].long(), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_log_mel_of_golden_clips(case, golden, golden_feature_extractor):
    # The mel stage alone, from the golden clips.
    mel = golden_feature_extractor.log_mel(golden[f"{case}.window_clips"])
    assert relative_error(mel, golden[f"{case}.mel"]) <= MAX_RELATIVE_ERROR


def test_batch_pads_windows_with_zero_clip_mel(golden, golden_feature_extractor):
    fe = golden_feature_extractor
    waveforms = [golden["a.waveform"].numpy(), golden["b.waveform"].numpy()]
    out = fe(waveforms, sampling_rate=rate_of(fe), return_tensors="pt")
    features, mask = out["input_features"], out["input_features_mask"]
    n_b = golden["b.window_clips"].shape[0]
    assert features.shape == (2, n_b, fe.num_frames, fe.num_mel_bins)
    torch.testing.assert_close(mask.float(), golden["batch.window_mask"], rtol=0, atol=0)
    assert relative_error(features[0, :1], golden["a.mel"]) <= MAX_RELATIVE_ERROR
    assert relative_error(features[1], golden["b.mel"]) <= MAX_RELATIVE_ERROR
    # Padding windows are exactly the log-mel of a zero clip (the original collator pads with zero clips).
    zero_clip_mel = fe.log_mel(torch.zeros(1, fe.window_samples))
    torch.testing.assert_close(features[0, 1:], zero_clip_mel.expand(n_b - 1, -1, -1), rtol=0, atol=0)
    assert torch.all(features[0, 1:] == fe.silence_db())
    assert fe.silence_db() == pytest.approx(10 * np.log10(fe.mel_floor), abs=1e-4)

    clips, clip_mask = fe.window_clips(waveforms, sampling_rate=rate_of(fe))
    assert clips.shape == (2, n_b, fe.window_samples) and not clips[0, 1:].any()
    np.testing.assert_array_equal(clip_mask, mask.numpy())


def test_padding_to_max_windows(golden, golden_feature_extractor):
    fe = golden_feature_extractor
    out = fe(golden["a.waveform"].numpy(), sampling_rate=rate_of(fe), padding="max_length", return_tensors="np")
    assert out["input_features"].shape[1] == fe.max_num_windows
    assert out["input_features_mask"].tolist() == [[1] + [0] * (fe.max_num_windows - 1)]
    with pytest.raises(ValueError, match="same number of windows"):
        fe([golden["a.waveform"].numpy(), golden["b.waveform"].numpy()], sampling_rate=rate_of(fe), padding=False)


def test_num_windows_rule(golden_feature_extractor):
    fe = golden_feature_extractor
    w, n = fe.window_samples, fe.max_num_windows
    assert fe.get_num_windows(1) == 1
    assert fe.get_num_windows(w) == 1
    assert fe.get_num_windows(w + 1) == 2
    assert fe.get_num_windows(2 * w) == 2
    assert fe.get_num_windows(n * w - 1) == n
    assert fe.get_num_windows(n * w) == n
    assert fe.get_num_windows(10 * n * w) == n
    assert fe.max_audio_seconds() == pytest.approx(n * fe.window_length)


def test_long_audio_is_truncated_with_warning(golden_feature_extractor, caplog):
    fe = golden_feature_extractor
    rng = np.random.default_rng(1)
    limit = fe.max_samples()
    waveform = rng.uniform(-0.5, 0.5, limit + 1234)
    waveform[-1] = 0.9  # the loudest sample lies beyond the limit: truncation must come before normalisation
    with caplog.at_level(logging.WARNING):
        clips = fe.clips_from_waveform(waveform)
    assert "1234 samples are dropped" in caplog.text
    assert clips.shape == (fe.max_num_windows, fe.window_samples)
    np.testing.assert_array_equal(clips, fe.clips_from_waveform(waveform[:limit]))
    assert clips.max() == 1.0 or clips.min() == -1.0


def test_input_types_agree(golden, golden_feature_extractor):
    fe = golden_feature_extractor
    waveform = golden["a.waveform"].numpy()
    reference = fe(waveform, sampling_rate=rate_of(fe), return_tensors="pt")["input_features"]
    variants = [
        torch.from_numpy(waveform),
        waveform.tolist(),
        [waveform],
        np.stack([waveform, waveform]),
        torch.from_numpy(np.stack([waveform, waveform])),
    ]
    for variant in variants:
        features = fe(variant, sampling_rate=rate_of(fe), return_tensors="pt")["input_features"]
        for row in features:
            torch.testing.assert_close(row, reference[0], rtol=0, atol=0)
    numpy_out = fe(waveform, sampling_rate=rate_of(fe))
    assert isinstance(numpy_out["input_features"], np.ndarray) and numpy_out["input_features"].dtype == np.float32
    assert numpy_out["input_features_mask"].dtype == np.int64
    np.testing.assert_array_equal(numpy_out["input_features"], reference.numpy())


def test_float32_input_is_computed_in_float32(golden_feature_extractor):
    fe = golden_feature_extractor
    rng = np.random.default_rng(2)
    waveform = rng.uniform(-0.3, 0.7, fe.window_samples // 2).astype(np.float32)
    clips = fe.clips_from_waveform(waveform)
    peak = np.abs(waveform).max()
    assert peak.dtype == np.float32
    scaled = waveform / peak  # float32 peak normalisation
    quantised = (np.clip(scaled, -1, 1) * np.float32(32767.0)).astype(np.int16) / 32767.0
    np.testing.assert_array_equal(clips[0, : waveform.shape[0]], quantised.astype(np.float32))
    assert not clips[0, waveform.shape[0] :].any()


def test_normalize_and_quantize_switches(golden_feature_extractor):
    fe = golden_feature_extractor
    waveform = np.linspace(-0.5, 0.25, fe.window_samples)
    raw = fe.clips_from_waveform(waveform, do_normalize=False, do_quantize=False)
    np.testing.assert_array_equal(raw[0], waveform.astype(np.float32))
    normalised = fe.clips_from_waveform(waveform, do_quantize=False)
    np.testing.assert_array_equal(normalised[0], (waveform / 0.5).astype(np.float32))
    quantised = fe.clips_from_waveform(waveform, do_normalize=False)
    np.testing.assert_array_equal(
        quantised[0], ((np.clip(waveform, -1, 1) * 32767.0).astype(np.int16) / 32767.0).astype(np.float32)
    )
    switched_off = AudioFlamingo2FeatureExtractor(do_normalize=False, do_quantize=False)
    np.testing.assert_array_equal(switched_off.clips_from_waveform(waveform)[0], raw[0])


def test_all_zero_audio_gives_silence_without_nan(golden_feature_extractor):
    fe = golden_feature_extractor
    out = fe(np.zeros(fe.window_samples + 5), sampling_rate=rate_of(fe), return_tensors="pt")
    features = out["input_features"]
    assert features.shape[1] == 2 and not torch.isnan(features).any()
    assert torch.all(features == fe.silence_db())


def test_overlapping_windows(golden_feature_extractor):
    fe = AudioFlamingo2FeatureExtractor(window_length=2.0, window_overlap=0.5, max_num_windows=4)
    stride, overlap = fe.window_stride, fe.overlap_samples
    waveform = np.random.default_rng(3).uniform(-1, 1, fe.window_samples + stride + 7)
    clips = fe.clips_from_waveform(waveform)
    assert clips.shape == (3, fe.window_samples)
    np.testing.assert_array_equal(clips[1, :overlap], clips[0, -overlap:])
    quantised = ((np.clip(peak_of(waveform), -1, 1) * 32767.0).astype(np.int16) / 32767.0).astype(np.float32)
    np.testing.assert_array_equal(clips[2, : waveform.shape[0] - 2 * stride], quantised[2 * stride :])
    assert fe.max_samples() == 4 * fe.window_samples - 3 * overlap
    assert fe.num_frames == fe.window_samples // fe.hop_length + 1
    assert fe(waveform, sampling_rate=fe.sampling_rate)["input_features"].shape == (1, 3, fe.num_frames, 64)


def peak_of(waveform):
    from af2_hf.audio import peak_normalize

    return peak_normalize(waveform)


def test_filterbank_matches_transformers_htk_filterbank():
    from transformers.audio_utils import mel_filter_bank

    for n_fft, mels, f_min, f_max, rate in [(1024, 64, 50.0, 8000.0, 16000), (400, 80, 0.0, 7600.0, 16000)]:
        ours = htk_mel_filter_bank(n_fft // 2 + 1, mels, f_min, f_max, rate)
        reference = mel_filter_bank(n_fft // 2 + 1, mels, f_min, f_max, rate, norm=None, mel_scale="htk")
        assert ours.shape == reference.shape
        np.testing.assert_allclose(ours.numpy(), reference, atol=1e-5)  # float32 vs float64


def test_log_mel_matches_independent_reference_for_other_configs():
    # transformers.audio_utils (numpy, float64 filterbank) as an independent reference on a non-default config.
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    fe = AudioFlamingo2FeatureExtractor(num_mel_bins=40, n_fft=512, hop_length=128, f_min=20.0, f_max=6000.0,
                                        window_length=1.0)
    waveform = np.random.default_rng(4).uniform(-1, 1, fe.window_samples)
    clip = fe.clips_from_waveform(waveform)[0]
    ours = fe(waveform, sampling_rate=fe.sampling_rate)["input_features"][0, 0]
    filters = mel_filter_bank(fe.n_fft // 2 + 1, fe.num_mel_bins, fe.f_min, fe.f_max, fe.sampling_rate,
                              norm=None, mel_scale="htk")
    reference = spectrogram(clip.astype(np.float64), window_function(fe.n_fft, "hann"), frame_length=fe.n_fft,
                            hop_length=fe.hop_length, power=2.0, center=True, pad_mode="reflect",
                            mel_filters=filters, mel_floor=fe.mel_floor, log_mel="dB").T
    assert ours.shape == reference.shape == (fe.num_frames, fe.num_mel_bins)
    assert relative_error(torch.from_numpy(ours), torch.from_numpy(reference)) <= MAX_RELATIVE_ERROR


def test_device_argument(golden, golden_feature_extractor):
    fe = golden_feature_extractor
    waveform = golden["a.waveform"].numpy()
    reference = fe(waveform, sampling_rate=rate_of(fe), return_tensors="pt")["input_features"]
    devices = ["cpu", torch.device("cpu")] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        out = fe(waveform, sampling_rate=rate_of(fe), return_tensors="pt", device=device)
        assert out["input_features"].device.type == torch.device(device).type
        assert relative_error(out["input_features"].cpu(), reference) <= MAX_RELATIVE_ERROR


def test_save_and_load(tmp_path, golden, golden_feature_extractor):
    fe = AudioFlamingo2FeatureExtractor(max_num_windows=7, num_mel_bins=48, f_max=7000.0, do_quantize=False)
    fe.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = AudioFlamingo2FeatureExtractor.from_pretrained(tmp_path)
    assert loaded.to_dict() == fe.to_dict()
    assert not any(key.startswith("_") for key in loaded.to_dict())
    waveform = golden["a.waveform"].numpy()
    np.testing.assert_array_equal(
        loaded(waveform, sampling_rate=fe.sampling_rate)["input_features"],
        fe(waveform, sampling_rate=fe.sampling_rate)["input_features"],
    )
    override = AudioFlamingo2FeatureExtractor.from_pretrained(tmp_path, max_num_windows=2)
    assert override.max_num_windows == 2


def test_wrong_sampling_rate_says_how_to_resample(golden_feature_extractor):
    with pytest.raises(ValueError, match="librosa.resample"):
        golden_feature_extractor(np.zeros(100), sampling_rate=44100)
    with pytest.raises(ValueError, match="load_audio"):
        golden_feature_extractor.window_clips(np.zeros(100), sampling_rate=8000)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (np.zeros((10, 2, 2)), ValueError, "1-D waveform or a 2-D batch"),
        ([np.zeros((10, 2, 2))], ValueError, "1-D mono"),
        (np.zeros(0), ValueError, "empty"),
        ([], ValueError, "empty list"),
        (np.array([0.1, np.nan]), ValueError, "NaN"),
        (np.array([1, 2], dtype=np.int64), TypeError, "floating-point"),
        ("audio.wav", TypeError, "load_audio"),
        ([[0.1, "x"]], TypeError, "numbers only"),
        (object(), TypeError, "numpy array"),
    ],
)
def test_bad_inputs(bad, error, message, golden_feature_extractor):
    with pytest.raises(error, match=message):
        golden_feature_extractor(bad, sampling_rate=golden_feature_extractor.sampling_rate)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_overlap": 10.0},
        {"window_overlap": -1.0},
        {"f_max": 9000.0},
        {"f_min": 8000.0},
        {"n_fft": 0},
        {"max_num_windows": 0},
        {"window_length": 0.01},
        {"num_mel_bins": 64, "feature_size": 80},
    ],
)
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        AudioFlamingo2FeatureExtractor(**kwargs)


def test_invalid_call_arguments(golden_feature_extractor):
    fe = golden_feature_extractor
    with pytest.raises(ValueError, match="return_tensors"):
        fe(np.zeros(10), sampling_rate=fe.sampling_rate, return_tensors="tf")
    with pytest.raises(ValueError, match="max_num_windows"):
        fe(np.zeros(10), sampling_rate=fe.sampling_rate, max_num_windows=0)
    with pytest.raises(ValueError, match="padding"):
        fe(np.zeros(10), sampling_rate=fe.sampling_rate, padding="sideways")


@pytest.mark.parametrize(
    "value, error, message",
    [
        (0.5, TypeError, r"single number \(0.5\), not audio"),
        (np.float32(0.5), TypeError, "single number"),
        (np.array(0.5), ValueError, "0-d array"),
        (torch.tensor(0.5), ValueError, "0-d array"),
        ([np.zeros(100), np.array(0.5)], ValueError, "Audio 1 is a 0-d array"),
        ([np.zeros(100), 0.5, np.zeros(3)], TypeError, "Audio 1 is a single number"),
    ],
)
def test_a_scalar_is_not_audio(golden_feature_extractor, value, error, message):
    with pytest.raises(error, match=message):
        golden_feature_extractor(value, sampling_rate=golden_feature_extractor.sampling_rate)
