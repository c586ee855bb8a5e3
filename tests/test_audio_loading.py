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
    with pytest.raises(TypeError, match=r"single number \(12345\), not audio"):
        load_audio(12345)
    with pytest.raises(AudioLoadError, match="0-d array"):
        load_audio(np.array(0.5))
    with pytest.raises(TypeError, match="None"):
        load_audio(None)
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


# ---------------------------------------------------------------------------------------------------- edge files

# Every format libsndfile writes here, with what a copy cut to 60 % of its bytes gives: "warn" (the samples present,
# with a warning that the file is truncated) or "error" (AudioLoadError: the stream cannot be decoded).
FORMATS = {
    "wav-pcm16": ("wav", "WAV", "PCM_16", "warn"),
    "wav-pcm24": ("wav", "WAV", "PCM_24", "warn"),
    "wav-pcm32": ("wav", "WAV", "PCM_32", "warn"),
    "wav-float": ("wav", "WAV", "FLOAT", "warn"),
    "wav-double": ("wav", "WAV", "DOUBLE", "warn"),
    "w64-pcm16": ("w64", "W64", "PCM_16", "warn"),
    "aiff-pcm16": ("aiff", "AIFF", "PCM_16", "warn"),
    "au-pcm16": ("au", "AU", "PCM_16", "warn"),
    "flac-16": ("flac", "FLAC", "PCM_16", "error"),
    "flac-24": ("flac", "FLAC", "PCM_24", "error"),
    "ogg-vorbis": ("ogg", "OGG", "VORBIS", "error"),
    "ogg-opus": ("opus", "OGG", "OPUS", "warn"),
    "mp3": ("mp3", "MP3", "MPEG_LAYER_III", "warn"),
    "caf-pcm16": ("caf", "CAF", "PCM_16", "error"),
}
TONE = (0.5 * np.sin(np.arange(32000) / 10)).astype(np.float32)


def _encoded(kind: str) -> bytes:
    _, file_format, subtype, _ = FORMATS[kind]
    buffer = io.BytesIO()
    sf.write(buffer, TONE, 16000, format=file_format, subtype=subtype)
    return buffer.getvalue()


def _load_logged(source, **kwargs):
    from transformers.testing_utils import CaptureLogger

    import af2_hf.audio

    with CaptureLogger(af2_hf.audio.logger) as captured:
        waveform = load_audio(source, **kwargs)
    return waveform, captured.out


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_each_format_loads_without_a_warning_under_any_extension(kind, tmp_path):
    data = _encoded(kind)
    reference, log = _load_logged(data)
    assert log == "" and reference.shape == (32000,) and reference.dtype == np.float64
    lossy = FORMATS[kind][2] in ("VORBIS", "OPUS", "MPEG_LAYER_III")
    if not lossy:
        np.testing.assert_allclose(reference, peak_normalize(TONE.astype(np.float64)), atol=2e-4)
    # libsndfile recognises the content, not the extension: the same bytes under another name load the same.
    for name in (f"clip.{FORMATS[kind][0]}", "clip.wav", "clip.mp3", "clip.txt", "clip"):
        (tmp_path / name).write_bytes(data)
        np.testing.assert_array_equal(load_audio(tmp_path / name), reference)


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_a_file_cut_short_is_named(kind, tmp_path):
    data = _encoded(kind)
    path = tmp_path / f"cut.{FORMATS[kind][0]}"
    path.write_bytes(data[: int(len(data) * 0.6)])
    if FORMATS[kind][3] == "warn":
        waveform, log = _load_logged(path)
        assert 0 < waveform.shape[0] < 32000
        assert np.isfinite(waveform).all()
        assert "cut.%s" % FORMATS[kind][0] in log
        assert "truncated" in log or "cut short" in log, log
    else:
        with pytest.raises(AudioLoadError, match=f"cut.{FORMATS[kind][0]}") as raised:
            load_audio(path)
        assert "BytesIO object at" not in str(raised.value)


