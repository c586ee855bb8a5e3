"""Remote-code export: an exported directory loads and answers in a Python where af2_hf cannot be imported."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import af2_hf
from af2_hf import AudioFlamingo2Processor, add_remote_code, save_with_remote_code
from af2_hf.export import remote_code_files
from af2_testing import converted_tiny_dir, load_converted_model, random_model

PACKAGE_DIR = Path(af2_hf.__file__).parent
CODE_FILES = {
    "configuration_audioflamingo2.py",
    "modeling_audioflamingo2.py",
    "processing_audioflamingo2.py",
    "feature_extraction_audioflamingo2.py",
    "tokenization_audioflamingo2.py",
    "audio.py",
    "pipeline_audio_question_answering.py",
    "soundcot.py",
    "_compat.py",
}


def test_the_converter_exports_remote_code():
    directory = converted_tiny_dir()
    copied = {path.name for path in remote_code_files()}
    assert copied >= CODE_FILES  # and any module those import relatively
    for name in copied:
        assert (directory / name).read_bytes() == (PACKAGE_DIR / name).read_bytes(), name
        # Only relative imports among the copied modules: no absolute import of the package.
        assert not re.search(r"^\s*(from|import)\s+af2_hf\b", (directory / name).read_text(), re.MULTILINE), name
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_audioflamingo2.AudioFlamingo2Config",
        "AutoModel": "modeling_audioflamingo2.AudioFlamingo2Model",
        "AutoModelForMultimodalLM": "modeling_audioflamingo2.AudioFlamingo2ForConditionalGeneration",
    }
    # The folder's own pipeline code is listed under a task of its own, so that with af2_hf imported
    # pipeline("audio-question-answering", model=folder) takes the registered pipeline (no trust_remote_code).
    assert config["custom_pipelines"] == {
        "audioflamingo2-audio-question-answering": {
            "impl": "pipeline_audio_question_answering.AudioQuestionAnsweringPipeline",
            "pt": ["AutoModelForMultimodalLM"],
            "type": "multimodal",
        }
    }
    processor = json.loads((directory / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing_audioflamingo2.AudioFlamingo2Processor"}
    assert processor["feature_extractor"]["auto_map"] == {
        "AutoFeatureExtractor": "feature_extraction_audioflamingo2.AudioFlamingo2FeatureExtractor",
        "AutoProcessor": "processing_audioflamingo2.AudioFlamingo2Processor",
    }


def test_save_pretrained_writes_the_model_code_and_add_remote_code_is_idempotent(tmp_path, golden_processor):
    model = random_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForMultimodalLM"].endswith(".AudioFlamingo2ForConditionalGeneration")
    assert (tmp_path / "modeling_audioflamingo2.py").is_file() and (tmp_path / "configuration_audioflamingo2.py").is_file()
    assert "custom_pipelines" not in config
    golden_processor.save_pretrained(tmp_path)
    add_remote_code(tmp_path)
    first = {name: (tmp_path / name).read_bytes() for name in ("config.json", "processor_config.json")}
    add_remote_code(tmp_path)
    assert first == {name: (tmp_path / name).read_bytes() for name in ("config.json", "processor_config.json")}


def test_save_with_remote_code_round_trip(tmp_path, golden_processor):
    from transformers import AutoModelForMultimodalLM

    model = random_model(seed=3)
    save_with_remote_code(model, golden_processor, tmp_path / "out", max_shard_size="1GB")
    reloaded = AutoModelForMultimodalLM.from_pretrained(tmp_path / "out")
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert set(os.listdir(tmp_path / "out")) >= CODE_FILES | {"config.json", "processor_config.json"}
    assert os.listdir(tmp_path) == ["out"]  # the staging folder was renamed, nothing left beside it


def test_save_with_remote_code_refuses_a_non_empty_folder_and_replaces_it_whole(tmp_path, golden_processor):
    from af2_hf.atomic import OutputDirectoryNotEmptyError

    out = tmp_path / "out"
    save_with_remote_code(random_model(seed=1), golden_processor, out, max_shard_size="20KB")  # sharded
    assert (out / "model.safetensors.index.json").is_file()
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with pytest.raises(OutputDirectoryNotEmptyError, match="not empty"):
        save_with_remote_code(random_model(seed=2), golden_processor, out)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # untouched

    model = random_model(seed=2)
    save_with_remote_code(model, golden_processor, out, overwrite=True)  # one file now: no stale shard is left
    names = set(os.listdir(out))
    assert "model.safetensors" in names and not [name for name in names if "-of-" in name or name.endswith(".index.json")]
    assert os.listdir(tmp_path) == ["out"]

    class Interrupted(Exception):
        pass

    def failing_save(*args, **kwargs):
        raise Interrupted

    model.save_pretrained = failing_save  # an interrupted save leaves the previous folder as it was
    after = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with pytest.raises(Interrupted):
        save_with_remote_code(model, golden_processor, out, overwrite=True)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == after
    assert os.listdir(tmp_path) == ["out"]


def test_export_rejects_what_it_cannot_export(tmp_path, golden_dir, golden_processor):
    with pytest.raises(FileNotFoundError, match="config.json"):
        add_remote_code(tmp_path)
    shutil.copy(golden_dir / "base_lm" / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="qwen2"):
        add_remote_code(tmp_path)
    with pytest.raises(TypeError, match="Audio Flamingo 2 model"):
        save_with_remote_code(torch.nn.Linear(2, 2), golden_processor, tmp_path / "x")
    with pytest.raises(TypeError, match="AudioFlamingo2Processor"):
        save_with_remote_code(random_model(), golden_processor.tokenizer, tmp_path / "x")


BLOCKED_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockAf2Hf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "af2_hf" or name.startswith("af2_hf."):
                raise ModuleNotFoundError(f"af2_hf is blocked in this test ({name})")
            return None

    sys.meta_path.insert(0, BlockAf2Hf())
    directory, audio_a, audio_c, question = sys.argv[1:5]

    import torch
    from transformers import (AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForMultimodalLM, AutoProcessor,
                              pipeline)

    try:
        import af2_hf  # noqa: F401
        blocked = False
    except ModuleNotFoundError:
        blocked = True
    result = {"blocked": blocked, "classes": {}}
    config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
    feature_extractor = AutoFeatureExtractor.from_pretrained(directory, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    model = AutoModelForMultimodalLM.from_pretrained(directory, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(directory, trust_remote_code=True)
    for name, obj in [("config", config), ("feature_extractor", feature_extractor), ("processor", processor),
                      ("model", model), ("base", base)]:
        result["classes"][name] = [type(obj).__module__, type(obj).__name__]

    inputs = processor(text=question, audio=audio_a, return_tensors="pt")
    with torch.no_grad():
        result["logits"] = model(**inputs).logits[0, -1].tolist()

    try:  # the registered task name is af2_hf's: without it, transformers does not know the task
        pipeline("audio-question-answering", model=directory, trust_remote_code=True)
        result["registered_task_error"] = None
    except Exception as error:
        result["registered_task_error"] = f"{type(error).__name__}: {error}"
    pipe = pipeline("audioflamingo2-audio-question-answering", model=directory, trust_remote_code=True)
    result["pipeline_class"] = [type(pipe).__module__, type(pipe).__name__]
    result["answer"] = pipe(audio_a, question=question, do_sample=False, max_new_tokens=12)["answer"]
    result["batch"] = [out["answer"] for out in pipe([audio_a, audio_c], question=question, batch_size=2,
                                                     do_sample=False, max_new_tokens=6)]
    inferred = pipeline(model=directory, trust_remote_code=True)  # the task comes from custom_pipelines
    result["inferred_task"] = inferred.task
    result["af2_hf_modules"] = sorted(name for name in sys.modules if name.split(".")[0] == "af2_hf")
    print("RESULT " + json.dumps(result))
    """
)


