"""``af2-hf example-audio OUT.wav``: writes the bundled 3-second example clip (``af2_hf.example_clip``), so that the
quick start works anywhere the package is installed."""

from __future__ import annotations

from pathlib import Path

from ..cli import CliError


def add_arguments(parser) -> None:
    parser.add_argument("output", help="WAV file to write, e.g. ./example.wav")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")


def run(args) -> int:
    from ..example_clip import SECONDS, write_example_clip

    output = Path(args.output)
    if output.is_dir():
        raise CliError(f"{args.output!r} is a folder; pass a file name such as {str(output / 'example.wav')!r}.")
    if output.exists() and not args.overwrite:
        raise CliError(f"{args.output!r} already exists (--overwrite replaces it).")
    print(f"Wrote the {SECONDS}-second example clip (16 kHz mono: a tone, a chirp, noise bursts) to "
          f"{write_example_clip(output)}.")
    return 0
