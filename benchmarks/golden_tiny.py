"""The golden tiny checkpoint of the original implementation, as the benchmark scripts use it (no test helpers)."""

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# ../shared/golden/tiny beside the checkout, or AF2_GOLDEN_DIR.
DEFAULT_GOLDEN_DIR = Path(os.environ.get("AF2_GOLDEN_DIR",
                                         Path(__file__).resolve().parents[1].parent / "shared/golden/tiny"))


@dataclass
class GoldenTiny:
    tensors: dict[str, torch.Tensor]  # expected.safetensors
    spec: dict  # expected.json
    greedy_kwargs: dict  # generate() arguments of the golden greedy ids
    beam_kwargs: dict  # ... and of the golden beam ids
    converted_dir: Path  # the original checkpoint converted (float32) into a fresh temporary folder


def load_golden_tiny(golden_dir: Path, prefix: str) -> GoldenTiny:
    """Read the golden folder and convert its original checkpoint into a temporary folder named after `prefix`."""
    from safetensors.torch import load_file

    from af2_hf.convert_af2 import convert_af2_checkpoint

    spec = json.loads((golden_dir / "expected.json").read_text())
    converted = Path(tempfile.mkdtemp(prefix=prefix)) / "converted"
    convert_af2_checkpoint(golden_dir / "original", golden_dir / "base_lm", converted, dtype="float32")
    return GoldenTiny(
        tensors=load_file(str(golden_dir / "expected.safetensors")),
        spec=spec,
        greedy_kwargs=dict(spec["generation"]["greedy"]),
        beam_kwargs={key: value for key, value in spec["generation"]["beam"].items() if key != "case"},
        converted_dir=converted,
    )
