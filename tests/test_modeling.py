"""Model behaviour on small random configs: construction from config, cache/prefill equivalence, gates, embeddings,
masking of padded windows, layouts (cross-attention every n layers, untied embeddings) and input validation."""

import copy
import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

from af2_hf import AudioFlamingo2Config, AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model
from af2_hf._compat import CACHE_KEY, output_cache
from af2_testing import random_features, random_model, tiny_config


def inputs(batch=2, seq=9, windows=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        input_ids=torch.randint(0, 110, (batch, seq), generator=generator),
        input_features=random_features(batch, windows, seed=seed),
        input_features_mask=torch.ones(batch, windows, dtype=torch.long),
    )


def test_default_config_is_af2_3b():
    config = AudioFlamingo2Config()
    assert config.audio_hidden_size == 2048
    assert config.text_config.hidden_size == 2048 and config.text_config.num_hidden_layers == 36
    assert config.cross_attention_layers == list(range(36))
    assert config.audio_rotary_dim == 128  # max(256 // 2, 32)
    assert config.audio_transformer_rope_theta == 4096.0


def test_fresh_gates_are_closed_so_audio_has_no_effect():
    torch.manual_seed(0)
    model = AudioFlamingo2ForConditionalGeneration(tiny_config()).eval()
    for block in model.model.cross_attention_layers:
        assert block.attn_gate.item() == 0.0 and block.ff_gate.item() == 0.0
    x = inputs()
    with torch.no_grad():
        with_audio = model(**x).logits
        other_audio = model(**{**x, "input_features": random_features(2, 2, seed=5)}).logits
    torch.testing.assert_close(with_audio, other_audio)


def test_audio_changes_logits_when_gates_open():
    model = random_model()
    x = inputs()
    with torch.no_grad():
        a = model(**x).logits
        b = model(**{**x, "input_features": random_features(2, 2, seed=5)}).logits
    assert (a - b).abs().max() > 1e-3


def test_audio_features_shape_and_batched_tower_calls():
    model = random_model()
    calls = []
    hook = model.model.audio_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            audio = model.get_audio_features(random_features(3, 4), torch.ones(3, 4, dtype=torch.long)).last_hidden_state
    finally:
        hook.remove()
    assert model.config.audio_tower_batch_size == 4
    assert calls == [4, 4, 4]  # the 12 windows of the batch together, 4 per call
    assert audio.shape == (3, 4 * 64, model.config.audio_hidden_size)


