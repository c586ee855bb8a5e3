#!/usr/bin/env python
"""Evaluate Audio Flamingo 2 from Python: the library behind ``af2-hf evaluate`` in a few lines.

    python examples/evaluate.py --model ./af2-tiny examples/data/train.jsonl predictions-python.jsonl

The command line does the same with every option (datasets, several processes, resuming, adapters):
``af2-hf evaluate --help``.
"""

import argparse

from transformers import AutoModelForMultimodalLM, AutoProcessor

import af2_hf  # noqa: F401  (registers Audio Flamingo 2 with the Auto classes)
from af2_hf.evaluation import evaluate_examples, format_summary, load_examples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="AF2 model directory (model + processor)")
    parser.add_argument("data", help="JSONL manifest or dataset folder / parquet / arrow file")
    parser.add_argument("output", help="results file (JSONL); its summary is written beside it")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    args = parser.parse_args(argv)

    examples = load_examples(args.data)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForMultimodalLM.from_pretrained(args.model).eval()
    summary = evaluate_examples(model, processor, examples, args.output, max_new_tokens=args.max_new_tokens,
                                overwrite=True, progress=False)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
