"""The af2-hf command line (ask / convert / make-tiny), the tiny model and tokenizer, and the bundled example clip."""

import json
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForMultimodalLM, AutoProcessor

from af2_hf import AudioFlamingo2Config, AudioQuestionAnsweringPipeline
from af2_hf.cli import MODEL_ENV, main
from af2_hf.tiny import RANDOM_WEIGHTS_MARKER, build_tiny_tokenizer
from af2_testing import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "data" / "example.wav"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny") / "af2-tiny"
    assert main(["make-tiny", str(directory)]) == 0
    return directory


# ---------------------------------------------------------------------------------------------------- make-tiny


def test_make_tiny_writes_a_loadable_deterministic_checkpoint(tiny_dir, tmp_path, capsys):
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["make-tiny", str(again)]) == 0
    out = capsys.readouterr().out
    assert "RANDOM" in out and "noise" in out and f"--model {again}" in out
    for name in ("tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    first, second = load_file(tiny_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (tiny_dir / RANDOM_WEIGHTS_MARKER).is_file()
    assert type(AutoConfig.from_pretrained(tiny_dir)) is AudioFlamingo2Config
    config = json.loads((tiny_dir / "config.json").read_text())
    assert "audio-question-answering" in config["custom_pipelines"] and "AutoModel" in config["auto_map"]
    assert main(["make-tiny", str(tmp_path / "seed1"), "--seed", "1", "--max-num-windows", "3"]) == 0
    other = load_file(tmp_path / "seed1" / "model.safetensors")
    embeddings = "model.language_model.embed_tokens.weight"
    assert not torch.equal(other[embeddings], first[embeddings])
    assert AutoProcessor.from_pretrained(tmp_path / "seed1").feature_extractor.max_num_windows == 3


def test_tiny_tokenizer_is_a_prepared_qwen2_byte_level_bpe():
    tokenizer = build_tiny_tokenizer()
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.sep_token) == ("<|endoftext|>", "<|PAD_TOKEN|>", "<SEP>")
    ids = tokenizer.convert_tokens_to_ids(["<audio>", "<|endofchunk|>", "<|PAD_TOKEN|>", "<SEP>"])
    assert ids == list(range(len(tokenizer) - 4, len(tokenizer)))  # appended after the base vocabulary, in order
    for text in ["What is the sound source in this audio?", "Café, 12.5 s — naïve 音"]:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(encoded) == text
    # Trained merges: common words are single tokens, the prompt markers stay whole.
    assert len(tokenizer(" sound", add_special_tokens=False)["input_ids"]) == 1
    prompt = tokenizer("<audio>what is it?<SEP>", add_special_tokens=False)["input_ids"]
    assert prompt[0] == ids[0] and prompt[-1] == ids[3]
    assert build_tiny_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_tiny_model_answers_depend_on_the_audio(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    model = AutoModelForMultimodalLM.from_pretrained(tiny_dir).eval()
    noise = np.random.default_rng(0).uniform(-1, 1, 16000 * 3)
    logits = []
    for audio in (str(EXAMPLE), noise):
        inputs = processor(text="what is it?", audio=audio, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            logits.append(model(**inputs).logits[0, -1])
    assert (logits[0] - logits[1]).abs().max() > 0.05 * logits[0].abs().max()
    assert logits[0].argmax() != inputs["input_ids"][0, -1]  # it does not just repeat <SEP>


# ---------------------------------------------------------------------------------------------------- ask


def test_ask_prints_the_answer(tiny_dir, capsys):
    model = AutoModelForMultimodalLM.from_pretrained(tiny_dir).eval()
    pipe = AudioQuestionAnsweringPipeline(model=model, processor=AutoProcessor.from_pretrained(tiny_dir))
    expected = pipe(str(EXAMPLE), question="What is it?", do_sample=False, max_new_tokens=6)["answer"]
    capsys.readouterr()
    assert main(["ask", str(EXAMPLE), "What is it?", "--model", str(tiny_dir), "--greedy", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert "RANDOM weights" in captured.err
    # Sampling (the default) with a seed is reproducible.
    assert main(["ask", str(EXAMPLE), "q", "--model", str(tiny_dir), "--max-new-tokens", "5", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(["ask", str(EXAMPLE), "q", "--model", str(tiny_dir), "--max-new-tokens", "5", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first


def test_ask_with_the_model_from_the_environment(tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv(MODEL_ENV, str(tiny_dir))
    assert main(["ask", str(EXAMPLE), "What is it?", "--greedy", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize(
    "model_arg, message",
    [
        (None, "No model given"),
        ("./no-such-model-dir", "does not exist"),
        ("README.md", "is a file"),
        ("GOLDEN_ORIGINAL", "ORIGINAL release"),
    ],
)
def test_ask_without_a_usable_model_explains_how_to_get_one(model_arg, message, golden_dir, capsys, monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)
    monkeypatch.chdir(REPO_ROOT)
    argv = ["ask", str(EXAMPLE), "What is it?"]
    if model_arg is not None:
        argv += ["--model", str(golden_dir / "original") if model_arg == "GOLDEN_ORIGINAL" else model_arg]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "af2-hf convert --af2-dir nvidia/audio-flamingo-2" in err and "af2-hf make-tiny" in err


def test_ask_with_unreadable_audio_exits_2(tiny_dir, tmp_path, capsys):
    assert main(["ask", str(tmp_path / "missing.wav"), "q", "--model", str(tiny_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    assert main(["ask", str(tmp_path / "bad.wav"), "q", "--model", str(tiny_dir)]) == 2
    assert "Could not read audio" in capsys.readouterr().err
    assert main(["ask", str(EXAMPLE), "q", "--model", str(tiny_dir), "--max-new-tokens", "0"]) == 2


def test_console_script_offline_without_a_model(tmp_path):
    """The installed `af2-hf` script, offline, with a Hub id that cannot be fetched: exit 2, guidance, no traceback."""
    script = shutil.which("af2-hf")
    assert script, "the af2-hf console script is not installed: run pip install -e \".[test]\""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop(MODEL_ENV, None)
    completed = subprocess.run([script, "ask", str(EXAMPLE), "What is it?", "--model", "nvidia/audio-flamingo-2"],
                               env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    assert "af2-hf convert" in completed.stderr and "nvidia/audio-flamingo-2" in completed.stderr


# ---------------------------------------------------------------------------------------------------- convert


def test_convert_through_the_cli_then_ask(golden_dir, golden_json, tmp_path, capsys):
    out = tmp_path / "converted"
    argv = ["convert", "--af2-dir", str(golden_dir / "original"), "--text-model", str(golden_dir / "base_lm"),
            "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    assert (out / "pipeline_audio_question_answering.py").is_file()
    capsys.readouterr()
    audio = str(golden_dir / "audio" / golden_json["audio_files"]["a"]["file"])
    assert main(["ask", audio, golden_json["prompts"]["a"], "--model", str(out), "--greedy",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == golden_json["decoded"]["a.greedy"] + "\n"


def test_convert_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    assert "--af2-dir" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        _run_script(REPO_ROOT / "conversion" / "convert_af2_to_hf.py", ["--help"])
    assert exit_info.value.code == 0
    assert "--text-model" in capsys.readouterr().out
    assert main(["convert", "--af2-dir", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "o"),
                 "--no-progress"]) != 0
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


def _run_script(path, args):
    saved = sys.argv
    sys.argv = [str(path), *args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = saved


# ---------------------------------------------------------------------------------------------------- example clip


def test_example_clip_is_small_deterministic_16k_mono(tmp_path):
    assert EXAMPLE.stat().st_size < 100_000
    info = sf.info(EXAMPLE)
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 48000, "PCM_16")
    copy = tmp_path / "copy.wav"
    _run_script(REPO_ROOT / "examples" / "data" / "make_example_wav.py", [str(copy)])
    committed, _ = sf.read(EXAMPLE, dtype="int16")
    regenerated, _ = sf.read(copy, dtype="int16")
    assert np.abs(committed.astype(int) - regenerated.astype(int)).max() <= 1
    assert np.abs(committed).max() > 10000  # not silence
