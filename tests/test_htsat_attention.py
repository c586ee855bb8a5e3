"""The HTSAT tower's fused (SDPA) window attention: the original's numbers, the eager module's numbers, weights and
gradients, and the eager fallback (attention weights, `attn_implementation="eager"`)."""

from unittest import mock

import pytest
import torch
from transformers.models.clap.modeling_clap import ClapAudioModel, ClapAudioSelfAttention

from af2_hf import htsat_attention
from af2_hf.htsat_attention import HTSATSdpaSelfAttention
from af2_testing import load_converted_model, random_features, random_model, relative_error

TOL = 1e-4


def window_attentions(model):
    return [m for m in model.model.audio_tower.modules() if isinstance(m, ClapAudioSelfAttention)]


def count_sdpa_calls(model, features):
    with mock.patch.object(htsat_attention.F, "scaled_dot_product_attention",
                           wraps=htsat_attention.F.scaled_dot_product_attention) as sdpa, torch.no_grad():
        out = model.model.audio_tower(features).last_hidden_state
    return out, sdpa.call_count


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_both_paths_reproduce_the_original_audio_tower(golden, case):
    """Golden AF-CLAP output (the original's HTSAT) from the fused path and from the eager one; the converted
    checkpoint has trained relative-position tables and shifted windows."""
    mel = golden[f"{case}.mel"][:, None]
    outputs = {}
    for implementation in ("sdpa", "eager"):
        model = load_converted_model(implementation)
        out, calls = count_sdpa_calls(model, mel)
        assert calls == (len(window_attentions(model)) if implementation == "sdpa" else 0)
        outputs[implementation] = out.flatten(2).transpose(1, 2)
        assert relative_error(outputs[implementation], golden[f"{case}.clap_out"]) <= TOL
    assert relative_error(outputs["sdpa"], outputs["eager"]) <= 1e-5


def test_every_window_attention_is_fused_with_the_eager_parameters():
    model = random_model()
    attentions = window_attentions(model)
    assert attentions and all(type(m) is HTSATSdpaSelfAttention for m in attentions)
    eager_tower = ClapAudioModel._from_config(model.config.audio_config, attn_implementation="eager")
    expected = {name: tensor.shape for name, tensor in eager_tower.state_dict().items()}
    assert {name: tensor.shape for name, tensor in model.model.audio_tower.state_dict().items()} == expected
    assert all(m.query.weight.dtype == torch.float32 for m in attentions)


def test_fused_path_matches_eager_code_with_random_relative_position_tables():
    model = random_model(seed=3)
    with torch.no_grad():
        for attention in window_attentions(model):
            attention.relative_position_bias_table.normal_(0, 1.0)
    features = random_features(3, 1)[:, 0, None]
    fused, calls = count_sdpa_calls(model, features)
    assert calls == len(window_attentions(model))
    model.set_attn_implementation("eager")
    eager, calls = count_sdpa_calls(model, features)
    assert calls == 0
    assert relative_error(fused, eager) <= 1e-5


def test_attention_weights_requested_fall_back_to_eager_code():
    model = random_model()
    features = random_features(2, 1)[:, 0, None]
    with torch.no_grad():
        plain = model.model.audio_tower(features).last_hidden_state
        with mock.patch.object(htsat_attention.F, "scaled_dot_product_attention") as sdpa:
            out = model.model.audio_tower(features, output_attentions=True)
    sdpa.assert_not_called()
    assert out.attentions and all(a.shape[-1] == a.shape[-2] == 64 for a in out.attentions)
    assert relative_error(out.last_hidden_state, plain) <= 1e-5


def test_training_gradients_match_the_eager_code():
    grads = {}
    for implementation in ("sdpa", "eager"):
        model = random_model(seed=1).train()
        model.set_attn_implementation(implementation)
        features = random_features(2, 1, seed=4)[:, 0, None]
        model.model.audio_tower(features).last_hidden_state.square().mean().backward()
        grads[implementation] = {
            name: p.grad for name, p in model.model.audio_tower.named_parameters() if p.grad is not None
        }
    assert grads["sdpa"].keys() == grads["eager"].keys()
    assert any("relative_position_bias_table" in name for name in grads["sdpa"])
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grad, grads["eager"][name], rtol=1e-4, atol=1e-6, msg=name)


def test_attention_dropout_applies_in_training_only():
    model = random_model(audio_config=dict(attention_probs_dropout_prob=0.5))
    features = random_features(1, 1)[:, 0, None]
    tower = model.model.audio_tower
    with torch.no_grad():
        eval_out = tower(features).last_hidden_state
        tower.train()
        tower.audio_encoder.batch_norm.eval()  # keep its running statistics: only dropout differs
        outputs = {}
        for p in (0.0, 0.5):
            for attention in window_attentions(model):
                attention.dropout.p = p
            outputs[p] = tower(features).last_hidden_state
        tower.eval()
        assert torch.equal(tower(features).last_hidden_state, eval_out)  # eval: no dropout whatever p
    assert not torch.allclose(outputs[0.0], outputs[0.5])  # train: the attention dropout acts
