"""transformers' generation and model contracts on a small fast AF2 (2-stage HTSAT on 8 mel bins x 20 frames):
assisted / prompt-lookup decoding, inputs_embeds, the cache (one DynamicCache / StaticCache with the audio layers
after the decoder's, continuing from a returned cache, crop), left padding, beam sample, return_dict_in_generate,
text-only prompts and mixed batches (equal to a plain Qwen2 LM with the same weights), get_audio_features'
outputs, gradient checkpointing, attention implementations and the tensor-parallel plan."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from af2_hf._compat import CACHE_KEY, output_cache
from af2_hf.modeling_audioflamingo2 import (
    AudioFlamingo2AudioCacheLayer,
    AudioFlamingo2StaticAudioCacheLayer,
    _attention_interface,
)
from af2_testing import random_model

PAD = 118
FAST = dict(
    audio_config=dict(
        spec_size=32, num_mel_bins=8, patch_embeds_hidden_size=8, depths=[1, 1], num_attention_heads=[2, 2],
        window_size=4, hidden_size=16,
    ),
    audio_transformer_rotary_dim=4, tokens_per_window=16,
)


def fast_model(seed=0, **overrides):
    return random_model(seed=seed, **FAST, **overrides)


def features(batch, windows, seed=0):
    return torch.randn(batch, windows, 20, 8, generator=torch.Generator().manual_seed(seed)) * 4 - 2


def ids(batch, seq, seed=0):
    return torch.randint(0, 110, (batch, seq), generator=torch.Generator().manual_seed(seed))


def audio_inputs(batch=1, seq=7, windows=2, seed=0, mask=None):
    return dict(
        input_ids=ids(batch, seq, seed),
        input_features=features(batch, windows, seed),
        input_features_mask=torch.ones(batch, windows, dtype=torch.long) if mask is None else mask,
    )


GREEDY = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=PAD)


def count_audio_projections(model):
    calls = []
    hooks = [block.to_kv.register_forward_hook(lambda *_: calls.append(1)) for block in model.model.cross_attention_layers]
    return calls, hooks


# -- assisted and prompt-lookup decoding --------------------------------------------------------------------------


def test_the_model_as_its_own_assistant_gives_the_greedy_ids():
    model = fast_model()
    x = audio_inputs(mask=torch.tensor([[1, 0]]))
    greedy = model.generate(**x, **GREEDY)
    assert torch.equal(model.generate(**x, **GREEDY, assistant_model=model), greedy)


def test_prompt_lookup_decoding_gives_the_greedy_ids():
    model = fast_model()
    x = audio_inputs(seq=12)
    x["input_ids"][0, 6:12] = x["input_ids"][0, :6]  # something to look up
    greedy = model.generate(**x, **GREEDY)
    assert torch.equal(model.generate(**x, **GREEDY, prompt_lookup_num_tokens=3), greedy)


def test_a_prefill_that_is_not_the_first_iteration_keeps_the_audio_until_the_cache_holds_it():
    model = fast_model()
    x = audio_inputs()
    cache = DynamicCache(config=model.config.text_config)
    inputs = model.prepare_inputs_for_generation(x["input_ids"], input_features=x["input_features"],
                                                 input_features_mask=x["input_features_mask"],
                                                 is_first_iteration=False, use_cache=True, **{CACHE_KEY: cache})
    assert inputs["input_features"] is x["input_features"]
    with torch.no_grad():
        model(**inputs)
    later = model.prepare_inputs_for_generation(x["input_ids"], input_features=x["input_features"],
                                                input_features_mask=x["input_features_mask"],
                                                is_first_iteration=False, use_cache=True, **{CACHE_KEY: cache})
    assert later["input_features"] is None and later["input_features_mask"] is x["input_features_mask"]


# -- inputs_embeds ------------------------------------------------------------------------------------------------


def test_generate_from_inputs_embeds_with_audio_equals_generate_from_ids():
    model = fast_model()
    x = audio_inputs()
    from_ids = model.generate(**x, **GREEDY)
    embeds = model.get_input_embeddings()(x["input_ids"])
    from_embeds = model.generate(inputs_embeds=embeds, input_features=x["input_features"],
                                 input_features_mask=x["input_features_mask"], **GREEDY)
    assert torch.equal(from_embeds, from_ids[:, x["input_ids"].shape[1]:])


# -- the cache ----------------------------------------------------------------------------------------------------


def test_return_dict_in_generate_returns_one_dynamic_cache_with_the_audio_layers_after_the_decoders():
    model = fast_model()
    x = audio_inputs(batch=2, mask=torch.tensor([[1, 1], [1, 0]]))
    out = model.generate(**x, **GREEDY, return_dict_in_generate=True, output_logits=True)
    cache = output_cache(out)
    layers = model.config.text_config.num_hidden_layers
    assert type(cache) is DynamicCache
    assert len(cache.layers) == layers + len(model.model.cross_attention_layers)
    assert all(type(layer) is AudioFlamingo2AudioCacheLayer for layer in cache.layers[layers:])
    assert all(layer.keys.shape == (2, 2, 2 * 16, 16) for layer in cache.layers[layers:])
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    assert len(out.logits) == 6 and out.sequences.shape == (2, 7 + 6)


def test_static_cache_holds_static_audio_layers_and_equals_dynamic():
    model = fast_model()
    x = audio_inputs(batch=2, mask=torch.tensor([[1, 1], [1, 0]]))
    dynamic = model.generate(**x, **GREEDY)
    out = model.generate(**x, **GREEDY, cache_implementation="static", return_dict_in_generate=True)
    assert torch.equal(out.sequences, dynamic)
    cache = output_cache(out)
    layers = model.config.text_config.num_hidden_layers
    assert isinstance(cache, StaticCache)
    assert all(type(layer) is AudioFlamingo2StaticAudioCacheLayer and layer.max_cache_len == 32
               for layer in cache.layers[layers:])


def test_continuing_from_a_returned_cache_equals_one_generate():
    model = fast_model()
    x = audio_inputs()
    whole = model.generate(**x, **{**GREEDY, "max_new_tokens": 5, "min_new_tokens": 5})
    first = model.generate(**x, **{**GREEDY, "max_new_tokens": 3, "min_new_tokens": 3}, return_dict_in_generate=True)
    calls, hooks = count_audio_projections(model)
    try:
        rest = model.generate(input_ids=first.sequences, input_features=x["input_features"],
                              input_features_mask=x["input_features_mask"],
                              **{CACHE_KEY: output_cache(first)}, **{**GREEDY, "max_new_tokens": 2, "min_new_tokens": 2})
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(rest, whole)
    assert len(calls) == len(model.model.cross_attention_layers)  # the audio projected once in the second call


def test_continuing_from_inputs_embeds_and_a_returned_cache():
    """The contract of the mixin's test_generate_continue_from_inputs_embeds (which skips AF2: it asks the composite
    config for `use_cache`, which lives in its text_config)."""
    model = fast_model()
    x = audio_inputs()
    audio = dict(input_features=x["input_features"], input_features_mask=x["input_features_mask"])
    embeds = model.get_input_embeddings()(x["input_ids"])
    whole = model.generate(inputs_embeds=embeds, **audio, **{**GREEDY, "max_new_tokens": 4, "min_new_tokens": 4})
    first = model.generate(inputs_embeds=embeds, **audio, **{**GREEDY, "max_new_tokens": 3, "min_new_tokens": 3},
                           return_dict_in_generate=True)
    more = torch.cat([embeds, model.get_input_embeddings()(first.sequences)], dim=1)
    last = model.generate(inputs_embeds=more, **audio, **{CACHE_KEY: output_cache(first)},
                          **{**GREEDY, "max_new_tokens": 1, "min_new_tokens": 1})
    assert torch.equal(torch.cat([first.sequences, last], dim=1), whole)


def test_cropping_the_cache_keeps_the_audio():
    model = fast_model()
    with torch.no_grad():
        cache = output_cache(model(**audio_inputs(seq=9)))
    layers = model.config.text_config.num_hidden_layers
    audio = [layer.keys.clone() for layer in cache.layers[layers:]]
    cache.crop(-4)  # drop the last 4 text tokens (as assisted decoding drops rejected candidates)
    assert cache.get_seq_length() == 5
    assert all(torch.equal(layer.keys, kept) for layer, kept in zip(cache.layers[layers:], audio))


def test_a_cache_that_is_not_a_transformers_cache_is_refused():
    model = fast_model()
    with pytest.raises(TypeError, match="Cache"):
        model(**audio_inputs(), cache=((torch.zeros(1), torch.zeros(1)),))


# -- batching, beams ----------------------------------------------------------------------------------------------


def test_left_padded_batch_equals_single_runs():
    model = fast_model()
    a, b = audio_inputs(seq=9, seed=1), audio_inputs(seq=5, seed=2, windows=1)
    batch_ids = torch.full((2, 9), PAD)
    batch_ids[0], batch_ids[1, 4:] = a["input_ids"][0], b["input_ids"][0]
    attention = (batch_ids != PAD).long()
    attention[0] = 1
    feats = torch.zeros(2, 2, 20, 8)
    feats[0], feats[1, :1] = a["input_features"][0], b["input_features"][0]
    out = model.generate(input_ids=batch_ids, attention_mask=attention, input_features=feats,
                         input_features_mask=torch.tensor([[1, 1], [1, 0]]), **GREEDY)
    assert torch.equal(out[0, 9:], model.generate(**a, **GREEDY)[0, 9:])
    assert torch.equal(out[1, 9:], model.generate(**b, **GREEDY)[0, 5:])


def test_beam_sample_is_seeded_and_equal_across_cache_implementations():
    model = fast_model()
    kwargs = dict(**audio_inputs(batch=2), do_sample=True, num_beams=2, num_return_sequences=2, max_new_tokens=5,
                  pad_token_id=PAD, top_k=20)
    runs = []
    for cache_implementation in ("dynamic", "static"):
        torch.manual_seed(7)
        runs.append(model.generate(**kwargs, cache_implementation=cache_implementation))
    assert runs[0].shape[0] == 4
    assert torch.equal(runs[0], runs[1])


# -- text-only prompts --------------------------------------------------------------------------------------------


def plain_language_model(model):
    """Qwen2ForCausalLM with the AF2 model's language-model weights (no audio tower, no gated blocks)."""
    lm = Qwen2ForCausalLM(Qwen2Config(**model.config.text_config.to_diff_dict())).eval()
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    return lm


