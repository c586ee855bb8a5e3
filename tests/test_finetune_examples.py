"""examples/finetune.py and examples/evaluate.py on a tiny model: a couple of steps / examples each, stage and LoRA
runs, adapter vs merged evaluation, manifests and argument errors."""

import importlib.util
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from af2_hf import AudioFlamingo2ForConditionalGeneration
from af2_hf.training import ManifestError, read_manifest
from test_training import make_tiny_af2, tone

REPO = Path(__file__).resolve().parents[1]
CHOICES = ["yes", "piano", "three", "rain"]


def load_example_script(name: str):
    spec = importlib.util.spec_from_file_location(f"af2_example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    make_tiny_af2(root / "model")
    (root / "clips").mkdir()
    manifest = root / "train.jsonl"
    items = [("Is this speech?", "yes"), ("Which instrument plays?", "piano"), ("Count the beeps.", "three"),
             ("Describe the weather", "rain")]
    with open(manifest, "w") as handle:
        for index, (prompt, answer) in enumerate(items):
            sf.write(root / "clips" / f"{index}.wav", tone(300.0 * (index + 1), seconds=0.5), 16000)
            # the original dataset keys ("name", "output") for half of the rows
            row = {"audio": f"clips/{index}.wav", "prompt": prompt, "answer": answer, "choices": CHOICES}
            if index % 2:
                row = {"name": row["audio"], "prompt": prompt, "output": answer, "choices": CHOICES}
            handle.write(json.dumps(row) + "\n\n")
    return root


def base_args(workspace, output):
    return [
        "--model", str(workspace / "model"), "--train_manifest", str(workspace / "train.jsonl"),
        "--output_dir", str(workspace / output), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", "--max_new_tokens", "3",
    ]


def test_finetune_stage_then_evaluate(workspace, capsys):
    finetune, evaluate = load_example_script("finetune"), load_example_script("evaluate")
    trainer = finetune.main([*base_args(workspace, "sft"), "--stage", "sft", "--eval_manifest",
                             str(workspace / "train.jsonl"), "--generation_eval_examples", "2"])
    out = workspace / "sft"
    assert trainer.state.global_step == 2
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    eval_metrics = json.loads((out / "eval_results.json").read_text())
    assert eval_metrics["eval_generation_total"] == 2 and "eval_loss" in eval_metrics
    assert "AF2 stage 'sft'" in capsys.readouterr().out
    # sft: AF-CLAP moved, the LM layers did not
    start = AudioFlamingo2ForConditionalGeneration.from_pretrained(workspace / "model").state_dict()
    tuned = AudioFlamingo2ForConditionalGeneration.from_pretrained(out).state_dict()
    assert not torch.equal(tuned["model.audio_tower.audio_encoder.patch_embed.proj.weight"],
                           start["model.audio_tower.audio_encoder.patch_embed.proj.weight"])
    assert torch.equal(tuned["model.language_model.layers.1.self_attn.q_proj.weight"],
                       start["model.language_model.layers.1.self_attn.q_proj.weight"])

    predictions = workspace / "predictions.jsonl"
    summary, answers = evaluate.main(["--model", str(out), "--manifest", str(workspace / "train.jsonl"),
                                      "--batch_size", "3", "--max_new_tokens", "3", "--output", str(predictions)])
    err = capsys.readouterr().err
    assert "generating" in err and "4/4" in err  # tqdm progress bar
    assert summary["total"] == summary["examples"] == 4 and 0 <= summary["accuracy"] <= 1
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["prediction"] for r in records] == answers
    assert all({"correct", "selected", "choices", "answer"} <= set(r) for r in records)
    assert sum(r["correct"] for r in records) == summary["correct"]


def test_finetune_lora_adapter_and_merged_model_agree(workspace):
    finetune, evaluate = load_example_script("finetune"), load_example_script("evaluate")
    trainer = finetune.main([*base_args(workspace, "lora"), "--lora", "--lora_r", "4", "--lora_alpha", "8",
                             "--learning_rate", "5e-2", "--merge_lora"])
    out = workspace / "lora"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert trainer.state.global_step == 2
    manifest = str(workspace / "train.jsonl")
    with_adapter, predictions_adapter = evaluate.main(["--model", str(workspace / "model"), "--adapter", str(out),
                                                       "--manifest", manifest, "--no_progress"])
    merged, predictions_merged = evaluate.main(["--model", str(out / "merged"), "--manifest", manifest,
                                                "--no_progress"])
    assert predictions_adapter == predictions_merged and with_adapter == merged
    base, predictions_base = evaluate.main(["--model", str(workspace / "model"), "--manifest", manifest,
                                            "--no_progress", "--limit", "2"])
    assert base["examples"] == 2


def test_finetune_argument_errors(workspace):
    finetune = load_example_script("finetune")
    args = base_args(workspace, "bad")
    for extra in (["--stage", "everything"], ["--lora", "--stage", "full"], ["--stage", "lora"],
                  ["--remove_unused_columns", "True"], ["--train_embeddings", "some"],
                  ["--lora", "--train_embeddings", "all"]):
        with pytest.raises(SystemExit):
            finetune.main([*args, *extra])
    bad = workspace / "bad.jsonl"
    bad.write_text('{"audio": "clips/0.wav", "prompt": "q", "answer": "a"}\n{"audio": "clips/0.wav"}\n')
    with pytest.raises(ManifestError, match="bad.jsonl:2: missing field 'prompt'"):
        finetune.main([*args[:2], "--train_manifest", str(bad), *args[4:]])
    evaluate = load_example_script("evaluate")
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(workspace / "model"), "--manifest", str(bad), "--batch_size", "0"])


def test_read_manifest(workspace, tmp_path):
    rows = read_manifest(workspace / "train.jsonl")
    assert len(rows) == 4
    assert rows[1]["audio"] == str(workspace / "clips" / "1.wav") and rows[1]["answer"] == "piano"
    assert set(rows[1]) == {"audio", "prompt", "answer", "choices"}
    assert read_manifest(workspace / "train.jsonl", audio_root="/data")[0]["audio"] == "/data/clips/0.wav"
    cases = {
        "not json": "not valid JSON",
        "[1, 2]": "expected a JSON object",
        '{"audio": "a.wav", "name": "b.wav", "prompt": "q", "answer": "a"}': "only one of",
        '{"audio": 3, "prompt": "q", "answer": "a"}': "non-empty path",
        '{"audio": "a.wav", "prompt": null, "answer": "a"}': "'prompt' must be a string",
        '{"audio": "a.wav", "prompt": "q", "answer": "a", "choices": "a"}': "'choices' must be a non-empty list",
        '{"audio": "a.wav", "prompt": "q"}': "missing field 'answer' / 'output'",
    }
    for line, message in cases.items():
        path = tmp_path / "m.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(ManifestError, match=message):
            read_manifest(path)
    assert read_manifest(path, require_answer=False)[0]["prompt"] == "q"
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="no examples"):
        read_manifest(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "missing.jsonl")
