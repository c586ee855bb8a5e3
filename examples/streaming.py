#!/usr/bin/env python
"""Stream the answer token by token with transformers' TextIteratorStreamer (generate runs in a thread).

    python examples/streaming.py --model ./audio-flamingo-2-hf examples/data/example.wav "Describe the audio."
"""

import argparse
import sys
from threading import Thread

from transformers import AutoModelForMultimodalLM, AutoProcessor, TextIteratorStreamer

import af2_hf  # noqa: F401  (registers Audio Flamingo 2 with the Auto classes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio")
    parser.add_argument("question", nargs="?", default="Describe the audio in detail.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForMultimodalLM.from_pretrained(args.model).eval()
    inputs = processor(text=args.question, audio=args.audio, return_tensors="pt")
    # skip_prompt drops the question; skip_special_tokens drops <|endofchunk|>, eos and pad, as decode_answer does.
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=model.generate,
                    kwargs=dict(**inputs, streamer=streamer, do_sample=False, max_new_tokens=args.max_new_tokens))
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    thread.join()
    sys.stdout.write("\n")
    return "".join(pieces)


if __name__ == "__main__":
    main()
