"""`datasets` audio columns as users have them, straight into the processor and the pipeline.

A real `datasets.Dataset` is built from the golden audio files (16 kHz mono WAV, 44.1 kHz stereo WAV, FLAC). Its audio
values in every form `datasets` gives them (``Audio(decode=False)`` dicts ``{"path", "bytes"}``, decoded dicts
``{"array", "sampling_rate"}``, and with torchcodec importable the ``AudioDecoder`` of ``Audio()``) must give the
model exactly the inputs that the files themselves give. Where torchcodec cannot be imported (datasets 4+ decodes
audio with it), ``Audio(decode=False)`` with af2_hf's own loader in ``Dataset.map`` is the documented way.
"""

import numpy as np
import pytest
import torch
from datasets import Audio, Dataset
from transformers import pipeline
from transformers.pipelines.pt_utils import KeyDataset

from af2_hf import AudioFlamingo2Processor, load_audio
from af2_testing import converted_tiny_dir, load_converted_model

CASES = ["a", "b", "c"]
GREEDY = {"do_sample": False, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def processor():
    return AudioFlamingo2Processor.from_pretrained(converted_tiny_dir())


@pytest.fixture(scope="module")
def af2_pipe(processor):
    return pipeline("audio-question-answering", model=load_converted_model("sdpa"), processor=processor)


@pytest.fixture(scope="module")
def undecoded(golden_audio_files, golden_json):
    """A Dataset of the golden files with Audio(decode=False): rows hold {"path", "bytes"}."""
    dataset = Dataset.from_dict({
        "audio": [str(golden_audio_files[case]) for case in CASES],
        "question": [golden_json["prompts"][case] for case in CASES],
    })
    return dataset.cast_column("audio", Audio(decode=False))


def _features(processor, audio, question):
    inputs = processor(text=question, audio=audio, return_tensors="pt")
    return {key: inputs[key] for key in ("input_ids", "attention_mask", "input_features", "input_features_mask")}


def _assert_same(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_undecoded_rows_go_straight_into_the_processor_and_the_pipeline(undecoded, processor, af2_pipe,
                                                                       golden_audio_files, golden_json):
    for index, case in enumerate(CASES):
        row = undecoded[index]
        assert set(row["audio"]) == {"path", "bytes"}
        path = str(golden_audio_files[case])
        expected = _features(processor, path, row["question"])
        _assert_same(_features(processor, row["audio"], row["question"]), expected)
        embedded = {"path": None, "bytes": golden_audio_files[case].read_bytes()}  # e.g. a dataset from the Hub
        _assert_same(_features(processor, embedded, row["question"]), expected)
    answers = af2_pipe(KeyDataset(undecoded, "audio"), question=golden_json["prompts"]["a"], batch_size=2, **GREEDY)
    by_path = af2_pipe([str(golden_audio_files[case]) for case in CASES], question=golden_json["prompts"]["a"],
                       batch_size=2, **GREEDY)
    assert list(answers) == by_path
    rows = [{"audio": row["audio"], "question": row["question"]} for row in undecoded]
    expected = [{"answer": golden_json["decoded"][f"{case}.greedy"]} for case in CASES]
    assert af2_pipe(rows, batch_size=3, do_sample=False, max_new_tokens=12) == expected


def test_decoded_dicts_and_the_package_loader_in_dataset_map(undecoded, processor, af2_pipe, golden_audio_files,
                                                             golden_json):
    """The torchcodec-free route: Audio(decode=False) + af2_hf.load_audio in Dataset.map gives a column of decoded
    dicts {"array", "sampling_rate"} (what a decoded audio column holds), equal to the files as model input."""
    rate = processor.feature_extractor.sampling_rate
    max_seconds = processor.feature_extractor.max_audio_seconds()

    def decode(example):
        waveform = load_audio(example["audio"], sampling_rate=rate, max_seconds=max_seconds)
        return {"decoded": {"array": waveform, "sampling_rate": rate}}

    decoded = undecoded.map(decode)
    assert decoded.features["decoded"]["array"].feature.dtype == "float64"  # stored without loss
    for index, case in enumerate(CASES):
        value = decoded[index]["decoded"]  # a list of floats, as datasets returns an unformatted column
        assert value["sampling_rate"] == rate
        assert np.array_equal(np.asarray(value["array"]), load_audio(str(golden_audio_files[case]),
                                                                     max_seconds=max_seconds))
        question = golden_json["prompts"][case]
        _assert_same(_features(processor, value, question), _features(processor, str(golden_audio_files[case]),
                                                                       question))
        assert af2_pipe(value, question=question, do_sample=False, max_new_tokens=12) == {
            "answer": golden_json["decoded"][f"{case}.greedy"]}

    # A decoded dict at the file's own rate (44.1 kHz stereo b.wav as a user would decode it: channel 0) is
    # resampled by the loader exactly as the file is.
    import soundfile as sf

    data, file_rate = sf.read(golden_audio_files["b"], dtype="float64")
    own_rate = {"array": data[:, 0], "sampling_rate": file_rate}
    question = golden_json["prompts"]["b"]
    _assert_same(_features(processor, own_rate, question), _features(processor, str(golden_audio_files["b"]),
                                                                      question))


def _torchcodec_usable() -> bool:
    try:
        from torchcodec.decoders import AudioDecoder  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # not installed, or its FFmpeg libraries are missing
        return False
    return True


# torchcodec's PyPI wheels link CUDA's libnvrtc (its CPU wheels are on the PyTorch index only), so it cannot load on
# the CPU-only CI machine; there the test below runs instead, and the Audio(decode=False) route above is tested.
@pytest.mark.skipif(not _torchcodec_usable(), reason="torchcodec (with FFmpeg) is not importable: datasets cannot "
                    "decode audio here; the Audio(decode=False) route above is the one to use")
def test_audio_decoder_column(undecoded, processor, af2_pipe, golden_audio_files, golden_json):
    decoding = undecoded.cast_column("audio", Audio())
    for index, case in enumerate(CASES):
        decoder = decoding[index]["audio"]
        assert hasattr(decoder, "get_all_samples")
        question = golden_json["prompts"][case]
        _assert_same(_features(processor, decoder, question),
                     _features(processor, str(golden_audio_files[case]), question))
    answer = af2_pipe(decoding[0]["audio"], question=golden_json["prompts"]["a"], do_sample=False, max_new_tokens=12)
    assert answer == {"answer": golden_json["decoded"]["a.greedy"]}


def test_without_torchcodec_a_decoding_column_says_what_to_do(undecoded):
    """Documents the situation the decode=False route answers: datasets itself refuses to decode."""
    if _torchcodec_usable():
        pytest.skip("torchcodec is importable here: decoded columns work (test_audio_decoder_column)")
    with pytest.raises(ImportError, match="torchcodec"):
        undecoded.cast_column("audio", Audio())[0]["audio"]