def test_a_wav_header_that_claims_more_data_names_both_sizes(tmp_path):
    data = _encoded("wav-pcm16")
    path = tmp_path / "short.wav"
    path.write_bytes(data[:10044])  # 44-byte header + 10000 bytes of the 64000 it claims
    waveform, log = _load_logged(path)
    assert waveform.shape == (5000,)
    assert "short.wav' is truncated: its header claims 64000 bytes but the file holds 10000" in log
    # The samples present are exactly the first 5000 of the intact file (before peak normalisation).
    intact, _ = sf.read(io.BytesIO(data), dtype="float64")
    np.testing.assert_array_equal(waveform, peak_normalize(intact[:5000]))


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_zero_length_header_only_and_corrupt_headers(kind, tmp_path):
    extension = FORMATS[kind][0]
    empty = tmp_path / f"empty.{extension}"
    empty.write_bytes(b"")
    with pytest.raises(AudioLoadError, match=r"empty \(0 bytes\)"):
        load_audio(empty)
    data = _encoded(kind)
    garbage = tmp_path / f"garbage.{extension}"
    garbage.write_bytes(bytes(range(256)) * 4 + data[1024:])  # the header overwritten
    with pytest.raises(AudioLoadError, match=f"garbage.{extension}"):
        load_audio(garbage)
    header_only = tmp_path / f"header.{extension}"
    header_only.write_bytes(data[:12])
    with pytest.raises(AudioLoadError, match=f"header.{extension}"):
        load_audio(header_only)


@pytest.mark.parametrize(
    "content",
    [b"%PDF-1.4\n" + b"x" * 2000, b"\x89PNG\r\n\x1a\n" + b"\x00" * 2000, "un texte, pas du son\n".encode() * 100,
     b"\x00" * 4096],
    ids=["pdf", "png", "text", "zeros"],
)
def test_non_audio_files_say_so(content, tmp_path):
    path = tmp_path / "sound.wav"
    path.write_bytes(content)
    with pytest.raises(AudioLoadError, match=r"sound.wav.*not audio, or its format is not one libsndfile reads"):
        load_audio(path)


@pytest.mark.parametrize(
    "value, error, message",
    [
        (0.5, TypeError, "single number"),
        (3, TypeError, "single number"),
        (np.float32(0.1), TypeError, "single number"),
        (True, TypeError, "single number"),
        (np.array(0.25), AudioLoadError, "0-d array"),
        (np.array([], dtype=np.float32), AudioLoadError, "no samples"),
        (np.zeros((2, 3, 4), dtype=np.float32), AudioLoadError, "1-D"),
        (np.array([0.1, np.nan], dtype=np.float32), AudioLoadError, "NaN"),
        (np.array([1 + 1j, 0j]), TypeError, "complex128"),
        (["a", "b"], TypeError, "numbers only"),
        ({"sampling_rate": 16000}, ValueError, "'array'.*'bytes' or 'path'"),
        ({"array": np.zeros(10)}, ValueError, "needs its 'sampling_rate'"),
        ({"array": np.zeros(10), "sampling_rate": 0}, ValueError, "positive integer"),
        (object(), TypeError, "expected a waveform"),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, str) else value[:12],
)
def test_values_that_are_not_audio(value, error, message):
    with pytest.raises(error, match=message):
        load_audio(value)


# ---------------------------------------------------------------------------------------------------- in memory


