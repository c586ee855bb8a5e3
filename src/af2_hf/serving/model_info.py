"""The model's name and licence, as ``af2-hf serve`` lists it and ``af2-hf demo`` shows it.

The licence comes from the model card (``README.md`` front matter: ``license``, ``license_name``, ``license_link``)
of a local folder or Hub repo; a tiny random model of ``af2-hf make-tiny`` says so; a folder without a card gets the licence of
the Audio Flamingo 2 releases it was converted from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelInfo", "RELEASE_LICENCE", "describe_model"]

RELEASE_LICENCE = (
    "No model card in the folder. Weights converted from an Audio Flamingo 2 release keep its licence: the NVIDIA "
    "OneWay Noncommercial License (non-commercial use only), and the licence of the Qwen2.5 base model."
)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    licence: str
    random_weights: bool


def _card_licence(reference: str) -> str | None:
    from huggingface_hub import ModelCard

    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "README.md").is_file():
            return None
        source = path / "README.md"
    else:
        source = reference  # a Hub repo: its card, when the Hub can be reached
    try:
        data = ModelCard.load(source).data
    except (OSError, ValueError):
        return None
    parts = [str(value) for value in (data.get("license_name") or data.get("license"), data.get("license_link")) if value]
    return " - ".join(parts) or None


def describe_model(reference: str, random_weights: bool) -> ModelInfo:
    """Name and licence of the model at ``reference`` (a folder or a Hub id) for display."""
    path = Path(reference).expanduser()
    name = path.resolve().name if path.is_dir() else reference
    if random_weights:
        licence = "None: tiny RANDOM weights made by `af2-hf make-tiny` (its answers are noise)."
    else:
        licence = _card_licence(reference) or RELEASE_LICENCE
    return ModelInfo(name=name, licence=licence, random_weights=random_weights)
