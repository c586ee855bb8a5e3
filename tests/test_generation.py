"""generate(): golden greedy/beam ids, cached audio K/V, batching with left padding, static cache, sampling,
streamers and a compiled decode step."""

import threading

import pytest
import torch
from transformers import CompileConfig, TextIteratorStreamer

from af2_testing import load_converted_model, random_features, random_model, relative_error

EOS, PAD = 999, 1002  # only for the golden tiny tokenizer


def single_inputs(golden, case):
    return dict(
        input_ids=golden[f"{case}.input_ids"],
        input_features=golden[f"{case}.mel"][None],
        input_features_mask=golden[f"{case}.window_mask"][None].long(),
    )


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_greedy_ids_and_step_logits_match_golden(model, golden, case):
    out = model.generate(
        **single_inputs(golden, case), do_sample=False, max_new_tokens=12,
        output_logits=True, return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, golden[f"{case}.greedy_ids"])
    step_logits = torch.cat(out.logits, dim=0)
    assert relative_error(step_logits, golden[f"{case}.greedy_step_logits"]) <= 1e-4


def test_beam_search_matches_golden(model, golden):
    out = model.generate(
        **single_inputs(golden, "a"), do_sample=False, num_beams=3, max_new_tokens=8,
        output_scores=True, return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, golden["a.beam_ids"])
    torch.testing.assert_close(out.sequences_scores, golden["a.beam_sequences_scores"], atol=1e-4, rtol=0)


def test_left_padded_batch_equals_single_runs(model, golden):
    cases = ["a", "b", "c"]
    seq = max(golden[f"{x}.input_ids"].shape[1] for x in cases)
    windows = max(golden[f"{x}.mel"].shape[0] for x in cases)
    ids = torch.full((3, seq), PAD)
    attention = torch.zeros(3, seq, dtype=torch.long)
    feats = torch.full((3, windows, 1001, 64), -100.0)
    mask = torch.zeros(3, windows, dtype=torch.long)
    for i, x in enumerate(cases):
        n = golden[f"{x}.input_ids"].shape[1]
        ids[i, seq - n:], attention[i, seq - n:] = golden[f"{x}.input_ids"][0], 1
        w = golden[f"{x}.mel"].shape[0]
        feats[i, :w], mask[i, :w] = golden[f"{x}.mel"], 1
    out = model.generate(input_ids=ids, attention_mask=attention, input_features=feats, input_features_mask=mask,
                         do_sample=False, max_new_tokens=12)
    for i, x in enumerate(cases):
        assert torch.equal(out[i, seq:], golden[f"{x}.greedy_ids"][0, golden[f"{x}.input_ids"].shape[1]:]), x


def test_cached_decoding_equals_full_forward(model, golden):
    inputs = single_inputs(golden, "b")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=10, output_logits=True,
                         return_dict_in_generate=True)
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        full = model(input_ids=out.sequences, input_features=inputs["input_features"],
                     input_features_mask=inputs["input_features_mask"], use_cache=False).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, prompt - 1:-1], rtol=1e-4, atol=1e-4)


def test_audio_projected_once_per_generate(model, golden):
    calls = []
    hooks = [block.to_kv.register_forward_hook(lambda *_: calls.append(1))
             for block in model.model.cross_attention_layers]
    try:
        model.generate(**single_inputs(golden, "a"), do_sample=False, max_new_tokens=6, min_new_tokens=6)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == len(model.model.cross_attention_layers)


