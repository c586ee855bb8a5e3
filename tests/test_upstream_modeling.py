"""transformers' own ``ModelTesterMixin`` and ``GenerationTesterMixin``, run unchanged against a tiny Audio Flamingo 2.

Every inputs dict holds ``input_features`` with two windows per sample, the second one padding (its row of
``input_features_mask`` is 0), and the cross-attention gates of every model the mixins build are opened (the
tester's ``_init_weights`` hook below), so the audio moves the logits and every test exercises the audio path.

No test is skipped by this class on the current transformers (on an older release, one whose mixin predates an
upstream fix: see ``test_keep_in_fp32_modules`` below). What it sets, as transformers' own model tests do: `_prepare_for_class` adds the
causal-LM labels the mixin adds by name only for classes in transformers' Auto mappings; the mixin's cache-check hook
`_check_past_key_values_for_generate` checks the decoder's layers with the mixin's own check and the gated
cross-attention blocks' audio layers after them; `skip_test_audio_features_output_shape` (the mixin expects CLAP's
projection width) and `test_can_init_all_missing_weights_before_2023` (runs a check the mixin would skip for want
of a copyright year). The mixins' own conditional skips remain (no accelerator / FlashAttention kernels / deepspeed,
the HTSAT tower without SDPA, the composite config without a top-level `use_cache`); the generation contracts behind
them are tested in ``tests/test_generation_contracts.py``.
"""

import inspect
import unittest

import torch
from transformers.cache_utils import Cache, DynamicCache, StaticCache

import upstream_suite


SUITE = upstream_suite.install()

from tests.generation.test_utils import GenerationTesterMixin  # noqa: E402
from tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor  # noqa: E402
from transformers.testing_utils import torch_device  # noqa: E402

from af2_hf import AudioFlamingo2Config, AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model  # noqa: E402
from af2_hf.modeling_audioflamingo2 import AudioFlamingo2GatedCrossAttentionBlock  # noqa: E402


#: Gate values of the tiny models (fresh AF2 gates are 0: the language model would ignore the audio).
OPEN_ATTN_GATE, OPEN_FF_GATE = 0.7, 0.4


class AudioFlamingo2ModelTester:
    """Tiny AF2: a 2-stage HTSAT on 8 mel bins x 20 frames (16 tokens per window), a 2-layer audio transformer and
    a 2-layer Qwen2 with a gated cross-attention block before each decoder layer. The mixins read the number of
    audio-encoder layers `get_audio_features` reports from `num_hidden_layers`, hence the same depth for both."""

    def __init__(self, parent, batch_size=3, seq_length=7, windows=2, frames=20, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.windows = windows
        self.frames = frames
        self.is_training = is_training
        # hidden_size: the HTSAT output width, patch_embeds_hidden_size * 2 ** (len(depths) - 1)
        self.audio_config = dict(
            spec_size=32, num_mel_bins=8, patch_embeds_hidden_size=8, depths=[1, 1], num_attention_heads=[2, 2],
            window_size=4, enable_fusion=False, hidden_size=16,
        )
        self.text_config = dict(
            model_type="qwen2", vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            pad_token_id=1, bos_token_id=0, eos_token_id=2,
        )
        self.vocab_size = self.text_config["vocab_size"]
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.encoder_seq_length = seq_length

    def get_config(self):
        return AudioFlamingo2Config(
            audio_config=self.audio_config, text_config=self.text_config,
            audio_transformer_num_layers=self.num_hidden_layers, audio_transformer_num_heads=2, audio_transformer_intermediate_size=24,
            audio_transformer_rotary_dim=4, cross_attention_num_heads=2, cross_attention_head_dim=8,
            cross_attention_ff_mult=2, tokens_per_window=16,
            audio_token_id=95, end_of_chunk_token_id=96, pad_token_id=1, sep_token_id=98, eos_token_id=2,
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.seq_length], 90) + 3  # no pad / eos / AF2 special tokens
        attention_mask = torch.ones_like(input_ids)
        attention_mask[:, :1] = 0  # left padding
        features = floats_tensor([self.batch_size, self.windows, self.frames, self.audio_config["num_mel_bins"]])
        window_mask = torch.zeros(self.batch_size, self.windows, dtype=torch.long, device=input_ids.device)
        window_mask[:, : self.windows - 1] = 1  # the last window of every sample is padding
        return config, {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "input_features": features * 4 - 2,
            "input_features_mask": window_mask,
        }


