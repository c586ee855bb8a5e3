#!/usr/bin/env python
"""Ask one question about one audio file: AutoProcessor + AutoModelForMultimodalLM + generate.

    python examples/ask.py --model ./audio-flamingo-2-hf examples/data/example.wav "What is the sound source?"

``--model`` is a converted checkpoint (``af2-hf convert``) or, offline, a tiny random one (``af2-hf make-tiny``).
"""

import argparse

from transformers import AutoModelForMultimodalLM, AutoProcessor

import af2_hf  # noqa: F401  (registers Audio Flamingo 2 with the Auto classes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio", help="audio file")
    parser.add_argument("question", nargs="?", default="What is the sound source in this audio?")
    parser.add_argument("--model", required=True, help="converted model directory or Hub repo")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of the release sampling")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForMultimodalLM.from_pretrained(args.model).eval()
    # The processor loads the file as the original does and builds f"<audio>{question.lower().strip()}<SEP>".
    inputs = processor(text=args.question, audio=args.audio, return_tensors="pt").to(model.device)
    generation = {"do_sample": False} if args.greedy else {}
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **generation)
    answer = processor.decode_answer(output[0])  # the text after <SEP>, as the original's predict()
    print(answer)
    return answer


if __name__ == "__main__":
    main()
