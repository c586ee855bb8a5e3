"""af2_hf.load_audio against the golden read_audio output, plus the loading rules of the original and bad input."""

import io
import pathlib

import numpy as np
import pytest
import soundfile as sf

from af2_hf import AudioLoadError, load_audio
from af2_hf.audio import peak_normalize

CASES = ["a", "b", "c"]


def golden_read_seconds(golden_json) -> float:
    clap = golden_json["config"]["clap_config"]
    return clap["max_num_window"] * (clap["window_length"] - clap["window_overlap"]) + clap["window_overlap"]


def golden_rate(golden_json) -> int:
    return golden_json["config"]["htsat"]["sample_rate"]


@pytest.mark.parametrize("case", CASES)
def test_waveform_matches_golden(case, golden, golden_json, golden_audio_files):
    waveform = load_audio(golden_audio_files[case], golden_rate(golden_json), golden_read_seconds(golden_json))
    expected = golden[f"{case}.waveform"].numpy()
    assert waveform.dtype == np.float64 and waveform.ndim == 1
    assert waveform.shape == expected.shape
    info = golden_json["audio_files"][case]
    if info["sample_rate"] == golden_rate(golden_json):
        # soundfile + float64 arithmetic: bit-identical.
        np.testing.assert_array_equal(waveform, expected)
    else:
        # Resampled with librosa/soxr: bit-identical with the golden versions of librosa and soxr, otherwise
        # resampler differences are allowed up to 1e-6 relative.
        import librosa
        import soxr

        versions = golden_json["versions"]
        if librosa.__version__ == versions["librosa"] and soxr.__version__ == versions["soxr"]:
            np.testing.assert_array_equal(waveform, expected)
        else:
            assert np.linalg.norm(waveform - expected) / np.linalg.norm(expected) <= 1e-6


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "file", "bytesio", "pathlike", "str"])
def test_sources_agree(kind, golden, golden_json, golden_audio_files):
    path = golden_audio_files["a"]
    if kind == "bytes":
        source = path.read_bytes()
    elif kind == "bytearray":
        source = bytearray(path.read_bytes())
    elif kind == "bytesio":
        source = io.BytesIO(path.read_bytes())
    elif kind == "pathlike":
        source = pathlib.Path(path)
    elif kind == "str":
        source = str(path)
    else:
        source = open(path, "rb")
    try:
        waveform = load_audio(source, golden_rate(golden_json), golden_read_seconds(golden_json))
    finally:
        if kind == "file":
            source.close()
    np.testing.assert_array_equal(waveform, golden["a.waveform"].numpy())


def test_truncation_happens_before_normalisation(golden, golden_json, golden_audio_files):
    # c.flac has its loudest part after the read limit: reading everything changes the normalisation.
    rate = golden_rate(golden_json)
    full = load_audio(golden_audio_files["c"], rate, max_seconds=None)
    info = golden_json["audio_files"]["c"]
    assert full.shape == (int(info["seconds"] * rate),)
    expected = golden["c.waveform"].numpy()
    assert not np.array_equal(full[: expected.shape[0]], expected)
    # Same signal up to a scale: the limited read is the prefix renormalised by its own peak.
    np.testing.assert_allclose(peak_normalize(full[: expected.shape[0]]), expected, rtol=0, atol=1e-12)


def test_max_seconds_reads_int_seconds_times_rate(tmp_path):
    rate = 8000
    signal = np.sin(np.arange(rate * 3) * 0.01) * 0.5
    path = tmp_path / "tone.wav"
    sf.write(path, signal, rate, subtype="FLOAT")
    assert load_audio(path, rate, max_seconds=1.2345).shape == (int(1.2345 * rate),)
    assert load_audio(path, rate, max_seconds=10.0).shape == (rate * 3,)


@pytest.mark.parametrize("case", CASES)
def test_peak_normalisation_is_idempotent_on_golden(case, golden):
    waveform = golden[f"{case}.waveform"].numpy()
    np.testing.assert_array_equal(peak_normalize(waveform), waveform)


def test_peak_normalisation_rules():
    non_negative = np.array([0.0, 0.225, 0.45])
    out = peak_normalize(non_negative)
    np.testing.assert_array_equal(out, 2 * non_negative / 0.45 - 1.0)
    assert out[-1] == 1.0 and out[0] == -1.0
    np.testing.assert_array_equal(peak_normalize(out), out)

    negative_peak = np.array([0.1, -0.8, 0.4])
    np.testing.assert_array_equal(peak_normalize(negative_peak), negative_peak / 0.8)

    single = peak_normalize(np.array([-0.3, 0.2], dtype=np.float32))
    assert single.dtype == np.float32 and single[0] == -1.0


