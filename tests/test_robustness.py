"""Robustness (issue #8): bad and unusual input, strict checkpoint loading, unsafe checkpoint files, concurrency.

Every case ends in a typed error that names the problem or in documented handling (see the docstrings of
AudioFlamingo2FeatureExtractor, AudioFlamingo2Processor, load_audio and AudioFlamingo2PreTrainedModel.from_pretrained).
Cases already covered elsewhere are only referenced here:

- test_audio_loading.py: missing file, text file / cut RIFF header (test_corrupt_files_raise), empty bytes, 0-frame
  WAV, directory, URL (test_empty_and_unsupported_sources), NaN in a file, silent file, stereo files, MP3/OGG.
- test_feature_extraction.py: truncation warning (test_long_audio_is_truncated_with_warning), silence features,
  wrong sampling rate, 3-D / empty / NaN / int64 / path / object inputs (test_bad_inputs).
- test_processor.py: prompt truncation warning, two <audio> in a text and text/audio count mismatch
  (test_count_mismatch), audio-only call, unreadable file.
- test_conversion.py: unknown safe_ckpt / clap_ckpt keys and inconsistent shapes are refused with nothing written.
- test_loading.py: corrupt, truncated and missing weight files and shards, folders that are no model or an original
  release, other model types, invalid config sizes, output_loading_info, max_position_embeddings.
"""

import io
import logging
import pathlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
import torch
from af2_testing import converted_tiny_dir, edited_weights_copy, random_features, random_model
from safetensors.torch import load_file, save_file

from af2_hf import AudioFlamingo2FeatureExtractor, AudioFlamingo2ForConditionalGeneration, AudioLoadError, load_audio
from af2_hf.convert_af2 import ConversionError, build_native_checkpoint, convert_af2_checkpoint
from af2_hf.modeling_audioflamingo2 import AudioFlamingo2Model, CheckpointMismatchError

RATE = 16000
WINDOW = 10 * RATE


@pytest.fixture(scope="module")
def fe():
    """Default windowing (10 s) but at most 3 windows, so that over-long audio stays cheap."""
    return AudioFlamingo2FeatureExtractor(max_num_windows=3)


def features(extractor, audio, **kwargs):
    return extractor(audio, sampling_rate=RATE, return_tensors="pt", **kwargs)


def tone(n: int, seed: int = 0, amplitude: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / RATE
    return amplitude * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)


def generate(model, inputs, max_new_tokens=4):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


# ==================================================================================================== audio


@pytest.mark.parametrize("empty", [np.zeros(0), np.zeros(0, dtype=np.float32), torch.zeros(0), []],
                         ids=["np64", "np32", "torch", "list"])
def test_empty_audio_is_refused(fe, golden_processor, empty):
    with pytest.raises(ValueError, match="empty"):
        features(fe, empty)
    with pytest.raises(ValueError, match="empty"):
        golden_processor(text="q", audio=empty, sampling_rate=RATE)


def test_empty_item_in_a_batch_is_named(fe):
    with pytest.raises(ValueError, match="Audio 1 is empty"):
        features(fe, [tone(100), np.zeros(0)])


def test_silence_gives_finite_features_and_a_finite_answer(fe, golden_processor, model, tmp_path):
    # The original divides 0 by 0 in read_audio (NaN, later cast to 0 on x86-64); here silence is exact zeros.
    silence = fe.silence_db()
    for audio in (np.zeros(1), np.zeros(RATE), np.zeros(RATE, dtype=np.float32), np.zeros(RATE, dtype=np.int16)):
        out = features(fe, audio)["input_features"]
        assert torch.isfinite(out).all() and torch.all(out == silence)
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(3 * RATE, dtype=np.int16), RATE, subtype="PCM_16")
    from_file = golden_processor(text="what do you hear?", audio=path, return_tensors="pt")
    from_array = golden_processor(text="what do you hear?", audio=np.zeros(3 * RATE), sampling_rate=RATE,
                                  return_tensors="pt")
    for key in from_array:
        torch.testing.assert_close(from_file[key], from_array[key], rtol=0, atol=0)
    result = generate(model, from_file)
    assert all(torch.isfinite(step).all() for step in result.logits)
    assert isinstance(golden_processor.decode_answer(result.sequences[0]), str)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["float64", "float32", "torch"])
