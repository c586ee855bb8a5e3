#!/usr/bin/env python
"""Convert an original Audio Flamingo 2 release into a native Hugging Face Transformers checkpoint.

Example:
    python conversion/convert_af2_to_hf.py --af2-dir nvidia/audio-flamingo-2 --text-model Qwen/Qwen2.5-3B \
        --output-dir ./audio-flamingo-2-hf [--dtype bfloat16] [--push-to-hub USER/audio-flamingo-2-hf]

``--af2-dir`` and ``--text-model`` take a local folder or a Hub repo id. The work is done by
``af2_hf.convert_af2.convert_af2_checkpoint`` (also behind ``af2-hf convert``).
"""

import sys

from af2_hf.convert_af2 import main

if __name__ == "__main__":
    sys.exit(main())
