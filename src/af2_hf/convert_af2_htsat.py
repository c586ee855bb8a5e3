"""The AF-CLAP audio encoder (HTSAT) of an original checkpoint -> transformers' ``ClapAudioModel``: its config from
the weight shapes alone (:func:`build_clap_audio_config`) and its key-rename rules (:func:`convert_htsat_state_dict`).

Used by the Audio Flamingo 2 converter (:mod:`af2_hf.convert_af2`) and the AF-CLAP converter.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch

from .convert_af2_report import ConversionError, ConversionReport

__all__ = ["UNUSED_HTSAT_FAMILIES", "build_clap_audio_config", "convert_htsat_state_dict"]

# HTSAT weights that the original never uses in AF2 (prefixes relative to the HTSAT module).
UNUSED_HTSAT_FAMILIES = OrderedDict(
    [
        ("spectrogram_extractor.", "torchlibrosa STFT of HTSAT; AF2 computes the log-mel itself (CLAP.get_mel)"),
        ("logmel_extractor.", "torchlibrosa mel filterbank of HTSAT; AF2 computes the log-mel itself"),
        ("patch_embed.fusion_model.", "AFF fusion branch; never taken (every window is exactly 10 s, longer=False)"),
        ("patch_embed.mel_conv2d.", "fusion-branch conv; never taken (longer=False)"),
        ("tscam_conv.", "AudioSet token-semantic classification conv; its output is discarded"),
        ("head.", "AudioSet classification head; unused"),
    ]
)


DEFAULT_SPEC_SIZE = 256  # the original's create_htsat_model hard-codes spec_size=256
DEFAULT_HTSAT_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm default, as in the original HTSAT
DEFAULT_HTSAT_DROP_PATH_RATE = 0.1  # HTSAT_Swin_Transformer default (training only)

# ----------------------------------------------------------------------------------------------------------------
# HTSAT (AF-CLAP) -> transformers' ClapAudioModel
# ----------------------------------------------------------------------------------------------------------------

_HTSAT_BLOCK_RENAMES = (
    ("attn.proj.", "attention.output.dense."),
    ("attn.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("attn.relative_position_index", "attention.self.relative_position_index"),
    ("norm1.", "layernorm_before."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)


def _stage_block_indices(htsat: dict[str, torch.Tensor]) -> dict[int, list[int]]:
    stages: dict[int, set[int]] = {}
    for key in htsat:
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            stages.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        else:
            m = re.match(r"layers\.(\d+)\.", key)
            if m:
                stages.setdefault(int(m.group(1)), set())
    return {s: sorted(b) for s, b in sorted(stages.items())}


def _require(htsat: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in htsat:
        raise ConversionError(f"HTSAT weight '{key}' is missing from both safe_ckpt and clap_ckpt.")
    return htsat[key]


def _windows_per_side(attn_mask: torch.Tensor) -> int:
    n = int(round(math.sqrt(attn_mask.shape[0])))
    if n * n != attn_mask.shape[0]:
        raise ConversionError(f"HTSAT attn_mask with {attn_mask.shape[0]} windows is not a square grid.")
    return n


def _stage_shapes(htsat: dict[str, torch.Tensor], stages: dict[int, list[int]], embed_dim: int):
    """``(depths, heads, window sizes, MLP ratios)`` per stage, from the blocks' bias tables and MLP weights."""
    depths, heads, window_sizes, mlp_ratios = [], [], [], []
    for s, blocks in stages.items():
        if blocks != list(range(len(blocks))) or not blocks:
            raise ConversionError(f"HTSAT stage {s} has blocks {blocks}; expected 0..n-1.")
        depths.append(len(blocks))
        width = embed_dim * 2**s
        stage_heads, stage_windows, stage_ratios = set(), set(), set()
        for b in blocks:
            prefix = f"layers.{s}.blocks.{b}."
            table = _require(htsat, prefix + "attn.relative_position_bias_table")
            side = int(round(math.sqrt(table.shape[0])))
            if side * side != table.shape[0] or side % 2 == 0:
                raise ConversionError(f"{prefix}attn.relative_position_bias_table has {table.shape[0]} rows, "
                                      "not (2w-1)^2.")
            stage_windows.add((side + 1) // 2)
            stage_heads.add(int(table.shape[1]))
            fc1 = _require(htsat, prefix + "mlp.fc1.weight")
            if fc1.shape[1] != width:
                raise ConversionError(f"{prefix}mlp.fc1.weight has input width {fc1.shape[1]}, expected {width} "
                                      f"(patch width {embed_dim} doubled per stage).")
            stage_ratios.add(fc1.shape[0] / fc1.shape[1])
        if len(stage_heads) != 1 or len(stage_ratios) != 1:
            raise ConversionError(f"HTSAT stage {s} mixes head counts {stage_heads} or MLP ratios {stage_ratios}.")
        heads.append(stage_heads.pop())
        window_sizes.append(stage_windows)
        mlp_ratios.append(stage_ratios.pop())
    return depths, heads, window_sizes, mlp_ratios


def _patch_stride(htsat: dict[str, torch.Tensor], stage0_blocks: list[int], window_size: int, spec_size: int,
                  patch_size: int) -> int:
    """Not visible in the conv weight. The stage-0 shift mask (when stored) holds one entry per window of the
    (spec_size / stride)^2 patch grid; otherwise the original's stride equals the patch size (4 / (4, 4))."""
    mask_key = next((k for k in (f"layers.0.blocks.{b}.attn_mask" for b in stage0_blocks) if k in htsat), None)
    if mask_key is None:
        return patch_size
    grid = _windows_per_side(htsat[mask_key]) * window_size
    if spec_size % grid != 0:
        raise ConversionError(f"Stage-0 patch grid {grid} does not divide spec_size {spec_size}.")
    return spec_size // grid


def build_clap_audio_config(htsat: dict[str, torch.Tensor], spec_size: int = DEFAULT_SPEC_SIZE):
    """A ``ClapAudioConfig`` for the HTSAT weights ``htsat`` (keys relative to the HTSAT module), from shapes alone."""
    from transformers import ClapAudioConfig

    proj = _require(htsat, "patch_embed.proj.weight")
    embed_dim, in_chans, patch_h, patch_w = proj.shape
    if patch_h != patch_w:
        raise ConversionError(f"Non-square HTSAT patch {patch_h}x{patch_w} is not supported by ClapAudioModel.")
    patch_size = int(patch_h)
    num_mel_bins = int(_require(htsat, "bn0.weight").shape[0])

    stages = _stage_block_indices(htsat)
    if list(stages) != list(range(len(stages))) or not stages:
        raise ConversionError(f"HTSAT stages are not numbered 0..n-1: {list(stages)}")
    depths, heads, window_sizes, mlp_ratios = _stage_shapes(htsat, stages, embed_dim)
    # Window size: the bias tables of a stage whose resolution is at most the window are still built for the
    # configured window (the original shrinks the window at run time only), so every stage carries the same size.
    all_windows = set().union(*window_sizes)
    if len(all_windows) != 1:
        raise ConversionError(f"HTSAT window sizes differ between blocks: {sorted(all_windows)}")
    window_size = all_windows.pop()
    if len(set(mlp_ratios)) != 1:
        raise ConversionError(f"HTSAT MLP ratios differ between stages: {mlp_ratios}")
    mlp_ratio = mlp_ratios[0]

    patch_stride = _patch_stride(htsat, stages[0], window_size, spec_size, patch_size)

    num_layers = len(depths)
    hidden_size = embed_dim * 2 ** (num_layers - 1)
    norm = _require(htsat, "norm.weight")
    if norm.shape[0] != hidden_size:
        raise ConversionError(f"HTSAT final norm width {norm.shape[0]} != {embed_dim} * 2**{num_layers - 1}.")

    qkv_bias = "layers.0.blocks.0.attn.qkv.bias" in htsat
    patch_norm = "patch_embed.norm.weight" in htsat
    config = ClapAudioConfig(
        spec_size=spec_size,
        num_mel_bins=num_mel_bins,
        patch_embed_input_channels=int(in_chans),
        patch_size=patch_size,
        patch_stride=[patch_stride, patch_stride],
        patch_embeds_hidden_size=int(embed_dim),
        depths=depths,
        num_attention_heads=heads,
        window_size=int(window_size),
        mlp_ratio=float(mlp_ratio),
        qkv_bias=qkv_bias,
        enable_patch_layer_norm=patch_norm,
        enable_fusion=False,
        fusion_type=None,
        hidden_size=int(hidden_size),
        hidden_act="gelu",
        layer_norm_eps=DEFAULT_HTSAT_LAYER_NORM_EPS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=DEFAULT_HTSAT_DROP_PATH_RATE,
    )
    if config.spec_size % config.num_mel_bins != 0:
        raise ConversionError(f"spec_size {spec_size} is not a multiple of the {num_mel_bins} mel bins.")
    return config


def _hf_shift_mask(config, stage: int, block: int) -> torch.Tensor | None:
    """The shifted-window mask that transformers' ClapAudioLayer builds at run time for ``(stage, block)``."""
    from transformers.models.clap.modeling_clap import ClapAudioLayer

    grid = config.spec_size // config.patch_stride[0] // 2**stage
    width = config.patch_embeds_hidden_size * 2**stage
    shift = 0 if block % 2 == 0 else config.window_size // 2
    layer = ClapAudioLayer(config, width, (grid, grid), config.num_attention_heads[stage], shift_size=shift)
    layer.set_shift_and_window_size((grid, grid))
    return layer.get_attn_mask(grid, grid, dtype=torch.float32, device="cpu")


def _hf_relative_position_index(config, stage: int) -> torch.Tensor:
    from transformers.models.clap.modeling_clap import ClapAudioSelfAttention

    width = config.patch_embeds_hidden_size * 2**stage
    attention = ClapAudioSelfAttention(config, width, config.num_attention_heads[stage], config.window_size)
    return attention.create_relative_position_index()


def convert_htsat_state_dict(
    htsat: dict[str, torch.Tensor],
    config,
    prefix: str = "",
    report: ConversionReport | None = None,
    origins: dict[str, str] | None = None,
    unmapped: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Map HTSAT keys (relative to the HTSAT module) to ``ClapAudioModel`` keys (prefixed with ``prefix``).

    Drops the documented unused families, checks the non-persistent buffers of the original (``attn_mask``) against
    what transformers computes, and raises :class:`ConversionError` on any other key it cannot place (or appends it to
    ``unmapped`` when a list is given).
    """
    report = report if report is not None else ConversionReport()
    origins = origins or {}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in htsat.items():
        origin = origins.get(key, "htsat")
        family = next((f for f in UNUSED_HTSAT_FAMILIES if key.startswith(f)), None)
        if family is not None:
            report.drop(f"HTSAT {family}* ({UNUSED_HTSAT_FAMILIES[family]})", key)
            continue

        target: list[tuple[str, torch.Tensor]] = []
        if key.startswith("bn0."):
            target = [("audio_encoder.batch_norm." + key[len("bn0."):], tensor)]
        elif re.fullmatch(r"patch_embed\.(proj|norm)\.(weight|bias)", key):
            target = [("audio_encoder." + key, tensor)]
        elif re.fullmatch(r"norm\.(weight|bias)", key):
            target = [("audio_encoder." + key, tensor)]
        elif re.fullmatch(r"layers\.\d+\.downsample\.(reduction|norm)\.(weight|bias)", key):
            target = [("audio_encoder." + key, tensor)]
        elif (m := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.attn_mask", key)) is not None:
            expected = _hf_shift_mask(config, int(m.group(1)), int(m.group(2)))
            if expected is None or expected.shape != tensor.shape or not torch.equal(expected, tensor.float()):
                raise ConversionError(f"HTSAT buffer {key} differs from the shifted-window mask transformers builds.")
            report.drop("HTSAT layers.*.blocks.*.attn_mask (buffer recomputed by ClapAudioModel; verified equal)",
                        key)
            continue
        elif (m := re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index", key)) is not None:
            expected = _hf_relative_position_index(config, int(m.group(1)))
            if expected.shape != tensor.shape or not torch.equal(expected, tensor.long()):
                raise ConversionError(f"HTSAT buffer {key} differs from the relative position index of transformers.")
            native = f"audio_encoder.layers.{m.group(1)}.blocks.{m.group(2)}.attention.self.relative_position_index"
            target = [(native, tensor)]
        elif (m := re.fullmatch(r"(layers\.\d+\.blocks\.\d+)\.attn\.qkv\.(weight|bias)", key)) is not None:
            base, kind = m.group(1), m.group(2)
            if tensor.shape[0] % 3 != 0:
                raise ConversionError(f"{key} has {tensor.shape[0]} rows, not a multiple of 3.")
            q, k, v = tensor.chunk(3, dim=0)
            target = [
                (f"audio_encoder.{base}.attention.self.{name}.{kind}", part.clone())
                for name, part in (("query", q), ("key", k), ("value", v))
            ]
        elif (m := re.fullmatch(r"(layers\.\d+\.blocks\.\d+)\.(.+)", key)) is not None:
            base, rest = m.group(1), m.group(2)
            for old, new in _HTSAT_BLOCK_RENAMES:
                if rest.startswith(old):
                    target = [(f"audio_encoder.{base}.{new}{rest[len(old):]}", tensor)]
                    break
        if not target:
            unknown.append(key)
            continue
        for native, value in target:
            out[prefix + native] = value
            report.sources[prefix + native] = f"{origin}:{key}"
    if unknown and unmapped is not None:
        unmapped.extend(f"HTSAT {k} (from {origins.get(k, 'htsat')})" for k in unknown)
    elif unknown:
        raise ConversionError("Unmapped HTSAT keys (not a documented unused family): " + ", ".join(sorted(unknown)))
    return out

