"""AudioFlamingo2Processor and the AF2 tokenizer set-up against the golden prompts, ids, batches and decoded texts."""

import logging

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from af2_hf import AudioFlamingo2FeatureExtractor, AudioFlamingo2Processor, AudioLoadError, prepare_af2_tokenizer
from af2_hf.processing_audioflamingo2 import AF2_CHAT_TEMPLATE

CASES = ["a", "b", "c"]
MAX_RELATIVE_ERROR = 1e-4


def relative_error(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).norm() / expected.norm()).item()


def assert_equal(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=0, atol=0)


def user_turn(question, source, audio_key="path", audio_first=True):
    blocks = [{"type": "audio", audio_key: source}, {"type": "text", "text": question}]
    return {"role": "user", "content": blocks if audio_first else blocks[::-1]}


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_prepared_tokenizer_matches_golden_ids(golden_dir, golden_json):
    tokenizer = AutoTokenizer.from_pretrained(golden_dir / "base_lm")
    assert prepare_af2_tokenizer(tokenizer) is tokenizer
    ids = golden_json["token_ids"]
    assert len(tokenizer) == ids["len_tokenizer"]
    assert tokenizer.convert_tokens_to_ids(["<audio>", "<|endofchunk|>", "<|PAD_TOKEN|>"]) == [
        ids["audio"],
        ids["endofchunk"],
        ids["pad"],
    ]
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == (ids["pad_token"], ids["pad"])
    assert (tokenizer.sep_token, tokenizer.sep_token_id) == (ids["sep_token"], ids["sep"])
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == (ids["eos_token"], ids["eos"])
    assert tokenizer.bos_token_id == ids["bos"]
    # Idempotent.
    prepare_af2_tokenizer(tokenizer)
    assert len(tokenizer) == ids["len_tokenizer"]


def test_special_tokens_stay_special_and_survive_save(tmp_path, af2_tokenizer, golden_json):
    ids = golden_json["token_ids"]
    text = "<audio>x y<SEP>z<|endofchunk|><|endoftext|><|PAD_TOKEN|>"
    encoded = af2_tokenizer(text, add_special_tokens=False)["input_ids"]
    for name in ("audio", "sep", "endofchunk", "eos", "pad"):
        assert encoded.count(ids[name]) == 1
    assert af2_tokenizer.decode(encoded, skip_special_tokens=True) == "x yz"
    af2_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == encoded
    assert reloaded.decode(encoded, skip_special_tokens=True) == "x yz"
    assert (reloaded.pad_token, reloaded.sep_token, len(reloaded)) == ("<|PAD_TOKEN|>", "<SEP>", len(af2_tokenizer))


def test_existing_sep_token_is_kept(golden_dir, golden_feature_extractor):
    tokenizer = AutoTokenizer.from_pretrained(golden_dir / "base_lm")
    tokenizer.add_special_tokens({"sep_token": "<mysep>"})
    prepare_af2_tokenizer(tokenizer)
    assert tokenizer.sep_token == "<mysep>"
    assert "<SEP>" not in tokenizer.get_vocab()
    processor = AudioFlamingo2Processor(golden_feature_extractor, tokenizer)
    assert processor.format_prompt(" Hi ") == "<audio>hi<mysep>"


def test_prepare_rejects_non_tokenizers():
    with pytest.raises(TypeError):
        prepare_af2_tokenizer("Qwen/Qwen2.5-3B")


# ---------------------------------------------------------------------------------------------------- prompts + ids


@pytest.mark.parametrize("case", CASES)
def test_single_sample_matches_golden(case, golden, golden_json, golden_processor, golden_audio_files):
    out = golden_processor(
        text=golden_json["prompts"][case], audio=golden_audio_files[case], return_tensors="pt"
    )
    assert set(out) == {"input_ids", "attention_mask", "input_features", "input_features_mask"}
    assert_equal(out["input_ids"], golden[f"{case}.input_ids"])
    assert torch.all(out["attention_mask"] == 1)
    assert relative_error(out["input_features"][0], golden[f"{case}.mel"]) <= MAX_RELATIVE_ERROR
    assert_equal(out["input_features_mask"][0], golden[f"{case}.window_mask"].long())


