"""AF-CLAP beyond the golden stages: the zero-shot pipeline, Auto classes, conversion, text packing (one text, many
texts, any padding), batches of mixed clip lengths, the crop rule, bad inputs, and the ``af2-hf clap`` command."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from clap_testing import (
    RELATIVE_TOLERANCE,
    checkpoint_path,
    clap_golden_dir,
    clip_index,
    clip_names,
    clip_paths,
    converted_clap_dir,
    expected,
    expected_json,
    fusion_seed,
    labels,
    load_model,
    load_processor,
    max_norm_error,
    recorded_crops,
    t5_dir,
)


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def processor():
    return load_processor()


def _text_embeds(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.get_text_features(**inputs).pooler_output


def _audio_embeds(model, features) -> torch.Tensor:
    with torch.no_grad():
        return model.get_audio_features(**features).pooler_output


# ------------------------------------------------------------------------------------------------- pipeline / auto


def test_zero_shot_pipeline_golden_argmax_and_scores():
    """transformers' pipeline on a converted folder, no trust_remote_code: the original's scores for every clip
    (the crops drawn as the original drew them, through ``feature_extractor.crop_generator``)."""
    from transformers import pipeline

    from af2_hf import load_afclap_audio

    pipe = pipeline("zero-shot-audio-classification", model=str(converted_clap_dir()))
    assert type(pipe.model).__name__ == "AFClapModel"
    pipe.feature_extractor.crop_generator = np.random.RandomState(fusion_seed())
    reference = expected()["logits_per_audio"].softmax(-1)
    for index, path in enumerate(clip_paths()):
        result = pipe(load_afclap_audio(path), candidate_labels=labels(), hypothesis_template="{}")
        scores = torch.tensor([next(r["score"] for r in result if r["label"] == label) for label in labels()])
        assert result[0]["label"] == labels()[int(reference[index].argmax())]
        assert max_norm_error(scores, reference[index]) <= RELATIVE_TOLERANCE


def test_auto_classes_load_the_converted_folder():
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoProcessor

    from af2_hf import AFClapConfig, AFClapFeatureExtractor, AFClapModel, AFClapProcessor

    folder = converted_clap_dir()
    assert isinstance(AutoConfig.from_pretrained(folder), AFClapConfig)
    assert isinstance(AutoModel.from_pretrained(folder), AFClapModel)
    assert isinstance(AutoProcessor.from_pretrained(folder), AFClapProcessor)
    assert isinstance(AutoFeatureExtractor.from_pretrained(folder), AFClapFeatureExtractor)


def test_remote_code_without_af2_hf(tmp_path):
    """The converted folder loads with trust_remote_code in a Python where af2_hf cannot be imported."""
    script = f"""