def test_padded_windows_do_not_change_a_sample():
    model = random_model()
    x = inputs(batch=1, windows=2)
    padded = torch.cat([x["input_features"], random_features(1, 3, seed=9)], dim=1)
    with torch.no_grad():
        alone = model(**x).logits
        with_pad = model(input_ids=x["input_ids"], input_features=padded,
                         input_features_mask=torch.tensor([[1, 1, 0, 0, 0]])).logits
    torch.testing.assert_close(alone, with_pad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_arg", ["cache", "past_key_values"])
def test_prefill_plus_cached_steps_equal_full_forward(cache_arg):
    """Either spelling of the cache argument (transformers >= 5.24 `cache`, older `past_key_values`) works."""
    model = random_model()
    x = inputs(batch=2, seq=12)
    with torch.no_grad():
        full = model(**x, use_cache=False).logits
        out = model(**{**x, "input_ids": x["input_ids"][:, :8]}, use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        # one DynamicCache: the decoder's self-attention layers, then one layer per gated cross-attention block
        layers = model.config.text_config.num_hidden_layers
        assert type(cache) is DynamicCache and len(cache.layers) == layers + len(model.model.cross_attention_layers)
        assert all(layer.keys.shape[-2] == 2 * model.config.tokens_per_window for layer in cache.layers[layers:])
        for t in range(8, 12):
            out = model(input_ids=x["input_ids"][:, t:t + 1], input_features_mask=x["input_features_mask"],
                        **{cache_arg: cache})
            assert output_cache(out) is cache
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_audio_given_again_replaces_the_cached_audio_keys_values():
    """Passing audio_hidden_states at a decode step re-projects the audio (the naive path): the step's logits equal
    the cached step's, and the cross-attention cache still holds one copy of the audio."""
    model = random_model()
    x = inputs(batch=1, seq=6)
    with torch.no_grad():
        out = model(**x)
        audio, mask = out.audio_hidden_states, x["input_features_mask"]
        token = out.logits[:, -1:].argmax(-1)
        cached = model(input_ids=token, cache=copy.deepcopy(output_cache(out)), input_features_mask=mask)
        cache = output_cache(out)
        naive = model(input_ids=token, cache=cache, input_features_mask=mask, audio_hidden_states=audio)
    torch.testing.assert_close(naive.logits, cached.logits, rtol=1e-5, atol=1e-5)
    cross_layers = cache.layers[model.config.text_config.num_hidden_layers :]
    assert len(cross_layers) == len(model.model.cross_attention_layers)
    assert all(layer.keys.shape[-2] == audio.shape[1] for layer in cross_layers)


def _cache_warnings(model, **inputs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(**inputs, past_key_values=DynamicCache())
    return [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_past_key_values_warns_as_transformers_own_models():
    """`past_key_values=`: transformers >= 5.24 renamed it `cache`; AF2 gives Qwen2's deprecation warning word for word
    (its own forward's name in it). On older releases it is the name, accepted silently."""
    model = random_model()
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**model.config.text_config.to_diff_dict())).eval()
    ids = inputs(batch=1, seq=4)["input_ids"]
    ours, theirs = _cache_warnings(model, input_ids=ids), _cache_warnings(qwen2, input_ids=ids)
    if CACHE_KEY == "cache":
        assert len(theirs) == 1
        assert ours == [theirs[0].replace(type(qwen2).__name__, type(model).__name__)]
    else:
        assert ours == theirs == []


def test_cross_attention_every_second_layer_and_untied_embeddings():
    model = random_model(cross_attention_every_n_layers=2,
                         text_config=dict(num_hidden_layers=4, tie_word_embeddings=False))
    assert model.config.cross_attention_layers == [1, 3]
    assert len(model.model.cross_attention_layers) == 2
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert torch.isfinite(model(**inputs()).logits).all()


def test_tied_embeddings_share_storage():
    model = random_model()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings(tied):
    model = random_model(text_config=dict(tie_word_embeddings=tied))
    model.resize_token_embeddings(130)
    assert model.get_input_embeddings().weight.shape[0] == 130
    assert model.lm_head.weight.shape[0] == 130
    assert model.config.text_config.vocab_size == 130
    with torch.no_grad():
        out = model(**{**inputs(), "input_ids": torch.tensor([[125, 3, 4], [1, 2, 129]])}).logits
    assert out.shape[-1] == 130


def test_base_model_and_hidden_states():
    model = random_model()
    base = model.model
    assert isinstance(base, AudioFlamingo2Model)
    with torch.no_grad():
        out = base(**inputs())
    assert out.last_hidden_state.shape == (2, 9, model.config.text_config.hidden_size)


def test_frozen_audio_tower_keeps_batchnorm_in_eval_under_train():
    model = random_model()
    model.model.audio_tower.requires_grad_(False)
    model.train()
    assert not model.model.audio_tower.training
    assert model.model.audio_transformer.training
    model.model.audio_tower.requires_grad_(True)
    model.train()
    assert model.model.audio_tower.training


def test_gradients_reach_gates_and_audio_transformer():
    model = random_model()
    model.train()
    x = inputs()
    out = model(**x, labels=x["input_ids"])
    out.loss.backward()
    block = model.model.cross_attention_layers[0]
    assert block.attn_gate.grad is not None and block.attn_gate.grad.abs().sum() > 0
    assert model.model.audio_transformer.layers[0].fc1.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_loss_and_grads():
    x = inputs()
    grads = []
    for checkpointing in (False, True):
        model = random_model()
        model.train()
        if checkpointing:
            # activation_checkpointing_enable from transformers 5.23 on (gradient_checkpointing_enable before)
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        loss = model(**x, labels=x["input_ids"], use_cache=False).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_bad_inputs_give_clear_errors():
    model = random_model()
    x = inputs()
    with pytest.raises(ValueError, match="one audio per text"):
        model(**{**x, "input_features": random_features(3, 2)})
    with pytest.raises(ValueError, match="input_features must have shape"):
        model(**{**x, "input_features": torch.randn(2, 1001, 64)})
    with pytest.raises(ValueError, match="mel bins"):
        model(**{**x, "input_features": torch.randn(2, 2, 1001, 32)})
    with pytest.raises(ValueError, match="input_features_mask has shape"):
        model(**{**x, "input_features_mask": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="prefill"):
        model(input_ids=x["input_ids"], input_features_mask=x["input_features_mask"])
    with pytest.raises(ValueError, match="frames per window; the audio tower takes 1 to 1024"):
        model(**{**x, "input_features": torch.randn(2, 2, 1025, 64)})
    with pytest.raises(ValueError, match="no window"):
        model(**{**x, "input_features": torch.randn(2, 0, 1001, 64), "input_features_mask": torch.ones(2, 0)})


def test_bad_audio_shapes_are_refused_before_any_tower_runs():
    model = random_model()
    x = inputs()
    calls = []
    handles = [module.register_forward_pre_hook(lambda *_: calls.append(1))
               for module in (model.model.audio_tower, model.model.audio_transformer)]
    try:
        for bad in (dict(input_features=torch.randn(2, 2, 1001, 32)), dict(input_features_mask=torch.ones(2, 3)),
                    dict(input_features=random_features(3, 2), input_features_mask=torch.ones(3, 2)),
                    dict(input_features=torch.randn(2, 2, 2000, 64))):
            with pytest.raises(ValueError):
                model(**{**x, **bad})
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []


def test_text_only_forward_is_the_language_model():
    model = random_model()
    ids = inputs()["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        lm = model.model.language_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, model.lm_head(lm))


def test_output_hidden_states_and_attentions():
    model = random_model()
    model.set_attn_implementation("eager")  # attention weights are only materialised by eager attention
    with torch.no_grad():
        out = model(**inputs(), output_hidden_states=True, output_attentions=True)
        plain = model(**inputs())
    layers = model.config.text_config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1
    assert len(out.attentions) == layers
    torch.testing.assert_close(out.logits, plain.logits)
    assert plain.hidden_states is None


def test_audio_tower_batch_size_bounds_each_call_and_keeps_the_result():
    """Windows go through the audio tower audio_tower_batch_size at a time; the result equals one call over all."""
    model = random_model()
    features = random_features(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    calls = []
    handle = model.model.audio_tower.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            model.config.audio_tower_batch_size = None
            together = model.get_audio_features(features, mask).last_hidden_state
            model.config.audio_tower_batch_size = 4
            chunked = model.get_audio_features(features, mask).last_hidden_state
    finally:
        handle.remove()
    assert calls == [6, 4, 2]
    torch.testing.assert_close(chunked, together, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="audio_tower_batch_size"):
        tiny_config(audio_tower_batch_size=0)