class _OpenGates:
    """Opens the cross-attention gates of every tiny model the mixins build (after transformers' weight init)."""

    def __init__(self):
        self.original = AudioFlamingo2ForConditionalGeneration._init_weights

    def __enter__(self):
        original = self.original

        def init_weights(model, module):
            original(model, module)
            if isinstance(module, AudioFlamingo2GatedCrossAttentionBlock):
                with torch.no_grad():
                    module.attn_gate.fill_(OPEN_ATTN_GATE)
                    module.ff_gate.fill_(OPEN_FF_GATE)

        for cls in (AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model):
            cls._init_weights = init_weights
        return self

    def __exit__(self, *exc):
        for cls in (AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model):
            cls._init_weights = self.original
        return False


class AudioFlamingo2ModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    # As transformers' audioflamingo3, qwen2_audio and mllama tests: the model with the LM head (the base model's
    # training and loss tests need a head; it is exercised inside this one and in tests/test_modeling.py).
    all_model_classes = (AudioFlamingo2ForConditionalGeneration,)
    all_generative_model_classes = (AudioFlamingo2ForConditionalGeneration,)
    pipeline_model_mapping = {}
    _is_composite = True
    # The mixin expects get_audio_features' width to be audio_config.projection_dim (CLAP's projection head). AF2
    # uses no projection: its audio states are the audio transformer's, audio_hidden_size wide (shape checked in
    # tests/test_modeling.py::test_audio_features_shape_and_batched_tower_calls); the mixin's own switch for that.
    skip_test_audio_features_output_shape = True
    # The mixin dates a model by a "# Copyright <year>" header in its config module and skips this weight-init check
    # for undated ones; AF2's is run.
    test_can_init_all_missing_weights_before_2023 = True

    if "is_floating_point" not in inspect.getsource(ModelTesterMixin.test_keep_in_fp32_modules):
        # Only where the installed release's mixin predates its fix (5.17): that version of the test demands that
        # EVERY state-dict tensor outside the fp32 lists load as float16, integer buffers included, so any model with
        # an integer buffer (HTSAT's relative_position_index) fails it; 5.24's version skips non-floating tensors.
        # The contract (audio path float32, the rest in the requested dtype, integer buffers untouched) is tested in
        # tests/test_mixed_precision.py on every release.
        @unittest.skip("this transformers release's test_keep_in_fp32_modules casts integer buffers (fixed upstream)")
        def test_keep_in_fp32_modules(self):
            pass

    def setUp(self):
        self.model_tester = AudioFlamingo2ModelTester(self)
        self._gates = _OpenGates().__enter__()

    def tearDown(self):
        self._gates.__exit__(None, None, None)

    def test_tester_inputs_exercise_the_audio(self):
        """The gates are open and the second window is padding: other audio in the real window moves the logits,
        other audio in the padding window does not."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = AudioFlamingo2ForConditionalGeneration(config).eval()
        real, padding = inputs["input_features"].clone(), inputs["input_features"].clone()
        real[:, 0] += 1.0
        padding[:, 1] += 1.0
        with torch.no_grad():
            logits = model(**inputs).logits
            moved = model(**{**inputs, "input_features": real}).logits
            unmoved = model(**{**inputs, "input_features": padding}).logits
        self.assertGreater((logits - moved).abs().max().item(), 1e-4)
        torch.testing.assert_close(logits, unmoved, rtol=1e-5, atol=1e-6)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """The mixin adds causal-LM labels for the classes transformers' own Auto mappings list by name; AF2 lives
        outside transformers, so the same labels are added here for its causal LM."""
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is AudioFlamingo2ForConditionalGeneration:
            inputs_dict["labels"] = torch.zeros(
                (self.model_tester.batch_size, self.model_tester.seq_length), dtype=torch.long, device=torch_device
            )
        return inputs_dict

    def _check_past_key_values_for_generate(self, batch_size, past_key_values, seq_length, config):
        """The mixin's hook for caches that hold more than the decoder's layers (its default asserts one layer per
        text layer): the first `num_hidden_layers` layers are checked by the mixin itself; the next ones, one per
        gated cross-attention block, must hold each sample's projected audio keys/values."""
        text_config = config.get_text_config(decoder=True)
        layers = text_config.num_hidden_layers
        self.assertIsInstance(past_key_values, DynamicCache if not past_key_values.is_compileable else StaticCache)
        super()._check_past_key_values_for_generate(
            batch_size, Cache(layers=past_key_values.layers[:layers]), seq_length, config
        )
        af2_config = self.model_tester.get_config()
        cross_layers = past_key_values.layers[layers:]
        self.assertEqual(len(cross_layers), len(af2_config.cross_attention_layers))
        audio_shape = (
            batch_size,
            af2_config.cross_attention_num_heads,
            self.model_tester.windows * af2_config.tokens_per_window,
            af2_config.cross_attention_head_dim,
        )
        for layer in cross_layers:
            self.assertEqual(tuple(layer.keys.shape), audio_shape)
            self.assertEqual(tuple(layer.values.shape), audio_shape)
