"""Loading and configuration validation (issues #14 item 7, #16 items 3, 4, 5, 7): af2_hf.loading and the config.

Every bad folder, weight file or config ends in a typed error that names the file or field (CheckpointFileError,
ModelFolderError: OSError; ModelTypeError, CheckpointMismatchError and the config's validation errors: ValueError),
raised before a model is built; ``output_loading_info=True`` reports instead of raising, as transformers does.
"""

import json
import logging
import pathlib
import shutil
import struct

import pytest
import torch
from af2_testing import edited_weights_copy, random_features, random_model, tiny_config
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForMultimodalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from af2_hf import AudioFlamingo2Config, AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model
from af2_hf.configuration_audioflamingo2 import MAX_PARAMETERS_ENV, ConfigValidationError, parameter_count_estimate
from af2_hf.loading import (
    CheckpointFileError,
    CheckpointMismatchError,
    ModelFolderError,
    ModelTypeError,
    check_checkpoint_files,
    original_release_hint,
    strict_from_pretrained,
)

MODEL_CLASSES = [AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model, AutoModelForMultimodalLM]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    random_model().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("sharded") / "model"
    random_model().save_pretrained(folder, max_shard_size="800KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    return folder


def copy_of(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test if an AF2 model is constructed (the checks must come before any allocation)."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a model was built before the problem was reported")

    for cls in (AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model):
        monkeypatch.setattr(cls, "__init__", refuse)


# ==================================================================================================== weight files


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def _first_tensor(header: dict) -> str:
    return sorted(name for name in header if name != "__metadata__")[0]


def _edit_header(edit):
    def apply(data: bytes) -> bytes:
        header, payload = _split(data)
        edit(header)
        return _join(header, payload)

    return apply


def _set_entry(field, value):
    return _edit_header(lambda h: h[_first_tensor(h)].__setitem__(field, value))


# name -> (how to damage the bytes of a safetensors file, what the error must say)
CORRUPTIONS = {
    "truncated_half": (lambda d: d[: len(d) // 2],
                       r"is truncated: its header declares \d+ bytes .* \(\d+ bytes missing\)"),
    "truncated_header": (lambda d: d[:100], r"declare a \d+-byte header; the file holds 100 bytes"),
    "seven_bytes": (lambda d: d[:7], r"is truncated: 7 bytes"),
    "zero_bytes": (lambda d: b"", r"is empty \(0 bytes\)"),
    "garbage": (lambda d: bytes(range(256)) * 20, r"not a valid safetensors file"),
    "lfs_pointer": (lambda d: b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
                    "Git LFS pointer"),
    "zip_file": (lambda d: b"PK\x03\x04" + bytes(200), r"zip/pickle \(torch.save\)"),
    "pickle_file": (lambda d: b"\x80\x02" + bytes(200), r"zip/pickle \(torch.save\)"),
    "header_not_json": (lambda d: struct.pack("<Q", 10) + b"{not json}" + d[8:], "not valid JSON"),
    "header_is_a_list": (lambda d: _join([1, 2], b""), "a JSON list"),
    "unknown_dtype": (_set_entry("dtype", "F99"), r"unknown dtype 'F99'"),
    "wrong_dtype": (_set_entry("dtype", "F16"), r"\(F16, shape .*\) needs \d+ bytes but its offsets span \d+"),
    "negative_shape": (_set_entry("shape", [-1, 4]), r"invalid shape \[-1, 4\]"),
    "reversed_offsets": (_set_entry("data_offsets", [8, 0]), r"invalid data offsets \[8, 0\]"),
    "entry_not_a_dict": (_edit_header(lambda h: h.__setitem__(_first_tensor(h), "x")), "malformed header entry"),
    "trailing_bytes": (lambda d: d + bytes(64), "64 bytes follow the last tensor"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_safetensors_file_is_named(saved, tmp_path, name, no_model_built):
    damage, expected = CORRUPTIONS[name]
    folder = copy_of(saved, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    for cls in MODEL_CLASSES:
        with pytest.raises(CheckpointFileError, match=expected) as error:
            cls.from_pretrained(folder)
        assert str(weights) in str(error.value)
        assert isinstance(error.value, OSError)
    with pytest.raises(CheckpointFileError, match=expected):  # also with the relaxed modes
        AudioFlamingo2ForConditionalGeneration.from_pretrained(folder, strict=False, output_loading_info=True)


# name -> (how to damage a sharded folder, what the error must say)
def _rename_shard_in_index(folder):
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = sorted(data["weight_map"])[0]
    data["weight_map"][key] = "model-99999-of-99999.safetensors"
    index.write_text(json.dumps(data))


def _swap_shard_of_a_tensor(folder):
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    key = next(k for k, v in sorted(data["weight_map"].items()) if v == shards[0])
    data["weight_map"][key] = shards[1]
    index.write_text(json.dumps(data))


def _first_shard(folder) -> pathlib.Path:
    return folder / sorted(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())[0]


SHARD_DAMAGE = {
    "shard_deleted": (lambda f: _first_shard(f).unlink(), r"names 1 shard file\(s\) that .* does not hold: model-"),
    "index_names_missing_file": (_rename_shard_in_index, "does not hold: model-99999-of-99999.safetensors"),
    "index_not_json": (lambda f: (f / "model.safetensors.index.json").write_text("{"), "is not valid JSON"),
    "index_without_weight_map": (lambda f: (f / "model.safetensors.index.json").write_text("{}"),
                                 "no valid 'weight_map'"),
    "index_maps_to_wrong_shard": (_swap_shard_of_a_tensor, "maps tensors to shards that do not hold them"),
    "shard_truncated": (lambda f: _first_shard(f).write_bytes(_first_shard(f).read_bytes()[:1000]), "model-"),
    "stale_single_file_beside_shards": (
        lambda f: save_file({"x": torch.zeros(1)}, str(f / "model.safetensors")),
        "holds both model.safetensors and model.safetensors.index.json",
    ),
}


@pytest.mark.parametrize("name", sorted(SHARD_DAMAGE))
def test_sharded_checkpoint_problems_are_named(sharded, tmp_path, name, no_model_built):
    damage, expected = SHARD_DAMAGE[name]
    folder = copy_of(sharded, tmp_path / "model")
    damage(folder)
    for cls in MODEL_CLASSES:
        with pytest.raises(CheckpointFileError, match=expected) as error:
            cls.from_pretrained(folder)
        assert str(folder) in str(error.value)


def test_intact_checkpoints_load_and_list_their_tensors(saved, sharded):
    single, shards = check_checkpoint_files(saved), check_checkpoint_files(sharded)
    assert single == set(load_file(str(saved / "model.safetensors"))) == shards
    reference = AudioFlamingo2ForConditionalGeneration.from_pretrained(saved).state_dict()
    for key, value in AudioFlamingo2ForConditionalGeneration.from_pretrained(sharded).state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_folder_with_a_config_but_no_weights(saved, tmp_path, no_model_built):
    folder = copy_of(saved, tmp_path / "model")
    (folder / "model.safetensors").unlink()
    for cls in MODEL_CLASSES:
        with pytest.raises(CheckpointFileError, match=r"has a config.json but no weights: no model.safetensors.*holds"):
            cls.from_pretrained(folder)


def test_corrupt_file_from_the_hub_is_reported_as_checkpoint_file_error():
    # Files downloaded from the Hub are read by transformers itself: a SafetensorError it raises is named too.
    def load(*args, **kwargs):
        raise SafetensorError("Error while deserializing header: header too small")

    with pytest.raises(CheckpointFileError, match=r"'user/model' is corrupt: Error while deserializing header"):
        strict_from_pretrained(load, AudioFlamingo2ForConditionalGeneration, "user/model")


# ==================================================================================================== folders


def _original_release(folder: pathlib.Path) -> pathlib.Path:
    (folder / "safe_ckpt").mkdir(parents=True)
    (folder / "safe_ckpt" / "metadata.json").write_text("[]")
    (folder / "clap_ckpt").mkdir()
    (folder / "configs").mkdir()
    (folder / "configs" / "inference.yaml").write_text("model_config: {}\n")
    return folder


def test_original_release_gets_the_convert_command(tmp_path, no_model_built):
    release = _original_release(tmp_path / "audio-flamingo-2")
    hint = original_release_hint(release)
    assert "ORIGINAL Audio Flamingo 2 release (safe_ckpt/, clap_ckpt/, configs/inference.yaml)" in hint
    assert f"af2-hf convert --af2-dir {release} --output-dir ./audio-flamingo-2-hf" in hint
    for load in (*(cls.from_pretrained for cls in MODEL_CLASSES[:2]), AudioFlamingo2Config.from_pretrained):
        with pytest.raises(ModelFolderError, match="ORIGINAL Audio Flamingo 2 release") as error:
            load(release)
        assert "af2-hf convert --af2-dir" in str(error.value) and "does not exist" not in str(error.value)
    # Only clap_ckpt/ (no safe_ckpt/) is still a release; a model folder never is.
    shutil.rmtree(release / "safe_ckpt")
    assert "(clap_ckpt/, configs/inference.yaml)" in original_release_hint(release)


def test_original_release_hub_ids_get_the_convert_command(no_model_built):
    for repo_id in ("nvidia/audio-flamingo-2", "nvidia/audio-flamingo-2-SoundCoT"):
        hint = original_release_hint(repo_id)
        assert f"af2-hf convert --af2-dir {repo_id} --output-dir ./{repo_id.split('/')[1]}-hf" in hint
        with pytest.raises(ModelFolderError, match="ORIGINAL"):  # before any download is tried
            AudioFlamingo2ForConditionalGeneration.from_pretrained(repo_id)
    assert original_release_hint("NVIDIA/Audio-Flamingo-2-0.5B") is not None  # Hub ids ignore case
    assert original_release_hint("someone/some-model") is None


def test_not_a_release(saved, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.yaml").write_text("a: 1\n")
    assert original_release_hint(saved) is None
    assert original_release_hint(tmp_path / "plain") is None
    assert original_release_hint(tmp_path / "missing") is None


@pytest.mark.parametrize("kind", ["empty", "other_files", "nested_empty_subfolder"])
def test_existing_directory_that_is_no_model_is_not_reported_missing(tmp_path, kind, no_model_built):
    folder = tmp_path / "folder"
    folder.mkdir()
    kwargs = {}
    if kind == "other_files":
        (folder / "notes.txt").write_text("x")
        (folder / "data").mkdir()
        expected = r"is a directory but not a Hugging Face model folder: .* \(it holds: data/, notes.txt\)"
    elif kind == "nested_empty_subfolder":
        (folder / "sub").mkdir()
        kwargs = {"subfolder": "sub"}
        expected = r"is a directory but not a Hugging Face model folder: it has no config.json \(it is empty\)"
    else:
        expected = r"it has no config.json \(it is empty\)"
    for load in (AudioFlamingo2ForConditionalGeneration.from_pretrained, AudioFlamingo2Model.from_pretrained,
                 AudioFlamingo2Config.from_pretrained):
        with pytest.raises(ModelFolderError, match=expected) as error:
            load(folder, **kwargs)
        assert "does not exist" not in str(error.value) and isinstance(error.value, OSError)


def test_missing_local_paths_and_subfolders(saved, tmp_path, no_model_built):
    for missing in (tmp_path / "nope", "./no/such/folder", "~/no-such-af2-folder"):
        with pytest.raises(ModelFolderError, match="does not exist"):
            AudioFlamingo2ForConditionalGeneration.from_pretrained(missing)
    with pytest.raises(ModelFolderError, match="has no subfolder 'nope'"):
        AudioFlamingo2Config.from_pretrained(saved, subfolder="nope")


def test_peft_adapter_folder_is_named(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="is a PEFT adapter folder"):
        AudioFlamingo2Config.from_pretrained(tmp_path / "adapter")


# ==================================================================================================== model type


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("qwen2") / "qwen2"
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def test_other_model_types_are_refused_before_allocation(qwen2_folder, tmp_path, no_model_built):
    from transformers import ClapConfig

    clap = tmp_path / "clap"
    ClapConfig().save_pretrained(clap)
    for folder, model_type in ((qwen2_folder, "qwen2"), (clap, "clap")):
        for load in (AudioFlamingo2ForConditionalGeneration.from_pretrained, AudioFlamingo2Model.from_pretrained,
                     AudioFlamingo2Config.from_pretrained):
            with pytest.raises(ModelTypeError, match=rf"holds a '{model_type}' model .*not an Audio Flamingo 2"):
                load(folder)
    with pytest.raises(ModelTypeError, match=r"--text-model .*qwen2"):
        AudioFlamingo2Config.from_pretrained(qwen2_folder)
    # The Auto classes keep resolving a folder by its own model type.
    assert type(AutoConfig.from_pretrained(qwen2_folder)).__name__ == "Qwen2Config"


# ==================================================================================================== strictness


MISSING = "model.audio_transformer.layers.1.fc2.bias"
RESHAPED = "model.cross_attention_layers.0.ff_in.weight"


def test_output_loading_info_reports_instead_of_raising(saved, tmp_path):
    def damage(state):
        del state[MISSING]
        state["model.audio_transformer.extra.weight"] = torch.zeros(2)
        state[RESHAPED] = state[RESHAPED][:, :-1].contiguous()

    broken = edited_weights_copy(saved, tmp_path / "broken", damage)
    with pytest.raises(CheckpointMismatchError, match="output_loading_info=True returns these lists"):
        AudioFlamingo2ForConditionalGeneration.from_pretrained(broken)
    model, info = AudioFlamingo2ForConditionalGeneration.from_pretrained(
        broken, output_loading_info=True, ignore_mismatched_sizes=True
    )
    assert isinstance(model, AudioFlamingo2ForConditionalGeneration)
    assert MISSING in info["missing_keys"] and "model.audio_transformer.extra.weight" in info["unexpected_keys"]
    assert [key for key, *_ in info["mismatched_keys"]] == [RESHAPED]
    # Without ignore_mismatched_sizes transformers itself refuses the differently shaped tensor (as for every model).
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AudioFlamingo2ForConditionalGeneration.from_pretrained(broken, output_loading_info=True)


def test_head_model_from_a_base_model_checkpoint(tmp_path):
    # As transformers does for a head model loaded from its base model: the head is initialised and reported.
    untied = random_model(text_config=dict(tie_word_embeddings=False))
    untied.model.save_pretrained(tmp_path / "base")
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(tmp_path / "base")
    for key, value in untied.model.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[key], value, rtol=0, atol=0)
    _, info = AudioFlamingo2ForConditionalGeneration.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"}
    # A full checkpoint that lacks its lm_head is still an error.
    untied.save_pretrained(tmp_path / "full")
    no_head = edited_weights_copy(tmp_path / "full", tmp_path / "no_head", lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointMismatchError, match="1 missing tensor.*lm_head.weight"):
        AudioFlamingo2ForConditionalGeneration.from_pretrained(no_head)


def test_state_dict_given_in_code_follows_transformers():
    config = tiny_config()
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(None, config=config, state_dict={})
    assert isinstance(model, AudioFlamingo2ForConditionalGeneration)
    assert not any(p.device.type == "meta" for p in model.parameters())


# ==================================================================================================== config


def _text(**overrides):
    return {"text_config": overrides}


def _audio(**overrides):
    return {"audio_config": overrides}


# overrides of tiny_config -> the field the error must name
FIELD_ERRORS = {
    "audio_transformer_num_heads_zero": ({"audio_transformer_num_heads": 0}, "audio_transformer_num_heads"),
    "audio_transformer_intermediate_negative": ({"audio_transformer_intermediate_size": -8},
                                                "audio_transformer_intermediate_size"),
    "audio_transformer_num_layers_zero": ({"audio_transformer_num_layers": 0}, "audio_transformer_num_layers"),
    "rope_theta_zero": ({"audio_transformer_rope_theta": 0.0}, "audio_transformer_rope_theta"),
    "layer_norm_eps_negative": ({"audio_transformer_layer_norm_eps": -1e-6}, "audio_transformer_layer_norm_eps"),
    "rotary_dim_zero": ({"audio_transformer_rotary_dim": 0}, "audio_transformer_rotary_dim"),
    "cross_heads_negative": ({"cross_attention_num_heads": -2}, "cross_attention_num_heads"),
    "cross_head_dim_zero": ({"cross_attention_head_dim": 0}, "cross_attention_head_dim"),
    "cross_ff_mult_zero": ({"cross_attention_ff_mult": 0}, "cross_attention_ff_mult"),
    "tokens_per_window_zero": ({"tokens_per_window": 0}, "tokens_per_window"),
    "audio_tower_batch_size_zero": ({"audio_tower_batch_size": 0}, "audio_tower_batch_size"),
}
CLASS_ERRORS = {
    "audio_heads_do_not_divide_width": ({"audio_transformer_num_heads": 3},
                                        r"not divisible by audio_transformer_num_heads=3"),
    "rotary_dim_odd": ({"audio_transformer_rotary_dim": 7}, r"audio_transformer_rotary_dim=7 must be even"),
    "rotary_dim_above_head_dim": ({"audio_transformer_rotary_dim": 128},
                                  r"audio_transformer_rotary_dim=128 .*head dimension 64"),
    "tokens_per_window_inconsistent": ({"tokens_per_window": 32},
                                       r"tokens_per_window=32, but the audio tower makes 64"),
    "text_hidden_not_divisible": (_text(hidden_size=30),
                                  r"text_config.hidden_size=30 is not divisible by text_config.num_attention_heads=4"),
    "text_kv_heads_do_not_divide": (_text(num_key_value_heads=3),
                                    r"num_attention_heads=4 is not divisible by text_config.num_key_value_heads=3"),
    "text_kv_heads_zero": (_text(num_key_value_heads=0),
                           r"text_config.num_key_value_heads must be a positive integer, got 0"),
    "text_vocab_zero": (_text(vocab_size=0), r"text_config.vocab_size must be a positive integer, got 0"),
    "text_hidden_negative": (_text(hidden_size=-32), r"text_config.hidden_size must be a positive integer, got -32"),
    "text_intermediate_zero": (_text(intermediate_size=0), r"text_config.intermediate_size must be a positive"),
    "text_heads_zero": (_text(num_attention_heads=0), r"text_config.num_attention_heads must be a positive"),
    "text_max_positions_zero": (_text(max_position_embeddings=0),
                                r"text_config.max_position_embeddings must be a positive"),
    "audio_depths_empty": (_audio(depths=[], num_attention_heads=[]), r"audio_config.depths is empty"),
    "audio_depth_zero": (_audio(depths=[1, 0, 1, 1]), r"audio_config.depths\[1\] must be a positive integer, got 0"),
    "audio_heads_count": (_audio(num_attention_heads=[1, 2, 2]),
                          r"audio_config.num_attention_heads has 3 entries for 4 stages"),
    "audio_heads_do_not_divide_stage": (_audio(num_attention_heads=[1, 3, 2, 4]),
                                        r"stage 1 .* not divisible by audio_config.num_attention_heads\[1\]=3"),
    "audio_width_zero": (_audio(patch_embeds_hidden_size=0),
                         r"audio_config.patch_embeds_hidden_size must be a positive"),
    "audio_spec_size_zero": (_audio(spec_size=0), r"audio_config.spec_size must be a positive"),
    "audio_patch_stride_zero": (_audio(patch_stride=[4, 0]), r"audio_config.patch_stride\[1\] must be a positive"),
    "absurd_vocab": (_text(vocab_size=10**12),
                     r"about 3.2e\+13 parameters .*text_config.vocab_size x text_config.hidden_size"),
    "absurd_intermediate": (_text(intermediate_size=10**12),
                            r"text_config.num_hidden_layers x .*AF2_HF_MAX_PARAMETERS"),
    "absurd_audio_width": ({"audio_config": dict(patch_embeds_hidden_size=2**20, num_attention_heads=[1, 1, 1, 1]),
                            "audio_transformer_num_heads": 1, "audio_transformer_rotary_dim": 32},
                           r"(audio transformer|audio tower)"),
}


@pytest.mark.parametrize("name", sorted(FIELD_ERRORS))
def test_config_field_validation(name):
    overrides, field = FIELD_ERRORS[name]
    with pytest.raises(ConfigValidationError, match=rf"field '{field}'") as error:
        tiny_config(**overrides)
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("name", sorted(CLASS_ERRORS))
def test_config_consistency_validation(name, monkeypatch):
    monkeypatch.delenv(MAX_PARAMETERS_ENV, raising=False)
    overrides, expected = CLASS_ERRORS[name]
    with pytest.raises(ConfigValidationError, match=expected):
        tiny_config(**overrides)


def test_parameter_limit_override(monkeypatch):
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "1e14")
    config = tiny_config(text_config=dict(vocab_size=10**12))  # a config only: nothing is allocated
    assert sum(parameter_count_estimate(config).values()) > 10**13
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "1000")
    with pytest.raises(ValueError, match="above the limit of 1e\\+03"):
        tiny_config()
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "lots")
    with pytest.raises(ValueError, match="AF2_HF_MAX_PARAMETERS='lots' is not a number"):
        tiny_config()


def test_parameter_estimate_matches_real_models():
    for overrides in ({}, {"text_config": dict(tie_word_embeddings=False)}, {"cross_attention_every_n_layers": 2}):
        config = tiny_config(**overrides)
        actual = AudioFlamingo2ForConditionalGeneration(config).num_parameters()
        estimate = sum(parameter_count_estimate(config).values())
        assert 0.95 * actual <= estimate <= actual, (overrides, estimate, actual)


def test_defaults_describe_the_3b_release():
    config = AudioFlamingo2Config()
    assert 4.5e9 < sum(parameter_count_estimate(config).values()) < 5e9
    assert config.tokens_per_window == 64 and config.max_position_embeddings == 32768


@pytest.mark.parametrize("edit, expected", [
    ({"text_config": {"hidden_size": 30}}, "text_config.hidden_size=30"),
    ({"tokens_per_window": 7}, "tokens_per_window=7"),
    ({"text_config": {"vocab_size": 10**13}}, "AF2_HF_MAX_PARAMETERS"),
    ({"audio_transformer_num_heads": -1}, "audio_transformer_num_heads"),
])
def test_bad_config_json_fails_before_allocation(saved, tmp_path, edit, expected, no_model_built):
    folder = copy_of(saved, tmp_path / "model")
    data = json.loads((folder / "config.json").read_text())
    for key, value in edit.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    (folder / "config.json").write_text(json.dumps(data))
    for load in (AudioFlamingo2ForConditionalGeneration.from_pretrained, AutoModelForMultimodalLM.from_pretrained,
                 AutoModel.from_pretrained, AutoConfig.from_pretrained, AudioFlamingo2Config.from_pretrained):
        with pytest.raises(ValueError, match=expected):
            load(folder)


def test_absurd_layer_count_is_refused_before_the_text_config_is_made(saved, tmp_path, no_model_built):
    # (Qwen2Config would first build a list of 10**9 layer types.)
    folder = copy_of(saved, tmp_path / "model")
    data = json.loads((folder / "config.json").read_text())
    data["text_config"]["num_hidden_layers"] = 10**9
    (folder / "config.json").write_text(json.dumps(data))
    for load in (AudioFlamingo2ForConditionalGeneration.from_pretrained, AudioFlamingo2Config.from_pretrained):
        with pytest.raises(ValueError, match=r"text_config.num_hidden_layers=1000000000 .*AF2_HF_MAX_PARAMETERS"):
            load(folder)


# ==================================================================================================== positions


def test_max_position_embeddings_is_the_text_models():
    config = tiny_config()
    assert config.max_position_embeddings == config.text_config.max_position_embeddings == 512
    config.max_position_embeddings = 64
    assert config.text_config.max_position_embeddings == 64
    assert "max_position_embeddings" not in config.to_dict()  # one value, stored in text_config
    as_kwarg = AudioFlamingo2Config(**{**tiny_config().to_dict(), "max_position_embeddings": 100})
    assert as_kwarg.text_config.max_position_embeddings == 100 == as_kwarg.max_position_embeddings


def test_generation_past_max_position_embeddings_is_capped_and_warned():
    model = random_model(text_config=dict(max_position_embeddings=8))
    inputs = dict(input_ids=torch.tensor([[3, 116, 7, 9, 119]]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                  input_features=random_features(1, 1), input_features_mask=torch.ones(1, 1, dtype=torch.long))
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        # The default length (20 new tokens) is capped at max_position_embeddings, as for text models ...
        assert model.generate(**inputs, do_sample=False).shape[1] == 8
        # ... and an explicit longer generation runs with transformers' warning.
        logger = hf_logging.get_logger("transformers.generation.stopping_criteria")
        logger.warning_once.cache_clear()
        messages = []
        handler = _ListHandler(messages)
        logger.addHandler(handler)
        try:
            assert model.generate(**inputs, do_sample=False, max_new_tokens=6).shape[1] == 11
        finally:
            logger.removeHandler(handler)
    assert any("exceeded the model's predefined maximum length (8)" in m for m in messages), messages


class _ListHandler(logging.Handler):
    def __init__(self, sink: list):
        super().__init__()
        self.sink = sink

    def emit(self, record):
        self.sink.append(record.getMessage())
