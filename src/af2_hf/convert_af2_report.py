"""What the Audio Flamingo 2 converter did, and how it fails: :class:`ConversionReport` (every native tensor's source,
what was dropped or overridden, the input files used) and :class:`ConversionError`.

Shared by the converter's steps (:mod:`af2_hf.convert_af2`, :mod:`af2_hf.convert_af2_htsat`,
:mod:`af2_hf.convert_af2_release`) and the AF-CLAP converter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ConversionError", "ConversionReport", "StateWriter"]


class ConversionError(ValueError):
    """The original checkpoint cannot be converted faithfully (unknown keys, inconsistent shapes, ...)."""


@dataclass
class ConversionReport:
    """What the converter did: where every native tensor came from and what was dropped or overridden."""

    sources: dict[str, str] = field(default_factory=dict)  # native key -> description of its source
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> original keys
    overridden: list[str] = field(default_factory=list)  # notes on tensors written by more than one source
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # every source resolved and file read, in reading order

    def drop(self, reason: str, key: str) -> None:
        self.dropped.setdefault(reason, []).append(key)

    def summary(self) -> str:
        lines = ["Audio Flamingo 2 conversion summary", "=" * 36]
        counts: dict[str, int] = {}
        for source in self.sources.values():
            origin = source.split(":", 1)[0]
            counts[origin] = counts.get(origin, 0) + 1
        if self.inputs:
            lines.append("inputs used:")
            lines.extend(f"  {entry}" for entry in self.inputs)
        lines.append(f"native tensors: {len(self.sources)}")
        for origin, n in sorted(counts.items()):
            lines.append(f"  from {origin}: {n}")
        if self.dropped:
            lines.append("dropped (documented unused families):")
            for reason, keys in self.dropped.items():
                lines.append(f"  {len(keys):5d}  {reason}")
        if self.overridden:
            lines.append(f"tensors written by more than one source (last one wins, as in the original): "
                         f"{len(self.overridden)}")
        for note in self.notes:
            lines.append(f"note: {note}")
        for warning in self.warnings:
            lines.append(f"WARNING: {warning}")
        return "\n".join(lines)


class StateWriter:
    """Native tensors in the order the original writes them: a later write replaces an earlier one."""

    def __init__(self, report: ConversionReport):
        self.state: dict[str, torch.Tensor] = {}
        self.report = report

    def put(self, key: str, tensor: torch.Tensor, source: str, expect_equal: bool = False) -> None:
        previous = self.state.get(key)
        if previous is not None:
            prior = self.report.sources.get(key, "?")
            same = previous.shape == tensor.shape and torch.equal(previous.float(), tensor.float())
            if expect_equal and not same:
                diff = ((previous.float() - tensor.float()).abs().max().item()
                        if previous.shape == tensor.shape else f"shapes {tuple(previous.shape)} vs {tuple(tensor.shape)}")
                self.report.warnings.append(
                    f"{key}: {source} differs from {prior} (max abs diff {diff}); {source} is used because the "
                    "original loads it last."
                )
            if not same:
                self.report.overridden.append(f"{key}: {prior} -> {source}")
        self.state[key] = tensor
        self.report.sources[key] = source

