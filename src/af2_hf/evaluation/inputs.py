"""Examples to evaluate, from a JSONL manifest or a ``datasets`` dataset (a ``save_to_disk`` folder, an
``audiofolder``, parquet / arrow files), as one table: the text fields of every row checked up front, the audio read
row by row when its batch comes."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..manifest import read_manifest

__all__ = ["Columns", "EvaluationInputError", "ExampleTable", "load_examples"]

_MANIFEST_SUFFIXES = (".jsonl", ".json")
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


class EvaluationInputError(ValueError):
    """The examples cannot be read or a row's fields are not usable (the message names the row)."""


@dataclass
class Columns:
    """Field names of the rows (a manifest's canonical keys are ``audio``, ``prompt``, ``answer``)."""

    audio: str = "audio"
    prompt: str = "prompt"
    answer: str = "answer"
    choices: str = "choices"
    references: str = "references"
    task: str = "task"
    id: str = "id"


@dataclass
class ExampleTable:
    """Rows to evaluate: ``rows[i]`` holds the checked text fields of example ``i`` (``prompt``, ``task``, ``kind``
    and, as they apply, ``answer``, ``choices``, ``references``, ``id``, ``audio_path``); ``audio(i)`` returns its
    audio in a form [`load_example_audio`] reads."""

    rows: list[dict]
    audio_source: Any
    audio_column: str = "audio"
    source: str = ""

    def __len__(self) -> int:
        return len(self.rows)

    def audio(self, index: int):
        if isinstance(self.audio_source, list):
            return self.audio_source[index]
        return self.audio_source[index][self.audio_column]

    def audio_seconds(self, index: int) -> float:
        """The audio's duration from its header (no decoding), 0.0 when it cannot be read (the row then fails with
        its error when its batch loads it)."""
        try:
            return _duration(self.audio(index))
        except Exception:  # any unreadable audio: reported with its own error when the batch loads it
            return 0.0


def _duration(audio) -> float:
    import soundfile as sf

    if isinstance(audio, Mapping):
        if audio.get("array") is not None:
            return len(audio["array"]) / float(audio["sampling_rate"])
        if audio.get("bytes") is not None:
            return sf.info(io.BytesIO(audio["bytes"])).duration
        audio = audio.get("path")
    if isinstance(audio, (str, os.PathLike)):
        return sf.info(os.fspath(audio)).duration
    if isinstance(audio, (bytes, bytearray)):
        return sf.info(io.BytesIO(bytes(audio))).duration
    if hasattr(audio, "__len__"):
        return float(len(audio))  # a waveform at the model's rate: samples order the batches as well as seconds
    return 0.0


def _string_list(value, where: str, name: str) -> list[str]:
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, str) for item in value):
        return list(value)
    raise EvaluationInputError(f"{where}: {name!r} must be a non-empty list of strings, got {value!r}.")


def _kind_and_labels(raw: Mapping, columns: Columns, task: str, caption_tasks: Sequence[str], where: str) -> dict:
    answer = raw.get(columns.answer)
    choices = raw.get(columns.choices)
    references = raw.get(columns.references)
    if choices is not None:
        if not isinstance(answer, str):
            raise EvaluationInputError(f"{where}: a multiple-choice row needs a string {columns.answer!r}.")
        return {"kind": "multiple_choice", "answer": answer,
                "choices": _string_list(choices, where, columns.choices)}
    if references is not None or isinstance(answer, (list, tuple)):
        refs = references if references is not None else answer
        return {"kind": "caption", "references": _string_list(refs, where, "references")}
    if answer is None:
        return {"kind": "unlabelled"}
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise EvaluationInputError(f"{where}: {columns.answer!r} must be a string, got {type(answer).__name__}.")
    if task in caption_tasks:
        return {"kind": "caption", "references": [str(answer)]}
    return {"kind": "open", "answer": str(answer)}


def _canonical_row(raw: Mapping, index: int, columns: Columns, default_task: str, default_prompt: str | None,
                   caption_tasks: Sequence[str], where: str) -> dict:
    prompt = raw.get(columns.prompt, default_prompt)
    if prompt is None:
        raise EvaluationInputError(
            f"{where}: no {columns.prompt!r} field; name the prompt column, or give one prompt for every row."
        )
    if not isinstance(prompt, str):
        raise EvaluationInputError(f"{where}: {columns.prompt!r} must be a string, got {type(prompt).__name__}.")
    task = raw.get(columns.task) or default_task
    row = {"index": index, "task": str(task), "prompt": prompt}
    if raw.get(columns.id) is not None:
        row["id"] = raw[columns.id]
    row.update(_kind_and_labels(raw, columns, row["task"], caption_tasks, where))
    return row


