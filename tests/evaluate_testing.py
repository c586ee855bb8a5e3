"""A tiny evaluation workspace shared by the evaluation tests: a tiny random AF2, clips of different lengths, one
broken file, and a manifest mixing multiple-choice, open, caption and unlabelled rows over two tasks."""

import json
from pathlib import Path

import soundfile as sf

from test_training import make_tiny_af2, tone

ROWS = [
    {"task": "sounds", "prompt": "Is this a tone?", "answer": "B", "choices": ["no", "yes"], "seconds": 0.4},
    {"task": "sounds", "prompt": "What plays?", "answer": "a sine tone", "seconds": 1.3},
    {"task": "captions", "prompt": "Describe the audio.", "references": ["a tone plays", "a steady sine tone"],
     "seconds": 0.9},
    {"task": "sounds", "prompt": "How many tones?", "answer": "one", "choices": ["one", "two"], "broken": True},
    {"task": "captions", "prompt": "Describe the sound.", "references": ["a high tone"], "seconds": 1.7},
    {"task": "sounds", "prompt": "Is it loud?", "answer": "no", "seconds": 0.6},
    {"task": "unlabelled", "prompt": "What is it?", "seconds": 1.1},
]


def make_workspace(root: Path) -> Path:
    """Writes ``model/``, ``clips/`` and ``eval.jsonl`` under ``root``; returns the manifest path."""
    make_tiny_af2(root / "model")
    (root / "clips").mkdir(parents=True, exist_ok=True)
    manifest = root / "eval.jsonl"
    with open(manifest, "w") as handle:
        for index, row in enumerate(ROWS):
            path = root / "clips" / f"{index}.wav"
            if row.get("broken"):
                path.write_bytes(b"RIFF....WAVEfmt this is not audio")
            else:
                sf.write(path, tone(200.0 * (index + 1), seconds=row["seconds"]), 16000)
            entry = {key: value for key, value in row.items() if key not in ("seconds", "broken")}
            handle.write(json.dumps({"audio": f"clips/{index}.wav", **entry}) + "\n")
    return manifest


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_summary(output: Path) -> dict:
    return json.loads(Path(output).with_name(Path(output).stem + ".summary.json").read_text())
