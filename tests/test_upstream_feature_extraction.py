"""transformers' own ``SequenceFeatureExtractionTestMixin`` (with ``FeatureExtractionSavingTestMixin``), unchanged,
against AudioFlamingo2FeatureExtractor.

The mixin comes from the installed transformers release's source distribution (``tests/upstream_suite.py``). It
checks the common feature-extractor contract: properties, ``BatchFeature`` conversion, ``pad`` / truncation of
feature sequences (with and without attention masks, from lists, arrays and tensors) and the JSON / save_pretrained
round trips. The tester below is this package's own; like transformers' Whisper feature extractor test, it feeds
``pad`` sequences of ``(frames, feature_size)`` features, and it runs every test of the mixin (Whisper's skips none).
"""

import unittest

import numpy as np

import upstream_suite

SUITE = upstream_suite.install()

from tests.test_sequence_feature_extraction_common import SequenceFeatureExtractionTestMixin  # noqa: E402

from af2_hf import AudioFlamingo2FeatureExtractor  # noqa: E402


def random_frames(num_frames: int, feature_size: int, rng: np.random.Generator) -> list[list[float]]:
    """A feature sequence as nested Python lists, values in [0, 1)."""
    return rng.random((num_frames, feature_size)).tolist()


class AudioFlamingo2FeatureExtractionTester:
    """Small settings (a 0.1 s window at 16 kHz, 10 mel bins) and feature sequences of increasing length."""

    def __init__(self, batch_size=7, min_seq_length=400, max_seq_length=2000, feature_size=10, padding_value=0.0,
                 sampling_rate=16000, return_attention_mask=False, seed=0):
        self.batch_size = batch_size
        self.min_seq_length = min_seq_length
        self.max_seq_length = max_seq_length
        self.seq_length_diff = (max_seq_length - min_seq_length) // (batch_size - 1)
        self.feature_size = feature_size
        self.padding_value = padding_value
        self.sampling_rate = sampling_rate
        self.return_attention_mask = return_attention_mask
        self.rng = np.random.default_rng(seed)

    def prepare_feat_extract_dict(self):
        return {
            "num_mel_bins": self.feature_size,
            "sampling_rate": self.sampling_rate,
            "window_length": 0.1,
            "max_num_windows": 4,
            "n_fft": 256,
            "hop_length": 64,
            "f_min": 0.0,
            "f_max": 8000.0,
            "padding_value": self.padding_value,
            "return_attention_mask": self.return_attention_mask,
        }

    def prepare_inputs_for_common(self, equal_length=False, numpify=False):
        lengths = ([self.max_seq_length] * self.batch_size if equal_length
                   else range(self.min_seq_length, self.max_seq_length, self.seq_length_diff))
        inputs = [random_frames(length, self.feature_size, self.rng) for length in lengths]
        return [np.asarray(x) for x in inputs] if numpify else inputs


class AudioFlamingo2FeatureExtractionTest(SequenceFeatureExtractionTestMixin, unittest.TestCase):
    feature_extraction_class = AudioFlamingo2FeatureExtractor

    def setUp(self):
        self.feat_extract_tester = AudioFlamingo2FeatureExtractionTester()

    def test_tester_settings_make_a_working_extractor(self):
        """The tester's settings are a valid AF2 configuration that featurises audio (not only pads)."""
        extractor = self.feature_extraction_class(**self.feat_extract_dict)
        out = extractor([np.linspace(-0.5, 0.5, 3000), np.linspace(0.2, -0.2, 900)], sampling_rate=16000,
                        return_tensors="np", return_attention_mask=True)
        self.assertEqual(out["input_features"].shape, (2, 2, extractor.num_frames, 10))
        self.assertEqual(out["input_features_mask"].tolist(), [[1, 1], [1, 0]])
