"""The af2-hf command line (ask / convert / make-tiny / example-audio), its errors (each: message and exit code 2, no
traceback), its start-up (no torch/transformers before a command runs), the tiny model and tokenizer, and the example
clip."""

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
    assert any(task.endswith("audio-question-answering") for task in config["custom_pipelines"])
    assert "AutoModel" in config["auto_map"]
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
        ("GOLDEN_ORIGINAL", "is an ORIGINAL Audio Flamingo 2 release"),
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


def test_console_script_offline_without_a_model_then_with_one(tiny_dir, tmp_path):
    """The installed `af2-hf` script (its deferred package import registers the Auto classes before a command runs):
    offline with a Hub id that is not cached: exit 2, guidance, no traceback; with the tiny model: an answer."""
    script = shutil.which("af2-hf")
    assert script, "the af2-hf console script is not installed: run pip install -e \".[test]\""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop(MODEL_ENV, None)
    completed = subprocess.run([script, "ask", str(EXAMPLE), "What is it?", "--model", "someone/not-cached-af2"],
                               env=env, cwd=tmp_path, capture_output=True, text=True)
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    assert "HF_HUB_OFFLINE is set" in completed.stderr and "local folder" in completed.stderr
    assert "af2-hf convert" in completed.stderr and "nvidia/audio-flamingo-2" in completed.stderr
    completed = subprocess.run([script, "ask", str(EXAMPLE), "What is it?", "--model", str(tiny_dir), "--greedy",
                                "--max-new-tokens", "3"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() and "RANDOM weights" in completed.stderr


# ---------------------------------------------------------------------------------------------------- start-up

_HEAVY = ("torch", "transformers", "numpy", "safetensors")


def test_console_script_entry_point_parses_without_torch_or_transformers():
    """`af2-hf --help` and every subcommand's --help (and a usage error) finish before torch, transformers or numpy
    are imported: they return at once on any machine (checked by what is imported, not by timing)."""
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "af2-hf"]
    assert script.value == "af2_hf_cli:main"
    code = f"""
import sys
from af2_hf_cli import main
runs = [["--help"]] + [[name, "--help"] for name in {list(_command_names())!r}] + [["ask"], ["no-such-command"]]
for argv in runs:
    try:
        main(argv)
    except SystemExit as exit_info:
        print("EXIT", argv[0], exit_info.code)
print("HEAVY", sorted(m for m in {_HEAVY!r} if m in sys.modules))
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[-1] == "HEAVY []", lines[-1]
    codes = [line.split(" ")[2] for line in lines if line.startswith("EXIT ")]
    assert len(codes) == 3 + len(_command_names())
    assert codes[: 1 + len(_command_names())] == ["0"] * (1 + len(_command_names()))
    assert codes[-2:] == ["2", "2"]  # usage errors: argparse's exit code 2
    for name in ("ask", "convert", "make-tiny", "example-audio"):
        assert f"    {name}" in completed.stdout


def _command_names() -> list[str]:
    from af2_hf.cli import _build_parser

    parser = _build_parser()
    return sorted(parser._subparsers._group_actions[0].choices)


def test_import_af2_hf_registers_the_auto_classes(tiny_dir):
    """A plain `import af2_hf` (a fresh interpreter) is enough for the Auto classes, as the README says."""
    code = f"""
import af2_hf
from transformers import AutoConfig, AutoModel, AutoModelForMultimodalLM, AutoProcessor
print(type(AutoConfig.from_pretrained({str(tiny_dir)!r})).__name__)
print(type(AutoModel.from_pretrained({str(tiny_dir)!r})).__name__)
print(type(AutoModelForMultimodalLM.from_pretrained({str(tiny_dir)!r})).__name__)
print(type(AutoProcessor.from_pretrained({str(tiny_dir)!r})).__name__, af2_hf.__version__)
"""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    from af2_hf import __version__

    assert completed.stdout.split() == ["AudioFlamingo2Config", "AudioFlamingo2Model",
                                        "AudioFlamingo2ForConditionalGeneration", "AudioFlamingo2Processor",
                                        __version__]


# ---------------------------------------------------------------------------------------------------- errors


def _error(argv, capsys) -> str:
    """stderr of a CLI run that must fail with exit code 2 and a one-paragraph message, no traceback."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_ask_device_errors(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ask = ["ask", str(EXAMPLE), "q", "--model", str(tiny_dir), "--device"]
    assert "CUDA is not available here" in _error(ask + ["cuda"], capsys)
    assert "use --device cpu" in _error(ask + ["cuda:0"], capsys)
    assert "is not a torch device" in _error(ask + ["gpu-please"], capsys)


def _copy_tiny(tiny_dir, target):
    shutil.copytree(tiny_dir, target)
    return target


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("no_config", "has no config.json"),
    ("corrupt_config", "is not valid JSON"),
    ("no_weights", "no weights"),
    ("truncated_weights", "corrupt or incomplete"),
    ("qwen2", "holds a 'qwen2' model, not an Audio Flamingo 2 model"),
    ("original_release", "af2-hf convert --af2-dir"),
])
def test_ask_model_folder_errors(case, message, tiny_dir, golden_dir, tmp_path, capsys):
    folder = tmp_path / case
    if case == "empty":
        folder.mkdir()
    elif case == "no_config":
        _copy_tiny(tiny_dir, folder)
        (folder / "config.json").unlink()
    elif case == "corrupt_config":
        _copy_tiny(tiny_dir, folder)
        (folder / "config.json").write_text('{"model_type": "audioflamingo2", "text_con')
    elif case == "no_weights":
        _copy_tiny(tiny_dir, folder)
        (folder / "model.safetensors").unlink()
    elif case == "truncated_weights":
        _copy_tiny(tiny_dir, folder)
        weights = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    elif case == "qwen2":
        folder = golden_dir / "base_lm"
    elif case == "original_release":
        folder = golden_dir / "original"
    err = _error(["ask", str(EXAMPLE), "q", "--model", str(folder)], capsys)
    assert message in err and str(folder) in err
    if case != "missing":
        assert "does not exist" not in err  # a folder that exists is never reported as missing


def test_ask_hub_id_without_network_fails_at_once(capsys, monkeypatch, tmp_path):
    """A Hub id with the Hub unreachable (here: a closed local port) fails before any download is tried, naming
    HF_HUB_OFFLINE=1 and the local-folder alternative; HF_HUB_OFFLINE=1 itself is named when it is set."""
    import transformers

    def no_download(*args, **kwargs):
        raise AssertionError("from_pretrained must not be called for an unreachable Hub id")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_download)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    err = _error(["ask", str(EXAMPLE), "q", "--model", "someone/not-cached-af2"], capsys)
    assert "cannot be reached" in err and "HF_HUB_OFFLINE=1" in err and "local folder" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _error(["ask", str(EXAMPLE), "q", "--model", "someone/not-cached-af2"], capsys)
    assert "HF_HUB_OFFLINE is set" in err and "someone/not-cached-af2" in err
    # The converter's Hub ids too.
    err = _error(["convert", "--af2-dir", "someone/not-cached-release", "--output-dir", str(tmp_path / "out"),
                  "--no-progress"], capsys)
    assert "--af2-dir 'someone/not-cached-release'" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "out").exists()


def test_ask_hub_id_of_an_original_release_prints_the_convert_command(capsys, monkeypatch):
    """A release's Hub id: the convert command at once (no download tried); another Hub repository without
    config.json (the original layout, found when loading): the convert command too."""
    import transformers

    def no_config(reference, **kwargs):
        raise OSError(f"{reference} does not appear to have a file named config.json. Checkout "
                      f"'https://huggingface.co/{reference}/tree/main' for available files.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_config)
    err = _error(["ask", str(EXAMPLE), "q", "--model", "nvidia/audio-flamingo-2"], capsys)
    assert "is an ORIGINAL Audio Flamingo 2 release" in err
    assert "af2-hf convert --af2-dir nvidia/audio-flamingo-2 --output-dir ./audio-flamingo-2-hf" in err
    monkeypatch.setattr("af2_hf.hub_access.hub_files_mode", lambda repo_id, what: False)
    err = _error(["ask", str(EXAMPLE), "q", "--model", "someone/af2-release-copy"], capsys)
    assert "ORIGINAL release on the Hub" in err
    assert "af2-hf convert --af2-dir someone/af2-release-copy --output-dir ./af2-release-copy-hf" in err


def test_make_tiny_refuses_a_non_empty_folder(tiny_dir, tmp_path, capsys):
    target = _copy_tiny(tiny_dir, tmp_path / "existing")
    (target / "notes.txt").write_text("mine")
    assert "is not empty" in _error(["make-tiny", str(target)], capsys)
    assert (target / "notes.txt").is_file()
    assert main(["make-tiny", str(target), "--overwrite", "--max-num-windows", "2"]) == 0
    assert not (target / "notes.txt").exists() and (target / "model.safetensors").is_file()


def test_example_audio_command(tmp_path, capsys):
    out = tmp_path / "clip.wav"
    assert main(["example-audio", str(out)]) == 0
    written, committed = sf.read(out, dtype="int16")[0], sf.read(EXAMPLE, dtype="int16")[0]
    assert written.shape == committed.shape and np.abs(written.astype(int) - committed.astype(int)).max() <= 1
    assert "already exists" in _error(["example-audio", str(out)], capsys)
    assert "is a folder" in _error(["example-audio", str(tmp_path)], capsys)
    assert main(["example-audio", str(out), "--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------------- convert


def test_convert_through_the_cli_then_ask(golden_dir, golden_json, tmp_path, capsys):
    out = tmp_path / "converted"
    argv = ["convert", "--af2-dir", str(golden_dir / "original"), "--text-model", str(golden_dir / "base_lm"),
            "--output-dir", str(out), "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 0
    assert (out / "pipeline_audio_question_answering.py").is_file()
    # The report names the resolved base model and every file it read (README: "reports what it used").
    report = capsys.readouterr().out
    assert f"base language model: {golden_dir / 'base_lm'} (from --text-model)" in report
    assert f"base LM weights: {golden_dir / 'base_lm' / 'model.safetensors'}" in report
    assert f"release yaml: {golden_dir / 'original' / 'configs' / 'inference.yaml'}" in report
    assert f"tokenizer: {golden_dir / 'base_lm'}" in report and "generation config: " in report
    for chunk in json.loads((golden_dir / "original" / "safe_ckpt" / "metadata.json").read_text()):
        assert f"safe_ckpt chunk: {golden_dir / 'original' / 'safe_ckpt' / chunk}.safetensors" in report
    assert f"clap_ckpt: {golden_dir / 'original' / 'clap_ckpt'}" in report
    audio = str(golden_dir / "audio" / golden_json["audio_files"]["a"]["file"])
    assert main(["ask", audio, golden_json["prompts"]["a"], "--model", str(out), "--greedy",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == golden_json["decoded"]["a.greedy"] + "\n"


def test_convert_errors_exit_2(golden_dir, tmp_path, capsys):
    """A base model that does not match the release, a chunk missing or not listed in metadata.json, and a
    non-empty output folder: exit 2, the file or option named, nothing written."""
    base = tmp_path / "base_lm_2_layers"
    shutil.copytree(golden_dir / "base_lm", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] - 1}))
    out = tmp_path / "out"
    convert = ["convert", "--af2-dir", str(golden_dir / "original"), "--output-dir", str(out), "--no-progress"]
    err = _error(convert + ["--text-model", str(base)], capsys)
    assert "does not match this release" in err and "--text-model" in err and not out.exists()

    release = tmp_path / "release"
    shutil.copytree(golden_dir / "original", release)
    names = json.loads((release / "safe_ckpt" / "metadata.json").read_text())
    (release / "safe_ckpt" / "metadata.json").write_text(json.dumps(names[:-1]))
    convert = ["convert", "--af2-dir", str(release), "--text-model", str(golden_dir / "base_lm"), "--output-dir",
               str(out), "--no-progress"]
    err = _error(convert, capsys)
    assert f"{names[-1]}.safetensors is not listed in" in err and "yaml" not in err and not out.exists()
    (release / "safe_ckpt" / "metadata.json").write_text(json.dumps(names))
    (release / "safe_ckpt" / f"{names[0]}.safetensors").unlink()
    err = _error(convert, capsys)
    assert f"{names[0]}.safetensors listed in metadata.json is missing" in err and not out.exists()

    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")
    err = _error(["convert", "--af2-dir", str(golden_dir / "original"), "--output-dir", str(out), "--no-progress"],
                 capsys)
    assert "is not empty" in err and "--overwrite" in err and (out / "model.safetensors").read_bytes() == b"old weights"


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
