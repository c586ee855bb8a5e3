"""Trainer end to end on a tiny AF2: datasets rows (arrays, paths, datasets Audio without decoding), loss falling,
generation accuracy in evaluate(), resume from a checkpoint, activation (gradient) checkpointing through the Trainer
arguments."""

import dataclasses

import numpy as np
import pytest
import soundfile as sf
import torch
from datasets import Audio, Dataset
from transformers import TrainingArguments

from af2_hf.training import (
    AudioFlamingo2DataCollator,
    AudioFlamingo2Trainer,
    GenerationAccuracyCallback,
    set_trainable,
)
from test_training import tiny_model, tiny_processor, tone

ITEMS = [
    ("Is this speech?", "yes", 300.0),
    ("Which instrument plays the melody here?", "piano", 600.0),
    ("Count the beeps.", "three", 1200.0),
    ("Describe the weather sound", "rain", 2400.0),
]


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(max_num_windows=1)


@pytest.fixture(scope="module")
def wav_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wavs")
    rows = []
    for index, (prompt, answer, frequency) in enumerate(ITEMS):
        path = folder / f"item{index}.wav"
        sf.write(path, tone(frequency, seconds=0.5 + 0.25 * index), 16000)
        rows.append({"audio": str(path), "prompt": prompt, "answer": answer})
    return rows


def arguments(output_dir, **overrides):
    base = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=3e-3,
        max_steps=30,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(overrides)
    return TrainingArguments(**base)


def losses(trainer):
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_trainer_trains_on_datasets_and_evaluates_with_generation(tmp_path, processor, wav_rows):
    # Training rows hold in-memory arrays at another rate ({"array", "sampling_rate"}: resampled by the collator);
    # the evaluation rows hold paths cast to datasets' Audio(decode=False) ({"path", "bytes"}: decoded by soundfile).
    train = Dataset.from_list(
        [
            {"audio": {"array": tone(f, seconds=0.5, rate=22050), "sampling_rate": 22050}, "prompt": p, "answer": a}
            for p, a, f in ITEMS
        ]
    )
    evaluation = Dataset.from_list(wav_rows).cast_column("audio", Audio(decode=False))
    assert set(evaluation[0]["audio"]) == {"bytes", "path"}

    # Closed gates, as a fresh AF2, and a 64-wide LM: the 32-wide one memorises four answers too slowly.
    model = tiny_model(seed=3, open_gates=False, text_config={"hidden_size": 64, "intermediate_size": 128})
    set_trainable(model, "full", verbose=False)
    model.model.audio_tower.requires_grad_(False)  # keeps the test fast (no backward through HTSAT)
    callback = GenerationAccuracyCallback(processor, wav_rows, batch_size=4, max_new_tokens=4)
    trainer = AudioFlamingo2Trainer(
        model=model,
        args=arguments(
            tmp_path, per_device_train_batch_size=4, max_steps=40, learning_rate=1e-2, lr_scheduler_type="constant"
        ),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=AudioFlamingo2DataCollator(processor, max_length=64),
        processing_class=processor,
        callbacks=[callback],
    )
    before = trainer.evaluate()
    assert before["eval_generation_total"] == 4
    trainer.train()
    after = trainer.evaluate()

    curve = losses(trainer)
    first, last = np.mean([curve[s] for s in (1, 2, 3)]), np.mean([curve[s] for s in (38, 39, 40)])
    print(f"training loss {first:.3f} -> {last:.3f}; eval loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}; "
          f"generation accuracy {before['eval_generation_accuracy']} -> {after['eval_generation_accuracy']} "
          f"{callback.last_predictions}")
    assert last < 0.3 * first
    assert after["eval_loss"] < 0.3 * before["eval_loss"]
    assert before["eval_generation_accuracy"] == 0.0
    assert after["eval_generation_accuracy"] >= 0.75
    assert any("eval_generation_accuracy" in entry for entry in trainer.state.log_history)