def test_static_cache_equals_dynamic(model, golden):
    inputs = single_inputs(golden, "c")
    dynamic = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    static = model.generate(**inputs, do_sample=False, max_new_tokens=8, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_sampling_is_seeded_and_num_return_sequences(model, golden):
    kwargs = dict(**single_inputs(golden, "a"), do_sample=True, top_k=30, top_p=0.95, max_new_tokens=8,
                  num_return_sequences=3)
    torch.manual_seed(123)
    first = model.generate(**kwargs)
    torch.manual_seed(123)
    second = model.generate(**kwargs)
    assert first.shape[0] == 3
    assert torch.equal(first, second)


def test_beam_search_with_a_batch_and_return_sequences():
    model = random_model()
    feats = random_features(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    ids = torch.randint(0, 110, (2, 7), generator=torch.Generator().manual_seed(1))
    out = model.generate(input_ids=ids, input_features=feats, input_features_mask=mask, do_sample=False,
                         num_beams=3, num_return_sequences=2, max_new_tokens=5, pad_token_id=118)
    assert out.shape[0] == 4
    # each sample's best beam equals its own single-sample beam search
    for i in range(2):
        alone = model.generate(input_ids=ids[i:i + 1], input_features=feats[i:i + 1, : int(mask[i].sum())],
                               input_features_mask=mask[i:i + 1, : int(mask[i].sum())], do_sample=False,
                               num_beams=3, max_new_tokens=5, pad_token_id=118)
        assert torch.equal(out[2 * i, : alone.shape[1]], alone[0])


def test_text_iterator_streamer(model, golden):
    from transformers import AutoTokenizer

    from af2_testing import converted_tiny_dir

    tokenizer = AutoTokenizer.from_pretrained(converted_tiny_dir())
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**single_inputs(golden, "a"), do_sample=False, max_new_tokens=12, streamer=streamer)
    thread = threading.Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    expected = tokenizer.decode(golden["a.greedy_ids"][0, golden["a.input_ids"].shape[1]:], skip_special_tokens=True)
    assert streamed == expected


def test_compiled_static_decode_step(golden):
    import torch._dynamo

    from af2_hf import AudioFlamingo2ForConditionalGeneration
    from af2_testing import converted_tiny_dir

    torch._dynamo.reset()
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(converted_tiny_dir()).eval()
    inputs = single_inputs(golden, "a")
    config = CompileConfig(fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # generate() only auto-compiles on accelerators unless asked
    out = model.generate(**inputs, do_sample=False, max_new_tokens=12, cache_implementation="static",
                         compile_config=config)
    assert torch.equal(out, golden["a.greedy_ids"])
    assert hasattr(model, "_compiled_call")  # the decode steps went through torch.compile
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_end_to_end_from_audio_file(golden, golden_json, golden_audio_files, case):
    """File -> saved processor -> model.generate -> answer: the original's ids and decoded answer."""
    from af2_hf import AudioFlamingo2Processor
    from af2_testing import converted_tiny_dir

    processor = AudioFlamingo2Processor.from_pretrained(converted_tiny_dir())
    model = load_converted_model("sdpa")
    inputs = processor(text=golden_json["prompts"][case], audio=str(golden_audio_files[case]), return_tensors="pt")
    assert torch.equal(inputs["input_ids"], golden[f"{case}.input_ids"])
    out = model.generate(**inputs, do_sample=False, max_new_tokens=12)
    assert torch.equal(out, golden[f"{case}.greedy_ids"])
    assert processor.decode_answer(out[0]) == golden_json["decoded"][f"{case}.greedy"]


def test_beam_search_encodes_each_audio_once(model, golden):
    batches = []
    hook = model.model.audio_tower.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        out = model.generate(**single_inputs(golden, "a"), do_sample=False, num_beams=3, max_new_tokens=8)
    finally:
        hook.remove()
    assert batches == [golden["a.mel"].shape[0]]  # the windows of one audio, not one copy per beam
    assert torch.equal(out, golden["a.beam_ids"])


def test_beam_search_static_and_cacheless_agree():
    model = random_model()
    kwargs = dict(input_ids=torch.randint(0, 110, (2, 7), generator=torch.Generator().manual_seed(3)),
                  input_features=random_features(2, 3), input_features_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
                  num_beams=3, max_new_tokens=5, do_sample=False, pad_token_id=118)
    dynamic = model.generate(**kwargs)
    assert torch.equal(dynamic, model.generate(**kwargs, cache_implementation="static"))
    assert torch.equal(dynamic, model.generate(**kwargs, use_cache=False))
