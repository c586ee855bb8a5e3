"""Multi-process training: examples/finetune.py under `torchrun --nproc_per_node 2` on CPU (gloo, DDP through the
Trainer/accelerate) takes the same steps as one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from test_finetune_examples import load_example_script
from test_training import make_tiny_af2, tone

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes_match_one_process(tmp_path):
    model_dir = make_tiny_af2(tmp_path / "model")
    manifest = tmp_path / "train.jsonl"
    with open(manifest, "w") as handle:
        for index, (prompt, answer) in enumerate([("is it a tone?", "yes"), ("count the beeps", "two"),
                                                  ("what plays?", "a sine"), ("is it loud?", "no")]):
            sf.write(tmp_path / f"{index}.wav", tone(300.0 * (index + 1), seconds=0.4), 16000)
            handle.write(json.dumps({"audio": f"{index}.wav", "prompt": prompt, "answer": answer}) + "\n")
    common = [
        "--model", str(model_dir), "--train_manifest", str(manifest), "--stage", "pretrain",
        "--max_steps", "3", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "True", "--seed", "0",
    ]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(REPO / "examples" / "finetune.py"),
        *common, "--output_dir", str(tmp_path / "ddp"), "--per_device_train_batch_size", "1",
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]

    single = load_example_script("finetune").main(
        [*common, "--output_dir", str(tmp_path / "single"), "--per_device_train_batch_size", "2"]
    )
    ddp_state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert ddp_state["global_step"] == 3
    # 4 examples, 2 processes x 1 per step: an epoch takes 2 steps (a single process would need 4)
    assert ddp_state["log_history"][0]["epoch"] == 0.5
    ddp_losses = [entry["loss"] for entry in ddp_state["log_history"] if "loss" in entry]
    single_losses = [entry["loss"] for entry in single.state.log_history if "loss" in entry]
    assert len(ddp_losses) == 3
    for a, b in zip(ddp_losses, single_losses):
        assert abs(a - b) <= 1e-4 * abs(b)

    start = load_file(model_dir / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "model.safetensors")
    one = load_file(tmp_path / "single" / "model.safetensors")
    moved = [name for name in start if not torch.equal(start[name], one[name])]
    assert any("audio_transformer" in name for name in moved) and any("cross_attention" in name for name in moved)
    assert not any("language_model.layers" in name or "audio_tower" in name for name in moved)
    # Three Adam steps at lr 1e-3 move the trained weights by ~1e-3; the two runs' float32 sums differ in order (half
    # the batch per process, so other kernel blockings), which leaves ~1e-6 on near-zero weights. A wrong reduction
    # (gradients summed or not averaged across processes) is off by the size of a step.
    for name in start:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


# The accelerate config of the README's multi-GPU FSDP section (FSDP2, wrap policy on our layer classes).
FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: bf16
num_machines: 1
num_processes: 8
machine_rank: 0
use_cpu: false
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: Qwen2DecoderLayer,AudioFlamingo2GatedCrossAttentionBlock,AudioFlamingo2AudioTransformerLayer,ClapAudioStage
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
  fsdp_activation_checkpointing: false
"""


def test_fsdp_config_wraps_our_layer_classes(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from test_training import tiny_model

    path = tmp_path / "fsdp.yaml"
    path.write_text(FSDP_CONFIG)
    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType.FSDP
    fsdp = config.fsdp_config
    names = fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
    model = tiny_model()
    assert sorted(names) == sorted(model._no_split_modules)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"], auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"],
        transformer_cls_names_to_wrap=names, reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
        state_dict_type=fsdp["fsdp_state_dict_type"],
    )
    plugin.set_auto_wrap_policy(model)  # raises if a class name is not in the model
    wrapped = {type(m).__name__ for m in model.modules() if plugin.auto_wrap_policy(m, False, 0)}
    assert wrapped == set(names)


def test_finetune_freezes_embeddings_under_fsdp(tmp_path, monkeypatch):
    finetune = load_example_script("finetune")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = ["--model", "m", "--train_manifest", "t.jsonl", "--output_dir", str(tmp_path), "--report_to", "none"]
    script, _ = finetune.parse([*args, "--stage", "pretrain"])
    assert script.train_embeddings == "none"
    assert finetune.parse([*args, "--stage", "full"])[0].train_embeddings == "auto"
    assert finetune.parse([*args, "--stage", "sft", "--train_embeddings", "all"])[0].train_embeddings == "all"
    with pytest.raises(SystemExit):
        finetune.parse([*args, "--stage", "sft", "--train_embeddings", "added"])
