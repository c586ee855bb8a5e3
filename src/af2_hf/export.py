"""Remote-code export: a saved Audio Flamingo 2 directory that loads without ``af2_hf`` installed.

Importing ``af2_hf`` registers the AF2 config, model, processor and feature extractor classes for remote code
(``register_for_auto_class``), so their ``save_pretrained`` already copies their modules and writes ``auto_map``.
:func:`add_remote_code` completes a saved directory, as transformers' ``custom_object_save`` and
``Pipeline.save_pretrained`` would:

* it copies every AF2 module the classes and the pipeline need (with the modules they import relatively);
* ``config.json``: ``auto_map`` for ``AutoConfig``, ``AutoModel`` and ``AutoModelForMultimodalLM``, and
  ``custom_pipelines`` for the folder's own task :data:`REMOTE_CODE_TASK`;
* ``processor_config.json``: ``auto_map`` for ``AutoProcessor``, and in its nested feature extractor also for
  ``AutoFeatureExtractor``.

The pipeline layout, chosen so that both kinds of user get the pipeline:

* transformers resolves a task listed in a folder's ``custom_pipelines`` to the folder's own code BEFORE its task
  registry, and such code always needs ``trust_remote_code=True``. The folder therefore lists its pipeline under a
  task name of its own, :data:`REMOTE_CODE_TASK` (``"audioflamingo2-audio-question-answering"``), never under
  ``"audio-question-answering"``: with ``af2_hf`` imported, ``pipeline("audio-question-answering", model=dir)``
  resolves through the registry that ``af2_hf`` fills and needs no ``trust_remote_code``.
* In a Python without ``af2_hf``::

      AutoModelForMultimodalLM.from_pretrained(dir, trust_remote_code=True)
      AutoProcessor.from_pretrained(dir, trust_remote_code=True)
      pipeline("audioflamingo2-audio-question-answering", model=dir, trust_remote_code=True)
      pipeline(model=dir, trust_remote_code=True)  # the task is inferred from custom_pipelines

A folder written before this layout (``custom_pipelines`` under ``"audio-question-answering"``) is brought to it by
running :func:`add_remote_code` on it again.

The weights are not touched, so the converter calls :func:`add_remote_code` on its output directory at no cost. Files
are replaced one by one atomically (written beside their target and renamed), the code first and ``config.json``
last, so an interrupted call never leaves a config that points to missing code. :func:`save_with_remote_code` writes
a whole new folder atomically (:func:`af2_hf.atomic.atomic_output_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from .atomic import atomic_output_dir
from .auto import AUDIO_QUESTION_ANSWERING_TASK
from .configuration_audioflamingo2 import AudioFlamingo2Config
from .feature_extraction_audioflamingo2 import AudioFlamingo2FeatureExtractor
from .modeling_audioflamingo2 import AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model
from .pipeline_audio_question_answering import REMOTE_CODE_TASK, AudioQuestionAnsweringPipeline
from .processing_audioflamingo2 import AudioFlamingo2Processor

__all__ = ["REMOTE_CODE_TASK", "add_remote_code", "remote_code_files", "save_with_remote_code"]


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
        REMOTE_CODE_TASK: {
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


def _replace_file(path: Path, write) -> None:
    """Runs ``write(handle)`` on a temporary file beside ``path`` and renames it to ``path`` (atomic on POSIX)."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    _replace_file(path, lambda handle: handle.write(text.encode("utf-8")))


def _copy_file(source: Path, target: Path) -> None:
    with open(source, "rb") as reader:
        _replace_file(target, lambda handle: shutil.copyfileobj(reader, handle))


def _own_pipelines(custom_pipelines: dict) -> dict:
    """``custom_pipelines`` without an entry of an earlier layout that lists the AF2 pipeline under the registered
    task name (it would shadow the registered pipeline and require ``trust_remote_code``)."""
    ours = _reference(AudioQuestionAnsweringPipeline)
    return {
        task: info
        for task, info in custom_pipelines.items()
        if not (task == AUDIO_QUESTION_ANSWERING_TASK and isinstance(info, dict) and info.get("impl") == ours)
    }


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
        _copy_file(source, target)
        copied.append(target)

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

    # config.json last: it is what makes the folder advertise code that must be there by then.
    config["auto_map"] = {**config.get("auto_map", {}), **_config_auto_map()}
    config["custom_pipelines"] = {**_own_pipelines(config.get("custom_pipelines", {})), **_custom_pipelines()}
    _write_json(config_path, config)
    return copied


def save_with_remote_code(
    model, processor, directory: str | os.PathLike, overwrite: bool = False, **save_kwargs
) -> Path:
    """``model.save_pretrained`` + ``processor.save_pretrained`` + :func:`add_remote_code`, written atomically.

    Everything is written into a temporary folder beside ``directory`` that is renamed to ``directory`` at the end,
    so an interrupted save leaves no half-written folder, and a re-save never mixes old and new files (e.g. an old
    ``model.safetensors`` beside new shards).

    Args:
        model: an [`AudioFlamingo2ForConditionalGeneration`] (or the base [`AudioFlamingo2Model`]).
        processor: its [`AudioFlamingo2Processor`].
        directory: the output directory (its parents are created if needed).
        overwrite: replace a non-empty ``directory`` whole; without it such a directory is refused.
        save_kwargs: passed to ``model.save_pretrained`` (e.g. ``max_shard_size``).

    Returns:
        The output directory.

    Raises:
        af2_hf.atomic.OutputDirectoryNotEmptyError: ``directory`` is not empty and ``overwrite`` is false.
    """
    if not isinstance(model, (AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model)):
        raise TypeError(f"Expected an Audio Flamingo 2 model, got {type(model).__name__}.")
    if not isinstance(processor, AudioFlamingo2Processor):
        raise TypeError(f"Expected an AudioFlamingo2Processor, got {type(processor).__name__}.")
    directory = Path(directory)
    with atomic_output_dir(directory, overwrite=overwrite) as staging:
        model.save_pretrained(staging, **save_kwargs)
        processor.save_pretrained(staging)
        add_remote_code(staging)
    return directory