def test_waveform_audio_equals_path_audio(golden, golden_json, golden_processor, golden_audio_files):
    from_path = golden_processor(text=golden_json["prompts"]["b"], audio=golden_audio_files["b"], return_tensors="pt")
    from_array = golden_processor(
        text=golden_json["prompts"]["b"], audio=golden["b.waveform"].numpy(), sampling_rate=16000, return_tensors="pt"
    )
    from_bytes = golden_processor(
        text=[golden_json["prompts"]["b"]], audio=[golden_audio_files["b"].read_bytes()], return_tensors="pt"
    )
    for other in (from_array, from_bytes):
        for key in from_path:
            assert_equal(other[key], from_path[key])


def test_prompt_format(golden_processor, af2_tokenizer):
    question = "  Is It LOUD?  \n"
    assert golden_processor.format_prompt(question) == "<audio>is it loud?<SEP>"
    formatted = golden_processor.format_prompt(question)
    out = golden_processor(text=question, audio=np.zeros(160), sampling_rate=16000)
    assert out["input_ids"][0] == af2_tokenizer(formatted, add_special_tokens=False)["input_ids"]
    # A text holding <audio> is used verbatim (not lower-cased).
    verbatim = golden_processor(text="<audio>Keep CASE<SEP>", audio=np.zeros(160), sampling_rate=16000)
    assert verbatim["input_ids"][0] == af2_tokenizer("<audio>Keep CASE<SEP>", add_special_tokens=False)["input_ids"]


def test_golden_batch_right_padded(golden, golden_json, golden_processor, golden_audio_files):
    out = golden_processor(
        text=[golden_json["prompts"]["a"], golden_json["prompts"]["b"]],
        audio=[golden_audio_files["a"], golden_audio_files["b"]],
        padding_side="right",
        return_tensors="pt",
    )
    assert_equal(out["input_ids"], golden["batch.input_ids"])
    assert_equal(out["attention_mask"], golden["batch.attention_mask"])
    assert_equal(out["input_features_mask"].float(), golden["batch.window_mask"])
    assert relative_error(out["input_features"][1], golden["b.mel"]) <= MAX_RELATIVE_ERROR


def test_default_padding_is_left(golden, golden_json, golden_processor, golden_audio_files, af2_tokenizer):
    out = golden_processor(
        text=[golden_json["prompts"]["a"], golden_json["prompts"]["b"]],
        audio=[golden_audio_files["a"], golden_audio_files["b"]],
        return_tensors="pt",
    )
    a_ids = golden["a.input_ids"][0]
    pad = golden["batch.input_ids"].shape[1] - a_ids.shape[0]
    assert_equal(out["input_ids"][0, pad:], a_ids)
    assert torch.all(out["input_ids"][0, :pad] == af2_tokenizer.pad_token_id)
    assert_equal(out["attention_mask"][0], golden["batch.attention_mask"][0].flip(0))
    # Windows are padded at the end whatever the text padding side.
    assert_equal(out["input_features_mask"].float(), golden["batch.window_mask"])


def test_training_text_matches_golden(golden, golden_json, golden_processor, golden_audio_files):
    out = golden_processor(
        text=golden_json["train"]["formatted"], audio=golden_audio_files["a"], padding_side="right", return_tensors="pt"
    )
    assert_equal(out["input_ids"], golden["train.input_ids"])
    assert_equal(out["attention_mask"], golden["train.attention_mask"])


def test_truncation_warns(golden_processor, caplog):
    max_length = golden_processor.text_kwargs["max_length"]
    long_question = "word " * (2 * max_length)
    with caplog.at_level(logging.WARNING):
        out = golden_processor(text=long_question, audio=np.zeros(160), sampling_rate=16000)
    assert len(out["input_ids"][0]) == max_length
    assert "Truncating text(s) [0]" in caplog.text


