"""Conversion of the original Audio Flamingo 2 release layout into the native Transformers format.

The golden ``original/`` checkpoint is converted once per module; layout variants (duplicate key families, a
trainable-only safe_ckpt, cross-attention every 2nd layer, untied embeddings, unknown keys) are built in temporary
folders from the golden tensors themselves."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from af2_testing import relative_error
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from af2_hf import AudioFlamingo2ForConditionalGeneration
from af2_hf.convert_af2 import (
    UNUSED_CLAP_CKPT_FAMILIES,
    UNUSED_HTSAT_FAMILIES,
    ConversionError,
    build_native_checkpoint,
    convert_af2_checkpoint,
    load_native_model,
    main,
)

TOL = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden_root(golden_dir) -> Path:
    return golden_dir  # conftest: fails (never skips) when the golden folder is missing


@pytest.fixture(scope="module")
def expected_json(golden_json) -> dict:
    return golden_json


@pytest.fixture(scope="module")
def safe_state(golden_root) -> dict:
    """The merged golden safe_ckpt, in metadata.json order."""
    folder = golden_root / "original" / "safe_ckpt"
    state = {}
    for name in json.loads((folder / "metadata.json").read_text()):
        state.update(load_file(str(folder / f"{name}.safetensors")))
    return state


@pytest.fixture(scope="module")
def release_yaml(golden_root) -> dict:
    return yaml.safe_load((golden_root / "original" / "configs" / "inference.yaml").read_text())


@pytest.fixture(scope="module")
def base_state(golden_root) -> dict:
    return load_file(str(golden_root / "base_lm" / "model.safetensors"))


def write_release(root: Path, golden_root: Path, safe: dict, release: dict, clap_state: dict | None = None) -> Path:
    """An original-layout release folder: safe_ckpt in two chunks + metadata.json, clap_ckpt, configs/*.yaml."""
    (root / "safe_ckpt").mkdir(parents=True)
    keys = list(safe)
    chunks = {"part_b": keys[: len(keys) // 2], "part_a": keys[len(keys) // 2:]}  # metadata order, not name order
    for name, names in chunks.items():
        save_file({k: safe[k].contiguous() for k in names}, str(root / "safe_ckpt" / f"{name}.safetensors"))
    (root / "safe_ckpt" / "metadata.json").write_text(json.dumps(list(chunks)))
    (root / "clap_ckpt").mkdir()
    if clap_state is None:
        shutil.copy(golden_root / "original" / "clap_ckpt" / "epoch_16.pt", root / "clap_ckpt" / "epoch_16.pt")
    else:
        torch.save({"epoch": 16, "state_dict": clap_state}, root / "clap_ckpt" / "epoch_16.pt")
    (root / "configs").mkdir()
    (root / "configs" / "inference.yaml").write_text(yaml.safe_dump(release))
    return root


def copy_base_lm(golden_root: Path, root: Path, config_edit: dict | None = None, state: dict | None = None) -> Path:
    shutil.copytree(golden_root / "base_lm", root)
    if config_edit:
        config = json.loads((root / "config.json").read_text())
        config.update(config_edit)
        (root / "config.json").write_text(json.dumps(config))
    if state is not None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / "model.safetensors"))
    return root


def layer_count(state: dict) -> int:
    return 1 + max(int(k.split(".")[3]) for k in state if k.startswith("lang_encoder.model.layers."))


@pytest.fixture(scope="module")
def baseline(golden_root):
    """Native (config, state dict, report) of the golden release, without writing."""
    return build_native_checkpoint(golden_root / "original", golden_root / "base_lm", progress=False)


@pytest.fixture(scope="module")
def converted(golden_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("af2_converted") / "model"
    report = convert_af2_checkpoint(golden_root / "original", golden_root / "base_lm", out, dtype="float32",
                                    progress=False, verbose=False)
    return out, report


# ---------------------------------------------------------------------------------------------------------------
# the golden release
# ---------------------------------------------------------------------------------------------------------------


def test_written_files_load_strictly(converted):
    out, _ = converted
    for name in ("config.json", "generation_config.json", "processor_config.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    model, info = AudioFlamingo2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info


def test_config_matches_original(converted, expected_json):
    out, _ = converted
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(out)
    config, original = model.config, expected_json["config"]
    htsat = original["htsat"]
    audio = config.audio_config
    assert audio.patch_embeds_hidden_size == htsat["embed_dim"]
    assert list(audio.depths) == htsat["depths"]
    assert list(audio.num_attention_heads) == htsat["num_heads"]
    assert audio.window_size == htsat["window_size"]
    assert list(audio.patch_stride) == htsat["patch_stride"] and audio.patch_size == htsat["patch_size"]
    assert audio.spec_size == htsat["spec_size"] and audio.num_mel_bins == htsat["mel_bins"]
    assert audio.enable_fusion is False
    assert config.audio_hidden_size == htsat["clap_dim"] == original["clap_config"]["audio_embed_dim"]
    assert config.tokens_per_window == htsat["tokens_per_window"]
    kwargs, effective = original["audio_transformer_kwargs"], original["audio_transformer_effective"]
    assert config.audio_transformer_num_heads == kwargs["n_head"]
    assert config.audio_transformer_num_layers == kwargs["n_layers"]
    assert config.audio_transformer_intermediate_size == kwargs["d_inner"]
    assert config.audio_rotary_dim == effective["rotary_dim"]
    assert config.audio_transformer_rope_theta == effective["rotary_base"]
    cross = original["cross_attention"]
    assert config.cross_attention_every_n_layers == cross["every_n_layers"]
    assert config.cross_attention_num_heads == cross["heads"]
    assert config.cross_attention_head_dim == cross["dim_head"]
    assert config.cross_attention_ff_mult == cross["ff_mult"]
    assert config.cross_attention_layers == cross["layers_with_cross_attention"]
    lm = original["lm"]
    assert config.text_config.vocab_size == lm["vocab_size"]
    assert config.text_config.hidden_size == lm["hidden_size"]
    assert config.text_config.num_hidden_layers == lm["num_hidden_layers"]
    assert config.tie_word_embeddings == lm["tie_word_embeddings"]
    ids = expected_json["token_ids"]
    assert (config.audio_token_id, config.end_of_chunk_token_id, config.pad_token_id, config.sep_token_id,
            config.eos_token_id) == (ids["audio"], ids["endofchunk"], ids["pad"], ids["sep"], ids["eos"])


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_clap_out_parity(converted, golden, case):
    out, _ = converted
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        hidden = model.model.audio_tower(input_features=golden[f"{case}.mel"][:, None]).last_hidden_state
    clap_out = hidden.flatten(2).transpose(1, 2)
    assert clap_out.shape == golden[f"{case}.clap_out"].shape
    assert relative_error(clap_out, golden[f"{case}.clap_out"]) <= TOL


def test_tokenizer_processor_and_generation_defaults(converted, expected_json, release_yaml):
    from transformers import GenerationConfig

    from af2_hf.processing_audioflamingo2 import AudioFlamingo2Processor

    out, _ = converted
    processor = AudioFlamingo2Processor.from_pretrained(out)
    ids = expected_json["token_ids"]
    tokenizer = processor.tokenizer
    assert len(tokenizer) == ids["len_tokenizer"]
    assert tokenizer.pad_token == ids["pad_token"] and tokenizer.sep_token == ids["sep_token"]
    assert tokenizer.convert_tokens_to_ids("<audio>") == ids["audio"]
    clap = release_yaml["clap_config"]
    fe = processor.feature_extractor
    assert fe.max_num_windows == clap["max_num_window"]
    assert fe.window_length == clap["window_length"] and fe.window_overlap == clap["window_overlap"]
    assert processor.chat_template
    generation = GenerationConfig.from_pretrained(out)
    # the release's inference.py: do_sample, top_k 30, top_p 0.95, max_new_tokens 256, eos = tokenizer eos
    assert generation.do_sample is True and generation.top_k == 30 and generation.top_p == 0.95
    assert generation.max_new_tokens == 256
    assert generation.eos_token_id == ids["eos"] and generation.pad_token_id == ids["pad"]


def test_converted_model_and_tokenizer_agree_on_special_tokens(converted):
    """The text config carries the tokenizer's pad id (and eos), so Trainer's special-token alignment finds nothing
    to change and prints no PAD/BOS/EOS warning when fine-tuning."""
    from transformers import trainer_utils

    from af2_hf.processing_audioflamingo2 import AudioFlamingo2Processor

    out, _ = converted
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(out)
    processor = AudioFlamingo2Processor.from_pretrained(out)
    text_config = model.config.get_text_config()
    assert text_config.pad_token_id == processor.tokenizer.pad_token_id is not None
    assert processor.tokenizer.eos_token_id in (text_config.eos_token_id if isinstance(text_config.eos_token_id, list)
                                                else [text_config.eos_token_id])
    def special_ids():
        # (transformers 5.17 turns an int eos of the generation config into a one-element list: the same stop)
        ids = [text_config.pad_token_id, text_config.eos_token_id, model.generation_config.pad_token_id,
               model.generation_config.eos_token_id, model.generation_config.bos_token_id]
        return [value if isinstance(value, list) else [value] for value in ids]

    warnings = []
    original_warning = trainer_utils.logger.warning
    trainer_utils.logger.warning = lambda message, *args, **kwargs: warnings.append(str(message))
    try:
        before = special_ids()
        trainer_utils.align_special_tokens(model, processor)
    finally:
        trainer_utils.logger.warning = original_warning
    assert not [w for w in warnings if "PAD/BOS/EOS" in w], warnings
    assert special_ids() == before


def test_output_folder_is_refused_or_replaced_whole(golden_root, tmp_path):
    """A re-conversion into a folder that holds a model: refused without overwrite; with it, the folder is replaced
    whole (no old single-file weights left beside new shards, which loading would pick up)."""
    from af2_hf.atomic import OutputDirectoryNotEmptyError

    out = tmp_path / "model"
    convert_af2_checkpoint(golden_root / "original", golden_root / "base_lm", out, progress=False, verbose=False)
    assert (out / "model.safetensors").is_file()
    with pytest.raises(OutputDirectoryNotEmptyError, match="is not empty"):
        convert_af2_checkpoint(golden_root / "original", golden_root / "base_lm", out, max_shard_size="1MB",
                               progress=False, verbose=False)
    assert (out / "model.safetensors").is_file() and not list(out.glob("model-*.safetensors"))
    convert_af2_checkpoint(golden_root / "original", golden_root / "base_lm", out, max_shard_size="1MB",
                           overwrite=True, progress=False, verbose=False)
    assert not (out / "model.safetensors").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left beside it


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, ConversionError])
def test_interrupted_conversion_leaves_nothing(interruption, golden_root, tmp_path, monkeypatch):
    """Interrupted after the weights were written (before the processor and the remote code): no folder that looks
    like a model, no temporary folder; an existing model that was being overwritten is kept as it was."""
    import af2_hf.convert_af2 as converter

    def interrupted(*args, **kwargs):
        raise interruption("interrupted")

    monkeypatch.setattr(converter, "write_processor", interrupted)
    out = tmp_path / "model"
    with pytest.raises(interruption):
        convert_af2_checkpoint(golden_root / "original", golden_root / "base_lm", out, progress=False, verbose=False)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(interruption):
        convert_af2_checkpoint(golden_root / "original", golden_root / "base_lm", out, overwrite=True,
                               progress=False, verbose=False)
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in out.iterdir()] == ["config.json"]


def test_report_drops_only_documented_families(converted, baseline):
    _, report = converted
    documented = [f"HTSAT {f}" for f in UNUSED_HTSAT_FAMILIES] + [f"clap_ckpt {f}" for f in UNUSED_CLAP_CKPT_FAMILIES]
    documented += ["HTSAT layers.*.blocks.*.attn_mask", "audio_transformer_clap.position_enc.inv_freq"]
    for reason in report.dropped:
        assert any(reason.startswith(d) for d in documented), reason
    assert not report.warnings
    summary = report.summary()
    assert "dropped" in summary and "fusion_model" in summary
    _, state, _ = baseline
    assert set(state) == set(report.sources)


def test_bfloat16_output(golden_root, golden, tmp_path):
    out = tmp_path / "bf16"
    convert_af2_checkpoint(golden_root / "original", golden_root / "base_lm", out, dtype="bfloat16",
                           progress=False, verbose=False)
    dtypes = set()
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                dtypes.add(handle.get_slice(key).get_dtype())
    assert "BF16" in dtypes and "F32" not in dtypes, dtypes  # integer buffers (I64) keep their dtype
    model, info = AudioFlamingo2ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # The language model and cross-attention load as saved; the audio path is kept in float32
    # (_keep_in_fp32_modules_strict: the mixed-precision layout, see README "Speed and precision").
    assert model.model.language_model.dtype == torch.bfloat16 and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.cross_attention_layers[0].to_q.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.model.audio_tower.parameters()} == {torch.float32}
    with torch.no_grad():
        clap_out = model.float().model.audio_tower(input_features=golden["a.mel"][:, None]).last_hidden_state
    assert relative_error(clap_out.flatten(2).transpose(1, 2), golden["a.clap_out"]) <= 2e-2  # bf16 weights


def test_cli(golden_root, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--af2-dir", str(golden_root / "original"), "--text-model", str(golden_root / "base_lm"),
                 "--output-dir", str(out), "--no-progress"]) == 0
    assert (out / "config.json").is_file()
    capsys.readouterr()
    assert main(["--af2-dir", str(tmp_path / "missing"), "--text-model", str(golden_root / "base_lm"),
                 "--output-dir", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: conversion failed, nothing was written" in err and "missing' is neither a directory" in err
    assert not (tmp_path / "x").exists()


def test_text_model_defaults_to_yaml_path(golden_root, baseline):
    # the golden yaml names ../base_lm as lang_encoder_path/tokenizer_path
    config, state, _ = build_native_checkpoint(golden_root / "original", None, progress=False)
    ref_config, ref_state, _ = baseline
    assert config.to_dict() == ref_config.to_dict()
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


# ---------------------------------------------------------------------------------------------------------------
# layout variants
# ---------------------------------------------------------------------------------------------------------------


def assert_same_state(state: dict, reference: dict, skip=()):
    assert set(state) == set(reference)
    for key, value in reference.items():
        if key not in skip:
            assert torch.equal(state[key], value), key


def with_duplicates(safe: dict) -> dict:
    """The full Flamingo state_dict: duplicate families written next to the canonical ones."""
    out = dict(safe)
    for key, value in safe.items():
        parts = key.split(".")
        if key.startswith("lang_encoder.model.layers.") and parts[4] == "decoder_layer":
            out["lang_encoder.old_decoder_blocks." + ".".join([parts[3]] + parts[5:])] = value.clone()
        elif key.startswith("lang_encoder.model.layers.") and parts[4] == "gated_cross_attn_layer_sound":
            out["lang_encoder.gated_cross_attn_layers_sound." + ".".join([parts[3]] + parts[5:])] = value.clone()
    return out


def test_duplicate_families_equal(golden_root, tmp_path, safe_state, release_yaml, baseline):
    safe = with_duplicates(safe_state)
    assert any(k.startswith("lang_encoder.old_decoder_blocks.") for k in safe)
    release = write_release(tmp_path / "dup", golden_root, safe, release_yaml)
    config, state, report = build_native_checkpoint(release, golden_root / "base_lm", progress=False)
    assert_same_state(state, baseline[1])
    assert config.to_dict() == baseline[0].to_dict()
    assert not report.warnings


def test_duplicate_family_that_differs_wins_like_the_original(golden_root, tmp_path, safe_state, release_yaml,
                                                              baseline):
    safe = with_duplicates(safe_state)
    dup_lm = "lang_encoder.old_decoder_blocks.0.mlp.up_proj.weight"
    dup_x = "lang_encoder.gated_cross_attn_layers_sound.0.attn.to_q.weight"
    safe[dup_lm] = safe[dup_lm] + 1.0
    safe[dup_x] = safe[dup_x] * 2.0
    release = write_release(tmp_path / "dup_diff", golden_root, safe, release_yaml)
    _, state, report = build_native_checkpoint(release, golden_root / "base_lm", progress=False)
    # the original's load_state_dict visits lang_encoder.old_decoder_blocks / gated_cross_attn_layers_sound last
    assert torch.equal(state["model.language_model.layers.0.mlp.up_proj.weight"], safe[dup_lm])
    assert torch.equal(state["model.cross_attention_layers.0.to_q.weight"], safe[dup_x])
    assert len(report.warnings) == 2 and any(dup_lm in w for w in report.warnings)


def test_trainable_only_safe_ckpt_takes_lm_from_base(golden_root, tmp_path, safe_state, release_yaml, base_state,
                                                     baseline):
    # filter_state_dict_to_trainable drops frozen LM weights but keeps embeddings (and the tied lm_head copy)
    frozen = [k for k in safe_state
              if (k.startswith("lang_encoder.model.layers.") and ".decoder_layer." in k)
              or k == "lang_encoder.model.norm.weight"]
    safe = {k: v for k, v in safe_state.items() if k not in frozen}
    release = write_release(tmp_path / "trainable", golden_root, safe, release_yaml)
    config, state, report = build_native_checkpoint(release, golden_root / "base_lm", progress=False)
    for key in frozen:
        native = "model.language_model." + key.split("lang_encoder.model.", 1)[1].replace("decoder_layer.", "")
        base_key = "model." + native.split("model.language_model.", 1)[1]
        assert torch.equal(state[native], base_state[base_key].float()), native
        assert report.sources[native].startswith("base_lm:")
    embed = state["model.language_model.embed_tokens.weight"]
    assert torch.equal(embed, safe_state["lang_encoder.model.embed_tokens.weight"])
    assert_same_state(state, baseline[1], skip=[k for k in state if k.startswith("model.language_model.")
                                                and "embed_tokens" not in k])
    load_native_model(config, state)


def test_htsat_from_clap_ckpt_when_safe_ckpt_lacks_it(golden_root, tmp_path, safe_state, release_yaml):
    # a safe_ckpt written with a frozen CLAP keeps only HTSAT buffers and "embed" parameters (patch_embed.*)
    frozen = [k for k in safe_state if k.startswith("clap.nvclap.layers.") and k.endswith((".weight", ".bias",
                                                                                           "bias_table"))]
    safe = {k: v for k, v in safe_state.items() if k not in frozen}
    release = write_release(tmp_path / "frozen_clap", golden_root, safe, release_yaml)
    config, state, _ = build_native_checkpoint(release, golden_root / "base_lm", progress=False)
    clap = torch.load(golden_root / "original" / "clap_ckpt" / "epoch_16.pt", weights_only=True,
                      map_location="cpu")["state_dict"]
    qkv = clap["module.audio_branch.layers.0.blocks.0.attn.qkv.weight"]
    prefix = "model.audio_tower.audio_encoder.layers.0.blocks.0."
    assert torch.equal(state[prefix + "attention.self.key.weight"], qkv.chunk(3)[1])
    assert torch.equal(state[prefix + "layernorm_after.bias"], clap["module.audio_branch.layers.0.blocks.0.norm2.bias"])
    # kept in safe_ckpt: it still overrides clap_ckpt
    assert torch.equal(state["model.audio_tower.audio_encoder.patch_embed.proj.weight"],
                       safe_state["clap.nvclap.patch_embed.proj.weight"])
    load_native_model(config, state)


def test_cross_attention_every_second_layer(golden_root, tmp_path, safe_state, release_yaml, baseline):
    n_layers = layer_count(safe_state)
    kept = [i for i in range(n_layers) if (i + 1) % 2 == 0]
    safe = {k: v for k, v in safe_state.items()
            if ".gated_cross_attn_layer_sound." not in k or int(k.split(".")[3]) in kept}
    release = dict(release_yaml, model_config=dict(release_yaml["model_config"], cross_attn_every_n_layers=2))
    folder = write_release(tmp_path / "every2", golden_root, safe, release)
    config, state, _ = build_native_checkpoint(folder, golden_root / "base_lm", progress=False)
    assert config.cross_attention_every_n_layers == 2 and config.cross_attention_layers == kept
    for j, layer in enumerate(kept):
        assert torch.equal(state[f"model.cross_attention_layers.{j}.to_kv.weight"],
                           safe_state[f"lang_encoder.model.layers.{layer}.gated_cross_attn_layer_sound.attn.to_kv.weight"])
    model = load_native_model(config, state)
    assert len(model.model.cross_attention_layers) == len(kept)
    # a yaml that disagrees with the checkpoint is refused
    wrong = write_release(tmp_path / "every2_wrong_yaml", golden_root, safe, release_yaml)
    with pytest.raises(ConversionError, match="cross_attn_every_n_layers"):
        build_native_checkpoint(wrong, golden_root / "base_lm", progress=False)


def test_untied_embeddings(golden_root, tmp_path, safe_state, release_yaml, base_state):
    generator = torch.Generator().manual_seed(0)
    embed = base_state["model.embed_tokens.weight"]
    base = dict(base_state, **{"lm_head.weight": torch.randn(embed.shape, generator=generator)})
    base_dir = copy_base_lm(golden_root, tmp_path / "base_untied", {"tie_word_embeddings": False}, base)
    safe = dict(safe_state)
    safe["lang_encoder.lm_head.weight"] = torch.randn(safe["lang_encoder.lm_head.weight"].shape, generator=generator)
    release = write_release(tmp_path / "untied", golden_root, safe, release_yaml)
    config, state, _ = build_native_checkpoint(release, base_dir, progress=False)
    assert config.tie_word_embeddings is False and config.text_config.tie_word_embeddings is False
    assert torch.equal(state["lm_head.weight"], safe["lang_encoder.lm_head.weight"])
    assert torch.equal(state["model.language_model.embed_tokens.weight"], safe["lang_encoder.model.embed_tokens.weight"])
    model = load_native_model(config, state)
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, safe["lang_encoder.lm_head.weight"])

    # without lm_head in safe_ckpt (frozen head): the base head, resized like the embedding (first rows kept)
    del safe["lang_encoder.lm_head.weight"]
    release = write_release(tmp_path / "untied_frozen_head", golden_root, safe, release_yaml)
    config, state, _ = build_native_checkpoint(release, base_dir, progress=False)
    rows = config.text_config.vocab_size
    assert torch.equal(state["lm_head.weight"], base["lm_head.weight"][:rows])


def test_grown_vocabulary_without_stored_embedding(golden_root, tmp_path, safe_state, release_yaml, base_state):
    vocab = safe_state["lang_encoder.model.embed_tokens.weight"].shape[0]
    from transformers import AutoTokenizer

    tokenizer_rows = len(AutoTokenizer.from_pretrained(golden_root / "base_lm"))  # before the AF2 tokens
    assert tokenizer_rows < vocab
    embed = base_state["model.embed_tokens.weight"][:tokenizer_rows]
    base_dir = copy_base_lm(golden_root, tmp_path / "base_small", {"vocab_size": tokenizer_rows},
                            dict(base_state, **{"model.embed_tokens.weight": embed}))
    safe = {k: v for k, v in safe_state.items()
            if k not in ("lang_encoder.model.embed_tokens.weight", "lang_encoder.lm_head.weight")}
    release = write_release(tmp_path / "grow", golden_root, safe, release_yaml)
    config, state, report = build_native_checkpoint(release, base_dir, progress=False)
    grown = state["model.language_model.embed_tokens.weight"]
    assert grown.shape[0] == vocab == config.text_config.vocab_size
    assert torch.equal(grown[:tokenizer_rows], embed)
    torch.testing.assert_close(grown[tokenizer_rows:], embed.mean(0, keepdim=True).expand(vocab - tokenizer_rows, -1))
    assert any("grown" in note for note in report.notes)


def test_unknown_keys_are_refused(golden_root, tmp_path, safe_state, release_yaml):
    safe = dict(safe_state)
    unknown = ["lang_encoder.model.mystery.weight", "clap.nvclap.layers.0.blocks.0.attn.extra_scale",
               "audio_transformer_clap.extra.weight", "some_new_module.weight"]
    for key in unknown:
        safe[key] = torch.zeros(2)
    release = write_release(tmp_path / "unknown", golden_root, safe, release_yaml)
    out = tmp_path / "unknown_out"
    with pytest.raises(ConversionError) as error:
        convert_af2_checkpoint(release, golden_root / "base_lm", out, progress=False, verbose=False)
    message = str(error.value)
    for key in unknown:  # every unmapped key is listed, not only the first one met
        assert key.split(".", 2)[-1] in message, key
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_unknown_clap_ckpt_key_is_refused(golden_root, tmp_path, safe_state, release_yaml):
    clap = torch.load(golden_root / "original" / "clap_ckpt" / "epoch_16.pt", weights_only=True,
                      map_location="cpu")["state_dict"]
    clap["module.unexpected_branch.weight"] = torch.zeros(3)
    release = write_release(tmp_path / "clap_unknown", golden_root, safe_state, release_yaml, clap_state=clap)
    with pytest.raises(ConversionError, match="module.unexpected_branch.weight"):
        build_native_checkpoint(release, golden_root / "base_lm", progress=False)


def test_inconsistent_shapes_are_refused(golden_root, tmp_path, safe_state, release_yaml):
    safe = dict(safe_state)
    safe["lang_encoder.model.embed_tokens.weight"] = safe["lang_encoder.model.embed_tokens.weight"][:-1]
    folder = write_release(tmp_path / "rows", golden_root, safe, release_yaml)
    with pytest.raises(ConversionError, match="tokenizer"):
        build_native_checkpoint(folder, golden_root / "base_lm", progress=False)
    wrong = dict(release_yaml, model_config=dict(
        release_yaml["model_config"],
        audio_transformer_kwargs=dict(release_yaml["model_config"]["audio_transformer_kwargs"], d_inner=7)))
    folder = write_release(tmp_path / "d_inner", golden_root, safe_state, wrong)
    with pytest.raises(ConversionError, match="d_inner"):
        build_native_checkpoint(folder, golden_root / "base_lm", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# HTSAT shapes other than the golden ones
# ---------------------------------------------------------------------------------------------------------------

_TO_LAION = (
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.self.relative_position_index", "attn.relative_position_index"),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)


def to_laion_htsat(model) -> dict:
    """The LAION/HTSAT key layout of a transformers ClapAudioModel (q/k/v fused, shift masks stored)."""
    out = {}
    state = model.state_dict()
    for key, value in state.items():
        key = key[len("audio_encoder."):]
        if key.startswith("batch_norm."):
            out["bn0." + key[len("batch_norm."):]] = value
        elif ".attention.self.key." in key or ".attention.self.value." in key:
            continue
        elif ".attention.self.query." in key:
            kind = key.rsplit(".", 1)[1]
            base = key.split(".attention.")[0]
            parts = [state[f"audio_encoder.{base}.attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
            out[f"{base}.attn.qkv.{kind}"] = torch.cat(parts)
        else:
            for new, old in _TO_LAION:
                key = key.replace(new, old)
            out[key] = value
    for s, stage in enumerate(model.audio_encoder.layers):
        grid = model.config.spec_size // model.config.patch_stride[0] // 2**s
        for b, block in enumerate(stage.blocks):
            block.set_shift_and_window_size((grid, grid))
            mask = block.get_attn_mask(grid, grid, torch.float32, "cpu")
            if mask is not None:
                out[f"layers.{s}.blocks.{b}.attn_mask"] = mask
    out["head.weight"] = torch.zeros(3, 3)  # documented unused families are dropped
    out["tscam_conv.bias"] = torch.zeros(3)
    return out


@pytest.mark.parametrize(
    "embed,depths,heads,window",
    [(48, [2, 2, 6, 2], [3, 6, 12, 24], 8), (16, [1, 1, 1, 1], [1, 2, 2, 4], 8), (16, [2, 2, 2, 2], [1, 2, 4, 8], 4)],
)
def test_htsat_config_and_mapping_from_shapes(embed, depths, heads, window):
    from transformers import ClapAudioConfig, ClapAudioModel

    from af2_hf.convert_af2 import ConversionReport, build_clap_audio_config, convert_htsat_state_dict

    torch.manual_seed(0)
    source = ClapAudioModel(ClapAudioConfig(patch_embeds_hidden_size=embed, depths=depths, num_attention_heads=heads,
                                            window_size=window, enable_fusion=False)).eval()
    laion = to_laion_htsat(source)
    config = build_clap_audio_config(laion)
    assert (config.patch_embeds_hidden_size, list(config.depths), list(config.num_attention_heads),
            config.window_size) == (embed, depths, heads, window)
    assert list(config.patch_stride) == [4, 4] and config.mlp_ratio == 4.0
    report = ConversionReport()
    target = ClapAudioModel(config).eval()
    target.load_state_dict(convert_htsat_state_dict(laion, config, report=report), strict=True)
    assert set(report.dropped) and all("head" in r or "tscam" in r or "attn_mask" in r for r in report.dropped)
    features = torch.randn(2, 1, 1001, 64) * 10 - 40
    with torch.no_grad():
        torch.testing.assert_close(target(features).last_hidden_state, source(features).last_hidden_state,
                                   rtol=0, atol=0)