def test_remote_code_loads_without_af2_hf(tmp_path, golden_json, golden_audio_files):
    directory = shutil.copytree(converted_tiny_dir(), tmp_path / "exported")
    question = golden_json["prompts"]["a"]
    audio_a, audio_c = str(golden_audio_files["a"]), str(golden_audio_files["c"])

    model = load_converted_model("sdpa")
    processor = AudioFlamingo2Processor.from_pretrained(directory)
    inputs = processor(text=question, audio=audio_a, return_tensors="pt")
    with torch.no_grad():
        expected_logits = model(**inputs).logits[0, -1]
    from transformers import pipeline

    local = pipeline("audio-question-answering", model=model, processor=processor)
    expected_batch = [out["answer"] for out in local([audio_a, audio_c], question=question, batch_size=2,
                                                     do_sample=False, max_new_tokens=6)]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    completed = subprocess.run(
        [sys.executable, "-c", BLOCKED_SCRIPT, str(directory), audio_a, audio_c, question],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])

    assert result["blocked"] is True
    assert result["af2_hf_modules"] == []
    expected_names = {
        "config": "AudioFlamingo2Config",
        "feature_extractor": "AudioFlamingo2FeatureExtractor",
        "processor": "AudioFlamingo2Processor",
        "model": "AudioFlamingo2ForConditionalGeneration",
        "base": "AudioFlamingo2Model",
    }
    for key, name in expected_names.items():
        module, class_name = result["classes"][key]
        assert class_name == name and module.startswith("transformers_modules."), (key, module, class_name)
    assert result["pipeline_class"][0].startswith("transformers_modules.")
    torch.testing.assert_close(torch.tensor(result["logits"]), expected_logits, rtol=1e-5, atol=1e-5)
    assert result["answer"] == golden_json["decoded"]["a.greedy"]
    assert result["batch"] == expected_batch
    assert result["inferred_task"] == "audioflamingo2-audio-question-answering"
    assert "Unknown task audio-question-answering" in result["registered_task_error"]