def _from_manifest(path: Path, audio_root, columns: Columns, default_task, default_prompt, caption_tasks):
    entries = read_manifest(path, audio_root, require_answer=False)
    rows = []
    for index, entry in enumerate(entries):
        row = _canonical_row(entry, index, columns, default_task, default_prompt, caption_tasks,
                             f"{path} example {index}")
        row["audio_path"] = entry["audio"]
        rows.append(row)
    return ExampleTable(rows, [entry["audio"] for entry in entries], source=str(path))


def _load_audiofolder(path: Path):
    import datasets

    try:
        return datasets.load_dataset("audiofolder", data_dir=str(path))
    except Exception as error:  # datasets wraps the builder's ImportError in DatasetGenerationError
        chain, cause = [], error
        while cause is not None and len(chain) < 10:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        if any("torchcodec" in str(cause) for cause in chain):
            raise EvaluationInputError(
                f"Reading the audiofolder {str(path)!r} goes through datasets' Audio feature, which needs torchcodec "
                "(and FFmpeg) from datasets 4 on: install torchcodec, or give the rows as a JSONL manifest of audio "
                "paths, a parquet file or a save_to_disk folder."
            ) from None
        raise


def _load_dataset(path: Path, split: str | None):
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_dir():
        loaded = _load_audiofolder(path)
    elif path.suffix in _FILE_BUILDERS:
        loaded = datasets.load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path))
    else:
        raise EvaluationInputError(
            f"{str(path)!r} is not an input af2-hf evaluate reads: give a JSONL manifest (.jsonl), a dataset folder "
            "(saved with save_to_disk, or an audiofolder) or a .parquet / .arrow file."
        )
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) != 1:
                raise EvaluationInputError(f"{str(path)!r} holds the splits {sorted(loaded)}: choose one with --split.")
            split = next(iter(loaded))
        if split not in loaded:
            raise EvaluationInputError(f"{str(path)!r} has no split {split!r}; it has {sorted(loaded)}.")
        loaded = loaded[split]
    return loaded


def _from_dataset(path: Path, split, columns: Columns, default_task, default_prompt, caption_tasks):
    import datasets

    dataset = _load_dataset(path, split)
    if columns.audio not in dataset.column_names:
        raise EvaluationInputError(f"{str(path)!r} has no audio column {columns.audio!r}; it has "
                                   f"{dataset.column_names}.")
    if isinstance(dataset.features[columns.audio], datasets.Audio):
        # {"path", "bytes"} per row: read by af2_hf.load_audio (the original read_audio), no torchcodec needed.
        dataset = dataset.cast_column(columns.audio, datasets.Audio(decode=False))
    text_columns = [name for name in dataset.column_names if name != columns.audio]
    texts = dataset.select_columns(text_columns).to_list() if text_columns else [{}] * len(dataset)
    rows = []
    for index, raw in enumerate(texts):
        rows.append(_canonical_row(raw, index, columns, default_task, default_prompt, caption_tasks,
                                   f"{path} row {index}"))
    return ExampleTable(rows, dataset, audio_column=columns.audio, source=str(path))


def load_examples(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    audio_root: str | os.PathLike | None = None,
    columns: Columns | None = None,
    task: str | None = None,
    prompt: str | None = None,
    caption_tasks: Sequence[str] = (),
    limit: int | None = None,
) -> ExampleTable:
    """Reads the examples to evaluate.

    ``source``: a JSONL manifest (``.jsonl``; lines as [`read_manifest`] reads them, relative audio paths resolved
    against ``audio_root`` or the manifest's folder), a folder written by ``Dataset.save_to_disk`` /
    ``DatasetDict.save_to_disk``, any other folder (read as an ``audiofolder``: audio files plus a ``metadata.csv``
    or ``metadata.jsonl``), or a ``.parquet`` / ``.arrow`` file. A dataset with several splits needs ``split``.

    Each row needs audio and a prompt (or ``prompt`` for all rows). Its kind follows its labels: ``choices`` (with
    the ``answer`` among them, or its option letter) -> multiple choice; ``references`` (a list of captions), a list
    ``answer``, or an ``answer`` of a task named in ``caption_tasks`` -> caption; another ``answer`` -> open
    question; none -> unlabelled (prediction only). ``task`` (default: the source's file or folder name) groups the
    rows of the per-task table unless the row has its own ``task``."""
    path = Path(source).expanduser()
    if not path.exists():
        raise EvaluationInputError(f"Input {str(path)!r} does not exist.")
    columns = columns or Columns()
    default_task = task or (path.stem if path.is_file() else path.name)
    caption_tasks = tuple(caption_tasks)
    if path.is_file() and path.suffix in _MANIFEST_SUFFIXES:
        table = _from_manifest(path, audio_root, columns, default_task, prompt, caption_tasks)
    else:
        table = _from_dataset(path, split, columns, default_task, prompt, caption_tasks)
    if not len(table):
        raise EvaluationInputError(f"Input {str(path)!r} holds no examples.")
    if limit is not None:
        table.rows = table.rows[:limit]
    return table
