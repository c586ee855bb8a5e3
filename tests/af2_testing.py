"""Shared helpers for the test-suite: the golden folder, the converted tiny checkpoint and small random models.

The golden data lives beside the checkout (``../shared/golden/tiny``); ``AF2_GOLDEN_DIR`` may point elsewhere. A
missing golden folder is an error, never a skip."""

import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_golden_dir(name: str, env_var: str) -> Path:
    """``../shared/golden/<name>`` beside the checkout (or ``$env_var``); raises if its ``expected.safetensors`` /
    ``expected.json`` are missing, so the tests fail instead of skipping."""
    path = Path(os.environ.get(env_var, REPO_ROOT.parent / "shared" / "golden" / name))
    if not (path / "expected.safetensors").is_file() or not (path / "expected.json").is_file():
        raise FileNotFoundError(
            f"Golden data not found at {path}: the tests need ../shared/golden/{name} beside the checkout "
            f"(or {env_var})."
        )
    return path


def golden_dir() -> Path:
    return shared_golden_dir("tiny", "AF2_GOLDEN_DIR")


@functools.lru_cache(maxsize=1)
def golden_tensors() -> dict:
    return load_file(str(golden_dir() / "expected.safetensors"))


@functools.lru_cache(maxsize=1)
def converted_tiny_dir() -> Path:
    """The golden original checkpoint converted once per test session (float32)."""
    from af2_hf.convert_af2 import convert_af2_checkpoint

    out = Path(tempfile.mkdtemp(prefix="af2_tiny_")) / "converted"
    convert_af2_checkpoint(golden_dir() / "original", golden_dir() / "base_lm", out, dtype="float32")
    return out


@functools.lru_cache(maxsize=None)
def load_converted_model(attn_implementation: str = "sdpa"):
    from af2_hf import AudioFlamingo2ForConditionalGeneration

    model = AudioFlamingo2ForConditionalGeneration.from_pretrained(
        converted_tiny_dir(), attn_implementation=attn_implementation
    )
    return model.eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).norm() / expected.norm()).item()


def tiny_config(**overrides):
    """A small random AF2 config (HTSAT with 32-wide patches, a 3-layer Qwen2) built from scratch."""
    from af2_hf import AudioFlamingo2Config

    kwargs = dict(
        audio_config=dict(
            patch_embeds_hidden_size=16, depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 4], enable_fusion=False
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512,
        ),
        audio_transformer_num_layers=2, audio_transformer_num_heads=2, audio_transformer_intermediate_size=64,
        cross_attention_num_heads=2, cross_attention_head_dim=16,
        audio_token_id=116, end_of_chunk_token_id=117, pad_token_id=118, sep_token_id=119, eos_token_id=115,
    )
    for key, value in overrides.items():
        if key in ("audio_config", "text_config"):
            kwargs[key] = {**kwargs[key], **value}
        else:
            kwargs[key] = value
    return AudioFlamingo2Config(**kwargs)


def random_model(seed: int = 0, open_gates: bool = True, **overrides):
    from af2_hf import AudioFlamingo2ForConditionalGeneration

    torch.manual_seed(seed)
    model = AudioFlamingo2ForConditionalGeneration(tiny_config(**overrides)).eval()
    if open_gates:  # fresh gates are 0 (the LM ignores the audio); open them so tests see the audio path
        with torch.no_grad():
            for block in model.model.cross_attention_layers:
                block.attn_gate.fill_(0.7)
                block.ff_gate.fill_(0.4)
    return model


def random_features(batch: int, windows: int, seed: int = 0, mel_bins: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, windows, 1001, mel_bins, generator=generator) * 15 - 45


def edited_weights_copy(source: Path, target: Path, edit) -> Path:
    """A copy of the saved model folder ``source`` at ``target`` whose ``model.safetensors`` state dict went
    through ``edit(state)`` (which changes it in place)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    state = load_file(str(source / "model.safetensors"))
    edit(state)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target