# ---------------------------------------------------------------------------------------------------- chat template


def test_chat_template_renders_original_formats(golden_json, golden_processor, golden_audio_files):
    for case in CASES:
        question = golden_json["prompts"][case]
        rendered = golden_processor.apply_chat_template([user_turn(question, golden_audio_files[case])])
        assert rendered == golden_processor.format_prompt(question)
    train = golden_json["train"]
    conversation = [
        user_turn(train["prompt"], golden_audio_files["a"], audio_first=False),
        {"role": "assistant", "content": [{"type": "text", "text": train["answer"]}]},
    ]
    assert golden_processor.apply_chat_template(conversation) == train["formatted"]
    string_answer = conversation[:1] + [{"role": "assistant", "content": train["answer"]}]
    assert golden_processor.apply_chat_template(string_answer) == train["formatted"]


def test_chat_template_tokenized(golden, golden_json, golden_processor, golden_audio_files):
    conversation = [user_turn(golden_json["prompts"]["c"], golden_audio_files["c"])]
    out = golden_processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    assert_equal(out["input_ids"], golden["c.input_ids"])
    assert relative_error(out["input_features"][0], golden["c.mel"]) <= MAX_RELATIVE_ERROR
    assert_equal(out["input_features_mask"][0], golden["c.window_mask"].long())
    ids_only = golden_processor.apply_chat_template(conversation, tokenize=True, return_tensors="pt")
    assert_equal(ids_only, golden["c.input_ids"])


def test_chat_template_batch_and_assistant_mask(golden, golden_json, golden_processor, golden_audio_files):
    train = golden_json["train"]
    conversations = [
        [
            user_turn(train["prompt"], golden_audio_files["a"]),
            {"role": "assistant", "content": train["answer"]},
        ],
        [user_turn(golden_json["prompts"]["b"], golden["b.waveform"].numpy(), audio_key="audio")],
    ]
    out = golden_processor.apply_chat_template(
        conversations,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        return_assistant_tokens_mask=True,
        processor_kwargs={"padding_side": "right"},
    )
    length = golden["train.input_ids"].shape[1]
    assert_equal(out["input_ids"][0, :length], golden["train.input_ids"][0])
    # The assistant span is what the original trains on: the answer, <|endofchunk|> and eos.
    assert_equal(out["assistant_masks"][0, :length], (golden["train.labels"][0] != -100).long())
    b_ids = golden["b.input_ids"][0]
    assert_equal(out["input_ids"][1, : b_ids.shape[0]], b_ids)
    assert_equal(out["input_features_mask"], torch.tensor([[1, 0, 0], [1, 1, 1]]))
    assert relative_error(out["input_features"][0, :1], golden["a.mel"]) <= MAX_RELATIVE_ERROR


def test_chat_template_errors(golden_processor, golden_audio_files, tmp_path):
    with pytest.raises(Exception, match="system, user and assistant"):
        golden_processor.apply_chat_template([{"role": "tool", "content": "hi"}])
    with pytest.raises(Exception, match="one system turn, first"):
        golden_processor.apply_chat_template([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}])
    with pytest.raises(Exception, match="cannot contain audio"):
        golden_processor.apply_chat_template(
            [{"role": "assistant", "content": [{"type": "audio", "path": golden_audio_files["a"]}]}]
        )
    with pytest.raises(ValueError, match="exactly one of"):
        golden_processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "audio", "path": golden_audio_files["a"], "url": "x"}]}],
            tokenize=True,
        )
    with pytest.raises(AudioLoadError, match="missing.wav"):
        golden_processor.apply_chat_template(
            [user_turn("q", str(tmp_path / "missing.wav"))], tokenize=True, return_dict=True
        )


# ---------------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("case", CASES)
def test_decode_answer_matches_golden(case, golden, golden_json, golden_processor):
    ids = golden[f"{case}.greedy_ids"]
    assert golden_processor.decode_answer(ids[0]) == golden_json["decoded"][f"{case}.greedy"]
    assert golden_processor.batch_decode_answers(ids) == [golden_json["decoded"][f"{case}.greedy"]]


