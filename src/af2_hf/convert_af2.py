"""Convert an original Audio Flamingo 2 release into the native Hugging Face format.

An original release (``nvidia/audio-flamingo-2`` and its siblings) holds

* ``safe_ckpt/metadata.json`` (the chunk names, in load order) and ``safe_ckpt/<chunk>.safetensors``,
* ``clap_ckpt/*.pt`` (a LAION-CLAP training checkpoint; only its ``module.audio_branch.*`` HTSAT part is used),
* ``configs/*.yaml`` (the original training/inference configuration),

while the language model and its tokenizer come from the base Qwen2.5 repository. The original builds its model
in this order: HTSAT from ``clap_ckpt``, the LM from the base repository, ``resize_token_embeddings(len(tokenizer))``
after adding the AF2 special tokens, then ``load_state_dict(safe_ckpt, strict=False)``. Where two sources write the
same parameter the last one wins; the converter reproduces that order and reports every disagreement.

Every hyper-parameter is derived from the checkpoint shapes, except what shapes cannot tell (audio-transformer
heads, window settings), which comes from the release yaml. Only documented, unused weight families are dropped;
any other key the converter cannot place is an error.

Use :func:`convert_af2_checkpoint` to write a converted model, or :func:`build_native_checkpoint` to get the config,
the native state dict and the report without writing anything.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# ----------------------------------------------------------------------------------------------------------------
# Key families
# ----------------------------------------------------------------------------------------------------------------

SAFE_HTSAT_PREFIX = "clap.nvclap."
CLAP_CKPT_AUDIO_PREFIXES = ("module.audio_branch.", "audio_branch.")

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

# Entries of the LAION-CLAP checkpoint outside the audio branch: the CLAP text tower and the contrastive heads.
UNUSED_CLAP_CKPT_FAMILIES = OrderedDict(
    [
        ("text_branch.", "CLAP text encoder; unused by AF2"),
        ("text_transform.", "CLAP text projection MLP; unused by AF2"),
        ("text_projection.", "CLAP text projection; unused by AF2"),
        ("audio_transform.", "CLAP audio projection MLP; unused by AF2"),
        ("audio_projection.", "CLAP audio projection; unused by AF2 (the original loads it and ignores it)"),
        ("logit_scale_a", "CLAP contrastive temperature; unused by AF2"),
        ("logit_scale_t", "CLAP contrastive temperature; unused by AF2"),
    ]
)

DEFAULT_SPEC_SIZE = 256  # the original's create_htsat_model hard-codes spec_size=256
DEFAULT_HTSAT_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm default, as in the original HTSAT
DEFAULT_HTSAT_DROP_PATH_RATE = 0.1  # HTSAT_Swin_Transformer default (training only)
DEFAULT_CROSS_ATTENTION_HEAD_DIM = 64  # GatedCrossAttentionBlock(dim_head=64), not exposed in the yaml


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

    def drop(self, reason: str, key: str) -> None:
        self.dropped.setdefault(reason, []).append(key)

    def summary(self) -> str:
        lines = ["Audio Flamingo 2 conversion summary", "=" * 36]
        counts: dict[str, int] = {}
        for source in self.sources.values():
            origin = source.split(":", 1)[0]
            counts[origin] = counts.get(origin, 0) + 1
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

    # Window size: the bias tables of a stage whose resolution is at most the window are still built for the
    # configured window (the original shrinks the window at run time only), so every stage carries the same size.
    all_windows = set().union(*window_sizes)
    if len(all_windows) != 1:
        raise ConversionError(f"HTSAT window sizes differ between blocks: {sorted(all_windows)}")
    window_size = all_windows.pop()
    if len(set(mlp_ratios)) != 1:
        raise ConversionError(f"HTSAT MLP ratios differ between stages: {mlp_ratios}")
    mlp_ratio = mlp_ratios[0]

    # Patch stride: not visible in the conv weight. The stage-0 shift mask (when stored) holds one entry per window
    # of the (spec_size / stride)^2 patch grid; otherwise the original's stride equals the patch size (4 / (4, 4)).
    patch_stride = patch_size
    mask_key = next((k for k in (f"layers.0.blocks.{b}.attn_mask" for b in stages[0]) if k in htsat), None)
    if mask_key is not None:
        grid = _windows_per_side(htsat[mask_key]) * window_size
        if spec_size % grid != 0:
            raise ConversionError(f"Stage-0 patch grid {grid} does not divide spec_size {spec_size}.")
        patch_stride = spec_size // grid

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


# ----------------------------------------------------------------------------------------------------------------
# Reading the original release
# ----------------------------------------------------------------------------------------------------------------

_AF2_ALLOW_PATTERNS = ["safe_ckpt/*", "clap_ckpt/*", "configs/*", "*.yaml", "*.yml"]
_TEXT_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


def resolve_source(path_or_repo: str | os.PathLike, allow_patterns: list[str] | None = None, **hub_kwargs) -> Path:
    """A local directory as is; anything else is taken as a Hub repo id and fetched with ``snapshot_download``."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ConversionError(f"'{text}' is neither a directory nor a Hub repo id.")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=text, allow_patterns=allow_patterns, **hub_kwargs))


