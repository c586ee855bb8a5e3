"""Auto-class registration and the audio-question-answering pipeline (AF2 golden answers, AF3, Qwen2-Audio)."""

import importlib
import io

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForMultimodalLM,
    AutoProcessor,
    AutoTokenizer,
    pipeline,
)
from transformers.pipelines import PIPELINE_REGISTRY

import af2_hf
from af2_hf import (
    AudioFlamingo2Config,
    AudioFlamingo2FeatureExtractor,
    AudioFlamingo2ForConditionalGeneration,
    AudioFlamingo2Model,
    AudioFlamingo2Processor,
    AudioLoadError,
    AudioQuestionAnsweringPipeline,
)
from af2_testing import converted_tiny_dir, load_converted_model

TASK = "audio-question-answering"
GREEDY = {"do_sample": False, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def af2_pipe():
    processor = AudioFlamingo2Processor.from_pretrained(converted_tiny_dir())
    return pipeline(TASK, model=load_converted_model("sdpa"), processor=processor)


# ---------------------------------------------------------------------------------------------------- Auto classes


def test_auto_classes_resolve_the_af2_classes():
    directory = converted_tiny_dir()
    assert type(AutoConfig.from_pretrained(directory)) is AudioFlamingo2Config
    assert type(AutoProcessor.from_pretrained(directory)) is AudioFlamingo2Processor
    assert type(AutoFeatureExtractor.from_pretrained(directory)) is AudioFlamingo2FeatureExtractor
    model = AutoModelForMultimodalLM.from_pretrained(directory)
    assert type(model) is AudioFlamingo2ForConditionalGeneration
    base = AutoModel.from_pretrained(directory)
    assert type(base) is AudioFlamingo2Model
    torch.testing.assert_close(base.language_model.norm.weight, model.model.language_model.norm.weight)
    # From the config alone as well.
    assert type(AutoModelForMultimodalLM.from_config(AutoConfig.from_pretrained(directory))) is (
        AudioFlamingo2ForConditionalGeneration
    )


def test_auto_feature_extractor_and_processor_from_a_processor_only_folder(tmp_path, golden_processor):
    golden_processor.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    feature_extractor = AutoFeatureExtractor.from_pretrained(tmp_path)
    assert type(feature_extractor) is AudioFlamingo2FeatureExtractor
    def settings(extractor):  # auto_map is round-tripped through save/load (remote code), the settings as well
        return {key: value for key, value in extractor.to_dict().items() if key != "auto_map"}

    assert settings(feature_extractor) == settings(golden_processor.feature_extractor)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor) is AudioFlamingo2Processor
    assert processor.tokenizer.sep_token == "<SEP>"


def test_pipeline_task_is_registered_and_registration_is_idempotent():
    task = PIPELINE_REGISTRY.supported_tasks[TASK]
    assert task["impl"] is AudioQuestionAnsweringPipeline
    assert task["pt"] == (AutoModelForMultimodalLM,)
    assert task["type"] == "multimodal"
    importlib.reload(importlib.import_module("af2_hf.auto"))  # registering again must not raise
    af2_hf.auto.register_auto_classes()
    assert type(AutoConfig.for_model("audioflamingo2")) is AudioFlamingo2Config


def test_pipeline_from_a_saved_and_from_an_exported_folder(tmp_path, golden_json, golden_audio_files):
    """A saved folder and an exported one (custom_pipelines under the folder's own task) both resolve to af2_hf's
    pipeline without trust_remote_code; the folder's own task name needs trust_remote_code, as transformers asks for
    any pipeline code shipped in a folder."""
    from af2_hf.tiny import make_tiny_model

    plain = tmp_path / "plain"
    make_tiny_model(plain, remote_code=False)
    assert not hasattr(AutoConfig.from_pretrained(plain), "custom_pipelines")
    pipe = pipeline(TASK, model=str(plain))
    assert type(pipe) is AudioQuestionAnsweringPipeline
    assert type(pipe.model) is AudioFlamingo2ForConditionalGeneration

    exported = str(converted_tiny_dir())
    question, expected = golden_json["prompts"]["a"], {"answer": golden_json["decoded"]["a.greedy"]}
    local = pipeline(TASK, model=exported)
    assert type(local) is AudioQuestionAnsweringPipeline and type(local.model) is AudioFlamingo2ForConditionalGeneration
    assert local(str(golden_audio_files["a"]), question=question, **GREEDY) == expected
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("audioflamingo2-audio-question-answering", model=exported)


