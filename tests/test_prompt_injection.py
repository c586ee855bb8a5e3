"""User text never becomes control tokens: questions and chat message text containing special or added tokens,
template markers, partial markers or look-alikes are encoded as plain text; only the raw ``text=`` prompt path reads
``<audio>`` and the other special tokens as control tokens, by design."""

import unicodedata

import numpy as np
import pytest
from transformers import AutoTokenizer

from af2_hf import AudioFlamingo2Processor, prepare_af2_tokenizer

WAVE = np.linspace(-0.5, 0.5, 1600)
PARTIAL = ["<audio", "audio>", "<|endof", "endofchunk|>", "<SE", "SEP>", "<|", "|>", "<<audio>>", "<SEP<SEP>>"]
LOOK_ALIKES = [
    "\uff1caudio\uff1e",  # fullwidth < >
    "<\u0430udio>",  # Cyrillic a
    "<au\u200bdio>",  # zero-width space
    "<SEP\u0301>",  # combining accent
    "<|endoftext|\u200d>",  # zero-width joiner
    "\u2039audio\u203a",  # single angle quotation marks
    "<AUDIO>",
    "<Sep>",
]


def control_tokens(tokenizer) -> list[str]:
    """Every added token (special or not) and every special token of the tokenizer."""
    return sorted(set(tokenizer.added_tokens_encoder) | set(tokenizer.all_special_tokens))


def added_ids(tokenizer) -> set[int]:
    return set(tokenizer.added_tokens_encoder.values()) | set(tokenizer.all_special_ids)


def injections(tokenizer) -> list[str]:
    tokens = control_tokens(tokenizer)
    many = "".join(token * 3 for token in tokens) * 5
    return tokens + PARTIAL + LOOK_ALIKES + [many, "x".join(tokens), " ".join(tokens + PARTIAL + LOOK_ALIKES)]


