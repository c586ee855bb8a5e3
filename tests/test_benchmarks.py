"""The benchmark scripts run end to end (tiny shapes, CPU) and report what they promise; the device parity script
passes on CPU against the golden data. Speed itself is never asserted here, and nothing is bounded by time: the runs
are bounded by work (tiny model, a short long clip, one repetition, a few decode steps), so a slow or busy machine
only makes them slower."""

import json
import os
import subprocess
import sys
from pathlib import Path

from af2_testing import REPO_ROOT, golden_dir

BENCH = REPO_ROOT / "benchmarks"


def run_script(name, *args, cwd):
    env = {**os.environ, "PYTHONPATH": str(BENCH)}
    result = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=cwd, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_benchmark_suite_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    # The long clip is 20 s (2 windows) instead of 300 s; compiled decoding is timed on GPUs only (gpu_checks.sh):
    # its correctness is checked by the device parity test below.
    stdout = run_script("run.py", "--config", "tiny", "--steps", "2", "--batch", "1", "2", "--repeats", "1",
                        "--long-seconds", "20", "--json", str(out), cwd=tmp_path)
    results = json.loads(out.read_text())
    names = {row["name"]: row for row in results["rows"]}
    for expected in ("features 10s", "features 20s", "audio encoding 20s", "time to first token 20s",
                     "decode b1 10s (cached audio K/V)", "decode b1 20s naive (K/V recomputed)",
                     "ratio decode(20s)/decode(10s)", "speed-up cached vs naive at 20s",
                     "peak memory b1 20s generate", "peak memory / weights", "generate b1 10s dynamic cache",
                     "generate b1 20s dynamic cache", "generate b2 10s dynamic cache"):
        assert expected in names, expected
        assert names[expected]["value"] > 0, expected
    assert not any("300s" in name or "compile" in name for name in names)
    assert results["weight_bytes"] > 0
    assert "| ratio decode(20s)/decode(10s)" in stdout


def test_precision_benchmark_tiny_cpu(tmp_path):
    """bench_precision.py: float32 / mixed / plain Qwen2 decode rows, the compiled generate() rows and the golden A
    quality rows (without torchao installed, as in CI, no int8 rows)."""
    out = tmp_path / "precision.json"
    stdout = run_script("bench_precision.py", "--config", "tiny", "--steps", "1", "--golden", str(golden_dir()),
                        "--compile", "--repeats", "1", "--json", str(out), cwd=tmp_path)
    rows = {row["measure"]: row for row in json.loads(out.read_text())["rows"]}
    for name in ("float32", "mixed bf16", "plain Qwen2 float32"):
        assert rows[f"decode b1 10s {name}"]["ms"] > 0 and rows[f"decode b1 10s {name}"]["ops"] > 0, name
    assert rows["decode b1 10s float32"]["vs_float32"] == 1.0
    assert 0 < rows["float32 decode step matrix-product share"]["share"] < 1
    assert rows["matrix-vector bytes/s"]["float32 linear"] > 0 and rows["matrix-vector bytes/s"]["bfloat16 linear"] > 0
    # --compile: generate() eager vs static cache + torch.compile; a compiled step launches fewer kernels than the
    # eager step's aten ops (fusion), and the eager rows have no kernel count
    for precision in ("float32", "mixed bf16"):
        eager, compiled = rows[f"generate b1 10s {precision} eager"], rows[f"generate b1 10s {precision} compiled"]
        assert eager["ms"] > 0 and compiled["ms"] > 0 and eager["kernels"] is None
        assert 0 < compiled["kernels"] < rows[f"decode b1 10s {precision}"]["ops"], precision
    assert rows["generate b1 10s float32 eager"]["vs_float32_eager"] == 1.0
    # the mixed model keeps the golden ids (the project's claim, also tested in test_mixed_precision.py)
    for name in ("float32", "mixed bf16", "mixed fp16"):
        assert rows[f"golden A {name}"]["greedy_ids_equal"] and rows[f"golden A {name}"]["audio_path_float32"], name
    assert "| precision | ms/step | x float32 | x plain Qwen2 |" in stdout


def test_encoding_benchmark_tiny_cpu(tmp_path):
    """bench_encoding.py: eager vs fused HTSAT rows against the matrix-product floor, the profile shares, the
    implicit-bf16 information row and one memory row per audio_tower_batch_size (subprocesses)."""
    out = tmp_path / "encoding.json"
    stdout = run_script("bench_encoding.py", "--config", "tiny", "--windows", "2", "--repeats", "1", "--memory",
                        "--memory-windows", "3", "--batch-sizes", "2", "0", "--json", str(out), cwd=tmp_path)
    report = json.loads(out.read_text())
    rows = {row["measure"]: row for row in report["rows"]}
    assert report["flops"] > 0 and report["matmul_rate"] > 0
    assert rows["eager window attention"]["vs_eager"] == 1.0
    fused = rows["fused SDPA window attention"]
    assert fused["seconds"] > 0 and 0 < fused["achieved_over_floor"] and fused["relative_error_vs_eager"] < 1e-5
    shares = rows["profile fused SDPA"]
    assert abs(sum(v for k, v in shares.items() if k != "measure") - 1) < 1e-6 and shares["matrix products"] > 0
    assert rows["fused SDPA, implicit bf16 matmuls (not used)"]["relative_error_vs_eager"] >= 0  # 0 without bf16 units
    for label in ("2", "all"):
        assert rows[f"encode 3 windows, audio_tower_batch_size={label}"]["seconds"] > 0
    assert "| tower | s | x eager | achieved/floor |" in stdout


def test_device_parity_script_passes_on_cpu(tmp_path):
    out = tmp_path / "parity.json"
    stdout = run_script("device_parity.py", "--device", "cpu", "--golden", str(golden_dir()), "--json", str(out),
                        cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report["failures"] == [], report["failures"]
    checks = {row["check"] for row in report["rows"]}
    assert {"a log-mel on cpu", "c clap_out", "b logits float32", "c greedy ids float32", "a beam ids",
            "batch logits (attended)", "a greedy ids static+compile", "a greedy ids bfloat16",
            "b log-mel from a cpu tensor stays there", "pipeline answer on cpu"} <= checks
    assert f"{len(report['rows'])} passed, 0 failed" in stdout


def test_gpu_checks_script_is_valid_bash():
    """benchmarks/gpu_checks.sh needs a GPU to run; here its syntax and the scripts it calls are checked."""
    script = BENCH / "gpu_checks.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    for called in ("device_parity.py", "run.py"):
        assert f"benchmarks/{called}" in script.read_text() and (BENCH / called).is_file()
