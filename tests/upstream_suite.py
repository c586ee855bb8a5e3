"""transformers' own common test mixins, made importable at test time (never committed to this repository).

The test files come from the source distribution of the INSTALLED transformers release (``pip download
transformers==<version> --no-binary :all: --no-deps``, kept in a download cache), unpacked into a scratch folder
for this test session, with ``../shared/transformers-tests/`` (the files the sdist lacks: ``tests/generation``,
``tests/utils``, ``tests/exporters``, ``utils/``) laid over it, as that folder's README describes. The scratch folder
goes first on ``sys.path`` (``tests`` as a package, ``utils/`` top-level), so ``from tests.test_modeling_common import
ModelTesterMixin`` imports transformers' unchanged mixins.

A missing ``../shared/transformers-tests`` or an sdist that cannot be had raises: the suite fails, it never skips.

Usage, at the top of a test module::

    import upstream_suite

    SUITE = upstream_suite.install()
    from tests.test_modeling_common import ModelTesterMixin  # noqa: E402
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import transformers

from af2_testing import REPO_ROOT


SHARED_TESTS = Path(os.environ.get("AF2_TRANSFORMERS_TESTS_DIR", REPO_ROOT.parent / "shared" / "transformers-tests"))
DOWNLOAD_CACHE = Path(os.environ.get("AF2_SDIST_CACHE", Path.home() / ".cache" / "af2-hf" / "sdist"))
#: Audio fixtures that ``tests/test_processing_common.py`` resolves by name in the working directory (no Hub here).
AUDIO_FIXTURES = ("glass-breaking-151256.mp3", "f2641_0_throatclearing.wav")

_installed: Path | None = None


def sdist_path(version: str = transformers.__version__) -> Path:
    """The transformers source distribution of ``version``, downloaded once into :data:`DOWNLOAD_CACHE`."""
    archive = DOWNLOAD_CACHE / f"transformers-{version}.tar.gz"
    if archive.is_file():
        return archive
    DOWNLOAD_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=DOWNLOAD_CACHE) as scratch:
        command = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:",
                   "--no-deps", "--no-build-isolation", "-q", "-d", scratch]
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(scratch) / archive.name
        if result.returncode != 0 or not downloaded.is_file():
            raise RuntimeError(
                f"Could not download the transformers {version} source distribution (needed for transformers' "
                f"common test mixins): {' '.join(command)}\n{result.stdout}\n{result.stderr}"
            )
        os.replace(downloaded, archive)  # atomic: a cut download never looks like a cached archive
    return archive


def _unpack_tests(archive: Path, target: Path) -> None:
    """The sdist's ``tests/`` tree into ``target/tests`` (members checked to stay inside ``target``)."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["tests"] and (m.isfile() or m.isdir())]
        for member in members:
            member.name = "/".join(member.name.split("/")[1:])
        tar.extractall(target, members=members, filter="data")


def _write_audio_fixtures(folder: Path) -> None:
    """Two short deterministic clips under the names the processing mixin looks for."""
    rate = 16000
    t = np.arange(rate, dtype=np.float64) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * t) * np.exp(-2.0 * t)).astype(np.float32)
    soundfile.write(folder / AUDIO_FIXTURES[0], tone, rate, format="MP3")
    soundfile.write(folder / AUDIO_FIXTURES[1], tone[::-1].copy(), rate, subtype="PCM_16")


def install() -> Path:
    """Unpack the installed release's tests with the shared overlay into a scratch folder (once per process), put it
    on ``sys.path`` and return it. Tests that read the audio fixtures need that folder as working directory
    (an autouse fixture with ``monkeypatch.chdir(root)`` in the test module)."""
    global _installed
    if _installed is not None:
        return _installed
    if not (SHARED_TESTS / "tests").is_dir():
        raise FileNotFoundError(
            f"{SHARED_TESTS} is missing: transformers' test files that the sdist lacks are required (see its README)."
        )
    root = Path(tempfile.mkdtemp(prefix=f"transformers-{transformers.__version__}-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    _unpack_tests(sdist_path(), root)
    shutil.copytree(SHARED_TESTS / "tests", root / "tests", dirs_exist_ok=True)
    shutil.copytree(SHARED_TESTS / "utils", root / "utils", dirs_exist_ok=True)
    _write_audio_fixtures(root)
    sys.path[:0] = [str(root), str(root / "utils")]
    for name in [m for m in sys.modules if m == "tests" or m.startswith("tests.")]:
        del sys.modules[name]  # an unrelated `tests` imported earlier must not shadow transformers'
    previous = os.getcwd()
    os.chdir(root)  # the processing mixin resolves its audio fixtures relative to the cwd at import
    try:
        import tests.test_processing_common  # noqa: F401
    finally:
        os.chdir(previous)
    _installed = root
    return root