INSTALLED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import af2_hf  # registers the audio-question-answering task
    from transformers import pipeline

    directory, audio, question = sys.argv[1:4]
    pipe = pipeline("audio-question-answering", model=directory)  # no trust_remote_code
    result = {"pipeline_class": [type(pipe).__module__, type(pipe).__name__],
              "model_class": [type(pipe.model).__module__, type(pipe.model).__name__],
              "answer": pipe(audio, question=question, do_sample=False, max_new_tokens=12)["answer"]}
    try:
        pipeline("audio-question-answering")
        result["no_model_error"] = None
    except Exception as error:
        result["no_model_error"] = f"{type(error).__name__}: {error}"
    print("RESULT " + json.dumps(result))
    """
)


def test_with_af2_hf_installed_a_converted_folder_needs_no_trust_remote_code(tmp_path, golden_json,
                                                                            golden_audio_files):
    """A fresh Python that imports af2_hf (nothing else registered) gets af2_hf's own pipeline and model classes
    from a converted folder (which ships remote code) without trust_remote_code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, "-c", INSTALLED_SCRIPT, str(converted_tiny_dir()), str(golden_audio_files["a"]),
         golden_json["prompts"]["a"]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result["pipeline_class"] == ["af2_hf.pipeline_audio_question_answering", "AudioQuestionAnsweringPipeline"]
    assert result["model_class"] == ["af2_hf.modeling_audioflamingo2", "AudioFlamingo2ForConditionalGeneration"]
    assert result["answer"] == golden_json["decoded"]["a.greedy"]
    assert result["no_model_error"].startswith("ValueError: The 'audio-question-answering' pipeline has no default")
    assert not (tmp_path / "modules").exists()  # no remote code was loaded


def test_add_remote_code_moves_an_earlier_layout_to_the_folder_task(tmp_path):
    """A folder exported before the current layout lists the pipeline under "audio-question-answering" (which
    shadows the registered pipeline); running add_remote_code again moves it to the folder's own task."""
    directory = shutil.copytree(converted_tiny_dir(), tmp_path / "old")
    config = json.loads((directory / "config.json").read_text())
    config["custom_pipelines"]["audio-question-answering"] = config["custom_pipelines"].pop(
        "audioflamingo2-audio-question-answering")
    config["custom_pipelines"]["other-task"] = {"impl": "other.OtherPipeline", "pt": []}
    (directory / "config.json").write_text(json.dumps(config))
    add_remote_code(directory)
    pipelines = json.loads((directory / "config.json").read_text())["custom_pipelines"]
    assert set(pipelines) == {"audioflamingo2-audio-question-answering", "other-task"}
    assert not [name for name in os.listdir(directory) if name.startswith(".")]  # no temporary file left


def test_atomic_output_dir_edges(tmp_path):
    """The helper every folder writer uses (export, converter, make-tiny): a file in the way, an empty folder, a
    failing body for a new target, the permissions of the result, a target that appears meanwhile."""
    from af2_hf.atomic import OutputDirectoryNotEmptyError, atomic_output_dir

    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        with atomic_output_dir(blocked):
            pass
    empty = tmp_path / "nested" / "empty"
    empty.mkdir(parents=True)
    with atomic_output_dir(empty) as staging:  # an empty folder is replaced without overwrite=True
        assert staging.parent == empty.parent and staging != empty and not any(staging.iterdir())
        (staging / "a.json").write_text("{}")
    assert os.listdir(empty) == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (empty.stat().st_mode & 0o777) == (0o777 & ~umask)

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(fresh) as staging:
            (staging / "half.bin").write_bytes(b"1")
            raise RuntimeError("interrupted")
    assert not fresh.exists() and sorted(os.listdir(tmp_path)) == ["file", "nested"]

    late = tmp_path / "late"
    with pytest.raises(OutputDirectoryNotEmptyError):
        with atomic_output_dir(late) as staging:
            (staging / "new").write_text("1")
            late.mkdir()
            (late / "someone-else").write_text("1")
    assert os.listdir(late) == ["someone-else"] and sorted(os.listdir(tmp_path)) == ["file", "late", "nested"]
