"""Remote-code export: a saved Audio Flamingo 2 directory that loads without ``af2_hf`` installed.

Importing ``af2_hf`` registers the AF2 config, model, processor and feature extractor classes for remote code
(``register_for_auto_class``), so their ``save_pretrained`` already copies their modules and writes ``auto_map``.
:func:`add_remote_code` completes a saved directory, as transformers' ``custom_object_save`` and
``Pipeline.save_pretrained`` would:

* it copies every AF2 module the classes and the ``audio-question-answering`` pipeline need (with the modules they
  import relatively);
* ``config.json``: ``auto_map`` for ``AutoConfig``, ``AutoModel`` and ``AutoModelForMultimodalLM``, and
  ``custom_pipelines`` for ``audio-question-answering``;
* ``processor_config.json``: ``auto_map`` for ``AutoProcessor``, and in its nested feature extractor also for
  ``AutoFeatureExtractor``.

Then, in a Python without ``af2_hf``::

    AutoModelForMultimodalLM.from_pretrained(dir, trust_remote_code=True)
    AutoProcessor.from_pretrained(dir, trust_remote_code=True)
    pipeline("audio-question-answering", model=dir, trust_remote_code=True)

The weights are not touched, so the converter calls :func:`add_remote_code` on its output directory at no cost.

Notes:

* transformers resolves a task listed in ``custom_pipelines`` to the directory's own pipeline code, which needs
  ``trust_remote_code=True`` even when ``af2_hf`` is imported (it then runs the directory's copy of the same code);
  or pass ``pipeline_class=af2_hf.AudioQuestionAnsweringPipeline``.
* A model loaded from an exported directory keeps ``custom_pipelines`` in its config; after saving it elsewhere
  (e.g. a fine-tuned model) run :func:`add_remote_code` on the new directory (or use :func:`save_with_remote_code`)
  so that the pipeline module is there too.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from .auto import AUDIO_QUESTION_ANSWERING_TASK
from .configuration_audioflamingo2 import AudioFlamingo2Config
from .feature_extraction_audioflamingo2 import AudioFlamingo2FeatureExtractor
from .modeling_audioflamingo2 import AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model
from .pipeline_audio_question_answering import AudioQuestionAnsweringPipeline
from .processing_audioflamingo2 import AudioFlamingo2Processor

__all__ = ["add_remote_code", "remote_code_files", "save_with_remote_code"]

CONFIG_NAME = "config.json"
PROCESSOR_NAME = "processor_config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"


def _reference(cls) -> str:
    """``"module_file_stem.ClassName"``, the form of an ``auto_map`` entry for code stored beside the weights."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def _config_auto_map() -> dict[str, str]:
    return {
        "AutoConfig": _reference(AudioFlamingo2Config),
        "AutoModel": _reference(AudioFlamingo2Model),
        "AutoModelForMultimodalLM": _reference(AudioFlamingo2ForConditionalGeneration),
    }


def _custom_pipelines() -> dict:
    return {
        AUDIO_QUESTION_ANSWERING_TASK: {
            "impl": _reference(AudioQuestionAnsweringPipeline),
            "pt": ["AutoModelForMultimodalLM"],
            "type": "multimodal",
        }
    }


def remote_code_files() -> list[Path]:
    """The module files an exported directory carries: the classes' modules and every module they import
    relatively (recursively), without duplicates."""
    classes = (
        AudioFlamingo2Config,
        AudioFlamingo2ForConditionalGeneration,
        AudioFlamingo2Processor,
        AudioFlamingo2FeatureExtractor,
        AudioQuestionAnsweringPipeline,
    )
    files: list[Path] = []
    for cls in classes:
        module_file = Path(sys.modules[cls.__module__].__file__)
        for path in [module_file, *map(Path, get_relative_import_files(module_file))]:
            if path not in files:
                files.append(path)
    return files


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def add_remote_code(directory: str | os.PathLike) -> list[Path]:
    """Makes a saved AF2 directory loadable with ``trust_remote_code=True`` and without ``af2_hf``.

    Args:
        directory: a directory written by ``model.save_pretrained`` + ``processor.save_pretrained`` (e.g. the output
            of ``af2-hf convert``). Weights and tokenizer files are left as they are.

    Returns:
        The paths of the module files copied into ``directory``.

    Raises:
        FileNotFoundError: ``directory`` has no ``config.json``.
        ValueError: ``config.json`` is not an Audio Flamingo 2 config.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: save the model into {directory} first.")
    config = _read_json(config_path)
    if config.get("model_type") != AudioFlamingo2Config.model_type:
        raise ValueError(
            f"{config_path} describes model_type {config.get('model_type')!r}, not "
            f"{AudioFlamingo2Config.model_type!r}."
        )

    copied = []
    for source in remote_code_files():
        target = directory / source.name
        shutil.copyfile(source, target)
        copied.append(target)

    config["auto_map"] = {**config.get("auto_map", {}), **_config_auto_map()}
    config["custom_pipelines"] = {**config.get("custom_pipelines", {}), **_custom_pipelines()}
    _write_json(config_path, config)

    processor_entry = {"AutoProcessor": _reference(AudioFlamingo2Processor)}
    feature_extractor_entry = {"AutoFeatureExtractor": _reference(AudioFlamingo2FeatureExtractor), **processor_entry}
    processor_path = directory / PROCESSOR_NAME
    if processor_path.is_file():
        processor = _read_json(processor_path)
        processor["auto_map"] = {**processor.get("auto_map", {}), **processor_entry}
        nested = processor.get("feature_extractor")
        if isinstance(nested, dict):
            nested["auto_map"] = {**nested.get("auto_map", {}), **feature_extractor_entry}
        _write_json(processor_path, processor)
    preprocessor_path = directory / PREPROCESSOR_NAME
    if preprocessor_path.is_file():
        preprocessor = _read_json(preprocessor_path)
        preprocessor["auto_map"] = {**preprocessor.get("auto_map", {}), **feature_extractor_entry}
        _write_json(preprocessor_path, preprocessor)
    return copied


def save_with_remote_code(model, processor, directory: str | os.PathLike, **save_kwargs) -> Path:
    """``model.save_pretrained`` + ``processor.save_pretrained`` into ``directory``, then :func:`add_remote_code`.

    Args:
        model: an [`AudioFlamingo2ForConditionalGeneration`] (or the base [`AudioFlamingo2Model`]).
        processor: its [`AudioFlamingo2Processor`].
        directory: the output directory (created if needed).
        save_kwargs: passed to ``model.save_pretrained`` (e.g. ``max_shard_size``).

    Returns:
        The output directory.
    """
    if not isinstance(model, (AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model)):
        raise TypeError(f"Expected an Audio Flamingo 2 model, got {type(model).__name__}.")
    if not isinstance(processor, AudioFlamingo2Processor):
        raise TypeError(f"Expected an AudioFlamingo2Processor, got {type(processor).__name__}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, **save_kwargs)
    processor.save_pretrained(directory)
    add_remote_code(directory)
    return directory