def test_pipeline_save_pretrained_keeps_the_registered_task(af2_pipe, tmp_path, golden_json, golden_audio_files):
    """pipe.save_pretrained writes the model, the processor and the pipeline code under the folder's own task: the
    folder loads through "audio-question-answering" without trust_remote_code and gives the same answers."""
    import json

    af2_pipe.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert set(config["custom_pipelines"]) == {"audioflamingo2-audio-question-answering"}
    assert config["custom_pipelines"]["audioflamingo2-audio-question-answering"]["impl"] == (
        "pipeline_audio_question_answering.AudioQuestionAnsweringPipeline")
    assert (tmp_path / "saved" / "pipeline_audio_question_answering.py").is_file()
    assert not hasattr(af2_pipe.model.config, "custom_pipelines") or "audio-question-answering" not in (
        af2_pipe.model.config.custom_pipelines)
    reloaded = pipeline(TASK, model=str(tmp_path / "saved"))
    assert type(reloaded) is AudioQuestionAnsweringPipeline
    path, question = str(golden_audio_files["a"]), golden_json["prompts"]["a"]
    assert reloaded(path, question=question, **GREEDY) == af2_pipe(path, question=question, **GREEDY)


def test_pipeline_without_a_model_says_so():
    with pytest.raises(ValueError, match="has no default model: pass one"):
        pipeline(TASK)


# ---------------------------------------------------------------------------------------------------- AF2 pipeline


def _model_inputs(pipe, inputs, **params):
    """The model inputs the pipeline builds for one input (preprocess + the processor call of its collate)."""
    return pipe._collate([pipe.preprocess(inputs, **params)])["model_inputs"]