def test_a_text_only_prompt_is_the_plain_language_model():
    model = fast_model()
    lm = plain_language_model(model)
    x = ids(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, lm(input_ids=x).logits, rtol=0, atol=0)
    assert torch.equal(model.generate(input_ids=x, **GREEDY), lm.generate(input_ids=x, **GREEDY))
    static = model.generate(input_ids=x, **GREEDY, cache_implementation="static")
    assert torch.equal(static, lm.generate(input_ids=x, **GREEDY))


def test_a_text_only_sample_in_a_mixed_batch_skips_the_gated_blocks():
    model = fast_model()
    lm = plain_language_model(model)
    x = audio_inputs(batch=2, seq=8, mask=torch.tensor([[1, 1], [0, 0]]))
    with torch.no_grad():
        mixed = model(**x).logits
        alone = model(**audio_inputs(batch=1, seq=8))["logits"]  # sample 0 with its audio, alone
        text_only = lm(input_ids=x["input_ids"][1:]).logits
    torch.testing.assert_close(mixed[1:], text_only, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[:1], alone, rtol=1e-5, atol=1e-5)
    assert (mixed[:1] - lm(input_ids=x["input_ids"][:1]).logits).abs().max() > 1e-3  # sample 0 does hear its audio
    out = model.generate(**x, **GREEDY)
    assert torch.equal(out[1:], lm.generate(input_ids=x["input_ids"][1:], **GREEDY))


