"""Atomic folder writes: build an output folder beside its target and move it into place only when complete.

Used by every path of the package that writes a model folder (the converter, :mod:`af2_hf.export`), so that an
interrupted write never leaves a half-written folder that looks like a model, and a re-write never mixes old and new
files (e.g. an old ``model.safetensors`` beside new shards)::

    with atomic_output_dir("out/af2", overwrite=False) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    # "out/af2" now holds exactly what was written into tmp

A non-empty target is refused unless ``overwrite=True``; then it is replaced whole (never merged).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["OutputDirectoryNotEmptyError", "atomic_output_dir"]


class OutputDirectoryNotEmptyError(FileExistsError):
    """The output folder already holds files and overwriting was not asked for."""


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"Output path {str(target)!r} exists and is not a folder.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputDirectoryNotEmptyError(
            f"Output folder {str(target)!r} is not empty. Choose a new folder, or ask to overwrite it (its whole "
            "content is then replaced)."
        )


def _make_readable(path: Path) -> None:
    """``mkdtemp`` creates a 0o700 folder; give the result the permissions a plain ``mkdir`` would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _move_into_place(staging: Path, target: Path) -> None:
    """Renames ``staging`` to ``target``; an existing ``target`` is moved aside first and removed at the end (or
    put back if the final rename fails)."""
    if not target.exists():
        os.replace(staging, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    aside.rmdir()
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``target``; on success it becomes ``target``.

    Args:
        target: the folder to produce. Its parent folders are created if needed.
        overwrite: replace an existing non-empty ``target`` whole. Without it such a target is refused before
            anything is written. An existing empty folder is always replaced.

    Yields:
        `pathlib.Path`: the temporary folder (in the same parent as ``target``, so the final rename is atomic).

    Raises:
        OutputDirectoryNotEmptyError: ``target`` is a non-empty folder and ``overwrite`` is false.
        NotADirectoryError: ``target`` exists and is a file.

    If the body raises (or is interrupted), the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target).absolute()
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _make_readable(staging)
        yield staging
        _check_target(target, overwrite)  # something may have appeared there meanwhile
        _move_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