def _assert_same_inputs(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_every_input_form_gives_the_same_model_inputs_and_the_golden_answer(af2_pipe, golden_json,
                                                                             golden_audio_files):
    path = golden_audio_files["a"]
    question = golden_json["prompts"]["a"]
    assert af2_pipe(str(path), question=question, **GREEDY) == {"answer": golden_json["decoded"]["a.greedy"]}

    reference = af2_pipe.processor(text=question, audio=str(path), return_tensors="pt")
    reference = {key: reference[key] for key in ("input_ids", "attention_mask", "input_features", "input_features_mask")}
    waveform, rate = sf.read(path, dtype="float64")
    assert rate == 16000
    with open(path, "rb") as handle:
        raw_bytes = handle.read()
    forms = [
        (str(path), {"question": question}),
        (path, {"question": question}),
        (raw_bytes, {"question": question}),
        (io.BytesIO(raw_bytes), {"question": question}),
        (waveform, {"question": question}),
        (torch.from_numpy(waveform), {"question": question}),
        (waveform, {"question": question, "sampling_rate": 16000}),
        ({"raw": waveform, "sampling_rate": 16000}, {"question": question}),
        ({"array": waveform, "sampling_rate": 16000, "path": "ignored.wav"}, {"question": question}),
        ({"audio": str(path), "question": question}, {}),
        ({"audio": {"array": waveform, "sampling_rate": 16000}, "question": question}, {}),
        ({"bytes": raw_bytes, "path": None}, {"question": question}),
        ({"path": str(path)}, {"question": question}),
        ({"audio": str(path), "question": question}, {"question": "a default that the input overrides"}),
    ]
    for inputs, params in forms:
        _assert_same_inputs(_model_inputs(af2_pipe, inputs, **params), reference)


def test_a_waveform_at_another_rate_is_resampled(af2_pipe, golden_json, golden_audio_files):
    """b.wav is 44.1 kHz stereo; the original keeps channel 0 after librosa resampling: passing channel 0 at 44.1 kHz
    gives the same features as the file, and the golden answer."""
    data, rate = sf.read(golden_audio_files["b"], dtype="float64")
    assert rate == 44100 and data.ndim == 2
    question = golden_json["prompts"]["b"]
    from_file = _model_inputs(af2_pipe, str(golden_audio_files["b"]), question=question)
    _assert_same_inputs(_model_inputs(af2_pipe, {"raw": data[:, 0], "sampling_rate": rate}, question=question),
                        from_file)
    _assert_same_inputs(_model_inputs(af2_pipe, data[:, 0], sampling_rate=rate, question=question), from_file)
    answer = af2_pipe({"raw": data[:, 0], "sampling_rate": rate}, question=question, **GREEDY)
    assert answer == {"answer": golden_json["decoded"]["b.greedy"]}


def test_a_batch_with_different_window_counts_gives_the_golden_answers(af2_pipe, golden_json, golden_audio_files):
    """a, b and c have 1, 3 and 5 windows: the processor pads windows (mask 0) and left-pads the text."""
    cases = ["a", "b", "c"]
    inputs = [{"audio": str(golden_audio_files[c]), "question": golden_json["prompts"][c]} for c in cases]
    expected = [{"answer": golden_json["decoded"][f"{c}.greedy"]} for c in cases]
    assert af2_pipe(inputs, batch_size=3, **GREEDY) == expected
    batch = af2_pipe._collate([af2_pipe.preprocess(item) for item in inputs])["model_inputs"]
    assert batch["input_features_mask"].tolist() == [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 1).all()  # left padding
    # A list of questions beside a list of audios (batches of 2, then 1); a generator gives an iterator.
    paths = [str(golden_audio_files[c]) for c in ("a", "b")]
    questions = [golden_json["prompts"][c] for c in ("a", "b")]
    assert af2_pipe(paths, question=questions, batch_size=2, **GREEDY) == expected[:2]
    streamed = af2_pipe((item for item in inputs[:2]), **GREEDY)
    assert not isinstance(streamed, list)
    assert list(streamed) == expected[:2]


def test_text_only_prompts_and_mixed_batches(af2_pipe, golden_json, golden_audio_files):
    """pipe(None, question=...) (and the other text-only forms) gives the model the text-only prompt without any
    input_features; a batch mixing audio and text-only samples answers each as it would be answered alone."""
    processor, model = af2_pipe.processor, af2_pipe.model
    question = "Name a musical instrument with strings."
    chat = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    reference = processor.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=True,
                                              return_tensors="pt")
    reference = {key: reference[key] for key in ("input_ids", "attention_mask")}
    assert processor.audio_token_id not in reference["input_ids"][0].tolist()
    for inputs, params in [(None, {"question": question}), ({"audio": None, "question": question}, {}),
                           ({"question": question}, {})]:
        _assert_same_inputs(_model_inputs(af2_pipe, inputs, **params), reference)

    expected_text = {"answer": processor.decode_answer(model.generate(**reference, **GREEDY)[0])}
    assert af2_pipe(None, question=question, **GREEDY) == expected_text
    assert af2_pipe(question=question, **GREEDY) == expected_text
    assert af2_pipe([None], question=[question], **GREEDY) == [expected_text]

    path, audio_question = str(golden_audio_files["a"]), golden_json["prompts"]["a"]
    expected_audio = {"answer": golden_json["decoded"]["a.greedy"]}
    mixed = [{"audio": path, "question": audio_question}, {"audio": None, "question": question},
             {"question": question}]
    batch = af2_pipe._collate([af2_pipe.preprocess(item) for item in mixed])["model_inputs"]
    assert batch["input_features_mask"].tolist() == [[1], [0], [0]]
    assert af2_pipe(mixed, batch_size=3, **GREEDY) == [expected_audio, expected_text, expected_text]
    # A batch of text-only samples carries no input_features at all.
    text_batch = af2_pipe._collate([af2_pipe.preprocess(item) for item in mixed[1:]])["model_inputs"]
    assert set(text_batch) == {"input_ids", "attention_mask"}


def test_special_token_text_in_a_question_stays_plain_text(af2_pipe, golden_audio_files):
    """A question holding <audio>, <SEP>, <|endoftext|> gives, with audio or without, the ids of
    processor.apply_question_request: no control id from the question and no extra audio slot."""
    processor = af2_pipe.processor
    question = "What is <|endoftext|> this <audio> sound?<SEP> <|endofchunk|>"
    path = str(golden_audio_files["a"])
    for audio in (None, path):
        inputs = _model_inputs(af2_pipe, {"audio": audio, "question": question})
        expected = processor.apply_question_request([question], audio=[audio], return_tensors="pt")
        torch.testing.assert_close(inputs["input_ids"], expected["input_ids"], rtol=0, atol=0)
        ids = inputs["input_ids"][0].tolist()
        assert ids.count(processor.audio_token_id) == (0 if audio is None else 1)
        assert processor.tokenizer.eos_token_id not in ids and processor.end_of_chunk_token_id not in ids
        assert ids.count(processor.tokenizer.sep_token_id) == 1  # the prompt's own, at the end
        assert ids[-1] == processor.tokenizer.sep_token_id


