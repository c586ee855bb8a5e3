"""`af2-hf evaluate` and the Trainer's generation accuracy in several processes (CPU, gloo): two processes started
by `accelerate launch` give the predictions and scores of one process; a `torchrun` run killed mid-way and started
again completes with every example exactly once; GenerationAccuracyCallback generates 1/N of the answers per rank
and gets the single-process metric."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from af2_hf.cli import main as cli_main
from evaluate_testing import ROWS, make_workspace, read_rows, read_summary

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def evaluate_args(root: Path, output: Path, *extra) -> list[str]:
    """Arguments of `af2-hf evaluate` (without the command name) on the workspace of :func:`make_workspace`."""
    return [str(root / "eval.jsonl"), "--model", str(root / "model"), "--output", str(output),
            "--max-new-tokens", "4", "--no-progress", *extra]


def test_accelerate_two_processes_match_one_process(tmp_path):
    make_workspace(tmp_path)
    one = tmp_path / "one.jsonl"
    assert cli_main(["evaluate", *evaluate_args(tmp_path, one, "--batch-size", "2")]) == 0

    two = tmp_path / "two.jsonl"
    # accelerate's multi-process launcher is --multi_gpu (it also runs CPU processes); --cpu would start ONE process
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(free_port()), "-m", "af2_hf.commands.evaluate",
               *evaluate_args(tmp_path, two, "--batch-size", "2")]
    run = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    summary = read_summary(two)
    assert summary["processes"] == 2  # really two processes (the world size of the process group)
    assert read_rows(two) == read_rows(one)
    assert summary["tasks"] == read_summary(one)["tasks"] and summary["overall"] == read_summary(one)["overall"]
    assert json.loads(run.stdout.strip().splitlines()[-1])["processes"] == 2


def test_torchrun_killed_then_restarted_writes_every_example_once(tmp_path):
    make_workspace(tmp_path)
    output = tmp_path / "out.jsonl"

    def command():
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), "-m", "af2_hf.commands.evaluate",
                *evaluate_args(tmp_path, output, "--batch-size", "1")]

    first = subprocess.Popen(command(), env=ENV, cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if output.exists() and output.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    # the launcher and both workers, wherever they are (torchrun's workers may sit in their own process groups)
    processes = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=60)
    first.wait(timeout=60)
    written = output.read_text().count("\n") if output.exists() else 0
    assert written >= 2, first.stderr.read()[-5000:]
    with open(output, "a") as handle:  # as if the kill had hit rank 0 in the middle of a write
        handle.write('{"index": 0, "task": "sou')

    second = subprocess.run(command(), env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    rows = read_rows(output)
    assert [row["index"] for row in rows] == list(range(len(ROWS)))  # each example exactly once, in order
    assert [row["prompt"] for row in rows] == [row["prompt"] for row in ROWS]
    assert [i for i, row in enumerate(rows) if row.get("error")] == [3]
    summary = read_summary(output)
    assert summary["complete"] and summary["processes"] == 2
    assert summary["generated"] == len(ROWS) - min(written, len(ROWS))


CALLBACK_SCRIPT = """
import json, os, sys
import torch
from af2_hf import AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Processor
from af2_hf.evaluation import generation
from af2_hf.training import GenerationAccuracyCallback, read_manifest
from transformers import TrainerControl, TrainerState, TrainingArguments

if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    torch.distributed.init_process_group("gloo")
root, out = sys.argv[1], sys.argv[2]
generated = []
original = generation.generate_batch
def counting(model, processor, prompts, *args, **kwargs):
    generated.extend(prompts)
    return original(model, processor, prompts, *args, **kwargs)
generation.generate_batch = counting
model = AudioFlamingo2ForConditionalGeneration.from_pretrained(root + "/model")
processor = AudioFlamingo2Processor.from_pretrained(root + "/model")
rows = [row for row in read_manifest(root + "/eval.jsonl", require_answer=False) if "answer" in row]
rows = [row for row in rows if not row["audio"].endswith("3.wav")]
callback = GenerationAccuracyCallback(processor, rows, batch_size=1, max_new_tokens=4)
metrics = {}
callback.on_evaluate(None, TrainerState(), TrainerControl(), model=model, metrics=metrics)
rank = int(os.environ.get("RANK", "0"))
with open(f"{out}.{rank}.json", "w") as handle:
    json.dump({"metrics": metrics, "predictions": callback.last_predictions, "generated": generated}, handle)
"""


def test_generation_accuracy_callback_shares_generation_over_ranks(tmp_path):
    make_workspace(tmp_path)
    script = tmp_path / "callback.py"
    script.write_text(CALLBACK_SCRIPT)
    single = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "one")], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-5000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(tmp_path), str(tmp_path / "two")]
    ddp = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-5000:]

    one = json.loads((tmp_path / "one.0.json").read_text())
    ranks = [json.loads((tmp_path / f"two.{rank}.json").read_text()) for rank in (0, 1)]
    assert len(one["generated"]) == 3
    # batches of one example dealt out: rank 0 generated batches 0 and 2, rank 1 batch 1; together each once
    assert [len(rank["generated"]) for rank in ranks] == [2, 1]
    assert sorted(ranks[0]["generated"] + ranks[1]["generated"]) == sorted(one["generated"])
    for rank in ranks:
        assert rank["predictions"] == one["predictions"] and rank["metrics"] == one["metrics"]
    assert one["metrics"]["eval_generation_total"] == 3


def test_readme_multinode_config_is_read_by_accelerate(tmp_path):
    import re

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Evaluation and batch inference"):]
    block = re.findall(r"^```yaml\n(.*?)^```", section, flags=re.S | re.M)[0]
    (tmp_path / "multinode.yaml").write_text(block)
    config = load_config_from_file(str(tmp_path / "multinode.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert (config.num_machines, config.num_processes, config.machine_rank) == (2, 16, 0)
    assert config.main_process_ip and config.main_process_port
