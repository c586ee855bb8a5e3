"""The package as users get it: ``python -m build`` (an sdist, then a wheel built from it), the wheel installed into a
fresh virtual environment, and README's quick start run there as written, in an empty folder.

The virtual environment reuses the packages of the environment running the tests (torch, transformers, ...: no
download) but not the checkout: it is layered with plain path entries, so the editable install's ``.pth`` is not
processed, and the test checks that ``af2_hf`` and the console script come from the venv.
"""

import os
import re
import shlex
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser

import pytest

from af2_testing import REPO_ROOT

import af2_hf


def _run(argv, **kwargs):
    completed = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    assert completed.returncode == 0, f"{shlex.join(map(str, argv))}\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed


def _quick_start_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"^```bash\n(.*?)^```", section, flags=re.S | re.M).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def _layered_venv(path):
    """A venv whose interpreter also sees this environment's site-packages (appended after its own), without the
    ``.pth`` files there (so not the editable checkout)."""
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)])
    python = path / "bin" / "python"
    inner = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    outer = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (path / inner / "_outer_environment.pth").write_text("\n".join(outer) + "\n")
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO_ROOT)])
    (wheel,) = dist.glob("af2_hf-*.whl")
    assert len(list(dist.glob("af2_hf-*.tar.gz"))) == 1
    return wheel


def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        licence = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert licence and b"Apache License" in archive.read(licence[0])
        assert archive.read("af2_hf/_version.py").decode().count(af2_hf.__version__) == 1
    assert metadata["Version"] == af2_hf.__version__
    assert metadata["License-Expression"] == "Apache-2.0" and metadata["License-File"] == "LICENSE"
    assert {"af2_hf_cli.py", "af2_hf/py.typed", "af2_hf/example_clip.py", "af2_hf/commands/convert.py"} <= set(names)
    assert metadata.get_all("Project-URL") and metadata.get_all("Classifier")
    requirements = metadata.get_all("Requires-Dist")
    for extra, packages in {"train": ("accelerate", "datasets", "peft")}.items():
        assert extra in metadata.get_all("Provides-Extra")
        for package in packages:
            assert any(r.startswith(package) and f'extra == "{extra}"' in r for r in requirements), (extra, package)


def _environment(**extra) -> dict:
    """This process's environment without PYTHONPATH (which would put a checkout before the venv's own copy)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, **extra}


def test_wheel_quick_start_in_a_fresh_venv(wheel, tmp_path):
    python = _layered_venv(tmp_path / "venv")
    # --no-index: every dependency must already be satisfied (by the layered environment); nothing is downloaded.
    _run([str(python), "-m", "pip", "install", "--no-index", "--no-build-isolation", "-q", str(wheel)],
         env=_environment(PIP_DISABLE_PIP_VERSION_CHECK="1"))
    where = _run([str(python), "-c", "import af2_hf, af2_hf_cli; print(af2_hf.__file__); print(af2_hf_cli.__file__); "
                                     "print(af2_hf.__version__)"], cwd=tmp_path, env=_environment()).stdout.split()
    venv = str(tmp_path / "venv")
    assert where[0].startswith(venv) and where[1].startswith(venv), where  # the wheel's copy, not the checkout's
    assert where[2] == af2_hf.__version__

    work = tmp_path / "work"
    work.mkdir()
    env = _environment(PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    env.pop("AF2_HF_MODEL", None)
    commands = _quick_start_commands()
    subcommands = [shlex.split(c)[:2] for c in commands]
    assert all(argv[0] == "af2-hf" for argv in subcommands), commands
    assert subcommands[:2] == [["af2-hf", "make-tiny"], ["af2-hf", "example-audio"]] and ["af2-hf", "ask"] in subcommands
    for command in commands:
        argv = shlex.split(command)
        completed = _run([str(python.parent / argv[0]), *argv[1:]], cwd=work, env=env)
    assert completed.stdout.strip(), "the quick start's ask printed no answer"
    assert (work / "af2-tiny" / "model.safetensors").is_file() and (work / "example.wav").is_file()