def test_non_finite_samples_are_refused(fe, golden_processor, bad, kind):
    waveform = tone(1000)
    waveform[[7, 500]] = bad
    if kind == "float32":
        waveform = waveform.astype(np.float32)
    elif kind == "torch":
        waveform = torch.from_numpy(waveform)
    with pytest.raises(ValueError, match=r"NaN or infinite samples .*the first at sample 7"):
        features(fe, waveform)
    with pytest.raises(ValueError, match="nan_to_num"):
        golden_processor(text="q", audio=waveform, sampling_rate=RATE)


@pytest.mark.parametrize(
    "dtype, subtype",
    [(np.int16, "PCM_16"), (np.int32, "PCM_32"), (np.int8, "PCM_S8"), (np.uint8, "PCM_U8")],
)
def test_integer_pcm_is_read_as_soundfile_reads_it(fe, dtype, subtype):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(1)
    pcm = rng.integers(info.min, info.max, size=RATE, endpoint=True).astype(dtype)
    pcm[:2] = [info.min, info.max]
    # soundfile's float64 reading of exactly these PCM bytes is the reference (uint8 is offset binary).
    reference, _ = sf.read(io.BytesIO(pcm.tobytes()), samplerate=RATE, channels=1, format="RAW", subtype=subtype,
                           dtype="float64")
    from af2_hf.feature_extraction_audioflamingo2 import _pcm_to_float

    np.testing.assert_array_equal(_pcm_to_float(torch.from_numpy(pcm)).numpy(), reference)
    expected = features(fe, reference)["input_features"]
    for variant in (pcm, torch.from_numpy(pcm)):
        torch.testing.assert_close(features(fe, variant)["input_features"], expected, rtol=0, atol=0)
    without_normalisation = fe.clips_from_waveform(pcm, do_normalize=False, do_quantize=False)
    np.testing.assert_array_equal(without_normalisation[0, :RATE], reference.astype(np.float32))


def test_int16_array_equals_its_wav_file(golden_processor, tmp_path):
    pcm = (tone(2 * RATE, seed=3, amplitude=0.4) * 32767).astype(np.int16)
    path = tmp_path / "pcm16.wav"
    sf.write(path, pcm, RATE, subtype="PCM_16")
    from_file = golden_processor(text="q", audio=path, return_tensors="pt")
    from_pcm = golden_processor(text="q", audio=pcm, sampling_rate=RATE, return_tensors="pt")
    torch.testing.assert_close(from_pcm["input_features"], from_file["input_features"], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.bool_, np.uint16, np.complex64])
def test_unsupported_dtypes_are_refused(fe, dtype):
    with pytest.raises(TypeError, match=r"dtype .*x / 32768"):
        features(fe, np.ones(10, dtype=dtype))


def test_multichannel_arrays_keep_channel_zero(fe, golden_processor, caplog):
    left, right = tone(RATE, seed=4), tone(RATE, seed=5, amplitude=0.9)[::-1].copy()
    expected = features(fe, left)["input_features"]
    channels_first, channels_last = np.stack([left, right]), np.stack([left, right], axis=1)
    cases = [
        (lambda: features(fe, [channels_first]), "channels first"),  # a 2-D item of a list: one waveform
        (lambda: features(fe, [channels_last]), "channels last"),
        (lambda: features(fe, channels_last), "channels last"),  # more rows than columns: (samples, channels)
        (lambda: golden_processor(text="q", audio=channels_first, sampling_rate=RATE, return_tensors="pt"),
         "channels first"),  # one text: the 2-D array is one waveform
        (lambda: golden_processor(text="q", audio=torch.from_numpy(channels_last), sampling_rate=RATE,
                                  return_tensors="pt"), "channels last"),
    ]
    for run, orientation in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            out = run()["input_features"]
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert f"2 channels x {RATE} samples ({orientation})" in caplog.text
        assert "only channel 0 is kept" in caplog.text
    # Documented: a top-level (batch, samples) array of the feature extractor stays a batch, as do mono 2-D shapes.
    batch = features(fe, channels_first)["input_features"]
    assert batch.shape[0] == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for mono in (left[None], left[:, None]):
            torch.testing.assert_close(features(fe, [mono])["input_features"], expected, rtol=0, atol=0)
    assert "channel" not in caplog.text


