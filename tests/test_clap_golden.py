"""AF-CLAP against the ORIGINAL AF-CLAP code on tiny random weights (``../shared/golden/clap_tiny``): every stage of
its README (waveforms, log-mels, fusion views, tokens, T5 states, pooled/projected/normalised embeddings,
HTSAT clip-wise tagging output, similarities, logits, mlp-loss logits, zero-shot argmax) within the README's
tolerances."""

import numpy as np
import pytest
import torch

from clap_testing import (
    MEL_DB_TOLERANCE_LOUD,
    MEL_DB_TOLERANCE_QUIET,
    RELATIVE_TOLERANCE,
    clip_index,
    clip_names,
    clip_paths,
    expected,
    expected_json,
    fusion_seed,
    labels,
    load_model,
    load_processor,
    max_norm_error,
    mel_errors,
    recorded_crops,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model()


@pytest.fixture(scope="module")
def processor():
    return load_processor()


@pytest.fixture(scope="module")
def features(processor):
    return processor.feature_extractor(clip_paths(), crop_indices=recorded_crops(), return_tensors="pt")


@pytest.fixture(scope="module")
def text_inputs(processor):
    return processor(text=labels())


# ---------------------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize("index,name", list(enumerate(clip_names())))
def test_loaded_waveform_quantised_exactly(index, name):
    from af2_hf import load_afclap_audio

    waveform = load_afclap_audio(clip_paths()[index])
    quantised = (np.clip(waveform, -1, 1) * np.float32(32767.0)).astype(np.int16)
    assert len(waveform) == expected_json()["fusion"][name]["loaded_samples"]
    np.testing.assert_array_equal(quantised, expected()[f"{name}.waveform_int16"].numpy())


def test_repeat_padded_waveform(processor):
    from af2_hf.feature_extraction_afclap import quantize_int16

    name = clip_names()[clip_index(longer=False)]
    reference = expected()[f"{name}.waveform_int16"].numpy()
    clip = quantize_int16((reference / 32767.0).astype(np.float32))
    np.testing.assert_array_equal(clip, (reference / 32767.0).astype(np.float32))
    padded = processor.feature_extractor.repeat_pad(clip)
    np.testing.assert_array_equal(padded, expected()[f"{name}.waveform"].numpy())


def test_longer_flags(features):
    flags = [bool(expected()[f"{name}.longer"].item()) for name in clip_names()]
    assert features["is_longer"].flatten().tolist() == flags


@pytest.mark.parametrize("name", clip_names())
def test_log_mel(processor, name):
    """``{name}.mel``: the mel of the 10 s repeat-padded input (short clip) or of the whole clip (longer)."""
    from af2_hf.feature_extraction_afclap import quantize_int16

    clip = (expected()[f"{name}.waveform_int16"].numpy() / 32767.0).astype(np.float32)
    extractor = processor.feature_extractor
    waveform = clip if len(clip) > extractor.max_samples else extractor.repeat_pad(quantize_int16(clip))
    mel = extractor.log_mel(torch.from_numpy(np.ascontiguousarray(waveform)))
    reference = expected()[f"{name}.mel"]
    assert mel.shape == reference.shape
    loud, quiet = mel_errors(mel, reference)
    assert loud <= MEL_DB_TOLERANCE_LOUD and quiet <= MEL_DB_TOLERANCE_QUIET, (loud, quiet)


@pytest.mark.parametrize("index,name", list(enumerate(clip_names())))
def test_fusion_views_from_files(features, index, name):
    """The model input of each clip: ``mel_fusion`` for longer clips (recorded crops), the mel 4 times otherwise."""
    reference = expected().get(f"{name}.mel_fusion")
    if reference is None:
        reference = expected()[f"{name}.mel"].expand(4, -1, -1)
    loud, quiet = mel_errors(features["input_features"][index], reference)
    assert loud <= MEL_DB_TOLERANCE_LOUD and quiet <= MEL_DB_TOLERANCE_QUIET, (loud, quiet)


def test_generator_reproduces_the_original_draws(processor, features):
    """``np.random.RandomState(seed)`` draws the crops the original drew after ``np.random.seed(seed)``."""
    drawn = processor.feature_extractor(
        clip_paths(), generator=np.random.RandomState(fusion_seed()), return_tensors="pt"
    )
    torch.testing.assert_close(drawn["input_features"], features["input_features"], rtol=0, atol=0)


def _golden_fusion_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    golden = expected()
    views = [
        golden[f"{name}.mel_fusion"] if f"{name}.mel_fusion" in golden else golden[f"{name}.mel"].expand(4, -1, -1)
        for name in clip_names()
    ]
    longer = torch.stack([expected()[f"{name}.longer"] for name in clip_names()])
    return torch.stack(views), longer


def test_audio_tower_stages_on_golden_mels(model):
    """HTSAT embedding, projection and normalised embedding from the original's own fusion inputs."""
    input_features, is_longer = _golden_fusion_inputs()
    with torch.no_grad():
        embedding = model.encode_audio(input_features, is_longer).pooler_output
        projected = model.audio_projection(embedding)
        embeds = model.get_audio_features(input_features, is_longer).pooler_output
        clipwise = model.get_audio_tagging(input_features, is_longer)
    assert max_norm_error(embedding, expected()["audio.embedding"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(clipwise, expected()["audio.clipwise_output"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(projected, expected()["audio.projected"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(embeds, expected()["audio.embed"]) <= RELATIVE_TOLERANCE


def test_audio_embeddings_from_files(model, features):
    with torch.no_grad():
        outputs = model.encode_audio(features["input_features"], features["is_longer"])
        embeds = model.get_audio_features(**features).pooler_output
        clipwise = model.get_audio_tagging(**features)
    assert max_norm_error(outputs.pooler_output, expected()["audio.embedding"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(clipwise, expected()["audio.clipwise_output"]) <= RELATIVE_TOLERANCE
    projected = model.audio_projection(outputs.pooler_output)
    assert max_norm_error(projected, expected()["audio.projected"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(embeds, expected()["audio.embed"]) <= RELATIVE_TOLERANCE


# ----------------------------------------------------------------------------------------------------------- text


def test_tokens_exact(text_inputs):
    torch.testing.assert_close(text_inputs["input_ids"], expected()["text.input_ids"], rtol=0, atol=0)
    torch.testing.assert_close(text_inputs["attention_mask"], expected()["text.attention_mask"], rtol=0, atol=0)


def test_text_stages(model, text_inputs):
    with torch.no_grad():
        outputs, pooled = model.encode_text(text_inputs["input_ids"], text_inputs["attention_mask"])
        projected = model.text_projection(pooled)
        features = model.get_text_features(**text_inputs)
    assert max_norm_error(outputs.last_hidden_state, expected()["text.last_hidden_state"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(pooled, expected()["text.pooled"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(projected, expected()["text.projected"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(features.pooler_output, expected()["text.embed"]) <= RELATIVE_TOLERANCE
    torch.testing.assert_close(features.last_hidden_state, outputs.last_hidden_state)


# ---------------------------------------------------------------------------------------------------------- joint


def test_logit_scales(model):
    scale_a, scale_t = model.get_logit_scale()
    assert max_norm_error(model.logit_scale_a, expected()["logit_scale_a.param"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(model.logit_scale_t, expected()["logit_scale_t.param"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(scale_a, expected()["logit_scale_a"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(scale_t, expected()["logit_scale_t"]) <= RELATIVE_TOLERANCE


def test_forward_logits_similarity_and_argmax(model, features, text_inputs):
    with torch.no_grad():
        outputs = model(**text_inputs, **features)
    assert max_norm_error(outputs.audio_embeds @ outputs.text_embeds.T, expected()["similarity"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(outputs.logits_per_audio, expected()["logits_per_audio"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(outputs.logits_per_text, expected()["logits_per_text"]) <= RELATIVE_TOLERANCE
    assert outputs.logits_per_audio.argmax(-1).tolist() == expected()["logits_per_audio"].argmax(-1).tolist()
    assert outputs.logits_per_text.argmax(-1).tolist() == expected()["logits_per_text"].argmax(-1).tolist()


def test_mlp_loss_stages(model, features, text_inputs):
    """``audio_transform``/``text_transform`` outputs and the four logits of the original's ``mlp_loss``."""
    with torch.no_grad():
        outputs = model(**text_inputs, **features)
        audio_mlp = model.audio_transform(outputs.audio_embeds)
        text_mlp = model.text_transform(outputs.text_embeds)
        logits = model.get_mlp_logits(outputs.audio_embeds, outputs.text_embeds)
    assert max_norm_error(audio_mlp, expected()["audio.embed_mlp"]) <= RELATIVE_TOLERANCE
    assert max_norm_error(text_mlp, expected()["text.embed_mlp"]) <= RELATIVE_TOLERANCE
    for name, value in logits.items():
        assert max_norm_error(value, expected()[f"mlp.{name}"]) <= RELATIVE_TOLERANCE, name