def test_resume_from_checkpoint_continues_identically(tmp_path, processor, wav_rows):
    # Audio as plain lists of floats (datasets' List(float32)) at 16 kHz; 6 rows = 3 steps per epoch, so the 8 steps
    # cross epochs and the resumed run has to restore the sampler position and RNG state.
    rows = [
        {"audio": tone(f, seconds=0.3 + 0.1 * i).tolist(), "prompt": p, "answer": a}
        for i, (p, a, f) in enumerate(ITEMS + ITEMS[:2])
    ]
    dataset = Dataset.from_list(rows)
    collator = AudioFlamingo2DataCollator(processor, max_length=64)

    def run(output_dir, resume=None):
        model = tiny_model(seed=5)
        set_trainable(model, "pretrain", verbose=False)
        trainer = AudioFlamingo2Trainer(
            model=model,
            args=arguments(output_dir, max_steps=8, save_strategy="steps", save_steps=4, weight_decay=0.1),
            train_dataset=dataset,
            data_collator=collator,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    resumed = run(tmp_path / "resumed", resume=str(checkpoint))

    full_losses, resumed_losses = losses(full), losses(resumed)
    assert resumed.state.global_step == 8
    # steps 1-4 come from the checkpoint's trainer_state.json; 5-8 were computed by the resumed run
    assert sorted(resumed_losses) == list(range(1, 9))
    for step in resumed_losses:
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-6, abs=0), step
    state_full = full.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, state_full[name], rtol=1e-6, atol=1e-7, msg=name)
    # pretrain: the frozen LM did not move except the rows of the added tokens of the (tied) embedding
    start = tiny_model(seed=5).state_dict()
    embedding = "model.language_model.embed_tokens.weight"
    moved = state_full[embedding] != start[embedding]
    assert moved.any(dim=1).nonzero().flatten().tolist() == [1000, 1001]
    assert torch.equal(state_full["model.language_model.layers.0.mlp.up_proj.weight"],
                       start["model.language_model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(state_full["model.audio_transformer.layers.0.fc1.weight"],
                           start["model.audio_transformer.layers.0.fc1.weight"])


# transformers >= 5.23 calls it activation_checkpointing; older releases gradient_checkpointing.
CHECKPOINTING_ARG = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                         if name in {field.name for field in dataclasses.fields(TrainingArguments)})


def test_activation_checkpointing_through_trainer_args_gives_same_loss_and_gradients(tmp_path, processor, wav_rows):
    # Plain SGD: the parameter change of each step is -lr * gradient, so equal updates mean equal gradients.
    dataset = Dataset.from_list(wav_rows)
    lr = 0.05
    results = {}
    for checkpointing in (False, True):
        model = tiny_model(seed=7)
        model.train()
        set_trainable(model, "sft", verbose=False)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = AudioFlamingo2Trainer(
            model=model,
            args=arguments(tmp_path / str(checkpointing), max_steps=2, optim="sgd", learning_rate=lr,
                           lr_scheduler_type="constant", **{CHECKPOINTING_ARG: checkpointing}),
            train_dataset=dataset,
            data_collator=AudioFlamingo2DataCollator(processor, max_length=64),
        )
        trainer.train()
        layers = [model.model.cross_attention_layers[0], model.model.audio_transformer.layers[0],
                  model.model.language_model.layers[0]]
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        deltas = {n: (p.detach() - start[n]) / -lr for n, p in model.named_parameters()}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        results[checkpointing] = (losses(trainer), deltas, buffers)
    (loss_off, grad_off, buf_off), (loss_on, grad_on, buf_on) = results[False], results[True]
    assert loss_on.keys() == loss_off.keys() == {1, 2}
    for step in loss_off:
        assert loss_on[step] == pytest.approx(loss_off[step], rel=1e-5)
    assert sum(g.abs().sum() > 0 for g in grad_off.values()) > 50
    for name in grad_off:
        torch.testing.assert_close(grad_on[name], grad_off[name], rtol=1e-4, atol=1e-5, msg=name)
    for name in buf_off:  # BatchNorm statistics of the trained audio tower are not updated twice by recomputation
        torch.testing.assert_close(buf_on[name], buf_off[name], msg=name)