def test_stereo_array_equals_stereo_file(golden_processor, tmp_path):
    stereo = np.stack([tone(RATE, seed=6), tone(RATE, seed=7)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, RATE, subtype="DOUBLE")
    data, _ = sf.read(path, dtype="float64")  # (samples, channels), as soundfile returns it
    from_file = golden_processor(text="q", audio=path, return_tensors="pt")
    from_array = golden_processor(text="q", audio=data, sampling_rate=RATE, return_tensors="pt")
    torch.testing.assert_close(from_array["input_features"], from_file["input_features"], rtol=0, atol=0)


def test_missing_sampling_rate_warns_and_assumes_16k(fe, golden_processor, golden_audio_files, caplog):
    waveform = tone(RATE)
    with caplog.at_level(logging.WARNING):
        out = fe(waveform, return_tensors="pt")
    assert f"assuming {RATE} Hz" in caplog.text
    torch.testing.assert_close(out["input_features"], features(fe, waveform)["input_features"], rtol=0, atol=0)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        golden_processor(text="q", audio=waveform)
    assert f"assuming {RATE} Hz" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # files carry their own rate: nothing to warn about
        golden_processor(text="q", audio=golden_audio_files["a"])
    assert "assuming" not in caplog.text


def test_sampling_rate_with_files(golden_processor, golden_audio_files):
    # (wrong rates of waveforms: test_feature_extraction / test_processor test_wrong_sampling_rate)
    with pytest.raises(ValueError, match="files are read at their own rate"):
        golden_processor(text="q", audio=golden_audio_files["b"], sampling_rate=44100)
    same = golden_processor(text="q", audio=golden_audio_files["b"], sampling_rate=RATE, return_tensors="pt")
    plain = golden_processor(text="q", audio=golden_audio_files["b"], return_tensors="pt")
    torch.testing.assert_close(same["input_features"], plain["input_features"], rtol=0, atol=0)
    for bad in (0, -16000, 8000):
        with pytest.raises(ValueError, match="expects audio sampled at 16000 Hz"):
            golden_processor(text="q", audio=np.zeros(10), sampling_rate=bad)


def test_long_audio_truncation_or_error(fe, golden_processor, tmp_path, caplog):
    # (default truncation of waveforms with a warning: test_feature_extraction test_long_audio_is_truncated_...)
    long = tone(3 * WINDOW + 500, seed=8)
    with pytest.raises(ValueError, match=rf"Audio 0 has {3 * WINDOW + 500} samples .*truncation=False"):
        features(fe, long, truncation=False)
    with pytest.raises(ValueError, match="truncation=False"):
        fe.window_clips(long, sampling_rate=RATE, truncation=False)
    exact = features(fe, long[: 3 * WINDOW], truncation=False)["input_features"]  # exactly the limit is fine
    assert exact.shape[1] == 3

    processor_limit = golden_processor.feature_extractor.max_samples()
    long = tone(processor_limit + RATE, seed=9)
    with pytest.raises(ValueError, match="truncation=False"):
        golden_processor(text="q", audio=long, sampling_rate=RATE, truncation=False)
    path = tmp_path / "long.flac"
    sf.write(path, long, RATE, subtype="PCM_16")
    with pytest.raises(ValueError, match=r"long.flac' lasts .*\(truncation=False\)"):
        golden_processor(text="q", audio=path, audio_kwargs={"truncation": False})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = golden_processor(text="q", audio=path, return_tensors="pt")
    assert "long.flac' lasts" in caplog.text and "only the first" in caplog.text
    assert out["input_features"].shape[1] == golden_processor.feature_extractor.max_num_windows
    with pytest.raises(ValueError, match="truncation=False"):
        load_audio(path, max_seconds=1.0, truncation=False)


@pytest.mark.parametrize("length", [1, 2, 7, 1023, 1025, WINDOW - 1, WINDOW, WINDOW + 1])
@pytest.mark.parametrize("value", [0.3, -0.3])
def test_tiny_and_sub_window_audio(fe, length, value):
    waveform = np.full(length, value)
    waveform[::3] *= -0.5
    out = features(fe, waveform)
    expected_windows = 1 if length <= WINDOW else 2
    assert out["input_features"].shape == (1, expected_windows, fe.num_frames, fe.num_mel_bins)
    assert torch.isfinite(out["input_features"]).all()
    assert out["input_features_mask"].tolist() == [[1] * expected_windows]


def test_tiny_audio_through_the_model(golden_processor, model):
    inputs = golden_processor(text=["one sample", "a tenth of a second"], audio=[np.array([0.5]), tone(1600)],
                              sampling_rate=RATE, return_tensors="pt")
    result = generate(model, inputs)
    assert all(torch.isfinite(step).all() for step in result.logits)


def _cut(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def test_corrupt_truncated_and_non_audio_files(golden_processor, tmp_path):
    waveform = tone(3 * RATE, seed=10, amplitude=0.5)
    written = {}
    for fmt, subtype, ext in [("WAV", "PCM_16", "wav"), ("FLAC", "PCM_16", "flac"), ("OGG", "VORBIS", "ogg")]:
        path = tmp_path / f"full.{ext}"
        sf.write(path, waveform, RATE, format=fmt, subtype=subtype)
        written[ext] = path.read_bytes()

    # A WAV cut short on disk: libsndfile reads the frames that are there (documented in load_audio).
    cut_wav = tmp_path / "cut.wav"
    cut_wav.write_bytes(_cut(written["wav"], 0.5))
    partial = load_audio(cut_wav)
    assert 0 < partial.shape[0] < waveform.shape[0] and np.isfinite(partial).all()

    # Compressed streams cut short cannot be decoded: a typed error naming the file.
    for ext in ("flac", "ogg"):
        cut = tmp_path / f"cut.{ext}"
        cut.write_bytes(_cut(written[ext], 0.3))
        with pytest.raises(AudioLoadError, match=f"cut.{ext}"):
            golden_processor(text="q", audio=cut)

    zero = tmp_path / "zero_bytes.wav"
    zero.write_bytes(b"")
    with pytest.raises(AudioLoadError, match=r"zero_bytes.wav' is empty \(0 bytes\)"):
        load_audio(zero)

    rng = np.random.default_rng(11)
    not_audio = {
        "image.png": b"\x89PNG\r\n\x1a\n" + rng.bytes(400),
        "clip.m4a": b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00isomiso2" + rng.bytes(400),  # AAC: not libsndfile's
        "noise.bin": rng.bytes(1000),
        "notes.txt": "Ünïcödé text, not audio\n".encode() * 20,
    }
    for name, content in not_audio.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(AudioLoadError, match=rf"{name}.*not audio.*ffmpeg"):
            golden_processor(text="q", audio=path)
        with pytest.raises(AudioLoadError, match="ffmpeg"):
            load_audio(content)


# ==================================================================================================== text


def test_no_text(golden_processor):
    # (audio only: test_processor test_audio_only_call)
    with pytest.raises(ValueError, match="empty list"):
        golden_processor(text=[], audio=[], sampling_rate=RATE)
    with pytest.raises(ValueError, match="Pass text and audio"):
        golden_processor()
    with pytest.raises(ValueError, match="text is an empty list"):
        golden_processor(text=[], audio=np.zeros(10), sampling_rate=RATE)


def test_audio_tokens_are_counted_per_text(golden_processor):
    # (two <audio> in a single text: test_processor test_count_mismatch)
    with pytest.raises(ValueError, match="Text 1 contains 3 <audio>"):
        golden_processor(text=["fine", "<audio><audio><audio>q<SEP>"], audio=[np.zeros(10)] * 2, sampling_rate=RATE)
    with pytest.raises(ValueError, match="2 text.* 3 audio"):
        golden_processor(text=["a", "b"], audio=np.zeros((3, 100)), sampling_rate=RATE)


def test_over_long_prompts(golden_processor, caplog):
    # (default: truncated to 512 with a warning, test_processor test_truncation_warns)
    long_question = "word " * 700
    with pytest.raises(ValueError, match=r"Text\(s\) \[1\] have \[\d+\] tokens, more than max_length=512"):
        golden_processor(text=["short", long_question], audio=[np.zeros(10)] * 2, sampling_rate=RATE,
                         truncation=False)
    with pytest.raises(ValueError, match="max_length=512"):
        golden_processor(text=long_question, audio=np.zeros(10), sampling_rate=RATE,
                         text_kwargs={"truncation": False})
    unlimited = golden_processor(text=long_question, audio=np.zeros(10), sampling_rate=RATE, max_length=None)
    assert len(unlimited["input_ids"][0]) > 512
    assert unlimited["input_ids"][0][-1] == golden_processor.tokenizer.sep_token_id
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # audio-only strictness leaves the text truncation (with its warning)
        out = golden_processor(text=long_question, audio=np.zeros(10), sampling_rate=RATE,
                               audio_kwargs={"truncation": False})
    assert len(out["input_ids"][0]) == 512 and "Truncating text(s) [0]" in caplog.text


@pytest.mark.parametrize(
    "question",
    ["", "   ", "\n\t", "Qu'ENTENDS-tu ? ÉTÉ, Ça, ŒUVRE", "这是什么声音？", "Звук СОБАКИ?", "🎵🔊 music?", "İstanbul ß ǅ"],
)
def test_empty_and_non_ascii_questions(golden_processor, model, question):
    inputs = golden_processor(text=question, audio=tone(RATE), sampling_rate=RATE, return_tensors="pt")
    tokenizer = golden_processor.tokenizer
    expected = f"<audio>{question.lower().strip()}{tokenizer.sep_token}"  # the original prompt
    assert tokenizer.decode(inputs["input_ids"][0]) == expected
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == golden_processor.audio_token_id and ids[-1] == tokenizer.sep_token_id
    result = generate(model, inputs, max_new_tokens=3)
    assert all(torch.isfinite(step).all() for step in result.logits)


# ==================================================================================================== loading


@pytest.fixture(scope="module")
def saved_random(tmp_path_factory):
    folder = tmp_path_factory.mktemp("random_model")
    random_model().save_pretrained(folder)
    return folder


MISSING = "model.audio_transformer.layers.1.fc2.bias"
RESHAPED = "model.cross_attention_layers.0.ff_in.weight"


def test_from_pretrained_lists_missing_unexpected_and_mismatched(saved_random, tmp_path):
    def damage(state):
        del state[MISSING]
        del state["model.language_model.layers.2.mlp.up_proj.weight"]
        state["model.audio_transformer.extra.weight"] = torch.zeros(2)
        state[RESHAPED] = state[RESHAPED][:, :-1].contiguous()

    broken = edited_weights_copy(saved_random, tmp_path / "broken", damage)
    for cls in (AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model):
        with pytest.raises(CheckpointMismatchError) as error:
            cls.from_pretrained(broken)
        message = str(error.value)  # (the base model names its keys without the "model." prefix)
        assert cls.__name__ in message and "strict=False" in message
        assert "2 missing tensor(s)" in message and MISSING.removeprefix("model.") in message
        assert "language_model.layers.2.mlp.up_proj.weight" in message
        assert "1 unexpected tensor(s)" in message and "audio_transformer.extra.weight" in message
        assert "1 tensor(s) with another shape" in message
        assert f"{RESHAPED.removeprefix('model.')} (checkpoint (128, 31), model (128, 32))" in message
    assert issubclass(CheckpointMismatchError, ValueError)

    # Opt-outs: strict=False is transformers' behaviour (mismatched shapes still need ignore_mismatched_sizes).
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AudioFlamingo2ForConditionalGeneration.from_pretrained(broken, strict=False)
    loaded, info = AudioFlamingo2ForConditionalGeneration.from_pretrained(
        broken, strict=False, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert MISSING in info["missing_keys"] and "model.audio_transformer.extra.weight" in info["unexpected_keys"]
    assert not hasattr(loaded.config, "strict")
    # ignore_mismatched_sizes alone only excuses the shapes.
    with pytest.raises(CheckpointMismatchError) as error:
        AudioFlamingo2ForConditionalGeneration.from_pretrained(broken, ignore_mismatched_sizes=True)
    assert MISSING in str(error.value) and "another shape" not in str(error.value)


def test_from_pretrained_return_values_are_unchanged(saved_random, tmp_path):
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(saved_random)
    assert isinstance(model, AudioFlamingo2ForConditionalGeneration) and not model.training
    model, info = AudioFlamingo2ForConditionalGeneration.from_pretrained(saved_random, output_loading_info=True)
    assert isinstance(model, AudioFlamingo2ForConditionalGeneration)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    reshaped = edited_weights_copy(
        saved_random, tmp_path / "reshaped", lambda s: s.__setitem__(RESHAPED, s[RESHAPED][:, :-1].contiguous())
    )
    model, info = AudioFlamingo2ForConditionalGeneration.from_pretrained(
        reshaped, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert [key for key, *_ in info["mismatched_keys"]] == [RESHAPED]


def test_base_model_from_a_full_untied_checkpoint(tmp_path):
    # The lm_head of a full checkpoint is dropped without error when loading the base model, as in transformers.
    random_model(text_config=dict(tie_word_embeddings=False)).save_pretrained(tmp_path / "full")
    base = AudioFlamingo2Model.from_pretrained(tmp_path / "full")
    assert isinstance(base, AudioFlamingo2Model)
    no_head = edited_weights_copy(tmp_path / "full", tmp_path / "no_head", lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        AudioFlamingo2ForConditionalGeneration.from_pretrained(no_head)


def test_peft_adapters_still_load(saved_random, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = get_peft_model(AudioFlamingo2ForConditionalGeneration.from_pretrained(saved_random),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    inputs = dict(input_ids=torch.tensor([[3, 116, 7, 9, 119]]), input_features=random_features(1, 1),
                  input_features_mask=torch.ones(1, 1, dtype=torch.long))
    with torch.no_grad():
        expected = lora(**inputs).logits
        via_peft = PeftModel.from_pretrained(AudioFlamingo2ForConditionalGeneration.from_pretrained(saved_random),
                                             tmp_path / "adapter")
        # transformers' own adapter loading goes through the strict from_pretrained
        via_transformers = AudioFlamingo2ForConditionalGeneration.from_pretrained(tmp_path / "adapter")
        for loaded in (via_peft, via_transformers):
            torch.testing.assert_close(loaded(**inputs).logits, expected)


# ==================================================================================================== converter


def _release_copy(golden_dir, target: pathlib.Path) -> pathlib.Path:
    import shutil

    shutil.copytree(golden_dir / "original", target)
    return target


def test_converter_refuses_missing_chunk_and_missing_tensor(golden_dir, tmp_path):
    # (unknown keys / shapes: test_conversion; here: a half release must not become a half model)
    release = _release_copy(golden_dir, tmp_path / "no_chunk")
    (release / "safe_ckpt" / "chunk_1.safetensors").unlink()
    out = tmp_path / "out1"
    with pytest.raises(ConversionError, match="chunk_1.safetensors listed in metadata.json is missing"):
        convert_af2_checkpoint(release, golden_dir / "base_lm", out, progress=False, verbose=False)
    assert not out.exists()

    release = _release_copy(golden_dir, tmp_path / "no_tensor")
    chunk = release / "safe_ckpt" / "chunk_2.safetensors"
    state = load_file(str(chunk))
    dropped = sorted(k for k in state if k.startswith("lang_encoder.model.layers.") and "gated_cross_attn" in k)[0]
    del state[dropped]
    save_file(state, str(chunk))
    out = tmp_path / "out2"
    with pytest.raises(ConversionError, match="nothing was written") as error:
        convert_af2_checkpoint(release, golden_dir / "base_lm", out, progress=False, verbose=False)
    assert "missing" in str(error.value)
    assert not out.exists()

    release = _release_copy(golden_dir, tmp_path / "bad_chunk")
    (release / "safe_ckpt" / "chunk_0.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ConversionError, match="chunk_0.safetensors is not a readable safetensors file"):
        build_native_checkpoint(release, golden_dir / "base_lm", progress=False)


class _Payload:
    """Unpickling this object runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_clap_checkpoint_is_read_with_weights_only(golden_dir, tmp_path):
    clap = golden_dir / "original" / "clap_ckpt" / "epoch_16.pt"
    state = torch.load(clap, weights_only=True, map_location="cpu")
    marker = tmp_path / "code_ran"
    cases = {
        "payload": lambda path: torch.save({**state, "extra": _Payload(marker)}, path),
        "garbage": lambda path: path.write_bytes(np.random.default_rng(0).bytes(4096)),
        "cut": lambda path: path.write_bytes(clap.read_bytes()[:5000]),
    }
    for name, write in cases.items():
        release = _release_copy(golden_dir, tmp_path / name)
        write(release / "clap_ckpt" / "epoch_16.pt")
        out = tmp_path / f"{name}_out"
        expected = "Refusing to load CLAP checkpoint" if name != "cut" else "not a readable PyTorch checkpoint"
        with pytest.raises(ConversionError, match=expected) as error:
            convert_af2_checkpoint(release, golden_dir / "base_lm", out, progress=False, verbose=False)
        assert "epoch_16.pt" in str(error.value)
        assert not out.exists()
        if name == "payload":
            assert "weights_only=True" in str(error.value)
    assert not marker.exists()  # the pickled payload never ran


def test_base_lm_bin_is_read_with_weights_only(golden_dir, tmp_path):
    import shutil

    base = tmp_path / "base_lm"
    shutil.copytree(golden_dir / "base_lm", base)
    state = load_file(str(base / "model.safetensors"))
    (base / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    torch.save({**state, "extra": _Payload(marker)}, base / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"Refusing to load base LM weights .*pytorch_model.bin"):
        build_native_checkpoint(golden_dir / "original", base, progress=False)
    assert not marker.exists()


UNSAFE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz"}


def test_only_safetensors_are_written(tmp_path):
    converted = converted_tiny_dir()
    files = [p for p in converted.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not [p.name for p in files if p.suffix in UNSAFE_SUFFIXES]
    model = random_model()
    model.save_pretrained(tmp_path / "saved")
    saved = [p for p in (tmp_path / "saved").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in saved)
    assert not [p.name for p in saved if p.suffix in UNSAFE_SUFFIXES]


# ==================================================================================================== concurrency


def test_concurrent_pipeline_calls_match_sequential(golden_json, golden_audio_files):
    # One shared pipeline, 4 threads at once (released together by a barrier): the model keeps no per-call state, so
    # every thread gets exactly the answers of the sequential run.
    from transformers import pipeline

    pipe = pipeline("audio-question-answering", model=str(converted_tiny_dir()), trust_remote_code=True)
    requests = [
        {"audio": str(golden_audio_files["a"]), "question": golden_json["prompts"]["a"]},
        {"audio": str(golden_audio_files["b"]), "question": golden_json["prompts"]["b"]},
        {"audio": {"raw": np.zeros(RATE), "sampling_rate": RATE}, "question": "is it quiet?"},
        {"audio": {"raw": tone(2 * RATE, seed=12), "sampling_rate": RATE}, "question": "what is the SOUND?"},
    ]

    def answer(request):
        return pipe(request, generate_kwargs={"max_new_tokens": 6, "do_sample": False})["answer"]

    sequential = [answer(request) for request in requests]
    assert len(set(sequential)) == len(requests)  # different answers: a mix-up would show
    assert sequential[0] == golden_json["decoded"]["a.greedy"][: len(sequential[0])]
    barrier = threading.Barrier(len(requests))

    def answer_together(request):
        barrier.wait(timeout=60)
        return answer(request)

    for _ in range(2):
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            assert list(pool.map(answer_together, requests)) == sequential


def test_arrays_torch_cannot_share_give_the_same_features(fe):
    """Big-endian, read-only and negatively strided numpy waveforms are featurised like the plain array."""
    rng = np.random.default_rng(3)
    plain = rng.uniform(-0.9, 0.9, RATE)
    expected = features(fe, plain)["input_features"]
    read_only = plain.copy()
    read_only.flags.writeable = False
    reversed_twice = plain[::-1].copy()[::-1]
    for waveform in (plain.astype(">f8"), read_only, reversed_twice):
        torch.testing.assert_close(features(fe, waveform)["input_features"], expected, rtol=0, atol=0)
    pcm = (plain * 32767).astype(np.int16)
    torch.testing.assert_close(features(fe, pcm.astype(">i2"))["input_features"],
                               features(fe, pcm)["input_features"], rtol=0, atol=0)
