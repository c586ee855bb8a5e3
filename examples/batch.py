#!/usr/bin/env python
"""Answer several questions about several audios in batches with the audio-question-answering pipeline.

    python examples/batch.py --model ./audio-flamingo-2-hf [--batch-size 4] [AUDIO ...]

Without audio arguments it uses examples/data/example.wav plus two synthetic clips (one at 8 kHz, resampled by the
pipeline) so that it runs anywhere.
"""

import argparse
from pathlib import Path

import numpy as np
from transformers import AutoModelForMultimodalLM, AutoProcessor

from af2_hf import AudioQuestionAnsweringPipeline

EXAMPLE = Path(__file__).resolve().parent / "data" / "example.wav"


def default_inputs():
    t8 = np.arange(8000 * 4) / 8000  # 4 s at 8 kHz
    t16 = np.arange(16000 * 12) / 16000  # 12 s at 16 kHz: two windows
    return [
        {"audio": str(EXAMPLE), "question": "What is the sound source in this audio?"},
        {"audio": {"raw": 0.3 * np.sin(2 * np.pi * 330 * t8), "sampling_rate": 8000},
         "question": "Is this a pure tone or a noise?"},
        {"audio": {"array": 0.2 * np.sign(np.sin(2 * np.pi * 2 * t16)) * np.sin(2 * np.pi * 880 * t16),
                   "sampling_rate": 16000},
         "question": "Describe how the sound changes over time."},
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="*", help="audio files (default: built-in examples)")
    parser.add_argument("--question", default="Describe the audio.", help="question for the audio files given")
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    model = AutoModelForMultimodalLM.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    pipe = AudioQuestionAnsweringPipeline(model=model, processor=processor)
    inputs = [{"audio": path, "question": args.question} for path in args.audio] or default_inputs()
    # One processor call per batch: text left-padded, audio windows padded and masked.
    results = pipe(inputs, batch_size=args.batch_size, do_sample=False, max_new_tokens=args.max_new_tokens)
    for item, result in zip(inputs, results):
        print(f"Q: {item['question']}\nA: {result['answer']}\n")
    return results


if __name__ == "__main__":
    main()
