"""Training data and presets: the collator against the golden training batch of the original, the label rules,
audio input forms, curriculum presets (requires_grad, embedding rows, tied lm_head) and LoRA through PEFT.

`make_tiny_af2` / `tone` are shared with the Trainer, distributed and example tests."""

import io
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from af2_hf import (
    AudioFlamingo2FeatureExtractor,
    AudioFlamingo2ForConditionalGeneration,
    AudioFlamingo2Processor,
    prepare_af2_tokenizer,
)
from af2_hf.training import (
    AF2_LORA_TARGET_MODULES,
    AudioFlamingo2DataCollator,
    AudioFlamingo2Trainer,
    answer_accuracy,
    build_training_labels,
    load_example_audio,
    match_choice,
    set_trainable,
)
from af2_testing import golden_dir, load_converted_model, relative_error, random_model

# Token ids of the golden tiny tokenizer once prepared (expected.json -> token_ids).
GOLDEN_IDS = dict(
    audio_token_id=1000, end_of_chunk_token_id=1001, pad_token_id=1002, sep_token_id=1003, eos_token_id=999
)


def tiny_processor(max_num_windows: int = 2) -> AudioFlamingo2Processor:
    from transformers import AutoTokenizer

    tokenizer = prepare_af2_tokenizer(AutoTokenizer.from_pretrained(golden_dir() / "base_lm"))
    return AudioFlamingo2Processor(AudioFlamingo2FeatureExtractor(max_num_windows=max_num_windows), tokenizer)


def tiny_model(seed: int = 0, **overrides) -> AudioFlamingo2ForConditionalGeneration:
    """A small random AF2 with the golden tokenizer's vocabulary and special-token ids (gates open)."""
    text = {"vocab_size": 1004, **overrides.pop("text_config", {})}
    return random_model(seed=seed, text_config=text, **GOLDEN_IDS, **overrides)


def make_tiny_af2(directory, seed: int = 0, max_num_windows: int = 2):
    """Saves a tiny random AF2 + processor to ``directory`` (what examples/finetune.py loads)."""
    model = tiny_model(seed)
    model.save_pretrained(directory)
    tiny_processor(max_num_windows).save_pretrained(directory)
    return directory


def tone(frequency: float, seconds: float = 1.0, rate: int = 16000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Collator: the golden batch of the original
# ----------------------------------------------------------------------------------------------------------------------


def test_collator_reproduces_golden_training_batch_and_loss(golden, golden_json, golden_processor, golden_audio_files):
    train = golden_json["train"]
    collator = AudioFlamingo2DataCollator(golden_processor, max_length=512)
    assert collator.format_text(train["prompt"], train["answer"]) == train["formatted"]
    batch = collator([{"audio": str(golden_audio_files["a"]), "prompt": train["prompt"], "answer": train["answer"]}])
    assert set(batch) == {"input_ids", "attention_mask", "input_features", "input_features_mask", "labels"}
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].dtype == torch.long
        assert torch.equal(batch[key], golden[f"train.{key}"]), key
    assert batch["input_features_mask"].tolist() == [[1]]

    model = load_converted_model()
    with torch.no_grad():
        out = model(**batch)
    loss_error = abs(out.loss.item() - golden["train.loss"].item()) / golden["train.loss"].item()
    assert loss_error <= 1e-4, loss_error
    assert relative_error(out.logits, golden["train.logits"]) <= 1e-4


def test_collator_batch_pads_text_right_and_windows_with_silence(golden_processor, golden_audio_files):
    collator = AudioFlamingo2DataCollator(golden_processor)
    examples = [
        {"audio": str(golden_audio_files["a"]), "prompt": "What is it?", "answer": "A tone."},
        {"audio": str(golden_audio_files["b"]), "prompt": "Describe the recording in detail.", "answer": "A chirp"},
    ]
    batch = collator(examples)
    singles = [collator([example]) for example in examples]
    assert batch["input_features_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    silence = golden_processor.feature_extractor.silence_db()
    assert torch.all(batch["input_features"][0, 1:] == silence)
    for row, single in enumerate(singles):
        n = single["input_ids"].shape[1]
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batch[key][row, :n], single[key][0]), key
        assert torch.all(batch["input_ids"][row, n:] == 1002)  # <|PAD_TOKEN|>
        assert torch.all(batch["attention_mask"][row, n:] == 0)
        assert torch.all(batch["labels"][row, n:] == -100)
        windows = single["input_features"].shape[1]
        assert torch.equal(batch["input_features"][row, :windows], single["input_features"][0])
    assert batch["input_ids"].shape[1] == max(s["input_ids"].shape[1] for s in singles)


