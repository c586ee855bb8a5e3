"""Shared fixtures: the golden data of the original implementation and the AF2 tokenizer / processor built from it.

The golden folder is ``../shared/golden/tiny`` beside the checkout (``AF2_GOLDEN_DIR`` overrides it). A missing
golden folder fails the tests that need it; it never skips them.
"""

import json
from pathlib import Path

import pytest

import af2_testing


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden folder (expected.safetensors, expected.json, audio/, base_lm/, original/)."""
    try:
        return af2_testing.golden_dir()
    except FileNotFoundError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def golden(golden_dir) -> dict:
    """Golden tensors (torch) of the original implementation, by name (e.g. ``a.mel``, ``batch.input_ids``)."""
    return af2_testing.golden_tensors()


@pytest.fixture(scope="session")
def model(golden_dir):
    """The golden original release converted with the converter and loaded with from_pretrained (SDPA, eval)."""
    return af2_testing.load_converted_model("sdpa")


@pytest.fixture(scope="session")
def golden_json(golden_dir) -> dict:
    """expected.json: prompts, decoded texts, configuration summary, token ids, versions."""
    with open(golden_dir / "expected.json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="session")
def golden_audio_files(golden_dir, golden_json) -> dict:
    """Case name -> audio path, as listed in expected.json."""
    return {case: golden_dir / "audio" / info["file"] for case, info in golden_json["audio_files"].items()}


@pytest.fixture(scope="session")
def af2_tokenizer(golden_dir):
    """The golden base tokenizer prepared as AF2 tokenizer (shared: do not modify it in a test)."""
    from transformers import AutoTokenizer

    from af2_hf.tokenization_audioflamingo2 import prepare_af2_tokenizer

    return prepare_af2_tokenizer(AutoTokenizer.from_pretrained(golden_dir / "base_lm"))


@pytest.fixture(scope="session")
def golden_feature_extractor(golden_json):
    """A feature extractor with the golden windowing (clap_config of expected.json) and default mel settings."""
    from af2_hf.feature_extraction_audioflamingo2 import AudioFlamingo2FeatureExtractor

    clap = golden_json["config"]["clap_config"]
    audio = golden_json["config"]["htsat"]
    return AudioFlamingo2FeatureExtractor(
        num_mel_bins=audio["mel_bins"],
        sampling_rate=audio["sample_rate"],
        window_length=float(clap["window_length"]),
        window_overlap=float(clap["window_overlap"]),
        max_num_windows=clap["max_num_window"],
        n_fft=audio["window_size_stft"],
        hop_length=audio["hop_size"],
        f_min=float(audio["fmin"]),
        f_max=float(audio["fmax"]),
    )


@pytest.fixture(scope="session")
def golden_processor(golden_feature_extractor, af2_tokenizer):
    """AudioFlamingo2Processor with the golden feature extractor and the prepared golden tokenizer."""
    from af2_hf.processing_audioflamingo2 import AudioFlamingo2Processor

    return AudioFlamingo2Processor(golden_feature_extractor, af2_tokenizer)