def find_release_yaml(af2_dir: Path, config_yaml: str | os.PathLike | None = None) -> Path:
    """The release yaml: ``configs/*.yaml`` (``inference.yaml`` preferred when there are several)."""
    if config_yaml is not None:
        path = Path(config_yaml)
        path = path if path.is_absolute() else af2_dir / path
        if not path.is_file():
            raise ConversionError(f"Release yaml {path} not found.")
        return path
    candidates = sorted((af2_dir / "configs").glob("*.y*ml")) or sorted(af2_dir.glob("*.y*ml"))
    if not candidates:
        raise ConversionError(f"No release yaml (configs/*.yaml) in {af2_dir}; pass config_yaml=.")
    if len(candidates) == 1:
        return candidates[0]
    preferred = [c for c in candidates if c.stem == "inference"]
    if preferred:
        return preferred[0]
    raise ConversionError(f"Several release yamls in {af2_dir}: {[c.name for c in candidates]}; pass config_yaml=.")


def load_release_yaml(path: Path) -> dict:
    import yaml

    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict) or "clap_config" not in data or "model_config" not in data:
        raise ConversionError(f"{path} is not an Audio Flamingo 2 release yaml (no clap_config/model_config).")
    return data


def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit="file")


def load_safe_ckpt(af2_dir: Path, report: ConversionReport, progress: bool = True) -> dict[str, torch.Tensor]:
    """Merge the safe_ckpt chunks in the order of ``metadata.json`` (a later chunk overrides, like dict.update)."""
    from safetensors.torch import load_file

    folder = af2_dir / "safe_ckpt"
    meta = folder / "metadata.json"
    if meta.is_file():
        try:
            with open(meta, encoding="utf-8") as handle:
                names = json.load(handle)
        except (ValueError, OSError) as error:
            raise ConversionError(f"{meta} is not valid JSON: {error}") from error
        if not isinstance(names, list):
            raise ConversionError(f"{meta} is not a JSON list of chunk names.")
        files = [folder / f"{name}.safetensors" for name in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if files:
            report.warnings.append(f"{meta} is missing; read the {len(files)} chunks in name order.")
    if not files:
        raise ConversionError(f"No safe_ckpt chunks found in {folder}.")
    state: dict[str, torch.Tensor] = {}
    for file in _progress(files, "safe_ckpt chunks", progress):
        if not file.is_file():
            raise ConversionError(f"safe_ckpt chunk {file} listed in metadata.json is missing.")
        try:
            chunk = load_file(str(file))
        except Exception as error:  # safetensors raises SafetensorError (not a public subclass of anything useful)
            raise ConversionError(f"safe_ckpt chunk {file} is not a readable safetensors file: {error}") from error
        repeated = sorted(set(chunk) & set(state))
        if repeated:
            report.warnings.append(f"{len(repeated)} keys appear in more than one chunk; {file.name} wins "
                                   f"(e.g. {repeated[0]}).")
        state.update(chunk)
    report.notes.append(f"safe_ckpt: {len(files)} chunks, {len(state)} tensors.")
    return state


def find_clap_ckpt(af2_dir: Path, clap_config: dict) -> Path | None:
    declared = clap_config.get("checkpoint")
    if declared:
        path = Path(declared)
        for candidate in (path if path.is_absolute() else af2_dir / path, af2_dir / "clap_ckpt" / path.name):
            if candidate.is_file():
                return candidate
    found = sorted((af2_dir / "clap_ckpt").glob("*.pt"))
    if len(found) > 1:
        raise ConversionError(f"Several CLAP checkpoints in {af2_dir / 'clap_ckpt'}: {[f.name for f in found]}.")
    return found[0] if found else None


def _load_torch_weights(path: Path, what: str, **kwargs):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never arbitrary pickled objects
    (unpickling those can run code). Every failure becomes a :class:`ConversionError` naming the file."""
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu", **kwargs)
    except pickle.UnpicklingError as error:
        details = [line.strip() for line in str(error).splitlines() if "WeightsUnpickler error" in line]
        raise ConversionError(
            f"Refusing to load {what} {path}: it is not a plain PyTorch weights file. It is read with "
            "torch.load(weights_only=True), which accepts tensors and plain containers only and refuses pickled "
            "arbitrary objects (loading those can run code); it may also be corrupt. Re-save the state dict with "
            "tensors only (torch.save(state_dict) or safetensors)."
            + (f" torch: {details[0]}" if details else "")
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConversionError(f"{what} {path} is not a readable PyTorch checkpoint (corrupt or truncated?): "
                              f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error


def load_clap_ckpt(path: Path, report: ConversionReport, unmapped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """HTSAT tensors (keys relative to HTSAT) of a LAION-CLAP checkpoint; its other entries are dropped or refused.
    The file is read with ``torch.load(weights_only=True)``: a pickled arbitrary object is refused."""
    checkpoint = _load_torch_weights(path, "CLAP checkpoint")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds no state dict.")
    htsat: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        audio_prefix = next((p for p in CLAP_CKPT_AUDIO_PREFIXES if key.startswith(p)), None)
        if audio_prefix is not None:
            htsat[key[len(audio_prefix):]] = tensor
            continue
        bare = key[len("module."):] if key.startswith("module.") else key
        family = next((f for f in UNUSED_CLAP_CKPT_FAMILIES if bare.startswith(f)), None)
        if family is not None:
            report.drop(f"clap_ckpt {family}* ({UNUSED_CLAP_CKPT_FAMILIES[family]})", key)
        else:
            unknown.append(key)
    if unknown and unmapped is not None:
        unmapped.extend(f"{k} ({path.name})" for k in unknown)
    elif unknown:
        raise ConversionError(f"Unmapped keys in {path.name} (not a documented unused CLAP family): "
                              + ", ".join(sorted(unknown)))
    report.notes.append(f"clap_ckpt {path.name}: {len(htsat)} HTSAT tensors.")
    return htsat


def _weight_loaders(folder: Path, progress: bool):
    """``(key, load)`` for every tensor of a Hugging Face model folder; ``load()`` reads that tensor only."""
    from safetensors import safe_open

    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            with open(index, encoding="utf-8") as handle:
                files = [folder / f for f in sorted(set(json.load(handle)["weight_map"].values()))]
        elif (folder / single).is_file():
            files = [folder / single]
        else:
            continue
        for file in _progress(files, "base LM shards", progress):
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as handle:
                    for key in handle.keys():
                        yield key, (lambda h=handle, k=key: h.get_tensor(k))
            else:
                state = _load_torch_weights(file, "base LM weights", mmap=True)
                for key, tensor in state.items():
                    yield key, (lambda t=tensor: t)
        return
    raise ConversionError(f"No model weights (model.safetensors / pytorch_model.bin) in {folder}.")


# ----------------------------------------------------------------------------------------------------------------
# Assembling the native state dict
# ----------------------------------------------------------------------------------------------------------------


class _Writes:
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


_AT_LAYER_RENAMES = {
    "slf_attn.w_qs.weight": "self_attn.query.weight",
    "slf_attn.w_ks.weight": "self_attn.key.weight",
    "slf_attn.w_vs.weight": "self_attn.value.weight",
    "slf_attn.fc.weight": "self_attn.dense.weight",
    "slf_attn.layer_norm.weight": "self_attn_layer_norm.weight",
    "slf_attn.layer_norm.bias": "self_attn_layer_norm.bias",
    "pos_ffn.w_1.weight": "fc1.weight",
    "pos_ffn.w_1.bias": "fc1.bias",
    "pos_ffn.w_2.weight": "fc2.weight",
    "pos_ffn.w_2.bias": "fc2.bias",
    "pos_ffn.layer_norm.weight": "final_layer_norm.weight",
    "pos_ffn.layer_norm.bias": "final_layer_norm.bias",
}

_XATTN_RENAMES = {
    "attn.norm.weight": "attn_norm.weight",
    "attn.norm.bias": "attn_norm.bias",
    "attn.to_q.weight": "to_q.weight",
    "attn.to_kv.weight": "to_kv.weight",
    "attn.to_out.weight": "to_out.weight",
    "attn_gate": "attn_gate",
    "ff.0.weight": "ff_norm.weight",
    "ff.0.bias": "ff_norm.bias",
    "ff.1.weight": "ff_in.weight",
    "ff.3.weight": "ff_out.weight",
    "ff_gate": "ff_gate",
}

# The original registers its decoder layers and cross-attention blocks a second time under these names, so a full
# safe_ckpt may hold a second copy of each (DESIGN §2); the converter only reads these checkpoint key families.
_LM_DUPLICATE_FAMILY = "old_decoder_blocks"
_XATTN_DUPLICATE_FAMILY = "gated_cross_attn_layers_sound"

# safe_ckpt families, in the order in which the original's load_state_dict visits them (a later one wins).
_LM_CANONICAL_LAYER = re.compile(r"lang_encoder\.model\.layers\.(\d+)\.decoder_layer\.(.+)")
_LM_DUPLICATE_LAYER = re.compile(rf"lang_encoder\.{_LM_DUPLICATE_FAMILY}\.(\d+)\.(.+)")
_XATTN_CANONICAL = re.compile(r"lang_encoder\.model\.layers\.(\d+)\.gated_cross_attn_layer_sound\.(.+)")
_XATTN_DUPLICATE = re.compile(rf"lang_encoder\.{_XATTN_DUPLICATE_FAMILY}\.(\d+)\.(.+)")
_AUDIO_TRANSFORMER_LAYER = re.compile(r"audio_transformer_clap\.layer_stack\.(\d+)\.(.+)")


@dataclass
class ConvertedCheckpoint:
    config: Any
    state_dict: dict[str, torch.Tensor]
    report: ConversionReport
    tokenizer: Any
    generation_config: Any
    processor_kwargs: dict[str, Any]
    af2_dir: Path
    text_dir: Path
    release_yaml: dict


def _infer_every_n(layers: list[int], num_layers: int) -> int:
    if not layers:
        raise ConversionError("safe_ckpt holds no gated cross-attention block "
                              "(lang_encoder.model.layers.{i}.gated_cross_attn_layer_sound.*).")
    every_n = layers[0] + 1
    expected = [i for i in range(num_layers) if (i + 1) % every_n == 0]
    if layers != expected:
        raise ConversionError(f"Gated cross-attention blocks sit before decoder layers {layers}, which is not "
                              f"'every n-th layer' of a {num_layers}-layer LM (n={every_n} would give {expected}).")
    return every_n


def _rotary_from_inv_freq(inv_freq: torch.Tensor, report: ConversionReport) -> tuple[int, float]:
    dim = 2 * inv_freq.numel()
    inv = inv_freq.double()

    def reproduce(base: float) -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)).double()

    for base in (4096.0,):
        if torch.allclose(reproduce(base), inv, rtol=1e-6, atol=0):
            return dim, base
    if inv.numel() < 2:
        raise ConversionError("Cannot infer the audio rotary base from a single inv_freq entry.")
    base = float(inv[1] ** (-dim / 2.0))
    if not torch.allclose(reproduce(base), inv, rtol=1e-5, atol=0):
        raise ConversionError("audio_transformer_clap.position_enc.inv_freq is not a rotary frequency sequence.")
    report.notes.append(f"audio rotary base inferred from inv_freq: {base:.6g} (not the default 4096).")
    return dim, base


def _resize_rows(weight: torch.Tensor, rows: int, what: str, report: ConversionReport) -> torch.Tensor:
    """``resize_token_embeddings`` of transformers 4.46: shrinking keeps the first rows; growing appends rows."""
    old = weight.shape[0]
    if rows == old:
        return weight
    if rows < old:
        report.notes.append(f"{what}: {old} -> {rows} rows (shrunk: the first {rows} base rows are kept).")
        return weight[:rows].clone()
    # transformers 4.46 (mean_resizing=True) samples new rows from N(mean, 1e-9 * covariance) of the old rows: the
    # mean up to ~1e-5 noise. The mean itself is used here (deterministic). safe_ckpt always stores the input
    # embedding (filter_state_dict_to_trainable keeps every "embed" parameter), so these rows are overridden anyway.
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    report.notes.append(f"{what}: {old} -> {rows} rows (grown: new rows initialised with the mean of the old rows).")
    return torch.cat([weight, mean.expand(rows - old, -1)], dim=0)


def _resolve_text_model(text_model, release: dict, af2_dir: Path) -> tuple[str | os.PathLike, str | os.PathLike]:
    """The LM and tokenizer sources: ``text_model`` when given, else the yaml's lang_encoder_path/tokenizer_path."""
    if text_model is not None:
        return text_model, text_model
    model_config = release["model_config"]
    out = []
    for field_name in ("lang_encoder_path", "tokenizer_path"):
        value = model_config.get(field_name) or model_config.get("lang_encoder_path")
        if not value:
            raise ConversionError("No text model given and the release yaml names none (lang_encoder_path).")
        local = af2_dir / value
        out.append(local if local.is_dir() else value)
    return out[0], out[1]


def assemble_checkpoint(
    af2_dir: str | os.PathLike,
    text_model: str | os.PathLike | None = None,
    *,
    config_yaml: str | os.PathLike | None = None,
    cross_attention_head_dim: int | None = None,
    progress: bool = True,
    hub_kwargs: dict | None = None,
) -> ConvertedCheckpoint:
    """Read an original release and build everything the native model needs, in memory."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from .configuration_audioflamingo2 import AudioFlamingo2Config
    from .tokenization_audioflamingo2 import prepare_af2_tokenizer

    hub_kwargs = hub_kwargs or {}
    report = ConversionReport()
    af2_dir = resolve_source(af2_dir, _AF2_ALLOW_PATTERNS, **hub_kwargs)
    yaml_path = find_release_yaml(af2_dir, config_yaml)
    release = load_release_yaml(yaml_path)
    clap_config, model_config = release["clap_config"], release["model_config"]
    at_kwargs = model_config.get("audio_transformer_kwargs") or {}
    report.notes.append(f"release yaml: {yaml_path.relative_to(af2_dir) if yaml_path.is_relative_to(af2_dir) else yaml_path}")
    if "common_encoder_embed_dim" in at_kwargs:
        report.notes.append("yaml audio_transformer_kwargs.common_encoder_embed_dim is ignored (as by the original: "
                            "the width is clap_config.audio_embed_dim).")

    text_source, tokenizer_source = _resolve_text_model(text_model, release, af2_dir)
    text_dir = resolve_source(text_source, _TEXT_ALLOW_PATTERNS, **hub_kwargs)
    tokenizer_dir = text_dir if tokenizer_source == text_source else resolve_source(
        tokenizer_source, _TEXT_ALLOW_PATTERNS, **hub_kwargs)

    safe = load_safe_ckpt(af2_dir, report, progress)
    unmapped: list[str] = []  # every key no documented rule places; reported together at the end
    clap_path = find_clap_ckpt(af2_dir, clap_config)
    writes = _Writes(report)

    # ---- AF-CLAP (HTSAT): clap_ckpt first, then safe_ckpt's clap.nvclap.* overrides -----------------------------
    htsat: dict[str, torch.Tensor] = {}
    origins: dict[str, str] = {}
    if clap_path is not None:
        for key, tensor in load_clap_ckpt(clap_path, report, unmapped).items():
            htsat[key], origins[key] = tensor, "clap_ckpt"
    else:
        report.notes.append("no clap_ckpt/*.pt: every HTSAT tensor must come from safe_ckpt.")
    overridden_htsat = 0
    for key in [k for k in safe if k.startswith(SAFE_HTSAT_PREFIX)]:
        rel = key[len(SAFE_HTSAT_PREFIX):]
        if rel in htsat:
            overridden_htsat += 1
        htsat[rel], origins[rel] = safe.pop(key), "safe_ckpt"
    if overridden_htsat:
        report.notes.append(f"{overridden_htsat} HTSAT tensors of clap_ckpt are overridden by safe_ckpt "
                            "(the original loads safe_ckpt last).")
    audio_config = build_clap_audio_config(htsat)
    for key, tensor in convert_htsat_state_dict(htsat, audio_config, "model.audio_tower.", report, origins,
                                                unmapped).items():
        writes.state[key] = tensor  # sources recorded by convert_htsat_state_dict
    del htsat

    width = audio_config.patch_embeds_hidden_size * 2 ** (len(audio_config.depths) - 1)
    declared_width = clap_config.get("audio_embed_dim")
    if declared_width is not None and int(declared_width) != width:
        raise ConversionError(f"yaml clap_config.audio_embed_dim={declared_width} but HTSAT outputs width {width}.")

    # ---- audio transformer --------------------------------------------------------------------------------------
    inv_freq = None
    at_layers: set[int] = set()
    for key in [k for k in safe if k.startswith("audio_transformer_clap.")]:
        tensor = safe.pop(key)
        if key == "audio_transformer_clap.position_enc.inv_freq":
            inv_freq = tensor
            report.drop("audio_transformer_clap.position_enc.inv_freq (rotary buffer; recomputed from the config, "
                        "verified)", key)
            continue
        if key in ("audio_transformer_clap.layer_norm.weight", "audio_transformer_clap.layer_norm.bias"):
            writes.put("model.audio_transformer.input_layernorm." + key.rsplit(".", 1)[1], tensor, f"safe_ckpt:{key}")
            continue
        m = _AUDIO_TRANSFORMER_LAYER.fullmatch(key)
        if m is None or m.group(2) not in _AT_LAYER_RENAMES:
            unmapped.append(key)
            continue
        at_layers.add(int(m.group(1)))
        writes.put(f"model.audio_transformer.layers.{m.group(1)}.{_AT_LAYER_RENAMES[m.group(2)]}", tensor,
                   f"safe_ckpt:{key}")
    if not at_layers:
        raise ConversionError("safe_ckpt holds no audio transformer (audio_transformer_clap.layer_stack.*).")
    at_num_layers = max(at_layers) + 1
    if sorted(at_layers) != list(range(at_num_layers)):
        raise ConversionError(f"Audio transformer layers {sorted(at_layers)} are not 0..n-1.")
    q = writes.state.get("model.audio_transformer.layers.0.self_attn.query.weight")
    fc1 = writes.state.get("model.audio_transformer.layers.0.fc1.weight")
    if q is None or fc1 is None:
        raise ConversionError("Audio transformer layer 0 lacks w_qs or pos_ffn.w_1.")
    if tuple(q.shape) != (width, width):
        raise ConversionError(f"Audio transformer w_qs has shape {tuple(q.shape)}, expected ({width}, {width}).")
    at_intermediate = int(fc1.shape[0])
    if "n_head" not in at_kwargs:
        raise ConversionError("yaml model_config.audio_transformer_kwargs.n_head is required (heads are not "
                              "visible in the weight shapes).")
    at_heads = int(at_kwargs["n_head"])
    for name, found in (("n_layers", at_num_layers), ("d_inner", at_intermediate)):
        if name in at_kwargs and int(at_kwargs[name]) != found:
            raise ConversionError(f"yaml audio_transformer_kwargs.{name}={at_kwargs[name]} but the checkpoint has "
                                  f"{found}.")
    rotary_kwargs: dict[str, Any] = {}
    if inv_freq is not None:
        rotary_dim, rope_theta = _rotary_from_inv_freq(inv_freq, report)
        rotary_kwargs = {"audio_transformer_rotary_dim": rotary_dim, "audio_transformer_rope_theta": rope_theta}
        default_dim = max((width // at_heads) // 2, 32)
        if rotary_dim != default_dim:
            report.notes.append(f"stored inv_freq rotates {rotary_dim} dims per head, not max(head_dim // 2, 32) = "
                                f"{default_dim} for n_head={at_heads}; the stored buffer is what the original uses.")
    else:
        report.notes.append("audio rotary inv_freq not stored: rotary dim/base from the original's defaults.")

    # ---- language model: base repo, resize, then safe_ckpt -------------------------------------------------------
    text_config = AutoConfig.from_pretrained(text_dir)
    tokenizer = prepare_af2_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir))
    vocab = len(tokenizer)
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    embed_key = "model.language_model.embed_tokens.weight"
    head_key = embed_key if tied else "lm_head.weight"

    num_layers = int(text_config.num_hidden_layers)

    # safe_ckpt LM keys in the visit order of the original's load_state_dict: lang_encoder.model.{embed_tokens,
    # layers.i.{gated_cross_attn_layer_sound, decoder_layer}, norm}, lang_encoder.lm_head, then the duplicate
    # families lang_encoder.{_LM_DUPLICATE_FAMILY}.i and lang_encoder.{_XATTN_DUPLICATE_FAMILY}.i. The duplicates are
    # the same modules as the canonical ones, so a full state_dict holds equal copies (they are compared); if a copy
    # differs, the later write (the duplicate) wins, as it does in the original.
    groups = {"model": [], "lm_head": [], _LM_DUPLICATE_FAMILY: [], _XATTN_DUPLICATE_FAMILY: []}
    for key in [k for k in safe if k.startswith("lang_encoder.")]:
        family = key.split(".", 2)[1]
        if family in groups:
            groups[family].append(key)
        else:
            unmapped.append(key)
            safe.pop(key)
    lm_writes: list[tuple[str, str, torch.Tensor, bool]] = []  # (native key, original key, tensor, is duplicate)
    xattn: dict[str, tuple[str, torch.Tensor]] = {}
    duplicates = {_LM_DUPLICATE_FAMILY: 0, _XATTN_DUPLICATE_FAMILY: 0}
    for key in sum(groups.values(), []):
        tensor = safe.pop(key)
        if key == "lang_encoder.model.embed_tokens.weight":
            if tensor.shape[0] != vocab:
                raise ConversionError(f"safe_ckpt embedding has {tensor.shape[0]} rows but the AF2 tokenizer has "
                                      f"{vocab} tokens (the original would fail to load it).")
            lm_writes.append((embed_key, key, tensor, False))
        elif key == "lang_encoder.model.norm.weight":
            lm_writes.append(("model.language_model.norm.weight", key, tensor, False))
        elif key == "lang_encoder.lm_head.weight":
            if tensor.shape[0] != vocab:
                raise ConversionError(f"safe_ckpt lm_head has {tensor.shape[0]} rows, expected {vocab}.")
            # tied: the same parameter as the embedding; the original writes lm_head after embed_tokens
            lm_writes.append((head_key, key, tensor, tied))
        elif (m := _LM_CANONICAL_LAYER.fullmatch(key) or _LM_DUPLICATE_LAYER.fullmatch(key)) is not None:
            duplicate = m.re is _LM_DUPLICATE_LAYER
            duplicates[_LM_DUPLICATE_FAMILY] += duplicate
            if int(m.group(1)) >= num_layers:
                raise ConversionError(f"{key}: layer index beyond the base LM's {num_layers} layers.")
            lm_writes.append((f"model.language_model.layers.{m.group(1)}.{m.group(2)}", key, tensor, duplicate))
        elif (m := _XATTN_CANONICAL.fullmatch(key) or _XATTN_DUPLICATE.fullmatch(key)) is not None:
            if m.group(2) not in _XATTN_RENAMES:
                unmapped.append(key)
                continue
            duplicate = m.re is _XATTN_DUPLICATE
            duplicates[_XATTN_DUPLICATE_FAMILY] += duplicate
            xattn_key = f"{m.group(1)}.{_XATTN_RENAMES[m.group(2)]}"
            if xattn_key in xattn:
                prior_key, prior = xattn[xattn_key]
                if prior.shape != tensor.shape or not torch.equal(prior.float(), tensor.float()):
                    report.warnings.append(f"{key} differs from {prior_key}; {key} is used because the original "
                                           "loads it last.")
            xattn[xattn_key] = (key, tensor)
        else:
            unmapped.append(key)
    for family, count in duplicates.items():
        if count:
            report.notes.append(f"duplicate family lang_encoder.{family}.*: {count} tensors compared with the "
                                "canonical lang_encoder.model.layers.{i}.* copies (equal copies are merged; a "
                                "differing copy wins, as in the original's load order).")

    # Base LM first (tensors that safe_ckpt overrides are not even read), resized like resize_token_embeddings.
    overridden_by_safe = {native for native, _, _, _ in lm_writes}
    skipped = 0
    for key, load in _weight_loaders(text_dir, progress):
        if key.startswith("model."):
            rest = key[len("model."):]
        elif key == "lm_head.weight":
            rest = None
        elif key.split(".", 1)[0] in ("embed_tokens", "layers", "norm"):
            rest = key
        else:
            unmapped.append(f"{key} (base LM)")
            continue
        if rest is not None and rest.endswith("rotary_emb.inv_freq"):
            report.drop("base LM rotary_emb.inv_freq (buffer recomputed by Qwen2)", key)
            continue
        if rest is None and tied:
            report.drop("base LM lm_head.weight (tied to the embedding, as transformers loads it)", key)
            continue
        native = "lm_head.weight" if rest is None else "model.language_model." + rest
        if native in overridden_by_safe:
            skipped += 1
            continue
        writes.put(native, load().float(), f"base_lm:{key}")
    if skipped:
        report.notes.append(f"{skipped} base-LM tensors are overridden by safe_ckpt (not read).")
    if embed_key in writes.state:
        writes.state[embed_key] = _resize_rows(writes.state[embed_key], vocab, "input embedding", report)
    elif embed_key not in overridden_by_safe:
        raise ConversionError("Neither the base LM nor safe_ckpt holds the input embedding.")
    if not tied:
        if "lm_head.weight" in writes.state:
            writes.state["lm_head.weight"] = _resize_rows(writes.state["lm_head.weight"], vocab, "lm_head", report)
        elif "lm_head.weight" not in overridden_by_safe:
            raise ConversionError("The LM is untied but neither the base LM nor safe_ckpt holds lm_head.weight.")
    for native, key, tensor, duplicate in lm_writes:
        writes.put(native, tensor.float(), f"safe_ckpt:{key}", expect_equal=duplicate)

    # ---- gated cross-attention ---------------------------------------------------------------------------------
    xattn_layers = sorted({int(k.split(".", 1)[0]) for k in xattn})
    every_n = _infer_every_n(xattn_layers, num_layers)
    declared_every_n = int(model_config.get("cross_attn_every_n_layers", 1))
    if declared_every_n != every_n:
        raise ConversionError(f"yaml cross_attn_every_n_layers={declared_every_n} but the checkpoint has "
                              f"cross-attention blocks every {every_n} layers ({xattn_layers}).")
    position = {layer: j for j, layer in enumerate(xattn_layers)}
    for xattn_key, (key, tensor) in sorted(xattn.items()):
        layer, name = xattn_key.split(".", 1)
        writes.put(f"model.cross_attention_layers.{position[int(layer)]}.{name}", tensor.float(), f"safe_ckpt:{key}")
    hidden = int(text_config.hidden_size)
    to_q = writes.state.get("model.cross_attention_layers.0.to_q.weight")
    to_kv = writes.state.get("model.cross_attention_layers.0.to_kv.weight")
    ff_in = writes.state.get("model.cross_attention_layers.0.ff_in.weight")
    if to_q is None or to_kv is None or ff_in is None:
        raise ConversionError("The first gated cross-attention block lacks to_q, to_kv or ff.1.")
    # GatedCrossAttentionBlock is built with its default dim_head=64 (the yaml has no setting for it)
    head_dim = int(cross_attention_head_dim or DEFAULT_CROSS_ATTENTION_HEAD_DIM)
    inner = int(to_q.shape[0])
    if inner % head_dim != 0:
        raise ConversionError(f"Cross-attention width {inner} is not a multiple of head_dim {head_dim}.")
    if to_q.shape[1] != hidden or to_kv.shape != (2 * inner, width):
        raise ConversionError(f"Cross-attention shapes to_q {tuple(to_q.shape)} / to_kv {tuple(to_kv.shape)} do not "
                              f"match LM width {hidden} and audio width {width}.")
    if ff_in.shape[0] % hidden != 0:
        raise ConversionError(f"Cross-attention FFN width {ff_in.shape[0]} is not a multiple of {hidden}.")

    # ---- leftovers ---------------------------------------------------------------------------------------------
    unmapped.extend(sorted(safe))
    if unmapped:
        raise ConversionError(f"{len(unmapped)} keys are not mapped and not a documented unused family; nothing "
                              "was converted: " + ", ".join(sorted(unmapped)))

    # ---- config ------------------------------------------------------------------------------------------------
    embed_rows = writes.state[embed_key].shape[0]
    text_config.vocab_size = int(embed_rows)
    text_config._name_or_path = ""  # no local path of the conversion machine in the written config
    grid = audio_config.spec_size // audio_config.patch_stride[0] // 2 ** (len(audio_config.depths) - 1)
    special = {
        "audio_token_id": tokenizer.convert_tokens_to_ids("<audio>"),
        "end_of_chunk_token_id": tokenizer.convert_tokens_to_ids("<|endofchunk|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = AudioFlamingo2Config(
        audio_config=audio_config.to_dict(),
        text_config=text_config.to_dict(),
        audio_transformer_num_layers=at_num_layers,
        audio_transformer_num_heads=at_heads,
        audio_transformer_intermediate_size=at_intermediate,
        cross_attention_every_n_layers=every_n,
        cross_attention_num_heads=inner // head_dim,
        cross_attention_head_dim=head_dim,
        cross_attention_ff_mult=int(ff_in.shape[0] // hidden),
        tokens_per_window=int(grid * grid),
        **rotary_kwargs,
        **special,
    )
    if config.cross_attention_layers != xattn_layers:
        raise ConversionError(f"Config places cross-attention before {config.cross_attention_layers}, checkpoint "
                              f"before {xattn_layers}.")
    if tied:
        writes.state["lm_head.weight"] = writes.state[embed_key]
        report.sources["lm_head.weight"] = f"tied:{embed_key}"

    # ---- generation and processing defaults --------------------------------------------------------------------
    try:
        generation_config = GenerationConfig.from_pretrained(text_dir)
    except OSError:
        generation_config = GenerationConfig()
    # The release's inference.py samples with top_k 30 / top_p 0.95 and max_new_tokens 256, stopping at the
    # tokenizer's eos; its benchmarks decode greedily (pass do_sample=False).
    generation_config.update(
        do_sample=True, top_k=30, top_p=0.95, temperature=1.0, max_new_tokens=256, num_return_sequences=1,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    processor_kwargs = {
        "num_mel_bins": int(audio_config.num_mel_bins),
        "max_num_windows": int(clap_config.get("max_num_window", 1)),
        "window_length": float(clap_config.get("window_length", 10.0)),
        "window_overlap": float(clap_config.get("window_overlap", 0.0)),
    }
    return ConvertedCheckpoint(config, writes.state, report, tokenizer, generation_config, processor_kwargs,
                               af2_dir, text_dir, release)


def build_native_checkpoint(af2_dir, text_model=None, **kwargs):
    """``(config, native_state_dict, report)`` for an original release, without writing anything."""
    converted = assemble_checkpoint(af2_dir, text_model, **kwargs)
    return converted.config, converted.state_dict, converted.report


# ----------------------------------------------------------------------------------------------------------------
# Building, checking and writing the native model
# ----------------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unsupported dtype {dtype!r}; choose one of float32, bfloat16, float16.")
    return _DTYPES[dtype]


def load_native_model(config, state_dict: dict[str, torch.Tensor]):
    """``AudioFlamingo2ForConditionalGeneration`` holding exactly ``state_dict`` (strict: no missing/extra key)."""
    from transformers.initialization import no_init_weights

    from .modeling_audioflamingo2 import AudioFlamingo2ForConditionalGeneration

    with no_init_weights():
        model = AudioFlamingo2ForConditionalGeneration(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: " + ", ".join(missing))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: " + ", ".join(unexpected))
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape: " + ", ".join(mismatched))
        raise ConversionError("The converted weights do not fit AudioFlamingo2ForConditionalGeneration; nothing "
                              "was written. " + "; ".join(parts))
    # Floating tensors follow the original's float32 model; integer buffers keep their dtype. assign=True hands the
    # tensors over instead of copying them (the never-touched empty parameters are released).
    state = {k: (v.float() if v.is_floating_point() else v.to(expected[k].dtype)) for k, v in state_dict.items()}
    del expected
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def convert_af2_checkpoint(
    af2_dir: str | os.PathLike,
    text_model: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    push_to_hub: str | None = None,
    *,
    config_yaml: str | os.PathLike | None = None,
    cross_attention_head_dim: int | None = None,
    max_shard_size: str | int = "5GB",
    private: bool | None = None,
    progress: bool = True,
    verbose: bool = True,
    hub_kwargs: dict | None = None,
) -> ConversionReport:
    """Convert an original Audio Flamingo 2 release into a native Hugging Face checkpoint in ``output_dir``.

    Args:
        af2_dir: the original release (local folder or Hub id): safe_ckpt/, clap_ckpt/, configs/*.yaml.
        text_model: the base language model + tokenizer (local folder or Hub id). ``None`` takes the yaml's
            ``lang_encoder_path``/``tokenizer_path`` (resolved against ``af2_dir`` when local).
        output_dir: where the model, tokenizer, processor and generation config are written.
        dtype: ``float32`` (the original's precision), ``bfloat16`` or ``float16``.
        push_to_hub: a repo id to upload ``output_dir`` to after writing.
    Returns:
        The :class:`ConversionReport` (also printed when ``verbose``).
    """
    from .feature_extraction_audioflamingo2 import AudioFlamingo2FeatureExtractor
    from .export import add_remote_code
    from .processing_audioflamingo2 import AudioFlamingo2Processor

    torch_dtype = _as_dtype(dtype)
    converted = assemble_checkpoint(af2_dir, text_model, config_yaml=config_yaml,
                                    cross_attention_head_dim=cross_attention_head_dim, progress=progress,
                                    hub_kwargs=hub_kwargs)
    model = load_native_model(converted.config, converted.state_dict)
    converted.state_dict.clear()
    if torch_dtype != torch.float32:
        model = model.to(torch_dtype)
    for cfg in (model.config, model.config.text_config, model.config.audio_config):
        cfg.dtype = torch_dtype
    model.generation_config = converted.generation_config

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    feature_extractor = AudioFlamingo2FeatureExtractor(**converted.processor_kwargs)
    processor = AudioFlamingo2Processor(feature_extractor=feature_extractor, tokenizer=converted.tokenizer)
    processor.save_pretrained(output_dir)
    add_remote_code(output_dir)  # modules + auto_map/custom_pipelines: loads with trust_remote_code, without af2_hf
    report = converted.report
    report.notes.append(f"written to {output_dir} ({str(torch_dtype).replace('torch.', '')}, "
                        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters).")
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(output_dir), repo_id=push_to_hub,
                          commit_message="Convert Audio Flamingo 2 to the native Transformers format")
        report.notes.append(f"pushed to https://huggingface.co/{push_to_hub}")
    if verbose:
        print(report.summary())
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Convert an original Audio Flamingo 2 release to Transformers.")
    parser.add_argument("--af2-dir", required=True, help="original release folder or Hub id (e.g. nvidia/audio-flamingo-2)")
    parser.add_argument("--text-model", default=None,
                        help="base LM + tokenizer folder or Hub id (default: the yaml's lang_encoder_path)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--config-yaml", default=None, help="release yaml (default: configs/*.yaml)")
    parser.add_argument("--cross-attention-head-dim", type=int, default=None,
                        help=f"head size of the gated cross-attention (default {DEFAULT_CROSS_ATTENTION_HEAD_DIM})")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        convert_af2_checkpoint(
            args.af2_dir, args.text_model, args.output_dir, dtype=args.dtype, push_to_hub=args.push_to_hub,
            config_yaml=args.config_yaml, cross_attention_head_dim=args.cross_attention_head_dim,
            max_shard_size=args.max_shard_size, private=args.private or None, progress=not args.no_progress,
        )
    except ConversionError as error:
        print(f"conversion failed: {error}")
        return 1
    return 0


__all__ = [
    "ConversionError",
    "ConversionReport",
    "assemble_checkpoint",
    "build_clap_audio_config",
    "build_native_checkpoint",
    "convert_af2_checkpoint",
    "convert_htsat_state_dict",
    "load_native_model",
    "main",
]