# -- get_audio_features -------------------------------------------------------------------------------------------


def test_get_audio_features_returns_base_model_output_with_pooling():
    model = fast_model()
    model.set_attn_implementation("eager")
    feats, mask = features(2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]])
    with torch.no_grad():
        out = model.get_audio_features(feats, mask, output_hidden_states=True, output_attentions=True)
        as_tuple = model.get_audio_features(feats, mask, return_dict=False)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out.last_hidden_state.shape == (2, 3 * 16, model.config.audio_hidden_size)
    layers = model.config.audio_transformer_num_layers
    assert len(out.hidden_states) == layers + 1 and torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert len(out.attentions) == layers and out.attentions[0].shape == (2, 2, 48, 48)
    # pooler_output: the mean over each sample's real windows' tokens
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, :32].mean(0))
    torch.testing.assert_close(out.pooler_output[1], out.last_hidden_state[1, :16].mean(0))
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)


# -- training, attention, parallelism -----------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_trains_with_both_checkpoint_kinds(use_reentrant):
    x = audio_inputs(batch=2, mask=torch.tensor([[1, 1], [1, 0]]))
    grads = []
    for checkpointing in (False, True):
        model = fast_model()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        loss = model(**x, labels=x["input_ids"], use_cache=False).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    assert any(name.startswith("model.audio_transformer.") for name in grads[1][1])  # through the audio states
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_set_attn_implementation_keeps_the_htsat_tower_eager_and_the_results():
    model = fast_model()
    x = audio_inputs(batch=2, mask=torch.tensor([[1, 1], [1, 0]]))
    logits = {}
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        assert model.config.text_config._attn_implementation == implementation
        assert model.model.audio_tower.config._attn_implementation == "eager"
        with torch.no_grad():
            logits[implementation] = model(**x).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-5)


def test_flash_attention_is_declared_and_the_audio_attentions_use_sdpa_with_it():
    model = fast_model()
    assert type(model)._supports_flash_attn and type(model)._supports_sdpa
    config = model.model.cross_attention_layers[0].config
    implementation = config._attn_implementation
    try:
        config._attn_implementation_internal = "flash_attention_2"
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        assert _attention_interface(config) is sdpa_attention_forward
    finally:
        config._attn_implementation_internal = implementation


def test_tensor_parallel_plan_covers_the_language_model_and_the_tied_head():
    model = fast_model()
    plan = model._tp_plan
    assert plan["lm_head"] == Qwen2ForCausalLM._tp_plan["lm_head"]
    for key, style in model.config.text_config.base_model_tp_plan.items():
        assert plan[f"model.language_model.{key}"] == style
    assert model.lm_head.weight is model.get_input_embeddings().weight