def test_waveforms_follow_the_file_steps(tmp_path):
    """A waveform (numpy, torch, list, integer PCM, at another rate) gives what its WAV file gives."""
    import torch

    rng = np.random.default_rng(0)
    signal = (0.3 * rng.standard_normal(24000)).clip(-1, 1)
    pcm = (signal * 32767).astype(np.int16)
    path = tmp_path / "pcm.wav"
    sf.write(path, pcm, 24000, subtype="PCM_16")
    from_file = load_audio(path, max_seconds=0.5)
    from_pcm = load_audio(pcm, source_sampling_rate=24000, max_seconds=0.5)
    np.testing.assert_array_equal(from_pcm, from_file)
    np.testing.assert_array_equal(load_audio({"array": pcm, "sampling_rate": 24000}, max_seconds=0.5), from_file)
    np.testing.assert_array_equal(load_audio({"raw": torch.from_numpy(pcm), "sampling_rate": 24000},
                                             max_seconds=0.5), from_file)

    at_target = signal.astype(np.float32)[:16000]
    kept = load_audio(at_target)
    assert kept.dtype == np.float32  # no resampling: float32 stays float32, as the feature extractor would see it
    np.testing.assert_array_equal(kept, peak_normalize(at_target))
    np.testing.assert_array_equal(load_audio(at_target.tolist()), peak_normalize(at_target.astype(np.float64)))
    np.testing.assert_array_equal(load_audio(torch.from_numpy(at_target)), kept)
    np.testing.assert_array_equal(load_audio(at_target, normalize=False), at_target)


def test_multichannel_waveforms_keep_channel_zero_with_a_warning():
    stereo = np.stack([np.linspace(-0.5, 0.5, 1000), np.linspace(0.2, -0.2, 1000)])  # (channels, samples)
    for layout in (stereo, stereo.T):
        waveform, log = _load_logged(layout)
        np.testing.assert_array_equal(waveform, peak_normalize(stereo[0]))
        assert "only channel 0 is kept" in log


def test_waveform_truncation_and_arguments():
    long = np.full(16000 * 3, 0.25)
    waveform, log = _load_logged(long, max_seconds=2)
    assert waveform.shape == (32000,) and "lasts 3.00 s" in log
    with pytest.raises(ValueError, match="truncation=False"):
        load_audio(long, max_seconds=2, truncation=False)
    with pytest.raises(ValueError, match="source_sampling_rate"):
        load_audio({"array": long, "sampling_rate": 16000}, source_sampling_rate=16000)
    with pytest.raises(ValueError, match="positive integer"):
        load_audio(long, source_sampling_rate=-1)


def test_datasets_dicts_and_decoders(tmp_path):
    """{"path", "bytes"} dicts read the bytes (else the path) as a file; a datasets AudioDecoder is read from the
    file it wraps; any other decoder with get_all_samples() (torchcodec's API) is taken as a waveform."""
    import torch

    path = tmp_path / "tone.flac"
    sf.write(path, TONE, 16000, subtype="PCM_16")
    expected = load_audio(path)
    np.testing.assert_array_equal(load_audio({"path": str(path), "bytes": None}), expected)
    np.testing.assert_array_equal(load_audio({"path": "elsewhere.flac", "bytes": path.read_bytes()}), expected)

    class Samples:  # torchcodec.AudioSamples: data (channels, samples) float32, sample_rate
        def __init__(self, data, sample_rate):
            self.data, self.sample_rate = data, sample_rate

    class Decoder:  # the torchcodec.decoders.AudioDecoder method load_audio uses
        def __init__(self, data, rate):
            self._samples = Samples(torch.as_tensor(data), rate)

        def get_all_samples(self):
            return self._samples

    stereo = np.stack([TONE, -TONE]).astype(np.float32)
    decoded = load_audio(Decoder(stereo, 16000))
    np.testing.assert_array_equal(decoded, peak_normalize(TONE))
    datasets_decoder = Decoder(np.zeros((1, 10), dtype=np.float32), 8000)
    datasets_decoder._hf_encoded = {"path": str(path), "bytes": None}
    np.testing.assert_array_equal(load_audio(datasets_decoder), expected)

    class Broken:
        def get_all_samples(self):
            raise RuntimeError("Could not decode stream")

    with pytest.raises(AudioLoadError, match="Could not decode Broken object"):
        load_audio(Broken())