import sys, torch
sys.modules["af2_hf"] = None
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained({str(converted_clap_dir())!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({str(converted_clap_dir())!r}, trust_remote_code=True)
with torch.no_grad():
    embeds = model.get_text_features(**processor(text=["a dog barks"])).pooler_output
print(type(model).__name__, tuple(embeds.shape))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "AFClapModel (1, 512)" in result.stdout


# ------------------------------------------------------------------------------------------------------ conversion


def test_conversion_output_and_report(tmp_path):
    from af2_hf.convert_afclap import convert_afclap_checkpoint

    out = tmp_path / "afclap"
    checkpoint, t5 = checkpoint_path(), t5_dir()
    report = convert_afclap_checkpoint(checkpoint, t5, out, verbose=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    assert {"modeling_afclap.py", "configuration_afclap.py", "processing_afclap.py"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name != "afclap"], "no staging folder may remain"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "afclap" and config["auto_map"]["AutoModel"] == "modeling_afclap.AFClapModel"
    assert config["audio_config"]["enable_fusion"] is True and config["audio_config"]["fusion_type"] == "aff_2d"
    assert config["audio_config"]["hidden_size"] == expected_json()["model"]["htsat"]["out_dim"]
    dropped = {key for keys in report.dropped.values() for key in keys}
    assert {"head.weight", "text_branch.encoder.embed_tokens.weight"} <= dropped
    assert not any("tscam_conv" in key for key in dropped)
    assert config["audio_tagging_num_classes"] == expected()["audio.clipwise_output"].shape[1]
    assert any(source.endswith("logit_scale_a") for source in report.sources.values())


def test_conversion_refuses_a_non_empty_folder(tmp_path):
    from af2_hf.atomic import OutputDirectoryNotEmptyError
    from af2_hf.convert_afclap import convert_afclap_checkpoint

    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(OutputDirectoryNotEmptyError):
        convert_afclap_checkpoint(checkpoint_path(), t5_dir(), tmp_path,
                                  verbose=False)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_conversion_refuses_pickled_objects_unknown_keys_and_wrong_t5(tmp_path):
    from af2_hf.convert_af2 import ConversionError
    from af2_hf.convert_afclap import build_afclap_config, convert_afclap_state_dict, load_release_state_dict

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {}, "extra": ConversionError("not a tensor")}, unsafe)
    with pytest.raises(ConversionError, match="weights_only"):
        load_release_state_dict(unsafe)

    state = load_release_state_dict(checkpoint_path())
    assert not any(key.startswith("module.") for key in state)
    config = build_afclap_config(state, t5_dir())
    with pytest.raises(ConversionError, match="Unmapped AF-CLAP checkpoint keys: mystery.weight"):
        convert_afclap_state_dict({**state, "mystery.weight": torch.zeros(1)}, config)

    t5 = tmp_path / "t5"
    t5.mkdir()
    t5_config = json.loads((t5_dir() / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps({**t5_config, "num_layers": t5_config["num_layers"] + 1}))
    with pytest.raises(ConversionError, match="num_layers"):
        build_afclap_config(state, t5)
    from af2_hf.convert_afclap import convert_afclap_checkpoint

    with pytest.raises(ConversionError, match="num_layers"):
        convert_afclap_checkpoint(checkpoint_path(), t5, tmp_path / "out", verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5", "unsafe.pt"], "a failed conversion leaves nothing"
    (t5 / "config.json").write_text(json.dumps({**t5_config, "d_ff": t5_config["d_ff"] * 2}))
    with pytest.raises(ConversionError, match="size mismatch"):
        convert_afclap_checkpoint(checkpoint_path(), t5, tmp_path / "out", verbose=False)


# ------------------------------------------------------------------------------------------------------------ text


def test_one_text_and_many_texts(model, processor):
    """The original fails on a one-text list; here one text gives the row it gets in a batch."""
    many = _text_embeds(model, **processor(text=labels()))
    for index, single in ((0, labels()[0]), (len(labels()) - 1, [labels()[-1]])):  # a string; a one-text list
        inputs = processor(text=single)
        assert inputs["input_ids"].shape == (1, 77)
        torch.testing.assert_close(_text_embeds(model, **inputs)[0], many[index], rtol=1e-5, atol=1e-6)


def test_text_embedding_does_not_depend_on_padding(model, processor):
    reference = _text_embeds(model, **processor(text=labels()))
    tokenizer = processor.tokenizer
    longest = tokenizer(labels(), padding=True, truncation=True, max_length=77, return_tensors="pt")
    torch.testing.assert_close(_text_embeds(model, **longest), reference, rtol=1e-5, atol=1e-6)
    tokenizer.padding_side = "left"
    try:
        left = tokenizer(labels(), padding="max_length", truncation=True, max_length=90, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    torch.testing.assert_close(_text_embeds(model, **left), reference, rtol=1e-5, atol=1e-6)
    no_mask = _text_embeds(model, input_ids=longest["input_ids"])
    torch.testing.assert_close(no_mask, reference, rtol=1e-5, atol=1e-6)


def test_untruncated_long_text_is_packed_like_the_tokenizer_truncates(model, processor):
    untruncated = processor.tokenizer(labels(), padding=True, return_tensors="pt")
    assert untruncated["input_ids"].shape[1] > 77
    packed_ids, packed_mask = model.pack_text(untruncated["input_ids"], untruncated["attention_mask"])
    torch.testing.assert_close(packed_ids, expected()["text.input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(packed_mask, expected()["text.attention_mask"], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------- audio


def test_mixed_length_batch_equals_single_calls(model, processor):
    crops = recorded_crops()
    batch = _audio_embeds(model, processor(audio=clip_paths(), crop_indices=crops))
    for index, path in enumerate(clip_paths()):
        single = _audio_embeds(model, processor(audio=path, crop_indices=[crops[index]]))
        torch.testing.assert_close(single[0], batch[index], rtol=1e-5, atol=1e-6)


def test_default_crops_are_deterministic_first_middle_last(processor):
    extractor = processor.feature_extractor
    longer = clip_index(longer=True)
    total = expected_json()["fusion"][clip_names()[longer]]["fusion_choice"]["total_frames"]
    ranges = extractor.crop_ranges(total)
    expected_crops = (int(ranges[0][0]), int(ranges[1][len(ranges[1]) // 2]), total - extractor.chunk_frames)
    first = extractor(clip_paths()[longer], return_tensors="pt")["input_features"]
    again = extractor(clip_paths()[longer], return_tensors="pt")["input_features"]
    given = extractor(clip_paths()[longer], crop_indices=[expected_crops], return_tensors="pt")["input_features"]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(first, given, rtol=0, atol=0)


def test_waveform_arrays_stereo_and_other_rates_match_files(processor):
    """An array in (channels, samples) at the file's rate gives the features of the file (librosa.load semantics)."""
    import soundfile

    longer = clip_index(longer=True)
    crops = [recorded_crops()[longer]]
    data, rate = soundfile.read(clip_paths()[longer], dtype="float32", always_2d=True)
    from_array = processor.feature_extractor([data.T], sampling_rate=rate, crop_indices=crops, return_tensors="pt")
    from_file = processor.feature_extractor(clip_paths()[longer], crop_indices=crops, return_tensors="pt")
    torch.testing.assert_close(from_array["input_features"], from_file["input_features"], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------------ bad inputs


def test_empty_label_list_and_empty_texts_are_refused(model, processor):
    from transformers import pipeline

    with pytest.raises(ValueError, match="empty"):
        processor(text=[])
    for bad in ("", "   ", ["a dog", " "]):
        with pytest.raises(ValueError, match="empty or whitespace"):
            processor(text=bad)
    pipe = pipeline("zero-shot-audio-classification", model=str(converted_clap_dir()))
    with pytest.raises(ValueError, match="[Nn]o texts|empty"):
        pipe(np.zeros(16000, dtype=np.float32) + 0.1, candidate_labels=[])
    with pytest.raises(ValueError, match="no tokens"):
        model.pack_text(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))


def test_nan_empty_and_silent_audio(model, processor, caplog):
    with pytest.raises(ValueError, match="NaN or infinite"):
        processor(audio=np.array([0.1, np.nan, 0.2], dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        processor(audio=np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="crop indices"):
        processor(audio=clip_paths()[clip_index(longer=True)], crop_indices=[(0, 0, 10_000)])
    bad_features = torch.zeros(1, 4, 1001, 64)
    bad_features[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.get_audio_features(bad_features)
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            silent = processor(audio=np.zeros(32000, dtype=np.float32))
    finally:
        logging.disable_propagation()
    assert "digital silence" in caplog.text
    embeds = _audio_embeds(model, silent)
    assert torch.isfinite(embeds).all()


def test_missing_audio_file_is_an_audio_load_error(processor, tmp_path):
    from af2_hf import AudioLoadError

    with pytest.raises(AudioLoadError, match="does not exist"):
        processor(audio=str(tmp_path / "missing.wav"))


# --------------------------------------------------------------------------------------------------------------- CLI


def test_cli_clap_labels_prints_the_golden_ranking(capsys):
    from af2_hf.cli import main

    short = clip_index(longer=False)  # the command uses the default crops: a clip without crops matches the original
    model = str(converted_clap_dir())
    assert main(["clap", "labels", clip_paths()[short], "--labels", *labels(), "--model", model]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(labels())
    probabilities = torch.tensor([float(line.split("\t")[0]) for line in lines])
    reference = expected()["logits_per_audio"][short].softmax(-1)
    assert lines[0].split("\t", 1)[1] == labels()[int(reference.argmax())]
    assert max_norm_error(probabilities, reference.sort(descending=True).values) <= 1e-3  # printed with 4 decimals


def test_cli_clap_errors_exit_2(tmp_path, capsys):
    from af2_hf.cli import main

    model = str(converted_clap_dir())
    assert main(["clap", "labels", str(tmp_path / "nope.wav"), "--labels", "x", "--model", model]) == 2
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("x")
    code = main(["clap", "convert", "--checkpoint", str(checkpoint_path()), "--text-model",
                 str(t5_dir()), "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "not empty" in capsys.readouterr().err


def test_device_parity_rows_on_cpu(monkeypatch):
    """benchmarks/device_parity.py's AF-CLAP rows (run on CUDA by benchmarks/gpu_checks.sh) pass on the CPU."""
    import importlib.util

    from af2_testing import REPO_ROOT

    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))  # as when run as a script: its sibling modules
    spec = importlib.util.spec_from_file_location("device_parity", REPO_ROOT / "benchmarks" / "device_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.afclap_parity(torch.device("cpu"), clap_golden_dir(), converted_clap_dir())
    assert [name for name, _, ok, _ in rows if not ok] == []
    names = {row[0] for row in rows}
    assert {"afclap audio.embed on cpu", "afclap text.embed on cpu", "afclap zero-shot argmax on cpu"} <= names


@pytest.mark.parametrize("fusion", [True, False])
def test_random_model_from_config_round_trip(tmp_path, fusion):
    """A model built from a config (sizes unlike the golden's): forward, contrastive loss, save/load round trip."""
    from af2_hf import AFClapConfig, AFClapModel

    config = AFClapConfig(
        audio_config=dict(patch_embeds_hidden_size=8, depths=[1, 1], num_attention_heads=[1, 2], hidden_size=16,
                          enable_fusion=fusion, fusion_type="aff_2d" if fusion else None),
        text_config=dict(vocab_size=50, d_model=32, d_kv=8, d_ff=16, num_layers=1, num_heads=2),
        projection_dim=24,
    )
    torch.manual_seed(0)
    model = AFClapModel(config).eval()
    inputs = dict(input_ids=torch.randint(2, 50, (2, 10)), input_features=torch.randn(2, 4, 1001, 64),
                  is_longer=torch.tensor([[True], [False]]))
    with torch.no_grad():
        outputs = model(**inputs, return_loss=True)
    assert outputs.logits_per_audio.shape == (2, 2) and outputs.audio_embeds.shape == (2, 24)
    assert torch.isfinite(outputs.loss)
    torch.testing.assert_close(outputs.audio_embeds.norm(dim=-1), torch.ones(2))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = AFClapModel.from_pretrained(tmp_path).eval()(**inputs)
    torch.testing.assert_close(reloaded.logits_per_audio, outputs.logits_per_audio, rtol=0, atol=0)
    with pytest.raises(ValueError, match="clip i with text i"):
        model(**{**inputs, "input_ids": inputs["input_ids"][:1]}, return_loss=True)
