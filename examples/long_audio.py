#!/usr/bin/env python
"""Long audio: Audio Flamingo 2 sees at most ``max_num_windows`` 10-second windows (30 = 5 minutes in the long-audio
releases); longer audio is truncated with a warning.

    python examples/long_audio.py --model ./audio-flamingo-2-hf [--audio LONG.wav] [--seconds 360]

Without ``--audio`` it synthesises ``--seconds`` of audio (a tone whose pitch changes every minute).
"""

import argparse

import numpy as np
import torch
from transformers import AutoModelForMultimodalLM, AutoProcessor

import af2_hf  # noqa: F401  (registers Audio Flamingo 2 with the Auto classes)


def synthetic(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    pitch = 220.0 * 2 ** ((t // 60) / 12)  # one semitone higher every minute
    return 0.3 * np.sin(2 * np.pi * pitch * t)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--audio", default=None, help="a long audio file (default: synthetic)")
    parser.add_argument("--seconds", type=float, default=360.0, help="length of the synthetic audio")
    parser.add_argument("--max-num-windows", type=int, default=None,
                        help="windows to keep (default: the feature extractor's, i.e. the release's)")
    parser.add_argument("--question", default="Summarize how the sound changes over time.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForMultimodalLM.from_pretrained(args.model).eval()
    audio = args.audio if args.audio else synthetic(args.seconds)
    windows = args.max_num_windows or processor.feature_extractor.max_num_windows
    print(f"The model sees at most {windows} windows = {processor.feature_extractor.max_audio_seconds(windows):.0f} s.")
    kwargs = {} if args.audio else {"sampling_rate": 16000}
    inputs = processor(text=args.question, audio=audio, return_tensors="pt", max_num_windows=windows, **kwargs)
    used = int(inputs["input_features_mask"].sum())
    print(f"Windows used: {used} (input_features {tuple(inputs['input_features'].shape)})")
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=args.max_new_tokens)
    answer = processor.decode_answer(output[0])
    print(f"Answer: {answer}")
    return used, answer


if __name__ == "__main__":
    main()
