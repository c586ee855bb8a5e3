"""examples/finetune.py and `af2-hf evaluate` on a tiny model: a couple of steps / examples each, stage and LoRA
runs, adapter vs merged evaluation, manifests and argument errors; examples/evaluate.py (the Python API in a few
lines) gives the command's results."""

import importlib.util
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from af2_hf import AudioFlamingo2ForConditionalGeneration
from af2_hf.cli import main as cli_main
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


def evaluate(workspace, model, output, *extra):
    """``af2-hf evaluate`` on the workspace manifest: (summary, predictions in example order)."""
    output = workspace / output
    assert cli_main(["evaluate", str(workspace / "train.jsonl"), "--model", str(model), "--output", str(output),
                     "--max-new-tokens", "3", "--overwrite", *extra]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(len(rows)))
    return json.loads(output.with_name(output.stem + ".summary.json").read_text()), rows


def base_args(workspace, output):
    return [
        "--model", str(workspace / "model"), "--train_manifest", str(workspace / "train.jsonl"),
        "--output_dir", str(workspace / output), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", "--max_new_tokens", "3",
    ]


def test_finetune_stage_then_evaluate(workspace, capsys):
    finetune = load_example_script("finetune")
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

    summary, rows = evaluate(workspace, out, "predictions.jsonl")
    err = capsys.readouterr().err
    assert "evaluating" in err and "4/4" in err and "example/s" in err  # tqdm progress bar with the rate
    overall = summary["overall"]
    assert summary["complete"] and overall["examples"] == overall["graded"] == 4 and 0 <= overall["accuracy"] <= 1
    assert all({"correct", "selected", "choices", "answer", "prediction"} <= set(row) for row in rows)
    assert sum(row["correct"] for row in rows) == overall["correct"]

    python_output = workspace / "predictions-python.jsonl"
    example = load_example_script("evaluate").main(
        ["--model", str(out), str(workspace / "train.jsonl"), str(python_output), "--max_new_tokens", "3"]
    )
    python_rows = [json.loads(line) for line in python_output.read_text().splitlines()]
    assert [r["prediction"] for r in python_rows] == [r["prediction"] for r in rows]
    assert example["overall"] == overall


def test_finetune_lora_adapter_and_merged_model_agree(workspace):
    finetune = load_example_script("finetune")
    trainer = finetune.main([*base_args(workspace, "lora"), "--lora", "--lora_r", "4", "--lora_alpha", "8",
                             "--learning_rate", "5e-2", "--merge_lora"])
    out = workspace / "lora"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert trainer.state.global_step == 2
    with_adapter, rows_adapter = evaluate(workspace, workspace / "model", "adapter.jsonl", "--adapter", str(out),
                                          "--no-progress")
    merged, rows_merged = evaluate(workspace, out / "merged", "merged.jsonl", "--no-progress")
    assert [r["prediction"] for r in rows_adapter] == [r["prediction"] for r in rows_merged]
    assert with_adapter["overall"] == merged["overall"]
    base, _ = evaluate(workspace, workspace / "model", "base.jsonl", "--no-progress", "--limit", "2")
    assert base["examples"] == base["written"] == 2


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
    with pytest.raises(SystemExit):
        cli_main(["evaluate", str(bad), "--model", str(workspace / "model"), "--output", "x.jsonl", "--batch-size", "0"])
    assert cli_main(["evaluate", str(bad), "--model", str(workspace / "model"), "--output",
                     str(workspace / "bad-out.jsonl")]) == 2


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
