#!/usr/bin/env python
"""Writes examples/data/example.wav (or OUT.wav): the package's example clip (see ``af2_hf.example_clip``; the same
as ``af2-hf example-audio OUT.wav``).

    python examples/data/make_example_wav.py [OUT.wav]
"""

import sys
from pathlib import Path

from af2_hf.example_clip import write_example_clip

if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("example.wav")
    print(write_example_clip(target))
