#!/usr/bin/env bash
# The test suite again against the oldest transformers release that setup.cfg allows (the GPU machines' 5.17), in a
# venv on top of the installed environment, so that the lower bound stays true.
set -euo pipefail
cd "$(dirname "$0")/.."
lowest=$(sed -n 's/^ *transformers>=\([0-9.]*\),.*/\1/p' setup.cfg)
venv=$(mktemp -d)/venv
python -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q "transformers==${lowest}.0"
"$venv/bin/python" - "$lowest" <<'PY'
import sys, transformers
print("lower-bound run: transformers", transformers.__version__)
assert transformers.__version__.startswith(sys.argv[1] + "."), "the venv did not get the lowest transformers"
PY
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests
