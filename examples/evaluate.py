#!/usr/bin/env python
"""Evaluate Audio Flamingo 2 on a JSONL manifest: batched greedy generation and accuracy.

    python examples/evaluate.py --model ./af2-ft --manifest test.jsonl --output predictions.jsonl
    python examples/evaluate.py --model ./audio-flamingo-2-hf --adapter ./af2-lora --manifest test.jsonl

Manifest lines: ``{"audio": "clips/x.wav", "prompt": "...", "answer": "...", "choices": ["...", "..."]}``
(``"name"``/``"output"`` are accepted for ``audio``/``answer``; relative paths resolve against ``--audio_root``, by
default the manifest's folder). With ``choices`` (multiple choice) the generated text is mapped to one of the
choices (exact text, a leading option letter such as "(b)", or the one choice it contains) and compared with the
answer; without, the lower-cased texts without punctuation must be equal.

Prints a JSON summary (accuracy, correct, total, unmatched) and writes one JSON line per example to ``--output``.
"""

import argparse
import json

import torch

from af2_hf import AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Processor
from af2_hf.training import answer_accuracy, generate_answers, read_manifest, score_answer


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="AF2 model directory (model + processor)")
    parser.add_argument("--manifest", required=True, help="JSONL manifest")
    parser.add_argument("--adapter", help="PEFT (LoRA) adapter directory to apply to --model")
    parser.add_argument("--audio_root", help="folder of relative audio paths (default: the manifest's folder)")
    parser.add_argument("--output", help="write the predictions here (JSONL)")
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--max_new_tokens", type=positive_int, default=64)
    parser.add_argument("--max_num_windows", type=positive_int, help="10-s windows per audio (default: processor's)")
    parser.add_argument("--limit", type=positive_int, help="evaluate the first N examples only")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on CUDA, float32 otherwise")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, args.dtype)

    rows = read_manifest(args.manifest, args.audio_root, require_answer=False)
    if args.limit:
        rows = rows[: args.limit]
    processor = AudioFlamingo2Processor.from_pretrained(args.model)
    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model = model.to(device).eval()

    predictions = generate_answers(
        model, processor, rows, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        max_num_windows=args.max_num_windows, progress=not args.no_progress,
    )
    scored = [row for row in rows if "answer" in row]
    summary = answer_accuracy(
        [p for p, row in zip(predictions, rows) if "answer" in row],
        [row["answer"] for row in scored],
        [row.get("choices") for row in scored],
    ) if scored else {"accuracy": None, "correct": 0, "total": 0, "unmatched": 0}
    summary["examples"] = len(rows)

    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            for row, prediction in zip(rows, predictions):
                record = {**row, "prediction": prediction}
                if "answer" in row:
                    record["correct"], selected = score_answer(prediction, row["answer"], row.get("choices"))
                    if row.get("choices"):
                        record["selected"] = selected
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(json.dumps(summary))
    return summary, predictions


if __name__ == "__main__":
    main()
