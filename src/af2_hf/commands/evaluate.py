"""``af2-hf evaluate``: batched generation and scores over a JSONL manifest or a ``datasets`` dataset, in one process
or under ``accelerate launch`` / ``torchrun`` (each process takes its share; rank 0 writes), resumable.

    af2-hf evaluate DATA --model DIR --output predictions.jsonl [--batch-size 8] [--max-new-tokens 64] [...]
    accelerate launch --multi_gpu --num_processes N -m af2_hf.commands.evaluate DATA --model DIR --output ...
    torchrun --nproc_per_node N -m af2_hf.commands.evaluate DATA --model DIR --output ...

(``python -m af2_hf.commands.evaluate ARGS`` is ``af2-hf evaluate ARGS``: the form launchers start.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..cli import MODEL_ENV, CliError, check_device, resolve_model_reference


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Generate answers for every example of DATA and score them (multiple-choice accuracy, exact / normalised "
        "match, caption BLEU / ROUGE-L / CIDEr-D). Writes one JSON line per example to --output and a summary "
        "(per-task and overall tables) beside it. A rerun with the same --output resumes where it stopped. Runs "
        "unchanged under `accelerate launch` / `torchrun`: each process generates its share of the batches."
    )
    parser.add_argument("data", help="JSONL manifest, dataset folder (save_to_disk or audiofolder), .parquet or .arrow")
    parser.add_argument("--model", default=None, help=f"converted model directory or Hub repo (default: ${MODEL_ENV})")
    parser.add_argument("--output", required=True, help="results file, one JSON line per example (.jsonl)")
    parser.add_argument("--summary", default=None, help="summary JSON (default: OUTPUT without .jsonl + .summary.json)")
    parser.add_argument("--adapter", default=None, help="PEFT (LoRA) adapter directory to apply to --model")
    parser.add_argument("--split", default=None, help="split of a dataset with several")
    parser.add_argument("--audio-root", default=None, help="folder of a manifest's relative audio paths "
                                                           "(default: the manifest's folder)")
    parser.add_argument("--prompt", default=None, help="prompt for rows without one (e.g. for captioning datasets)")
    parser.add_argument("--task", default=None, help="task name of rows without a 'task' field "
                                                     "(default: the input's file or folder name)")
    parser.add_argument("--caption-tasks", default="", help="comma-separated tasks whose answers are captions "
                                                            "(scored with BLEU / ROUGE-L / CIDEr-D)")
    for field in ("audio", "prompt", "answer", "choices", "references", "task"):
        parser.add_argument(f"--{field}-column", default=field, help=f"column of the {field} (default {field!r})")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="examples per batch and process")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=64)
    parser.add_argument("--max-num-windows", type=_positive_int, default=None,
                        help="10-s windows per audio (default: the processor's)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N examples only")
    parser.add_argument("--max-batches", type=_positive_int, default=None,
                        help="stop each process after N batches (a later run with the same --output resumes)")
    parser.add_argument("--no-sort", action="store_true", help="batch in input order instead of by audio length")
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming --output")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on CUDA, float32 otherwise")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _load_model(model_reference: str, adapter: str | None, device, dtype_name: str):
    """(model on ``device``, processor) of a converted AF2 folder or Hub repo; CliError with guidance otherwise."""
    import torch
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    reference, local_files_only = resolve_model_reference(model_reference)
    if dtype_name == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    try:
        processor = AutoProcessor.from_pretrained(reference, local_files_only=local_files_only)
        model = AutoModelForMultimodalLM.from_pretrained(reference, dtype=dtype, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        raise CliError(f"Could not load the model {model_reference!r}: {str(error).strip().splitlines()[0]}") from None
    if model.config.model_type != "audioflamingo2":
        raise CliError(f"{model_reference!r} holds a {model.config.model_type!r} model; af2-hf evaluate runs Audio "
                       "Flamingo 2 models.")
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.to(device).eval(), processor


def run(args) -> int:
    from ..evaluation.distributed import init_from_environment, setup_device
    from ..evaluation.metrics import format_summary
    from ..evaluation.inputs import Columns, EvaluationInputError, load_examples
    from ..evaluation.results import ResultsFileError
    from ..evaluation.runner import evaluate_examples
    from ..manifest import ManifestError

    reference = args.model or os.environ.get(MODEL_ENV)
    if not reference:
        raise CliError(f"No model given (--model or ${MODEL_ENV}).")
    columns = Columns(audio=args.audio_column, prompt=args.prompt_column, answer=args.answer_column,
                      choices=args.choices_column, references=args.references_column, task=args.task_column)
    caption_tasks = [name.strip() for name in args.caption_tasks.split(",") if name.strip()]
    try:
        examples = load_examples(args.data, split=args.split, audio_root=args.audio_root, columns=columns,
                                 task=args.task, prompt=args.prompt, caption_tasks=caption_tasks, limit=args.limit)
    except (EvaluationInputError, ManifestError, FileNotFoundError) as error:
        raise CliError(str(error)) from None
    device = setup_device(check_device(args.device))
    rank, world_size = init_from_environment(device)
    try:
        model, processor = _load_model(reference, args.adapter, device, args.dtype)
        summary = evaluate_examples(
            model, processor, examples, args.output, summary_path=args.summary, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, max_num_windows=args.max_num_windows, sort_by_length=not args.no_sort,
            max_batches=args.max_batches, overwrite=args.overwrite, progress=not args.no_progress,
        )
    except ResultsFileError as error:
        raise CliError(str(error)) from None
    finally:
        import torch

        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(format_summary(summary), file=sys.stderr)
        print(json.dumps({key: summary[key] for key in ("complete", "examples", "written", "processes",
                                                        "examples_per_second")} | {"overall": summary["overall"]}))
    return 0


if __name__ == "__main__":
    from ..cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
