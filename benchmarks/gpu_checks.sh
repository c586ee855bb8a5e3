#!/usr/bin/env bash
# CUDA checks and benchmarks in one go, for a GPU machine lent for a few minutes (see benchmarks/README.md).
#   bash benchmarks/gpu_checks.sh OUT_DIR [all|parity|bench]
# run.py saves each row as it is measured, so a run stopped by a time limit still leaves its rows in OUT_DIR.
# Uses the installed torch/transformers; af2_hf is imported from src/ when it is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_results}
stage=${2:-all}
mkdir -p "$out"
python -c "import af2_hf" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$out/env.txt"
status=0
if [ "$stage" = all ] || [ "$stage" = parity ]; then
  python benchmarks/device_parity.py --device cuda --json "$out/parity.json" 2>&1 | tee "$out/parity.txt" || status=1
fi
if [ "$stage" = all ] || [ "$stage" = bench ]; then
  python benchmarks/run.py --config 3b --device cuda --dtype bfloat16 --compile --json "$out/bench_3b_bf16.json" \
    2>&1 | tee "$out/bench_3b_bf16.txt" || status=1
fi
exit $status
