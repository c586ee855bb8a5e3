"""Every command and code block of README.md runs (offline, in a scratch folder).

* The set-up and test commands must be exactly what .ci/run runs (they are exercised by CI itself).
* ``af2-hf ...`` commands run through ``af2_hf.cli.main`` (the console script's entry point; the installed script
  itself is exercised in test_cli.py); ``python examples/...`` commands run the scripts with ``runpy``.
* Blocks whose first line says "needs internet" are run offline by the equivalent local invocation: Hub ids of the
  AF2 releases become the golden original release, Qwen base models the golden base LM, and ``ask`` on those
  stand-ins generates at most 8 tokens.
* The ``python`` blocks run after the shell blocks (they use ``./af2-tiny`` made by the quick start).
"""

import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys

import pytest

from af2_hf.cli import main as cli_main
from af2_testing import REPO_ROOT

README = REPO_ROOT / "README.md"
SETUP = ["pip install torch==2.13.0", 'pip install -e ".[test]"']
TEST_COMMAND = "python -m pytest -q tests"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def commands(block: str) -> list[str]:
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_setup_and_test_commands_are_what_ci_runs():
    ci = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    blocks = [commands(block) for block in code_blocks("bash")]
    assert SETUP in blocks and [TEST_COMMAND] in blocks
    # (other lines print the versions that ran or install system tools for single tests)
    ci_commands = [line for line in ci if line.startswith(("pip ", "python -m pytest"))]
    assert ci_commands == SETUP + [TEST_COMMAND]
    # ... then the same suite against the lowest transformers setup.cfg allows (in a venv, see the script).
    assert ci[-1] == "bash .ci/lower-bound.sh"
    assert "transformers>=" in (REPO_ROOT / "setup.cfg").read_text()
    # Nowhere else in the README are packages installed or the tests run.
    flat = [command for block in blocks for command in block]
    assert [c for c in flat if c.startswith("pip ")] == SETUP and flat.count(TEST_COMMAND) == 1


def _offline_equivalent(command: str, golden_dir) -> str:
    argv = shlex.split(command)
    replaced = []
    clap_golden = golden_dir.parent / "clap_tiny"  # AF-CLAP conversion: its release checkpoint and flan-T5 stand-in
    for arg in argv:
        if argv[:3] == ["af2-hf", "clap", "convert"] and re.fullmatch(r"nvidia/audio-flamingo-2", arg):
            arg = str(clap_golden)
        elif argv[:3] == ["af2-hf", "clap", "convert"] and re.fullmatch(r"google/flan-t5-[\w.]+", arg):
            arg = str(clap_golden / "flan_t5_tiny")
        elif re.fullmatch(r"nvidia/audio-flamingo-2(-[\w.]+)?", arg):
            arg = str(golden_dir / "original")
        elif re.fullmatch(r"Qwen/Qwen2\.5-[\w.]+", arg):
            arg = str(golden_dir / "base_lm")
        replaced.append(arg)
    if argv[:2] == ["af2-hf", "convert"]:
        assert replaced != argv, f"a 'needs internet' conversion without Hub ids: {command}"
        replaced.append("--no-progress")
    if argv[:2] == ["af2-hf", "ask"] and "--max-new-tokens" not in argv:
        replaced += ["--max-new-tokens", "8"]
    return shlex.join(replaced)


def _run(command: str):
    argv = shlex.split(command)
    if argv[0] == "af2-hf":
        assert cli_main(argv[1:]) == 0, command
    elif argv[0] == "python" and argv[1].startswith("examples/") and argv[1].endswith(".py"):
        saved = sys.argv
        sys.argv = argv[1:]
        try:
            runpy.run_path(argv[1], run_name="__main__")
        except SystemExit as exit_info:
            assert exit_info.code in (0, None), command
        finally:
            sys.argv = saved
    elif argv[:2] == ["accelerate", "launch"]:
        # multi-process commands: accelerate's launcher starts the processes (one thread each on this small machine)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *argv[2:]], env=env,
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, command + "\n" + run.stdout[-2000:] + run.stderr[-4000:]
    else:
        pytest.fail(f"README command this test does not know how to run: {command!r}")


def test_readme_commands_and_code_run_offline(tmp_path, monkeypatch, golden_dir, capsys):
    workspace = tmp_path / "workspace"
    shutil.copytree(REPO_ROOT / "examples", workspace / "examples",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("AF2_HF_MODEL", raising=False)

    ran = []
    for block in code_blocks("bash"):
        lines = commands(block)
        if lines in (SETUP, [TEST_COMMAND]):
            continue  # checked against .ci/run above
        needs_internet = block.lstrip().lower().startswith("# needs internet")
        for command in lines:
            if needs_internet:
                command = _offline_equivalent(command, golden_dir)
            _run(command)
            ran.append(command)
    assert any(c.startswith("af2-hf make-tiny") for c in ran) and any(c.startswith("af2-hf ask") for c in ran)
    assert sum(c.startswith("af2-hf convert") for c in ran) == 4
    assert os.path.isfile("example-copy.wav")
    assert os.path.isfile("af2-finetuned/model.safetensors") and os.path.isfile("predictions.jsonl")
    with open("predictions-2.summary.json", encoding="utf-8") as handle:  # af2-hf evaluate, 2 processes
        assert json.load(handle)["processes"] == 2

    python_blocks = code_blocks("python")
    assert len(python_blocks) >= 7
    for index, block in enumerate(python_blocks):
        capsys.readouterr()
        exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})
        assert capsys.readouterr().out.strip(), f"python block {index} printed nothing"
    assert os.path.isfile("my-af2/pipeline_audio_question_answering.py")


# Audio tasks of the Hugging Face Hub (huggingface.co/tasks): the values a model card's pipeline_tag may take here.
HUB_AUDIO_TASKS = {"audio-classification", "audio-text-to-text", "audio-to-audio", "automatic-speech-recognition",
                   "text-to-audio", "text-to-speech", "voice-activity-detection", "any-to-any"}


def test_model_card_task_is_a_hub_task_and_readme_names_its_pipeline():
    import yaml
    from transformers.pipelines import PIPELINE_REGISTRY

    import af2_hf

    card = (REPO_ROOT / "MODEL_CARD.md").read_text(encoding="utf-8")
    front_matter = yaml.safe_load(card.split("---")[1])
    tag = front_matter["pipeline_tag"]
    assert tag in HUB_AUDIO_TASKS, tag
    # transformers has no pipeline for that task: README and the card say which pipeline serves it, and it exists.
    assert tag not in PIPELINE_REGISTRY.supported_tasks
    task = af2_hf.AUDIO_QUESTION_ANSWERING_TASK
    assert task in PIPELINE_REGISTRY.supported_tasks
    readme = " ".join(README.read_text(encoding="utf-8").split())
    assert f"`pipeline_tag` is the Hub task `{tag}`" in readme and f"the one that serves it is `{task}`" in readme
    assert f"`pipeline_tag`) is `{tag}`; in transformers it is served by the `{task}` pipeline" in " ".join(card.split())
