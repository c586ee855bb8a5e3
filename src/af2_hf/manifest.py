"""JSONL manifests of examples (``{"audio", "prompt", "answer"[, "choices"]}`` per line), as read by
``examples/finetune.py`` and ``af2-hf evaluate``."""

from __future__ import annotations

import json
import os

__all__ = ["ManifestError", "read_manifest"]


class ManifestError(ValueError):
    """A JSONL manifest line is not valid."""


_FIELD_ALIASES = {"audio": ("audio", "name"), "prompt": ("prompt",), "answer": ("answer", "output")}


def read_manifest(path, audio_root=None, require_answer: bool = True) -> list[dict]:
    """Reads a JSONL manifest: one JSON object per line (blank lines are skipped) with

    * ``"audio"`` (or ``"name"``, the original dataset files' key): path of the audio file; a relative path is
      resolved against ``audio_root`` (default: the manifest's folder);
    * ``"prompt"``: the question / instruction;
    * ``"answer"`` (or ``"output"``, the original's key): the target text (needed unless ``require_answer=False``);
    * optional ``"choices"``: list of strings (multiple choice; used by the accuracy);
    * other keys are kept as they are.

    Returns a list of dicts with the canonical keys ``audio`` (absolute path), ``prompt``, ``answer`` (if present),
    plus the other fields. Raises :class:`ManifestError` naming the line on bad input, ``FileNotFoundError`` for a
    missing manifest."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Manifest {path!r} does not exist.")
    root = os.path.dirname(os.path.abspath(path)) if audio_root is None else os.fspath(audio_root)
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ManifestError(f"{where}: not valid JSON ({error.msg}).") from error
            if not isinstance(item, dict):
                raise ManifestError(f"{where}: expected a JSON object, got {type(item).__name__}.")
            row = dict(item)
            for canonical, aliases in _FIELD_ALIASES.items():
                present = [key for key in aliases if key in item]
                if len(present) > 1:
                    raise ManifestError(f"{where}: give only one of {present}.")
                if not present:
                    if canonical == "answer" and not require_answer:
                        continue
                    raise ManifestError(f"{where}: missing field {' / '.join(repr(a) for a in aliases)}.")
                value = row.pop(present[0])
                if canonical == "audio":
                    if not isinstance(value, str) or not value:
                        raise ManifestError(f"{where}: 'audio' must be a non-empty path string.")
                    value = value if os.path.isabs(value) else os.path.join(root, value)
                elif not isinstance(value, str) and not (
                    isinstance(value, (int, float)) and not isinstance(value, bool)
                ):
                    raise ManifestError(f"{where}: {canonical!r} must be a string, got {type(value).__name__}.")
                row[canonical] = value if canonical == "audio" else str(value)
            if "choices" in row:
                choices = row["choices"]
                if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                    raise ManifestError(f"{where}: 'choices' must be a non-empty list of strings.")
            rows.append(row)
    if not rows:
        raise ManifestError(f"Manifest {path!r} holds no examples.")
    return rows