def test_batch_decode_answers_left_padded(golden, golden_json, golden_processor, af2_tokenizer):
    a, b = golden["a.greedy_ids"][0], golden["b.greedy_ids"][0]
    eos, pad = af2_tokenizer.eos_token_id, af2_tokenizer.pad_token_id
    width = max(len(a), len(b)) + 1
    rows = [
        torch.cat([torch.full((width - len(seq) - 1,), pad), seq, torch.tensor([eos])]) for seq in (a, b)
    ]
    answers = golden_processor.batch_decode_answers(torch.stack(rows))
    assert answers == [golden_json["decoded"]["a.greedy"], golden_json["decoded"]["b.greedy"]]
    assert golden_processor.decode_answer(golden["a.beam_ids"][0].numpy()) == golden_json["decoded"]["a.beam"]
    with pytest.raises(ValueError):
        golden_processor.decode_answer(torch.stack(rows))


# ---------------------------------------------------------------------------------------------------- save / load


def test_save_and_load(tmp_path, golden, golden_json, golden_processor, golden_audio_files):
    golden_processor.save_pretrained(tmp_path)
    for name in ("processor_config.json", "chat_template.jinja", "tokenizer_config.json"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "chat_template.jinja").read_text() == AF2_CHAT_TEMPLATE
    loaded = AudioFlamingo2Processor.from_pretrained(tmp_path)
    assert isinstance(loaded.feature_extractor, AudioFlamingo2FeatureExtractor)
    # The loaded feature extractor also carries the auto_map of the file (as AutoFeatureExtractor gives it).
    loaded_settings = {k: v for k, v in loaded.feature_extractor.to_dict().items() if k != "auto_map"}
    assert loaded_settings == golden_processor.feature_extractor.to_dict()
    assert loaded.chat_template == golden_processor.chat_template
    assert len(loaded.tokenizer) == golden_json["token_ids"]["len_tokenizer"]
    assert (loaded.audio_token_id, loaded.end_of_chunk_token_id) == (
        golden_processor.audio_token_id,
        golden_processor.end_of_chunk_token_id,
    )
    kwargs = dict(text=golden_json["prompts"]["b"], audio=golden_audio_files["b"], return_tensors="pt")
    out, expected = loaded(**kwargs), golden_processor(**kwargs)
    for key in expected:
        assert_equal(out[key], expected[key])
    assert_equal(out["input_ids"], golden["b.input_ids"])
    assert AudioFlamingo2FeatureExtractor.from_pretrained(tmp_path).max_num_windows == (
        golden_json["config"]["clap_config"]["max_num_window"]
    )


# ---------------------------------------------------------------------------------------------------- errors


def test_count_mismatch(golden_json, golden_processor):
    with pytest.raises(ValueError, match="2 text"):
        golden_processor(text=[golden_json["prompts"]["a"]] * 2, audio=np.zeros(160), sampling_rate=16000)
    with pytest.raises(ValueError, match="1 text"):
        golden_processor(text="q", audio=[np.zeros(160), np.zeros(160)], sampling_rate=16000)
    with pytest.raises(ValueError, match="no audio inputs"):
        golden_processor(text="<audio>q<SEP>")
    with pytest.raises(ValueError, match="its audio is None"):
        golden_processor(text=["<audio>q<SEP>", "b"], audio=[None, np.zeros(160)], sampling_rate=16000)
    with pytest.raises(ValueError, match="2 <audio>"):
        golden_processor(text="<audio><audio>q<SEP>", audio=np.zeros(160), sampling_rate=16000)


def test_wrong_sampling_rate(golden_processor):
    with pytest.raises(ValueError, match="librosa.resample"):
        golden_processor(text="q", audio=np.zeros(160), sampling_rate=44100)


def test_unreadable_file(golden_processor, tmp_path):
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"not a flac file" * 20)
    with pytest.raises(AudioLoadError, match="broken.flac"):
        golden_processor(text="q", audio=broken)