def test_cli_ask_without_audio(af2_pipe, capsys):
    """`af2-hf ask --no-audio QUESTION` prints the pipeline's text-only answer; the audio-or-not forms that cannot
    be meant exit 2 with a message."""
    from af2_hf.cli import main

    model = str(converted_tiny_dir())
    question = "Name a musical instrument with strings."
    expected = af2_pipe(None, question=question, do_sample=False, max_new_tokens=5)["answer"]
    capsys.readouterr()
    assert main(["ask", "--no-audio", question, "--model", model, "--greedy", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    for argv, message in [
        (["ask", question, "--model", model], "or --no-audio QUESTION for a text-only prompt"),
        (["ask", "--no-audio", "clip.wav", question, "--model", model], "--no-audio takes the question alone"),
        (["ask", "--no-audio", question, "--model", model, "--soundcot"], "cannot be used with --no-audio"),
    ]:
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_generate_kwargs_pass_through(af2_pipe, golden, golden_json, golden_audio_files):
    path, question = str(golden_audio_files["a"]), golden_json["prompts"]["a"]
    prompt_length = golden["a.input_ids"].shape[1]
    processor = af2_pipe.processor
    four = {"answer": processor.decode_answer(golden["a.greedy_ids"][0, : prompt_length + 4])}
    assert af2_pipe(path, question=question, generate_kwargs={"do_sample": False, "max_new_tokens": 4}) == four
    # Set at construction, per call as keyword arguments.
    pipe = pipeline(TASK, model=af2_pipe.model, processor=processor, do_sample=False)
    assert pipe(path, question=question, max_new_tokens=4) == four
    beams = {"answer": golden_json["decoded"]["a.beam"]}
    assert af2_pipe(path, question=question, num_beams=3, do_sample=False, max_new_tokens=8) == beams
    several = af2_pipe(path, question=question, do_sample=True, num_return_sequences=2, max_new_tokens=2)
    assert isinstance(several, list) and len(several) == 2 and all(set(s) == {"answer"} for s in several)


def test_bad_inputs_raise_clear_errors(af2_pipe, golden_audio_files, tmp_path):
    path = str(golden_audio_files["a"])
    waveform = np.zeros(16000)
    with pytest.raises(ValueError, match="Missing question"):
        af2_pipe(path)
    with pytest.raises(TypeError, match="question must be a string"):
        af2_pipe({"audio": path, "question": 3})
    with pytest.raises(TypeError, match="question must be a string"):
        af2_pipe(path, question=3)
    with pytest.raises(ValueError, match="needs its 'sampling_rate'"):
        af2_pipe({"raw": waveform}, question="q")
    with pytest.raises(ValueError, match="Unexpected key"):
        af2_pipe({"audio": path, "prompt": "q"})
    with pytest.raises(ValueError, match="1-D"):
        af2_pipe(np.zeros((2, 3, 16000)), question="q")
    with pytest.raises(TypeError, match="floating-point samples or integer PCM"):
        af2_pipe(np.zeros(16000, dtype=np.complex64), question="q")
    with pytest.raises(AudioLoadError, match="0-d array"):
        af2_pipe(np.array(0.5), question="q")
    with pytest.raises(ValueError, match="NaN"):
        af2_pipe(np.full(16000, np.nan), question="q")
    with pytest.raises(ValueError, match="positive integer"):
        af2_pipe({"raw": waveform, "sampling_rate": -5}, question="q")
    with pytest.raises(TypeError, match="single number"):
        af2_pipe(12, question="q")
    with pytest.raises(ValueError, match="Pass a question"):
        af2_pipe()
    with pytest.raises(ValueError, match="no audio"):
        af2_pipe(None, question="q", soundcot=True)
    with pytest.raises(AudioLoadError, match="does not exist"):
        af2_pipe(str(tmp_path / "missing.wav"), question="q")
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(AudioLoadError):
        af2_pipe(str(tmp_path / "bad.wav"), question="q")
    with pytest.raises(ValueError, match="same length"):
        af2_pipe([path, path], question=["q"])
    with pytest.raises(TypeError, match="Unexpected argument"):
        af2_pipe(path, question="q", not_a_parameter=1)
    with pytest.raises(ValueError, match="given twice"):
        af2_pipe(path, question="q", max_new_tokens=3, generate_kwargs={"max_new_tokens": 4})
    with pytest.raises(ValueError, match="one of 'raw' and 'array'"):
        af2_pipe({"raw": waveform, "array": waveform, "sampling_rate": 16000}, question="q")
    with pytest.raises(ValueError, match="question once"):
        af2_pipe({"audio": {"audio": path, "question": "q"}, "question": "q"})


def test_a_pipeline_needs_a_processor():
    with pytest.raises(ValueError, match="needs a processor"):
        AudioQuestionAnsweringPipeline(model=load_converted_model("sdpa"))


# ---------------------------------------------------------------------------------------------------- AF3 / Qwen2-Audio

AF3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for block in message['content'] %}{% if block['type'] == 'audio' %}<sound>"
    "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_TEXT = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


def _golden_tokenizer(golden_dir, extra_tokens):
    tokenizer = AutoTokenizer.from_pretrained(golden_dir / "base_lm")
    tokenizer.add_special_tokens({"additional_special_tokens": extra_tokens})
    return tokenizer


def _save(model, processor, tokenizer, directory):
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def af3_dir(golden_dir, tmp_path_factory):
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
        WhisperFeatureExtractor,
    )

    tokenizer = _golden_tokenizer(golden_dir, ["<sound>", "<|im_start|>", "<|im_end|>"])
    processor = AudioFlamingo3Processor(WhisperFeatureExtractor(), tokenizer, chat_template=AF3_CHAT_TEMPLATE)
    torch.manual_seed(0)
    config = AudioFlamingo3Config(
        audio_config=dict(num_mel_bins=80, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32),
        text_config={**TINY_TEXT, "vocab_size": len(tokenizer)},
        audio_token_id=tokenizer.convert_tokens_to_ids("<sound>"),
    )
    model = AudioFlamingo3ForConditionalGeneration(config).eval()
    return _save(model, processor, tokenizer, tmp_path_factory.mktemp("af3"))