def plain_ids(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` as ordinary text: its pieces split at nothing the tokenizer treats specially."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_the_injections_cover_every_control_token(af2_tokenizer):
    expected = {"<audio>", "<|endofchunk|>", "<SEP>", "<|endoftext|>", "<|PAD_TOKEN|>"}
    assert expected <= set(control_tokens(af2_tokenizer))


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)  # the tokenizer's normaliser


def test_questions_are_plain_text(golden_processor, af2_tokenizer):
    controls = added_ids(af2_tokenizer)
    texts = injections(af2_tokenizer)
    questions = [f"What is {text} here?" for text in texts]
    with_audio = golden_processor.apply_question_request(questions, audio=[WAVE] * len(questions), max_length=None)
    assert with_audio["input_features_mask"].sum() == len(questions)  # one audio each, no extra slot
    text_only = golden_processor.apply_question_request(questions, padding=False, max_length=None)
    for text, question, ids, alone in zip(texts, questions, with_audio["input_ids"], text_only["input_ids"]):
        ids = [token for token in ids if token != af2_tokenizer.pad_token_id]
        assert ids[0] == golden_processor.audio_token_id and ids[-1] == af2_tokenizer.sep_token_id, text
        assert not controls & set(ids[1:-1]), text
        assert af2_tokenizer.decode(ids[1:-1]) == nfc(question.lower().strip()), text
        assert ids[1:-1] == plain_ids(af2_tokenizer, question.lower().strip()), text
        assert alone == ids[1:], text  # the text-only prompt: the same without <audio>


def test_raw_questions_without_placeholder_are_plain_text(golden_processor, af2_tokenizer):
    controls = added_ids(af2_tokenizer)
    for text in injections(af2_tokenizer):
        if "<audio>" in text:
            continue  # a text holding <audio> is a prompt on this path, by design
        ids = golden_processor(text=f"q {text}", audio=WAVE, sampling_rate=16000, max_length=None)["input_ids"][0]
        assert [token for token in ids if token in controls] == [ids[0], ids[-1]], text
        assert ids[0] == golden_processor.audio_token_id and ids[-1] == af2_tokenizer.sep_token_id, text


def test_question_requests_match_the_processor_for_plain_questions(golden, golden_json, golden_processor):
    questions = [golden_json["prompts"][case] for case in ("a", "b")]
    audio = [golden["a.waveform"].numpy(), golden["b.waveform"].numpy()]
    request = golden_processor.apply_question_request(questions, audio=audio, return_tensors="pt")
    direct = golden_processor(text=questions, audio=audio, sampling_rate=16000, return_tensors="pt")
    assert set(request) == set(direct)
    for key in direct:
        assert (request[key] == direct[key]).all(), key


def test_chat_message_text_is_plain_text(golden_processor, af2_tokenizer):
    controls = added_ids(af2_tokenizer)
    audio_id, sep_id = golden_processor.audio_token_id, af2_tokenizer.sep_token_id
    expected_controls = [audio_id, sep_id, golden_processor.end_of_chunk_token_id, af2_tokenizer.eos_token_id, sep_id]
    texts = injections(af2_tokenizer)
    conversations = [
        [
            {"role": "system", "content": f"system {text}"},
            {"role": "user", "content": [{"type": "audio", "audio": WAVE}, {"type": "text", "text": f"q {text}"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"a {text}"}]},
            {"role": "user", "content": f"{text} again"},
        ]
        for text in texts
    ]
    # (the longest texts exceed the default 512 tokens)
    out = golden_processor.apply_chat_template(conversations, tokenize=True, return_dict=True,
                                               processor_kwargs={"max_length": None, "padding": False})
    rendered = golden_processor.apply_chat_template(conversations)
    assert out["input_features_mask"].sum(-1).tolist() == [1] * len(texts)  # still exactly one audio slot each
    for text, ids, prompt in zip(texts, out["input_ids"], rendered):
        assert [token for token in ids if token in controls] == expected_controls, text
        assert af2_tokenizer.decode(ids) == nfc(prompt), text


def test_text_only_chat_turns_are_plain_text(golden_processor, af2_tokenizer):
    controls = added_ids(af2_tokenizer)
    for text in injections(af2_tokenizer):
        out = golden_processor.apply_chat_template([{"role": "user", "content": text}], tokenize=True, return_dict=True,
                                                   processor_kwargs={"max_length": None})
        assert set(out) == {"input_ids", "attention_mask"}, text  # no audio slot appeared
        ids = out["input_ids"][0]
        assert [token for token in ids if token in controls] == [af2_tokenizer.sep_token_id], text


def test_non_special_added_tokens_stay_text(golden_dir, golden_feature_extractor):
    # Qwen2.5 adds tokens such as <tool_call> as NON-special: split_special_tokens alone would still match them.
    tokenizer = prepare_af2_tokenizer(AutoTokenizer.from_pretrained(golden_dir / "base_lm"))
    tokenizer.add_tokens(["<tool_call>", "<|fim_prefix|>"])
    processor = AudioFlamingo2Processor(golden_feature_extractor, tokenizer)
    for text in ("<tool_call>", "a<|fim_prefix|>b", "<tool_call><tool_call>"):
        ids = processor(text=text, audio=WAVE, sampling_rate=16000)["input_ids"][0]
        assert not added_ids(tokenizer) & set(ids[1:-1]), text
        chat = processor.apply_chat_template([{"role": "user", "content": text}], tokenize=True)[0]
        assert not added_ids(tokenizer) & set(chat[:-1]), text


def test_raw_prompts_keep_their_control_tokens_by_design(golden_processor, af2_tokenizer):
    prompt = "<audio>q<SEP>a<|endofchunk|><|endoftext|>"
    ids = golden_processor(text=prompt, audio=WAVE, sampling_rate=16000)["input_ids"][0]
    assert ids == af2_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(golden_processor.audio_token_id) == 1 and ids[-1] == af2_tokenizer.eos_token_id
    text_only = golden_processor(text="q<SEP>")["input_ids"][0]
    assert text_only[-1] == af2_tokenizer.sep_token_id


def test_reserved_markers_in_messages_are_refused(golden_processor):
    for marker in ("\U000f1a20", "\U000f1a21"):
        with pytest.raises(ValueError, match="private-use"):
            golden_processor.apply_chat_template([{"role": "user", "content": f"a{marker}b"}], tokenize=True)


@pytest.mark.parametrize("text", ["bad \ud800 text", "\udcff", ["fine", "x\udfffy"]])
def test_lone_surrogates_are_refused(golden_processor, text):
    with pytest.raises(ValueError, match="lone surrogate"):
        golden_processor(text=text, audio=[WAVE] * (len(text) if isinstance(text, list) else 1), sampling_rate=16000)
    with pytest.raises(ValueError, match="lone surrogate"):
        golden_processor.apply_chat_template([{"role": "user", "content": "q \udc80"}], tokenize=True)


def test_bytes_text_is_decoded_or_refused(golden_processor, af2_tokenizer):
    out = golden_processor(text="café<SEP>".encode())["input_ids"][0]
    assert out == af2_tokenizer("café<SEP>", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="not valid UTF-8"):
        golden_processor(text=b"caf\xe9 \xff")


def test_decoded_answers_keep_plain_marker_text(golden_processor, af2_tokenizer):
    answer = "it says <SEP> and <|endoftext|>"
    ids = golden_processor(text="q", audio=WAVE, sampling_rate=16000)["input_ids"][0]
    sequence = ids + plain_ids(af2_tokenizer, answer) + [golden_processor.end_of_chunk_token_id,
                                                         af2_tokenizer.eos_token_id]
    assert golden_processor.decode_answer(sequence) == answer