def test_other_bad_arguments(golden_dir, golden_feature_extractor, golden_processor):
    with pytest.raises(ValueError, match="prepare_af2_tokenizer"):
        AudioFlamingo2Processor(golden_feature_extractor, AutoTokenizer.from_pretrained(golden_dir / "base_lm"))
    with pytest.raises(TypeError, match="AudioFlamingo2FeatureExtractor"):
        AudioFlamingo2Processor(object(), golden_processor.tokenizer)
    with pytest.raises(ValueError, match="return_tensors"):
        golden_processor(text="q", audio=np.zeros(160), sampling_rate=16000, return_tensors="tf")
    with pytest.raises(ValueError, match="text and audio only"):
        golden_processor(text="q", audio=np.zeros(160), images=[np.zeros((2, 2))])
    with pytest.raises(TypeError, match="string"):
        golden_processor(text=[1], audio=np.zeros(160), sampling_rate=16000)


def test_audio_only_call(golden, golden_processor):
    out = golden_processor(audio=golden["a.waveform"].numpy(), sampling_rate=16000, return_tensors="pt")
    assert set(out) == {"input_features", "input_features_mask"}
    assert relative_error(out["input_features"][0], golden["a.mel"]) <= MAX_RELATIVE_ERROR


# ---------------------------------------------------------------------------------------------------- contracts