def test_collator_pad_to_multiple_of(golden_processor, golden_audio_files):
    collator = AudioFlamingo2DataCollator(golden_processor, pad_to_multiple_of=16)
    batch = collator([{"audio": str(golden_audio_files["a"]), "prompt": "q", "answer": "a"}])
    assert batch["input_ids"].shape[1] == 16
    assert batch["labels"][0, batch["attention_mask"][0] == 0].eq(-100).all()


# ----------------------------------------------------------------------------------------------------------------------
# Label rules
# ----------------------------------------------------------------------------------------------------------------------

A, EOC, PAD, SEP, EOS = 1000, 1001, 1002, 1003, 999


def labels_of(rows):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels, cut = build_training_labels(ids, mask, **GOLDEN_IDS)
    return labels.tolist(), cut


def test_labels_keep_answer_span_and_every_eos():
    X = -100
    labels, cut = labels_of([
        [A, 5, 6, SEP, 7, 8, EOC, EOS],
        [A, 5, EOS, 6, SEP, 7, EOC, EOS, 9, SEP, 10, EOC],  # an eos inside the prompt is kept, as in the original
        [A, 5, SEP, 7, EOC, EOS],
    ])
    assert cut == []
    assert labels[0] == [X, X, X, X, 7, 8, EOC, EOS, X, X, X, X]
    # two <SEP>..<|endofchunk|> spans: both kept; text between them masked except eos
    assert labels[1] == [X, X, EOS, X, X, 7, EOC, EOS, X, X, 10, EOC]
    assert labels[2] == [X, X, X, 7, EOC, EOS, X, X, X, X, X, X]


def test_labels_empty_prompt_keeps_answer():
    # "<audio><SEP>answer": <SEP> at position 1 still opens the answer (train_utils.py semantics).
    labels, _ = labels_of([[A, SEP, 7, 8, EOC, EOS]])
    assert labels[0] == [-100, -100, 7, 8, EOC, EOS]


def test_labels_mask_an_answer_cut_by_max_length():
    labels, cut = labels_of([[A, 5, SEP, 7, 8, 9], [A, 5, SEP, 7, EOC, EOS], [A, 5, 6, 7]])
    assert cut == [0]
    assert labels[0] == [-100] * 6  # the unfinished answer gets no loss
    assert labels[1] == [-100, -100, -100, 7, EOC, EOS]
    assert labels[2] == [-100] * 4 + [-100, -100]  # prompt cut before <SEP>: nothing to learn
    with pytest.raises(ValueError, match="same shape"):
        build_training_labels(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4), **GOLDEN_IDS)


def test_collator_warns_and_masks_when_max_length_cuts_the_answer(golden_processor, golden_audio_files, caplog):
    collator = AudioFlamingo2DataCollator(golden_processor, max_length=12)
    examples = [
        {"audio": str(golden_audio_files["a"]), "prompt": "Q", "answer": "A rather long answer that will not fit"},
        {"audio": str(golden_audio_files["a"]), "prompt": "Q", "answer": "ok"},
    ]
    with caplog.at_level(logging.WARNING):
        batch = collator(examples)
    assert "cut to max_length=12" in caplog.text and "[0]" in caplog.text
    assert batch["input_ids"].shape[1] == 12
    assert batch["labels"][0].eq(-100).all()
    assert batch["labels"][1].ne(-100).sum() > 0
    assert batch["labels"][1][batch["input_ids"][1] == EOC].tolist() == [EOC]


# ----------------------------------------------------------------------------------------------------------------------
# Audio input forms and errors
# ----------------------------------------------------------------------------------------------------------------------


class FakeDecoder:
    """Stands in for torchcodec's AudioDecoder (what datasets >= 4 returns with decode=True):
    get_all_samples() -> an object with .data (channels, samples) and .sample_rate."""

    def __init__(self, data, rate):
        self.data, self.rate = torch.as_tensor(data), rate

    def get_all_samples(self):
        return type("Samples", (), {"data": self.data, "sample_rate": self.rate})()


