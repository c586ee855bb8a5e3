"""transformers' own ConfigTester, unchanged, against AudioFlamingo2Config (issue #14), and the same checks on the
nested text / audio configs of a non-default AF2 config (round trips, sub-config classes, overrides, Auto)."""

import json
import tempfile
import unittest

import upstream_suite
from af2_testing import tiny_config

SUITE = upstream_suite.install()
from tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers import AutoConfig, ClapAudioConfig, Qwen2Config  # noqa: E402

from af2_hf import AudioFlamingo2Config  # noqa: E402


class TinyConfigSource:
    """What ConfigTester's composite-kwargs check reads from the test's model tester: a non-default config."""

    def get_config(self):
        return tiny_config()


class AudioFlamingo2ConfigTest(unittest.TestCase):
    def setUp(self):
        self.model_tester = TinyConfigSource()
        # Top-level kwargs only: ConfigTester compares each kwarg with the saved JSON value.
        self.config_tester = ConfigTester(
            self, config_class=AudioFlamingo2Config, has_text_modality=False,
            audio_transformer_num_layers=2, cross_attention_every_n_layers=2, audio_tower_batch_size=4,
        )
        # The same checks with both sub-configs given as a saved config.json holds them (their non-default values).
        nested = json.loads(tiny_config().to_json_string())
        self.nested_tester = ConfigTester(
            self, config_class=AudioFlamingo2Config, has_text_modality=False,
            text_config=nested["text_config"], audio_config=nested["audio_config"],
            audio_transformer_num_heads=nested["audio_transformer_num_heads"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_config_with_nested_sub_configs(self):
        self.nested_tester.run_common_tests()

    def test_sub_configs_are_their_own_classes(self):
        config = tiny_config()
        self.assertIsInstance(config.text_config, Qwen2Config)
        self.assertIsInstance(config.audio_config, ClapAudioConfig)
        self.assertEqual(config.get_text_config(decoder=True), config.text_config)
        with tempfile.TemporaryDirectory() as folder:
            config.save_pretrained(folder)
            # Each sub-config loads from the AF2 folder with its own class, equal to the nested one.
            text, audio = Qwen2Config.from_pretrained(folder), ClapAudioConfig.from_pretrained(folder)
            self.assertEqual(text.to_dict() | {"transformers_version": None},
                             config.text_config.to_dict() | {"transformers_version": None})
            self.assertEqual(audio.patch_embeds_hidden_size, config.audio_config.patch_embeds_hidden_size)
            # AutoConfig gives the AF2 config back, with the same nested values.
            auto = AutoConfig.from_pretrained(folder)
            self.assertIsInstance(auto, AudioFlamingo2Config)
            direct = AudioFlamingo2Config.from_pretrained(folder)
            self.assertEqual(auto.to_dict() | {"_name_or_path": None}, direct.to_dict() | {"_name_or_path": None})

    def test_nested_overrides_keep_the_other_values(self):
        config = tiny_config()
        with tempfile.TemporaryDirectory() as folder:
            config.save_pretrained(folder)
            reloaded = AudioFlamingo2Config.from_pretrained(folder, text_config={"max_position_embeddings": 64})
        self.assertEqual(reloaded.max_position_embeddings, 64)
        expected = config.text_config.to_dict() | {"max_position_embeddings": 64}
        self.assertEqual(reloaded.text_config.to_dict(), expected)
        self.assertEqual(reloaded.audio_config.to_dict(), config.audio_config.to_dict())

    def test_derived_sizes_follow_the_sub_configs(self):
        config = tiny_config()
        self.assertEqual(config.audio_hidden_size, 16 * 2**3)
        self.assertEqual(config.audio_transformer_head_dim, config.audio_hidden_size // 2)
        self.assertEqual(config.cross_attention_layers, [0, 1, 2])
        self.assertEqual(tiny_config(cross_attention_every_n_layers=2).cross_attention_layers, [1])
        self.assertEqual(config.tie_word_embeddings, config.text_config.tie_word_embeddings)


if __name__ == "__main__":
    unittest.main()