def test_text_only_call_returns_the_tokenized_prompt(golden_processor, af2_tokenizer):
    out = golden_processor(text=["what is 2 + 2?<SEP>", "Hi"], return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask"}
    expected = af2_tokenizer(["what is 2 + 2?<SEP>", "Hi"], padding=True, padding_side="left", return_tensors="pt")
    assert_equal(out["input_ids"], expected["input_ids"])
    assert_equal(out["attention_mask"], expected["attention_mask"])


def test_mixed_batch_gives_text_only_samples_an_empty_window_mask(golden, golden_json, golden_processor, af2_tokenizer):
    question = golden_json["prompts"]["a"]
    single = golden_processor(text=question, audio=golden["a.waveform"].numpy(), sampling_rate=16000,
                              return_tensors="pt")
    # One audio per text (None: no audio) ...
    mixed = golden_processor(text=[question, "<audio>x<SEP>", "plain text<SEP>"],
                             audio=[golden["a.waveform"].numpy(), golden["b.waveform"].numpy(), None],
                             sampling_rate=16000, padding_side="right", return_tensors="pt")
    assert_equal(mixed["input_features_mask"][2], torch.zeros_like(mixed["input_features_mask"][2]))
    windows = single["input_features"].shape[1]
    assert_equal(mixed["input_features"][0, :windows], single["input_features"][0])
    assert_equal(mixed["input_ids"][0, : single["input_ids"].shape[1]], single["input_ids"][0])
    # ... or one audio per <audio> placeholder, in order.
    by_slot = golden_processor(text=["plain text<SEP>", "<audio>x<SEP>"], audio=[golden["b.waveform"].numpy()],
                               sampling_rate=16000, return_tensors="pt")
    assert by_slot["input_features_mask"][0].sum() == 0 and by_slot["input_features_mask"][1].sum() > 0
    assert_equal(by_slot["input_features"][1], mixed["input_features"][1, : by_slot["input_features"].shape[1]])
    tail = af2_tokenizer("plain text<SEP>", add_special_tokens=False)["input_ids"]
    assert by_slot["input_ids"][0, -len(tail):].tolist() == tail


def test_tokenizer_init_kwargs_are_defaults(golden_dir, golden_feature_extractor):
    tokenizer = prepare_af2_tokenizer(AutoTokenizer.from_pretrained(golden_dir / "base_lm", padding_side="right",
                                                                     max_length=7, padding="max_length"))
    processor = AudioFlamingo2Processor(golden_feature_extractor, tokenizer)
    out = processor(text="ab")
    assert len(out["input_ids"][0]) == 7 and out["attention_mask"][0][0] == 1  # right-padded to 7
    assert processor(text="ab", padding_side="left", padding=True)["input_ids"][0] == tokenizer("ab")["input_ids"]


def test_call_signature_names_only_text_and_audio(golden_processor):
    import inspect

    parameters = inspect.signature(AudioFlamingo2Processor.__call__).parameters
    assert [name for name in parameters if name not in ("self", "kwargs")] == ["text", "audio"]
    with pytest.raises(ValueError, match="text and audio only"):
        golden_processor(text="q", videos=[np.zeros((2, 3, 4, 4))])


def test_save_pretrained_leaves_the_processor_unchanged_and_round_trips_auto_map(tmp_path, golden_processor):
    import json

    before = (golden_processor.to_dict(), dict(golden_processor.feature_extractor.__dict__),
              dict(golden_processor.tokenizer.__dict__), dict(golden_processor.tokenizer.init_kwargs))
    golden_processor.save_pretrained(tmp_path / "first")
    after = (golden_processor.to_dict(), dict(golden_processor.feature_extractor.__dict__),
             dict(golden_processor.tokenizer.__dict__), dict(golden_processor.tokenizer.init_kwargs))
    assert after == before
    first = json.loads((tmp_path / "first" / "processor_config.json").read_text())
    assert first["auto_map"] == {"AutoProcessor": "processing_audioflamingo2.AudioFlamingo2Processor"}
    loaded = AudioFlamingo2Processor.from_pretrained(tmp_path / "first")
    loaded.save_pretrained(tmp_path / "second")
    assert json.loads((tmp_path / "second" / "processor_config.json").read_text()) == first
    assert AudioFlamingo2Processor.from_pretrained(tmp_path / "second").to_dict() == loaded.to_dict()


# ---------------------------------------------------------------------------------------------------- chat turns


def test_chat_template_system_turn_and_multi_turn(golden_processor, golden_audio_files):
    conversation = [
        {"role": "system", "content": "  You are an AUDIO expert. "},
        user_turn("What is it?", golden_audio_files["a"]),
        {"role": "assistant", "content": "A Dog."},
        {"role": "user", "content": [{"type": "text", "text": "And THEN?"}]},
    ]
    rendered = golden_processor.apply_chat_template(conversation)
    assert rendered == "you are an audio expert. <audio>what is it?<SEP>a dog.<|endofchunk|><|endoftext|>and then?<SEP>"
    out = golden_processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert out["input_ids"][0] == golden_processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert out["input_features_mask"][0].sum() == 1
    # Without audio: the same prompt without the <audio> slot, as the original's text-only prompts.
    text_only = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]
    assert golden_processor.apply_chat_template(text_only) == "be brief. why?<SEP>"
    assert golden_processor.apply_chat_template(text_only[1:]) == golden_processor.format_prompt("Why?", audio=False)
    ids = golden_processor.apply_chat_template(text_only, tokenize=True, return_dict=True)
    assert set(ids) == {"input_ids", "attention_mask"}


def test_chat_template_continues_a_final_message_verbatim(golden_processor):
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "It is A"}]
    assert golden_processor.apply_chat_template(conversation, continue_final_message=True) == "q<SEP>It is A"
    ids = golden_processor.apply_chat_template(conversation, continue_final_message=True, tokenize=True)
    assert ids[0] == golden_processor.tokenizer("q<SEP>It is A", add_special_tokens=False)["input_ids"]


def test_chat_batch_mixes_text_only_and_audio(golden, golden_json, golden_processor, golden_audio_files):
    conversations = [
        [{"role": "user", "content": "Count to three."}],
        [user_turn(golden_json["prompts"]["c"], golden_audio_files["c"])],
    ]
    out = golden_processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt")
    assert out["input_features_mask"][0].sum() == 0
    assert_equal(out["input_features_mask"][1], golden["c.window_mask"].long())
    c_ids = golden["c.input_ids"][0]
    assert_equal(out["input_ids"][1, -c_ids.shape[0]:], c_ids)
