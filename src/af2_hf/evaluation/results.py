"""The results file of an evaluation: one JSON line per example, appended batch by batch so that a stopped run can
resume, with torn writes detected and a final, ordered rewrite; and atomic writes of small JSON files (the summary).

Each batch is appended with one ``write`` on an ``O_APPEND`` descriptor and ``fsync``\\ ed. A crash can only leave
its last line unfinished (no newline, or not valid JSON): :meth:`ResultsFile.read` cuts that line off, so a resumed
run generates that example again and never writes an example twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["ResultsFile", "ResultsFileError", "write_json_atomic"]


class ResultsFileError(ValueError):
    """The results file cannot be resumed: it is corrupt or was written for other inputs."""


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, path)
    except BaseException:
        if os.path.exists(staging):
            os.unlink(staging)
        raise


def write_json_atomic(path: str | os.PathLike, value) -> None:
    """Writes ``value`` as indented JSON to ``path`` through a temporary file and a rename: the file holds either
    the old or the new content, never a part."""
    _write_atomic(Path(path), json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _line(row: Mapping) -> str:
    return json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"


class ResultsFile:
    """A JSONL file of result rows, each with an integer ``index`` (the example's position in the inputs)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise ResultsFileError(f"The output {str(self.path)!r} is a folder; give a .jsonl file path.")

    def lock(self) -> None:
        """Takes an exclusive lock on ``.<name>.lock`` beside the file for this process's lifetime (or until
        :meth:`unlock`), so that two runs never append to the same results (e.g. a restart while workers of a killed
        launcher still run). Raises :class:`ResultsFileError` if another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path.with_name(f".{self.path.name}.lock"), "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ResultsFileError(f"Another running evaluation is writing {str(self.path)!r}: wait for it to end, "
                                   "or stop it first.") from None
        self._lock = handle

    def unlock(self) -> None:
        handle = getattr(self, "_lock", None)
        if handle is not None:
            handle.close()
            self._lock = None

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()

    def read(self) -> list[dict]:
        """The complete rows written so far. An unfinished last line (a crash while writing) is cut from the file
        with a warning; a broken line before the end, a row without ``index`` or an index written twice raises
        :class:`ResultsFileError`."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            logger.warning(f"{self.path}: the last line was not finished (the run stopped while writing it); it is "
                           "dropped and its example is evaluated again.")
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
                os.fsync(handle.fileno())
        rows, seen = [], set()
        for number, line in enumerate(data[:keep].decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ResultsFileError(f"{self.path}:{number}: not valid JSON ({error.msg}); the file is corrupt: "
                                       "remove it or pass --overwrite.") from None
            index = row.get("index") if isinstance(row, dict) else None
            if isinstance(index, bool) or not isinstance(index, int):
                raise ResultsFileError(f"{self.path}:{number}: a result row needs an integer 'index'.")
            if index in seen:
                raise ResultsFileError(f"{self.path}:{number}: example {index} is written twice.")
            seen.add(index)
            rows.append(row)
        return rows

    def append(self, rows: Iterable[Mapping]) -> None:
        """Appends ``rows`` with one ``write`` and ``fsync``."""
        data = "".join(_line(row) for row in rows).encode("utf-8")
        if not data:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def rewrite_ordered(self, rows: Iterable[Mapping]) -> None:
        """Replaces the file atomically with ``rows`` ordered by ``index``."""
        _write_atomic(self.path, "".join(_line(row) for row in sorted(rows, key=lambda row: row["index"])))
