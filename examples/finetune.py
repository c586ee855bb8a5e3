#!/usr/bin/env python
"""Fine-tune Audio Flamingo 2 with the Trainer on a JSONL manifest of (audio, prompt, answer).

    python examples/finetune.py --model ./audio-flamingo-2-hf --train_manifest train.jsonl --output_dir ./af2-ft \\
        --stage sft --per_device_train_batch_size 4 --learning_rate 1e-5 --num_train_epochs 1

    # LoRA on the LM attention and the cross-attention projections (adapter saved in --output_dir):
    python examples/finetune.py ... --lora --lora_r 16 --merge_lora

    # several GPUs (DDP) or CPU processes (gloo): the same script under torchrun / accelerate launch
    torchrun --nproc_per_node 8 examples/finetune.py ...

Manifest: one JSON object per line, ``{"audio": "clips/x.wav", "prompt": "...", "answer": "..."}`` (``"name"`` and
``"output"`` — the keys of the original AF2 dataset files — are accepted for ``audio`` and ``answer``); relative
audio paths are resolved against ``--audio_root`` (default: the manifest's folder). Optional ``"choices"`` (a list)
is used by the generation accuracy on ``--eval_manifest``.

Every ``TrainingArguments`` option is accepted (``--learning_rate``, ``--max_steps``, ``--save_steps``,
``--gradient_checkpointing``, ``--resume_from_checkpoint``, ``--fsdp``, ...). On CUDA with bf16 support, bf16 mixed
precision is turned on unless ``--bf16``/``--fp16`` is given; without CUDA ``--use_cpu`` is turned on (so that
torchrun runs one multi-process gloo job). ``--remove_unused_columns`` is always False (the collator needs the raw
columns).

Stages (``af2_hf.training.set_trainable``): ``pretrain`` (audio transformer + cross-attention), ``sft`` (+ AF-CLAP),
``long`` (audio transformer + cross-attention; raise ``--max_num_windows``), ``full`` (everything); ``--lora``
freezes the base model and trains LoRA adapters only. ``--train_embeddings auto`` trains the embedding rows of
``<audio>`` and ``<|endofchunk|>`` as the original (all rows in ``full``); under FSDP it freezes the embedding instead.
"""

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import HfArgumentParser, TrainingArguments, set_seed

from af2_hf import AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Processor
from af2_hf.training import (
    AF2_LORA_TARGET_MODULES,
    AudioFlamingo2DataCollator,
    AudioFlamingo2Trainer,
    GenerationAccuracyCallback,
    read_manifest,
    set_trainable,
)

STAGES = ("pretrain", "sft", "long", "full", "lora")
EMBEDDINGS = {"auto": None, "added": "added", "all": "all", "none": False}


@dataclass
class ScriptArguments:
    model: str = field(metadata={"help": "converted AF2 model directory (model + processor)"})
    train_manifest: str = field(metadata={"help": "JSONL manifest of training examples"})
    eval_manifest: str | None = field(default=None, metadata={"help": "JSONL manifest for evaluation"})
    audio_root: str | None = field(default=None, metadata={"help": "folder of relative audio paths"})
    stage: str = field(default="sft", metadata={"help": f"training stage: {', '.join(STAGES)}"})
    train_embeddings: str = field(
        default="auto",
        metadata={"help": "auto (the original: <audio>/<|endofchunk|> rows; all rows in 'full'), added, all, none"},
    )
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (stage 'lora')"})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: str = field(
        default=",".join(AF2_LORA_TARGET_MODULES), metadata={"help": "comma-separated module names"}
    )
    merge_lora: bool = field(default=False, metadata={"help": "also save the merged model to OUTPUT_DIR/merged"})
    max_length: int = field(default=512, metadata={"help": "token limit per example (the original max_tokens)"})
    max_num_windows: int | None = field(
        default=None, metadata={"help": "10-s windows per audio (default: the processor's)"}
    )
    generation_eval_examples: int = field(
        default=32, metadata={"help": "eval-manifest examples scored by generation at each evaluation (0: none)"}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "generation length for the accuracy"})