def test_all_zero_audio_gives_zeros_not_nan(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(1600, dtype=np.int16), 16000, subtype="PCM_16")
    waveform = load_audio(path)
    assert waveform.shape == (1600,) and not np.isnan(waveform).any() and not waveform.any()


def test_float_file_beyond_unit_range_is_divided_by_peak(tmp_path):
    rate = 16000
    signal = np.linspace(-0.5, 2.0, rate)
    path = tmp_path / "loud.wav"
    sf.write(path, signal, rate, subtype="DOUBLE")
    np.testing.assert_array_equal(load_audio(path, rate), peak_normalize(signal / 2.0))


def test_multichannel_at_target_rate_keeps_channel_zero(tmp_path):
    rate = 16000
    t = np.arange(rate) / rate
    left = 0.3 * np.sin(2 * np.pi * 440 * t)
    right = 0.9 * np.sin(2 * np.pi * 1000 * t)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), rate, subtype="DOUBLE")
    np.testing.assert_array_equal(load_audio(path, rate), peak_normalize(left))


def test_multichannel_resampled_keeps_channel_zero(tmp_path):
    import librosa

    rate, target = 22050, 16000
    rng = np.random.default_rng(0)
    data = rng.uniform(-0.5, 0.5, size=(rate // 2, 3))
    path = tmp_path / "three.wav"
    sf.write(path, data, rate, subtype="DOUBLE")
    expected = peak_normalize(librosa.resample(data.T, orig_sr=rate, target_sr=target)[0])
    np.testing.assert_array_equal(load_audio(path, target), expected)


def test_ogg_and_mp3(tmp_path):
    rate = 16000
    t = np.arange(rate) / rate
    left = 0.5 * np.sin(2 * np.pi * 300 * t)
    right = 0.25 * np.sin(2 * np.pi * 900 * t)
    stereo = np.stack([left, right], axis=1)

    ogg = tmp_path / "tone.ogg"
    sf.write(ogg, stereo, rate, format="OGG", subtype="VORBIS")
    decoded, _ = sf.read(ogg, dtype="float64")
    np.testing.assert_array_equal(load_audio(ogg, rate), peak_normalize(np.ascontiguousarray(decoded[:, 0])))

    mp3 = tmp_path / "tone.mp3"
    sf.write(mp3, stereo, rate, format="MP3", subtype="MPEG_LAYER_III")
    decoded, _ = sf.read(mp3, dtype="float64")
    # The original decodes MP3 with pydub, which down-mixes; so does load_audio.
    np.testing.assert_array_equal(load_audio(mp3, rate), peak_normalize(decoded.mean(axis=1)))


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(AudioLoadError, match="nope.wav"):
        load_audio(missing)
    assert issubclass(AudioLoadError, ValueError)


@pytest.mark.parametrize(
    "content",
    [b"this is not audio at all" * 10, b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 20],
    ids=["text", "truncated-riff"],
)
def test_corrupt_files_raise(tmp_path, content):
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(AudioLoadError, match="broken.wav"):
        load_audio(path)
    with pytest.raises(AudioLoadError):
        load_audio(content)


def test_empty_and_unsupported_sources(tmp_path):
    with pytest.raises(AudioLoadError, match="empty"):
        load_audio(b"")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0), 16000, subtype="PCM_16")
    with pytest.raises(AudioLoadError, match="no samples"):
        load_audio(empty)
    with pytest.raises(AudioLoadError, match="directory"):
        load_audio(tmp_path)
    with pytest.raises(AudioLoadError, match="URL"):
        load_audio("https://example.com/a.wav")
    with pytest.raises(TypeError, match="path"):
        load_audio(12345)
    with pytest.raises(TypeError, match="binary"):
        load_audio(io.StringIO("text"))


def test_non_finite_samples_raise(tmp_path):
    path = tmp_path / "nan.wav"
    signal = np.zeros(100)
    signal[10] = np.nan
    sf.write(path, signal, 16000, subtype="DOUBLE")
    with pytest.raises(AudioLoadError, match="NaN"):
        load_audio(path)


@pytest.mark.parametrize(
    "kwargs", [{"sampling_rate": 0}, {"sampling_rate": 16000.5}, {"max_seconds": 0}, {"max_seconds": float("inf")}]
)
def test_invalid_arguments(kwargs, golden_audio_files):
    with pytest.raises(ValueError):
        load_audio(golden_audio_files["a"], **kwargs)
