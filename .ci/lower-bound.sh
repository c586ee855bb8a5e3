#!/usr/bin/env bash
# The test suite again against the oldest transformers release that setup.cfg allows (the GPU machines' 5.17), in a
# venv layered on the current environment, so that the lower bound stays true.
#
# Works whether or not it is started inside a virtual environment: `python -m venv --system-site-packages` only
# exposes the BASE interpreter's packages, which inside a venv lack torch and the rest. So the new venv also gets a
# .pth file that adds the current environment's site-packages (with their own .pth files, e.g. the editable af2_hf)
# after its own: what the venv installs itself (the lowest transformers) comes first.
set -euo pipefail
cd "$(dirname "$0")/.."
lowest=$(sed -n 's/^ *transformers>=\([0-9.]*\),.*/\1/p' setup.cfg)
if [ -z "$lowest" ]; then
  echo "FATAL: no 'transformers>=X.Y,' requirement in setup.cfg" >&2
  exit 1
fi
venv=$(mktemp -d)/venv
python -m venv --system-site-packages --without-pip "$venv"  # pip, setuptools: the layered environment's
python - "$venv" <<'PY'
"""Writes <venv site-packages>/_outer_environment.pth: the site-packages folders of this interpreter's environment."""
import pathlib, subprocess, sys, sysconfig

venv = pathlib.Path(sys.argv[1])
outer = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
inner = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       check=True, capture_output=True, text=True).stdout.strip()
lines = [f"import site; site.addsitedir({path!r})" for path in outer]
(pathlib.Path(inner) / "_outer_environment.pth").write_text("\n".join(lines) + "\n")
print("lower-bound venv:", venv, "layered on", ", ".join(outer))
PY
"$venv/bin/python" -m pip install -q "transformers==${lowest}.0"
# The af2-hf console script of this venv (its interpreter, its transformers), for the tests that run it.
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
"$venv/bin/python" - "$lowest" <<'PY'
import platform, sys

import torch, transformers

import af2_hf

print(f"lower-bound run: python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, af2_hf {af2_hf.__version__} ({af2_hf.__file__})")
assert transformers.__version__.startswith(sys.argv[1] + "."), "the venv did not get the lowest transformers"
PY
# Arguments (default: the whole suite) go to pytest, e.g. `bash .ci/lower-bound.sh tests/test_cli.py`.
PATH="$venv/bin:$PATH" "$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