def parse(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported() and not given & {"--bf16", "--fp16"}:
            argv += ["--bf16", "True"]
    elif "--use_cpu" not in given:
        # Without CUDA, use_cpu=True is what makes accelerate run torchrun processes as one gloo (MULTI_CPU) job
        # instead of independent single-process runs.
        argv += ["--use_cpu", "True"]
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    script, training = parser.parse_args_into_dataclasses(args=argv)
    if training.remove_unused_columns and "--remove_unused_columns" in given:
        parser.error("--remove_unused_columns must stay False: the collator needs the audio/prompt/answer columns.")
    training.remove_unused_columns = False
    if script.lora:
        if script.stage not in ("sft", "lora") and "--stage" in given:
            parser.error(f"--lora trains adapters only; it cannot be combined with --stage {script.stage}.")
        script.stage = "lora"
    if script.stage not in STAGES:
        parser.error(f"--stage must be one of {', '.join(STAGES)}, got {script.stage!r}.")
    if script.stage == "lora" and not script.lora:
        parser.error("--stage lora needs --lora (and the --lora_* options).")
    if script.train_embeddings not in EMBEDDINGS:
        parser.error(f"--train_embeddings must be one of {', '.join(EMBEDDINGS)}, got {script.train_embeddings!r}.")
    if script.stage == "lora" and script.train_embeddings not in ("auto", "none"):
        parser.error("--train_embeddings cannot be used with --lora (only the adapters train).")
    fsdp = bool(training.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and script.stage in ("pretrain", "sft", "long"):
        # Training only the <audio>/<|endofchunk|> rows relies on a gradient hook that FSDP's parameter
        # replacement drops (all rows would train): freeze the embedding instead, unless asked for every row.
        if script.train_embeddings == "added":
            parser.error("--train_embeddings added is not supported under FSDP; use none (default there) or all.")
        if script.train_embeddings == "auto":
            print("FSDP: the input embeddings are frozen (--train_embeddings none); pass all to train every row.")
            script.train_embeddings = "none"
    return script, training


def build_model(script: ScriptArguments):
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(script.model, dtype=torch.float32)
    if script.lora:
        from peft import LoraConfig, get_peft_model

        set_trainable(model, "lora", verbose=False)
        targets = [name.strip() for name in script.lora_target_modules.split(",") if name.strip()]
        config = LoraConfig(
            r=script.lora_r, lora_alpha=script.lora_alpha, lora_dropout=script.lora_dropout, target_modules=targets
        )
        model = get_peft_model(model, config)
        set_trainable(model, "lora")
    else:
        set_trainable(model, script.stage, train_embeddings=EMBEDDINGS[script.train_embeddings])
    return model


def main(argv=None):
    script, training = parse(argv)
    set_seed(training.seed)
    processor = AudioFlamingo2Processor.from_pretrained(script.model)
    train_rows = read_manifest(script.train_manifest, script.audio_root)
    eval_rows = read_manifest(script.eval_manifest, script.audio_root) if script.eval_manifest else None

    model = build_model(script)
    callbacks = []
    if eval_rows and script.generation_eval_examples > 0:
        callbacks.append(
            GenerationAccuracyCallback(
                processor,
                eval_rows[: script.generation_eval_examples],
                batch_size=training.per_device_eval_batch_size,
                max_new_tokens=script.max_new_tokens,
            )
        )
    trainer = AudioFlamingo2Trainer(
        model=model,
        args=training,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        data_collator=AudioFlamingo2DataCollator(
            processor, max_length=script.max_length, max_num_windows=script.max_num_windows
        ),
        processing_class=processor,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    trainer.save_model()  # the full model, or the LoRA adapter (+ the processor)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if eval_rows:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if script.lora and script.merge_lora and trainer.is_world_process_zero():
        merged_dir = os.path.join(training.output_dir, "merged")
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(merged_dir)
        processor.save_pretrained(merged_dir)
    if trainer.is_world_process_zero():
        with open(os.path.join(training.output_dir, "af2_finetune_args.json"), "w", encoding="utf-8") as handle:
            json.dump(vars(script), handle, indent=2)
    return trainer


if __name__ == "__main__":
    main()