def test_every_audio_form_gives_the_same_features(golden_processor, golden_audio_files):
    fe = golden_processor.feature_extractor
    collator = AudioFlamingo2DataCollator(golden_processor)
    path_a, path_b = golden_audio_files["a"], golden_audio_files["b"]
    raw_a, rate_a = sf.read(path_a, dtype="float64")
    raw_b, rate_b = sf.read(path_b, dtype="float64")  # 44.1 kHz stereo
    waveform_a = load_example_audio(str(path_a), fe)
    forms_a = [
        str(path_a), path_a, path_a.read_bytes(), io.BytesIO(path_a.read_bytes()),
        {"path": str(path_a), "bytes": None}, {"bytes": path_a.read_bytes(), "path": None},
        {"array": raw_a, "sampling_rate": rate_a}, waveform_a, torch.from_numpy(waveform_a), waveform_a.tolist(),
        FakeDecoder(raw_a[None], rate_a),
    ]
    reference = collator([{"audio": str(path_a), "prompt": "q", "answer": "a"}])["input_features"]
    for form in forms_a:
        got = collator([{"audio": form, "prompt": "q", "answer": "a"}])["input_features"]
        assert torch.equal(got, reference), type(form)
    # Resampled in-memory audio (channel 0 of a stereo 44.1 kHz file) equals reading the file.
    from_file = collator([{"audio": str(path_b), "prompt": "q", "answer": "a"}])["input_features"]
    for form in ({"array": raw_b[:, 0], "sampling_rate": rate_b}, FakeDecoder(raw_b.T, rate_b)):
        got = collator([{"audio": form, "prompt": "q", "answer": "a"}])["input_features"]
        assert torch.equal(got, from_file)


def test_collator_errors(golden_processor, golden_audio_files, af2_tokenizer):
    collator = AudioFlamingo2DataCollator(golden_processor)
    good = {"audio": str(golden_audio_files["a"]), "prompt": "q", "answer": "a"}
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        collator([{"input_ids": [1, 2]}])
    with pytest.raises(KeyError, match="'answer'"):
        collator([{"audio": good["audio"], "prompt": "q"}])
    with pytest.raises(TypeError, match="'answer' must be a string"):
        collator([{**good, "answer": None}])
    assert collator([{**good, "answer": 440}])["labels"].ne(-100).sum() > 0  # numbers are str()-ed as the original
    with pytest.raises(TypeError, match="non-empty list"):
        collator([])
    with pytest.raises(TypeError, match="not a dict"):
        collator(["x"])
    with pytest.raises(ValueError, match="Example 0 audio: .*expected a 1-D"):
        collator([{**good, "audio": np.zeros((2, 3, 16000))}])
    with pytest.raises(ValueError, match="sampling_rate"):
        collator([{**good, "audio": {"array": np.zeros(100)}}])
    with pytest.raises(ValueError, match="sampling_rate must be a positive integer"):
        collator([{**good, "audio": {"array": np.zeros(100), "sampling_rate": 0}}])
    with pytest.raises(ValueError, match="'sampling_rate', 'bytes' or 'path'"):
        collator([{**good, "audio": {"path": None, "bytes": None}}])
    with pytest.raises(TypeError, match="Example 0 audio: .*single number"):
        collator([{**good, "audio": 3}])
    with pytest.raises(ValueError, match="does not exist"):
        collator([{**good, "audio": "/nonexistent.wav"}])
    with pytest.raises(TypeError, match="AudioFlamingo2Processor"):
        AudioFlamingo2DataCollator(af2_tokenizer)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_length"):
            AudioFlamingo2DataCollator(golden_processor, max_length=bad)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        AudioFlamingo2DataCollator(golden_processor, pad_to_multiple_of=0)