@pytest.fixture(scope="module")
def qwen2_audio_dir(golden_dir, tmp_path_factory):
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    tokenizer = _golden_tokenizer(golden_dir, ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>", "<|im_start|>",
                                               "<|im_end|>"])
    processor = Qwen2AudioProcessor(WhisperFeatureExtractor(), tokenizer)  # its default (ChatML) chat template
    torch.manual_seed(0)
    config = Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=80, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                          encoder_ffn_dim=32),
        text_config={**TINY_TEXT, "vocab_size": len(tokenizer)},
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    model = Qwen2AudioForConditionalGeneration(config).eval()
    return _save(model, processor, tokenizer, tmp_path_factory.mktemp("qwen2_audio"))


def _reference_answer(model, processor, waveform, question, audio_token):
    """What a user would write by hand: chat template -> processor -> generate -> decode the new tokens."""
    conversation = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert audio_token in prompt
    inputs = processor(text=[prompt], audio=[waveform], sampling_rate=16000, return_tensors="pt")
    inputs.pop("num_audio_tokens", None)
    out = model.generate(**inputs, **GREEDY)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


@pytest.mark.parametrize("which", ["af3", "qwen2_audio"])
def test_pipeline_with_transformers_audio_models(request, which):
    directory = request.getfixturevalue(f"{which}_dir")
    audio_token = {"af3": "<sound>", "qwen2_audio": "<|AUDIO|>"}[which]
    pipe = pipeline(TASK, model=str(directory))
    assert type(pipe) is AudioQuestionAnsweringPipeline
    assert type(pipe.model).__name__ == {"af3": "AudioFlamingo3ForConditionalGeneration",
                                         "qwen2_audio": "Qwen2AudioForConditionalGeneration"}[which]
    rng = np.random.default_rng(0)
    short = (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32)
    long = (0.1 * rng.standard_normal(16000 * 5)).astype(np.float32)
    questions = ["What is it?", "Describe the recording in a few words, please."]

    references = [{"answer": _reference_answer(pipe.model, pipe.processor, audio, question, audio_token)}
                  for audio, question in zip([short, long], questions)]
    assert pipe(short, question=questions[0], **GREEDY) == references[0]
    batched = pipe([{"audio": short, "question": questions[0]}, {"audio": long, "question": questions[1]}],
                   batch_size=2, **GREEDY)
    assert batched == references

    # Files are decoded; other rates are resampled (librosa) to the feature extractor's 16 kHz.
    buffer = io.BytesIO()
    sf.write(buffer, long, 16000, format="WAV", subtype="FLOAT")
    assert pipe(buffer.getvalue(), question=questions[1], **GREEDY) == references[1]
    import librosa

    at_8k = librosa.resample(long, orig_sr=16000, target_sr=8000)
    _assert_same_inputs(_model_inputs(pipe, {"raw": at_8k, "sampling_rate": 8000}, question=questions[1]),
                        _model_inputs(pipe, librosa.resample(at_8k, orig_sr=8000, target_sr=16000),
                                      question=questions[1]))

    with pytest.raises(ValueError, match="soundcot=True needs an Audio Flamingo 2"):
        pipe(short, question="q", soundcot=True)
