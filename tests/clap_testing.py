"""Helpers of the AF-CLAP tests: the golden ``clap_tiny`` folder (original AF-CLAP on tiny random weights), its
checkpoint converted once per session, the clips loaded as the original loads them, and the README's tolerances.

The golden data lives beside the checkout (``../shared/golden/clap_tiny``); ``AF2_CLAP_GOLDEN_DIR`` may point
elsewhere. A missing golden folder is an error, never a skip."""

import functools
import json
import tempfile
from pathlib import Path

import torch
from af2_testing import shared_golden_dir
from safetensors.torch import load_file


def clap_golden_dir() -> Path:
    return shared_golden_dir("clap_tiny", "AF2_CLAP_GOLDEN_DIR")


@functools.lru_cache(maxsize=1)
def expected() -> dict:
    return load_file(str(clap_golden_dir() / "expected.safetensors"))


@functools.lru_cache(maxsize=1)
def expected_json() -> dict:
    return json.loads((clap_golden_dir() / "expected.json").read_text(encoding="utf-8"))


def clip_names() -> list[str]:
    """The golden clips, in the order the original processed them (one call)."""
    return list(expected_json()["clips"])


def checkpoint_path() -> Path:
    return clap_golden_dir() / expected_json()["files"]["checkpoint"]


def t5_dir() -> Path:
    return clap_golden_dir() / expected_json()["files"]["t5_stand_in"]


def clip_index(longer: bool) -> int:
    """The first clip the fusion branch cropped (``longer``) or did not."""
    fusion = expected_json()["fusion"]
    found = [i for i, name in enumerate(clip_names()) if (fusion[name]["fusion_choice"] is not None) == longer]
    assert found, f"the golden set has no clip with longer={longer}"
    return found[0]


def labels() -> list[str]:
    return json.loads((clap_golden_dir() / "labels.json").read_text(encoding="utf-8"))


def clip_paths() -> list[str]:
    info = expected_json()["clips"]
    return [str(clap_golden_dir() / "audio" / info[name]["file"]) for name in clip_names()]


def recorded_crops() -> list[tuple[int, int, int] | None]:
    """The fusion crops the original drew (``None`` for clips the fusion branch did not crop)."""
    crops = []
    for name in clip_names():
        choice = expected_json()["fusion"][name]["fusion_choice"]
        crops.append(None if choice is None else (choice["idx_front"], choice["idx_middle"], choice["idx_back"]))
    return crops


def fusion_seed() -> int:
    return expected_json()["seeds"]["np_random_fusion"]


@functools.lru_cache(maxsize=1)
def converted_clap_dir() -> Path:
    """The golden release checkpoint converted once per test session."""
    from af2_hf.convert_afclap import convert_afclap_checkpoint

    out = Path(tempfile.mkdtemp(prefix="afclap_tiny_")) / "converted"
    convert_afclap_checkpoint(checkpoint_path(), t5_dir(), out, verbose=False)
    return out


@functools.lru_cache(maxsize=1)
def load_model():
    from af2_hf import AFClapModel

    return AFClapModel.from_pretrained(converted_clap_dir()).eval()


@functools.lru_cache(maxsize=1)
def load_processor():
    from af2_hf import AFClapProcessor

    return AFClapProcessor.from_pretrained(converted_clap_dir())


def max_norm_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """The README's relative error: max |actual - reference| / max |reference|."""
    actual, reference = actual.detach().double(), reference.detach().double()
    return ((actual - reference).abs().max() / reference.abs().max()).item()


def mel_errors(actual: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max dB error where the reference is above -60 dB, max dB error elsewhere)."""
    diff = (actual.double() - reference.double()).abs()
    loud = reference > -60
    return diff[loud].max().item(), (diff[~loud].max().item() if (~loud).any() else 0.0)


# The README's suggested checks for a float32 port.
MEL_DB_TOLERANCE_LOUD = 0.05
MEL_DB_TOLERANCE_QUIET = 0.2
RELATIVE_TOLERANCE = 1e-4