def test_collator_rejects_pad_equal_to_eos(golden_feature_extractor):
    from transformers import AutoTokenizer

    tokenizer = prepare_af2_tokenizer(AutoTokenizer.from_pretrained(golden_dir() / "base_lm"))
    processor = AudioFlamingo2Processor(golden_feature_extractor, tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    with pytest.raises(ValueError, match="pad token equals the eos token"):
        AudioFlamingo2DataCollator(processor)


# ----------------------------------------------------------------------------------------------------------------------
# Curriculum presets
# ----------------------------------------------------------------------------------------------------------------------


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_stages_set_requires_grad_per_component():
    model = tiny_model()
    af2 = model.model
    emb = af2.get_input_embeddings().weight
    assert model.lm_head.weight is emb  # tied
    sizes = {
        "audio_tower": numel(af2.audio_tower),
        "audio_transformer": numel(af2.audio_transformer),
        "cross_attention": numel(af2.cross_attention_layers),
        "language_model": numel(af2.language_model) - emb.numel(),
        "embed_tokens": emb.numel(),
    }
    expected_trainable = {
        "pretrain": {"audio_transformer", "cross_attention", "embed_tokens"},
        "sft": {"audio_tower", "audio_transformer", "cross_attention", "embed_tokens"},
        "long": {"audio_transformer", "cross_attention", "embed_tokens"},
        "full": set(sizes),
        "lora": set(),
    }
    for stage, parts in expected_trainable.items():
        counts = set_trainable(model, stage, verbose=False)
        for part, size in sizes.items():
            assert counts[part]["total"] == size, (stage, part)
            assert counts[part]["trainable"] == (size if part in parts else 0), (stage, part)
        assert counts["lm_head"] == {"trainable": 0, "total": 0}  # tied: counted under embed_tokens
        assert counts["total"]["trainable"] == sum(sizes[p] for p in parts)
        assert counts["total"]["total"] == numel(model)
        assert trainable(model) == counts["total"]["trainable"]
        assert counts["embed_tokens"]["updated_rows"] == {"full": 1004, "lora": 0}.get(stage, 2)
    # train mode: a frozen tower keeps BatchNorm in eval; sft trains it
    model.train()
    set_trainable(model, "pretrain", verbose=False)
    assert not af2.audio_tower.training and af2.audio_transformer.training
    set_trainable(model, "sft", verbose=False)
    assert af2.audio_tower.training


def test_embedding_options_and_errors(capsys):
    model = tiny_model()
    counts = set_trainable(model, "pretrain", train_embeddings=False)
    assert "stage 'pretrain'" in capsys.readouterr().out
    assert counts["embed_tokens"]["trainable"] == 0 and not model.lm_head.weight.requires_grad
    counts = set_trainable(model, "pretrain", train_embeddings="all", verbose=False)
    assert counts["embed_tokens"]["updated_rows"] == 1004
    counts = set_trainable(model, "full", train_embeddings=False, verbose=False)
    assert counts["embed_tokens"]["trainable"] == 0
    assert counts["total"]["trainable"] == numel(model) - model.lm_head.weight.numel()
    with pytest.raises(ValueError, match="Unknown stage"):
        set_trainable(model, "finetune")
    with pytest.raises(ValueError, match="train_embeddings"):
        set_trainable(model, "sft", train_embeddings="some")
    with pytest.raises(ValueError, match="modules_to_save"):
        set_trainable(model, "lora", train_embeddings=True)
    with pytest.raises(TypeError, match="AudioFlamingo2ForConditionalGeneration"):
        set_trainable(torch.nn.Linear(2, 2), "full")


def test_added_rows_only_get_gradients_and_untied_head_stays_frozen():
    model = tiny_model()
    set_trainable(model, "pretrain", verbose=False)
    ids = torch.tensor([[A, 5, 6, SEP, 7, 8, EOC, EOS]])
    features = torch.randn(1, 1, 1001, 64) * 10 - 40
    out = model(input_ids=ids, input_features=features, labels=ids)
    out.loss.backward()
    grad = model.model.get_input_embeddings().weight.grad
    rows = grad.abs().sum(dim=1).nonzero().flatten().tolist()
    assert rows == [A, EOC]
    # Calling again replaces the hook instead of stacking it; "all" lets every used row move.
    model.zero_grad()
    set_trainable(model, "pretrain", train_embeddings="all", verbose=False)
    model(input_ids=ids, input_features=features, labels=ids).loss.backward()
    assert (model.model.get_input_embeddings().weight.grad.abs().sum(dim=1) > 0).sum() > 100

    untied = tiny_model(text_config={"tie_word_embeddings": False})
    assert untied.lm_head.weight is not untied.model.get_input_embeddings().weight
    counts = set_trainable(untied, "sft", verbose=False)
    assert counts["lm_head"]["trainable"] == 0 and counts["embed_tokens"]["updated_rows"] == 2
    counts = set_trainable(untied, "full", verbose=False)
    assert counts["lm_head"]["trainable"] == untied.lm_head.weight.numel()


def test_trainer_decays_only_cross_attention(tmp_path):
    from transformers import TrainingArguments

    model = tiny_model()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    names = AudioFlamingo2Trainer(model=model, args=args).get_decay_parameter_names(model)
    assert names and all(".cross_attention_layers." in n for n in names)
    assert "model.cross_attention_layers.0.to_q.weight" in names
    assert not any("norm" in n for n in names)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA (PEFT)
# ----------------------------------------------------------------------------------------------------------------------


def test_lora_counts_save_load_and_merge(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    rank = 4
    model = tiny_model(seed=1)
    config = model.config
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    q_out, kv_out = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    hidden, inner, audio = text.hidden_size, config.cross_attention_num_heads * config.cross_attention_head_dim, (
        config.audio_hidden_size
    )
    # r * (in + out) per adapted Linear
    per_layer_lm = rank * ((hidden + q_out) + 2 * (hidden + kv_out) + (q_out + hidden))
    per_block_xattn = rank * ((hidden + inner) + (audio + 2 * inner) + (inner + hidden))
    expected = text.num_hidden_layers * per_layer_lm + len(config.cross_attention_layers) * per_block_xattn
    assert expected == 3 * 4 * 224 + 3 * 4 * 320  # the tiny shapes, spelled out

    set_trainable(model, "lora", verbose=False)
    lora = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=8, lora_dropout=0.0, target_modules=AF2_LORA_TARGET_MODULES)
    )
    counts = set_trainable(lora, "lora", verbose=False)  # keeps PEFT's adapters trainable, everything else frozen
    assert counts["adapters"]["trainable"] == expected == counts["total"]["trainable"]
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == expected
    adapted = {n.rsplit(".", 2)[0] for n, _ in lora.named_parameters() if "lora_A" in n}
    assert not any("audio_tower" in n or "audio_transformer" in n for n in adapted)
    assert len(adapted) == 4 * 3 + 3 * 3

    # a few optimisation steps so that lora_B is no longer zero
    ids = torch.tensor([[A, 5, 6, SEP, 7, 8, EOC, EOS]])
    features = torch.randn(1, 1, 1001, 64) * 10 - 40
    batch = dict(input_ids=ids, input_features=features, input_features_mask=torch.ones(1, 1, dtype=torch.long))
    optimizer = torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(3):
        optimizer.zero_grad()
        lora(**batch, labels=ids).loss.backward()
        optimizer.step()
    lora.eval()
    with torch.no_grad():
        adapter_logits = lora(**batch).logits
    with lora.disable_adapter(), torch.no_grad():
        base_logits = lora(**batch).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3

    lora.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_model(seed=1), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, adapter_logits)
    merged = lora.merge_and_unload().eval()
    assert isinstance(merged, AudioFlamingo2ForConditionalGeneration)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapter_logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Accuracy helpers
# ----------------------------------------------------------------------------------------------------------------------


def test_answer_matching():
    choices = ["Dog barking", "Car horn", "Rain"]
    assert match_choice("dog barking.", choices) == "Dog barking"
    assert match_choice("(b) car horn", choices) == "Car horn"
    assert match_choice("b)", choices) == "Car horn"
    assert match_choice("i hear rain falling", choices) == "Rain"
    assert match_choice("no idea", choices) is None
    assert match_choice("dog barking and a car horn", ["dog barking", "car horn"]) is None  # ambiguous
    assert match_choice("heavy rain", ["rain", "heavy rain", "wind"]) == "heavy rain"
    scores = answer_accuracy(["Rain.", "car horn", "cat"], ["rain", "Dog barking", "cat!"], [choices, choices, None])
    assert scores == {"accuracy": 2 / 3, "correct": 2, "total": 3, "unmatched": 0}
    with pytest.raises(ValueError, match="predictions"):
        answer_accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="non-empty"):
        match_choice("a", [])
