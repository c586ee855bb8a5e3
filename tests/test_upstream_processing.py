"""transformers' own ProcessorTesterMixin, unchanged, against AudioFlamingo2Processor built from the golden tokenizer.

The mixin comes from the installed release's source distribution (``upstream_suite``); it resolves two audio fixtures
relative to the working directory, so every test runs in the suite's folder. Nothing is downloaded: the processor is
built from the golden base tokenizer (prepared as the AF2 tokenizer) and a default feature extractor.
"""

import unittest

import pytest
from transformers import AutoTokenizer

import af2_testing
import upstream_suite

SUITE = upstream_suite.install()
from tests.test_processing_common import ProcessorTesterMixin  # noqa: E402

from af2_hf import AudioFlamingo2FeatureExtractor, AudioFlamingo2Processor, prepare_af2_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def _in_suite_folder(monkeypatch):
    monkeypatch.chdir(SUITE)


class AudioFlamingo2ProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = AudioFlamingo2Processor

    @classmethod
    def _setup_tokenizer(cls):
        return prepare_af2_tokenizer(AutoTokenizer.from_pretrained(af2_testing.golden_dir() / "base_lm"))

    @classmethod
    def _setup_feature_extractor(cls):
        return AudioFlamingo2FeatureExtractor(max_num_windows=2)
