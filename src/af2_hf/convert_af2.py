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

Like transformers' ``convert_*_to_hf.py`` scripts, the conversion is a short sequence of named steps:

* :func:`read_release`: the release folder, its yaml, the ``safe_ckpt`` chunks and the base LM folder
  (reading: :mod:`af2_hf.convert_af2_release`);
* :func:`convert_state_dict`: the key-rename rules (data below; HTSAT's in :mod:`af2_hf.convert_af2_htsat`) applied
  part by part (:func:`convert_audio_tower`, :func:`convert_audio_transformer`, :func:`convert_language_model`,
  :func:`convert_cross_attention`), then :func:`build_config` from the shapes;
* :func:`write_model` and :func:`write_processor`, into a temporary folder beside the output that replaces it only
  when complete (:func:`af2_hf.atomic.atomic_output_dir`): a failed or interrupted conversion leaves no model behind;
* :func:`main`: the command line (``af2-hf convert``, ``conversion/convert_af2_to_hf.py``).

Use :func:`convert_af2_checkpoint` to write a converted model, or :func:`build_native_checkpoint` to get the config,
the native state dict and the report without writing anything.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .convert_af2_htsat import (
    UNUSED_HTSAT_FAMILIES,
    build_clap_audio_config,
    convert_htsat_state_dict,
)
from .convert_af2_release import (
    _AF2_ALLOW_PATTERNS,
    _TEXT_ALLOW_PATTERNS,
    UNUSED_CLAP_CKPT_FAMILIES,
    _weight_loaders,
    find_clap_ckpt,
    find_release_yaml,
    load_clap_ckpt,
    load_release_yaml,
    load_safe_ckpt,
    resolve_source,
)
from .convert_af2_report import ConversionError, ConversionReport, StateWriter

SAFE_HTSAT_PREFIX = "clap.nvclap."
_EMBED_KEY = "model.language_model.embed_tokens.weight"
DEFAULT_CROSS_ATTENTION_HEAD_DIM = 64  # GatedCrossAttentionBlock(dim_head=64), not exposed in the yaml

# ----------------------------------------------------------------------------------------------------------------
# Key-rename rules (original safe_ckpt key -> native key)
# ----------------------------------------------------------------------------------------------------------------

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
class Release:
    """An original release, read: where it is, its yaml sections, its merged safe_ckpt and the base LM folders."""

    af2_dir: Path
    clap_config: dict
    model_config: dict
    text_dir: Path
    tokenizer_dir: Path
    safe: dict[str, torch.Tensor]
    clap_path: Path | None


@dataclass
class ConvertedCheckpoint:
    """Everything the native model folder is written from (the result of :func:`convert_state_dict`)."""

    config: Any
    state_dict: dict[str, torch.Tensor]
    report: ConversionReport
    tokenizer: Any
    generation_config: Any
    processor_kwargs: dict[str, Any]


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



# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------


def _describe_source(given, resolved: Path) -> str:
    return str(resolved) if Path(str(given)).expanduser() == resolved else f"{resolved} (Hub id {given})"


def read_release(af2_dir, text_model, config_yaml, report: ConversionReport, progress: bool,
                 hub_kwargs: dict) -> Release:
    """Resolves the release and the base LM (local folders or Hub ids), reads the yaml and the safe_ckpt chunks."""
    given_af2_dir = af2_dir
    af2_dir = resolve_source(af2_dir, _AF2_ALLOW_PATTERNS, what="--af2-dir", **hub_kwargs)
    report.inputs.append(f"release: {_describe_source(given_af2_dir, af2_dir)}")
    yaml_path = find_release_yaml(af2_dir, config_yaml)
    release = load_release_yaml(yaml_path)
    report.inputs.append(f"release yaml: {yaml_path}")
    clap_config, model_config = release["clap_config"], release["model_config"]
    at_kwargs = model_config.get("audio_transformer_kwargs") or {}
    report.notes.append(f"release yaml: {yaml_path.relative_to(af2_dir) if yaml_path.is_relative_to(af2_dir) else yaml_path}")
    if "common_encoder_embed_dim" in at_kwargs:
        report.notes.append("yaml audio_transformer_kwargs.common_encoder_embed_dim is ignored (as by the original: "
                            "the width is clap_config.audio_embed_dim).")

    text_source, tokenizer_source = _resolve_text_model(text_model, release, af2_dir)
    text_dir = resolve_source(text_source, _TEXT_ALLOW_PATTERNS, what="--text-model", **hub_kwargs)
    tokenizer_dir = text_dir if tokenizer_source == text_source else resolve_source(
        tokenizer_source, _TEXT_ALLOW_PATTERNS, what="The yaml's tokenizer_path", **hub_kwargs)
    origin = "--text-model" if text_model is not None else "the release yaml's lang_encoder_path"
    report.inputs.append(f"base language model: {_describe_source(text_source, text_dir)} (from {origin})")
    report.inputs.append(f"tokenizer: {tokenizer_dir}")

    safe = load_safe_ckpt(af2_dir, report, progress)
    return Release(af2_dir, clap_config, model_config, text_dir, tokenizer_dir, safe,
                   find_clap_ckpt(af2_dir, clap_config))


def convert_audio_tower(release: Release, writes: StateWriter, unmapped: list[str], report: ConversionReport):
    """AF-CLAP (HTSAT): clap_ckpt first, then safe_ckpt's ``clap.nvclap.*`` overrides. Returns its config."""
    htsat: dict[str, torch.Tensor] = {}
    origins: dict[str, str] = {}
    safe = release.safe
    if release.clap_path is not None:
        for key, tensor in load_clap_ckpt(release.clap_path, report, unmapped).items():
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
    declared_width = release.clap_config.get("audio_embed_dim")
    if declared_width is not None and int(declared_width) != width:
        raise ConversionError(f"yaml clap_config.audio_embed_dim={declared_width} but HTSAT outputs width {width}.")
    return audio_config, width


def convert_audio_transformer(safe: dict, writes: StateWriter, unmapped: list[str], report: ConversionReport,
                              width: int, at_kwargs: dict) -> dict[str, Any]:
    """The audio transformer (``audio_transformer_clap.*``); returns its config arguments (sizes from the shapes,
    heads from the yaml, the rotary setting from the stored ``inv_freq``)."""
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
    return dict(audio_transformer_num_layers=at_num_layers, audio_transformer_num_heads=at_heads,
                audio_transformer_intermediate_size=at_intermediate,
                **_audio_rotary_settings(inv_freq, width, at_heads, report))


def _audio_rotary_settings(inv_freq: torch.Tensor | None, width: int, heads: int,
                           report: ConversionReport) -> dict[str, Any]:
    """The audio transformer's rotary dim/base from the stored ``inv_freq`` (none stored: the config defaults)."""
    if inv_freq is None:
        report.notes.append("audio rotary inv_freq not stored: rotary dim/base from the original's defaults.")
        return {}
    rotary_dim, rope_theta = _rotary_from_inv_freq(inv_freq, report)
    default_dim = max((width // heads) // 2, 32)
    if rotary_dim != default_dim:
        report.notes.append(f"stored inv_freq rotates {rotary_dim} dims per head, not max(head_dim // 2, 32) = "
                            f"{default_dim} for n_head={heads}; the stored buffer is what the original uses.")
    return {"audio_transformer_rotary_dim": rotary_dim, "audio_transformer_rope_theta": rope_theta}


_TEXT_MODEL_HINT = (" The base language model (--text-model, or the yaml's lang_encoder_path) does not match this "
                    "release: use the release's base model (README, 'Converting the original releases').")


def _lm_keys_in_load_order(safe: dict, unmapped: list[str]) -> list[str]:
    """safe_ckpt's ``lang_encoder.*`` keys by family, in the order of the original's load_state_dict; keys of any
    other family are popped into ``unmapped``."""
    groups = {"model": [], "lm_head": [], _LM_DUPLICATE_FAMILY: [], _XATTN_DUPLICATE_FAMILY: []}
    for key in [k for k in safe if k.startswith("lang_encoder.")]:
        family = key.split(".", 2)[1]
        if family in groups:
            groups[family].append(key)
        else:
            unmapped.append(key)
            safe.pop(key)
    return sum(groups.values(), [])


def _sort_safe_lm(safe: dict, vocab: int, tied: bool, num_layers: int, unmapped: list[str],
                  report: ConversionReport):
    """The safe_ckpt LM and cross-attention tensors, renamed: ``(lm_writes, xattn)``, popped from ``safe``.

    ``lm_writes`` holds ``(native key, original key, tensor, is duplicate)`` in the visit order of the original's
    load_state_dict: lang_encoder.model.{embed_tokens, layers.i.{gated_cross_attn_layer_sound, decoder_layer}, norm},
    lang_encoder.lm_head, then the duplicate families lang_encoder.{_LM_DUPLICATE_FAMILY}.i and
    lang_encoder.{_XATTN_DUPLICATE_FAMILY}.i. The duplicates are the same modules as the canonical ones, so a full
    state_dict holds equal copies (they are compared); if a copy differs, the later write (the duplicate) wins, as
    it does in the original. ``xattn`` maps ``"{layer}.{native name}"`` to ``(original key, tensor)``.
    """
    embed_key = _EMBED_KEY
    head_key = embed_key if tied else "lm_head.weight"
    lm_writes: list[tuple[str, str, torch.Tensor, bool]] = []  # (native key, original key, tensor, is duplicate)
    xattn: dict[str, tuple[str, torch.Tensor]] = {}
    duplicates = {_LM_DUPLICATE_FAMILY: 0, _XATTN_DUPLICATE_FAMILY: 0}
    for key in _lm_keys_in_load_order(safe, unmapped):
        tensor = safe.pop(key)
        if key == "lang_encoder.model.embed_tokens.weight":
            if tensor.shape[0] != vocab:
                raise ConversionError(f"safe_ckpt embedding has {tensor.shape[0]} rows but the AF2 tokenizer has "
                                      f"{vocab} tokens (the original would fail to load it)." + _TEXT_MODEL_HINT)
            lm_writes.append((embed_key, key, tensor, False))
        elif key == "lang_encoder.model.norm.weight":
            lm_writes.append(("model.language_model.norm.weight", key, tensor, False))
        elif key == "lang_encoder.lm_head.weight":
            if tensor.shape[0] != vocab:
                raise ConversionError(f"safe_ckpt lm_head has {tensor.shape[0]} rows, expected {vocab}."
                                      + _TEXT_MODEL_HINT)
            # tied: the same parameter as the embedding; the original writes lm_head after embed_tokens
            lm_writes.append((head_key, key, tensor, tied))
        elif (m := _LM_CANONICAL_LAYER.fullmatch(key) or _LM_DUPLICATE_LAYER.fullmatch(key)) is not None:
            duplicate = m.re is _LM_DUPLICATE_LAYER
            duplicates[_LM_DUPLICATE_FAMILY] += duplicate
            if int(m.group(1)) >= num_layers:
                raise ConversionError(f"{key}: layer index beyond the base LM's {num_layers} layers."
                                      + _TEXT_MODEL_HINT)
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
    return lm_writes, xattn


def _write_base_lm(text_dir: Path, writes: StateWriter, lm_writes: list, vocab: int, tied: bool,
                   unmapped: list[str], report: ConversionReport, progress: bool) -> None:
    """The base LM first (tensors that safe_ckpt overrides are not even read), resized like
    ``resize_token_embeddings``; then the safe_ckpt LM tensors over it."""
    embed_key = _EMBED_KEY
    overridden_by_safe = {native for native, _, _, _ in lm_writes}
    skipped = 0
    for key, load in _weight_loaders(text_dir, progress, report):
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


def convert_language_model(release: Release, writes: StateWriter, unmapped: list[str], report: ConversionReport,
                           progress: bool):
    """The language model: base repository, resized embeddings, then safe_ckpt. Returns ``(text_config, tokenizer,
    xattn)`` (the cross-attention tensors for :func:`convert_cross_attention`)."""
    from transformers import AutoConfig, AutoTokenizer

    from .tokenization_audioflamingo2 import prepare_af2_tokenizer

    text_config = AutoConfig.from_pretrained(release.text_dir)
    tokenizer = prepare_af2_tokenizer(AutoTokenizer.from_pretrained(release.tokenizer_dir))
    vocab = len(tokenizer)
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    lm_writes, xattn = _sort_safe_lm(release.safe, vocab, tied, int(text_config.num_hidden_layers), unmapped, report)
    _write_base_lm(release.text_dir, writes, lm_writes, vocab, tied, unmapped, report, progress)
    return text_config, tokenizer, xattn


def convert_cross_attention(xattn: dict, writes: StateWriter, model_config: dict, text_config, width: int,
                            cross_attention_head_dim: int | None) -> tuple[dict[str, Any], list[int]]:
    """The gated cross-attention blocks, renumbered 0..n-1; returns their config arguments (from the shapes) and the
    decoder layers they precede."""
    num_layers = int(text_config.num_hidden_layers)
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
                              f"match LM width {hidden} and audio width {width}." + _TEXT_MODEL_HINT)
    if ff_in.shape[0] % hidden != 0:
        raise ConversionError(f"Cross-attention FFN width {ff_in.shape[0]} is not a multiple of {hidden}.")
    config_kwargs = dict(cross_attention_every_n_layers=every_n, cross_attention_num_heads=inner // head_dim,
                         cross_attention_head_dim=head_dim, cross_attention_ff_mult=int(ff_in.shape[0] // hidden))
    return config_kwargs, xattn_layers


def build_config(audio_config, text_config, tokenizer, embed_rows: int, audio_transformer: dict,
                 cross_attention: dict):
    """``AudioFlamingo2Config`` from the converted parts. The text config carries the vocabulary size of the
    (resized) embedding and the AF2 tokenizer's pad/eos ids, so that ``Trainer`` finds the model and the tokenizer
    aligned (no PAD/BOS/EOS alignment warning)."""
    from .configuration_audioflamingo2 import AudioFlamingo2Config

    text_config.vocab_size = int(embed_rows)
    text_config.pad_token_id = tokenizer.pad_token_id
    text_config._name_or_path = ""  # no local path of the conversion machine in the written config
    grid = audio_config.spec_size // audio_config.patch_stride[0] // 2 ** (len(audio_config.depths) - 1)
    special = {
        "audio_token_id": tokenizer.convert_tokens_to_ids("<audio>"),
        "end_of_chunk_token_id": tokenizer.convert_tokens_to_ids("<|endofchunk|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return AudioFlamingo2Config(
        audio_config=audio_config.to_dict(),
        text_config=text_config.to_dict(),
        tokens_per_window=int(grid * grid),
        **audio_transformer,
        **cross_attention,
        **special,
    )


def generation_defaults(text_dir: Path, tokenizer, report: ConversionReport):
    """The base LM's generation config with the release's sampling settings and the AF2 tokenizer's eos/pad."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(text_dir)
        report.inputs.append(f"generation config: {text_dir / 'generation_config.json'}")
    except OSError:
        generation_config = GenerationConfig()
        report.inputs.append("generation config: transformers' defaults (the base LM has none)")
    # The release's inference.py samples with top_k 30 / top_p 0.95 and max_new_tokens 256, stopping at the
    # tokenizer's eos; its benchmarks decode greedily (pass do_sample=False). The special ids are the AF2
    # tokenizer's (Qwen2.5 has no bos token: generation always starts from the prompt), so that Trainer's alignment
    # of the model with the tokenizer finds nothing to change.
    generation_config.update(
        do_sample=True, top_k=30, top_p=0.95, temperature=1.0, max_new_tokens=256, num_return_sequences=1,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return generation_config


def processor_defaults(audio_config, clap_config: dict) -> dict[str, Any]:
    """Feature-extractor settings: mel bins from HTSAT, windows from the yaml's clap_config."""
    return {
        "num_mel_bins": int(audio_config.num_mel_bins),
        "max_num_windows": int(clap_config.get("max_num_window", 1)),
        "window_length": float(clap_config.get("window_length", 10.0)),
        "window_overlap": float(clap_config.get("window_overlap", 0.0)),
    }


def convert_state_dict(
    af2_dir: str | os.PathLike,
    text_model: str | os.PathLike | None = None,
    *,
    config_yaml: str | os.PathLike | None = None,
    cross_attention_head_dim: int | None = None,
    progress: bool = True,
    hub_kwargs: dict | None = None,
) -> ConvertedCheckpoint:
    """Read an original release and build everything the native model needs, in memory (nothing is written)."""
    report = ConversionReport()
    release = read_release(af2_dir, text_model, config_yaml, report, progress, dict(hub_kwargs or {}))
    writes = StateWriter(report)
    unmapped: list[str] = []  # every key no documented rule places; reported together at the end
    audio_config, width = convert_audio_tower(release, writes, unmapped, report)
    audio_transformer = convert_audio_transformer(release.safe, writes, unmapped, report, width,
                                                  release.model_config.get("audio_transformer_kwargs") or {})
    text_config, tokenizer, xattn = convert_language_model(release, writes, unmapped, report, progress)
    cross_attention, xattn_layers = convert_cross_attention(xattn, writes, release.model_config, text_config, width,
                                                            cross_attention_head_dim)
    unmapped.extend(sorted(release.safe))
    if unmapped:
        raise ConversionError(f"{len(unmapped)} keys are not mapped and not a documented unused family; nothing "
                              "was converted: " + ", ".join(sorted(unmapped)))

    embed_key = _EMBED_KEY
    config = build_config(audio_config, text_config, tokenizer, writes.state[embed_key].shape[0], audio_transformer,
                          cross_attention)
    if config.cross_attention_layers != xattn_layers:
        raise ConversionError(f"Config places cross-attention before {config.cross_attention_layers}, checkpoint "
                              f"before {xattn_layers}.")
    if getattr(text_config, "tie_word_embeddings", False):
        writes.state["lm_head.weight"] = writes.state[embed_key]
        report.sources["lm_head.weight"] = f"tied:{embed_key}"
    return ConvertedCheckpoint(config, writes.state, report, tokenizer,
                               generation_defaults(release.text_dir, tokenizer, report),
                               processor_defaults(audio_config, release.clap_config))


def build_native_checkpoint(af2_dir, text_model=None, **kwargs):
    """``(config, native_state_dict, report)`` for an original release, without writing anything."""
    converted = convert_state_dict(af2_dir, text_model, **kwargs)
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
        language_model = any(key.startswith(("model.language_model.", "lm_head.")) for key in missing + mismatched)
        raise ConversionError("The converted weights do not fit AudioFlamingo2ForConditionalGeneration; nothing "
                              "was written. " + "; ".join(parts) + (_TEXT_MODEL_HINT if language_model else ""))
    # Floating tensors follow the original's float32 model; integer buffers keep their dtype. assign=True hands the
    # tensors over instead of copying them (the never-touched empty parameters are released).
    state = {k: (v.float() if v.is_floating_point() else v.to(expected[k].dtype)) for k, v in state_dict.items()}
    del expected
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def write_model(converted: ConvertedCheckpoint, output_dir: Path, dtype: torch.dtype, max_shard_size):
    """The native model in ``dtype`` with the release's generation defaults, saved to ``output_dir``."""
    model = load_native_model(converted.config, converted.state_dict)
    converted.state_dict.clear()
    if dtype != torch.float32:
        model = model.to(dtype)
    for cfg in (model.config, model.config.text_config, model.config.audio_config):
        cfg.dtype = dtype
    model.generation_config = converted.generation_config
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    return model


def write_processor(converted: ConvertedCheckpoint, output_dir: Path) -> None:
    """Feature extractor + AF2 tokenizer (with its chat template) as one processor, saved to ``output_dir``."""
    from .feature_extraction_audioflamingo2 import AudioFlamingo2FeatureExtractor
    from .processing_audioflamingo2 import AudioFlamingo2Processor

    feature_extractor = AudioFlamingo2FeatureExtractor(**converted.processor_kwargs)
    AudioFlamingo2Processor(feature_extractor=feature_extractor, tokenizer=converted.tokenizer).save_pretrained(
        output_dir)


def push_folder_to_hub(output_dir: Path, repo_id: str, private: bool | None) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(output_dir), repo_id=repo_id,
                      commit_message="Convert Audio Flamingo 2 to the native Transformers format")
    return f"https://huggingface.co/{repo_id}"


def convert_af2_checkpoint(
    af2_dir: str | os.PathLike,
    text_model: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    push_to_hub: str | None = None,
    *,
    overwrite: bool = False,
    config_yaml: str | os.PathLike | None = None,
    cross_attention_head_dim: int | None = None,
    max_shard_size: str | int = "5GB",
    private: bool | None = None,
    progress: bool = True,
    verbose: bool = True,
    hub_kwargs: dict | None = None,
) -> ConversionReport:
    """Convert an original Audio Flamingo 2 release into a native Hugging Face checkpoint in ``output_dir``.

    Everything is written into a temporary folder beside ``output_dir``, which becomes ``output_dir`` only once the
    model, processor and remote code are complete: a failed or interrupted conversion leaves no folder that looks
    like a model, and a re-conversion never mixes old and new files.

    Args:
        af2_dir: the original release (local folder or Hub id): safe_ckpt/, clap_ckpt/, configs/*.yaml.
        text_model: the base language model + tokenizer (local folder or Hub id). ``None`` takes the yaml's
            ``lang_encoder_path``/``tokenizer_path`` (resolved against ``af2_dir`` when local).
        output_dir: where the model, tokenizer, processor and generation config are written.
        dtype: ``float32`` (the original's precision), ``bfloat16`` or ``float16``.
        push_to_hub: a repo id to upload ``output_dir`` to after writing.
        overwrite: replace a non-empty ``output_dir`` whole (without it, such a folder is refused before anything
            is read).
    Returns:
        The :class:`ConversionReport` (also printed when ``verbose``): the inputs used, every tensor's source.
    Raises:
        ConversionError: the release cannot be converted faithfully (nothing is written).
        af2_hf.atomic.OutputDirectoryNotEmptyError: ``output_dir`` holds files and ``overwrite`` is false.
        OSError: an input cannot be read (e.g. :class:`af2_hf.hub_access.HubUnavailableError` for a Hub id without
            network).
    """
    from .atomic import atomic_output_dir
    from .export import add_remote_code

    torch_dtype = _as_dtype(dtype)
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        converted = convert_state_dict(af2_dir, text_model, config_yaml=config_yaml,
                                       cross_attention_head_dim=cross_attention_head_dim, progress=progress,
                                       hub_kwargs=hub_kwargs)
        model = write_model(converted, staging, torch_dtype, max_shard_size)
        write_processor(converted, staging)
        add_remote_code(staging)  # modules + auto_map/custom_pipelines: loads with trust_remote_code, without af2_hf
    report = converted.report
    report.notes.append(f"written to {output_dir} ({str(torch_dtype).replace('torch.', '')}, "
                        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters).")
    if push_to_hub:
        report.notes.append(f"pushed to {push_folder_to_hub(Path(output_dir), push_to_hub, private)}")
    if verbose:
        print(report.summary())
    return report


def main(argv: list[str] | None = None) -> int:
    """``python conversion/convert_af2_to_hf.py ...``: the same arguments, messages and exit codes as
    ``af2-hf convert``."""
    import argparse

    from .cli import run_command
    from .commands import convert as convert_command

    parser = argparse.ArgumentParser(description=convert_command.DESCRIPTION)
    convert_command.add_arguments(parser)
    return run_command(convert_command.run, parser.parse_args(argv))


__all__ = [
    "ConversionError",
    "ConversionReport",
    "UNUSED_CLAP_CKPT_FAMILIES",
    "UNUSED_HTSAT_FAMILIES",
    "build_clap_audio_config",
    "build_native_checkpoint",
    "convert_af2_checkpoint",
    "convert_htsat_state_dict",
    "convert_state_dict",
    "load_native_model",
    "main",
    "read_release",
    "write_model",
    "write_processor",
]
