"""`af2-hf evaluate` wall time with 1 process vs N processes (torchrun, CPU gloo or one GPU each), on the tiny
random model of `af2-hf make-tiny` and synthetic clips of mixed lengths. Prints wall time (process start to exit,
model loading included) and the run's examples/s (generation loop only, from the summary), and checks that the
predictions of the runs are identical.

    python benchmarks/bench_evaluate.py --examples 64 --processes 2 --batch-size 4 --max-new-tokens 16
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def write_data(root: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / "clips").mkdir()
    manifest = root / "eval.jsonl"
    with open(manifest, "w") as handle:
        for index in range(count):
            seconds = float(rng.uniform(1.0, 25.0))
            t = np.arange(int(seconds * 16000)) / 16000
            wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(t.size)
            sf.write(root / "clips" / f"{index}.wav", wave.astype(np.float32), 16000)
            row = {"audio": f"clips/{index}.wav", "prompt": "Is there a tone?", "answer": "yes",
                   "choices": ["yes", "no"]}
            handle.write(json.dumps(row) + "\n")
    return manifest


def run(processes: int, threads: int, manifest: Path, model: Path, output: Path, args) -> dict:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                     "--master_port", str(29600 + processes)]
    command = [*launcher, "-m", "af2_hf.commands.evaluate", str(manifest), "--model", str(model), "--output",
               str(output), "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
               "--no-progress", "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    summary = json.loads(output.with_name(output.stem + ".summary.json").read_text())
    predictions = [json.loads(line)["prediction"] for line in output.read_text().splitlines()]
    return {"processes": summary["processes"], "threads_per_process": threads, "wall_s": round(wall, 2),
            "loop_examples_per_s": summary["examples_per_second"], "predictions": predictions}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU threads shared by the processes")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()

    from af2_hf.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_tiny_model(root / "model")
        manifest = write_data(root, args.examples, seed=0)
        rows = [run(1, args.cores, manifest, root / "model", root / "one.jsonl", args),
                run(args.processes, max(1, args.cores // args.processes), manifest, root / "model",
                    root / "many.jsonl", args)]
    same = rows[0].pop("predictions") == rows[1].pop("predictions")
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"examples": args.examples, "speedup_wall": round(rows[0]["wall_s"] / rows[1]["wall_s"], 2),
                      "identical_predictions": same}))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "identical_predictions": same}, indent=2))


if __name__ == "__main__":
    main()
