"""Reading an original Audio Flamingo 2 release: the release folder (local or from the Hub), its yaml, the
``safe_ckpt`` chunks in ``metadata.json`` order, the LAION-CLAP checkpoint, and the base language model's weights.

Every unreadable, missing or unlisted file raises :class:`~af2_hf.convert_af2_report.ConversionError` naming it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from .convert_af2_report import ConversionError, ConversionReport

CLAP_CKPT_AUDIO_PREFIXES = ("module.audio_branch.", "audio_branch.")

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

_AF2_ALLOW_PATTERNS = ["safe_ckpt/*", "clap_ckpt/*", "configs/*", "*.yaml", "*.yml"]
_TEXT_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


def resolve_source(path_or_repo: str | os.PathLike, allow_patterns: list[str] | None = None, what: str = "Source",
                   **hub_kwargs) -> Path:
    """A local directory as is; anything else is taken as a Hub repo id and fetched with ``snapshot_download`` (at
    once :class:`~af2_hf.hub_access.HubUnavailableError` when the Hub cannot be reached and it is not cached)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ConversionError(f"'{text}' is neither a directory nor a Hub repo id.")
    from huggingface_hub import snapshot_download

    from .hub_access import hub_files_mode

    local_files_only = hub_kwargs.pop("local_files_only", False) or hub_files_mode(text, what)
    return Path(snapshot_download(repo_id=text, allow_patterns=allow_patterns, local_files_only=local_files_only,
                                  **hub_kwargs))


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
        unlisted = sorted(set(folder.glob("*.safetensors")) - set(files))
        if unlisted:
            raise ConversionError(
                f"safe_ckpt chunk {unlisted[0]} is not listed in {meta} ({len(unlisted)} unlisted: "
                f"{', '.join(f.name for f in unlisted)}): the release folder is incomplete or mixes two releases. "
                "Restore metadata.json from the release, or remove the stray chunk."
            )
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
    report.inputs.extend(f"safe_ckpt chunk: {file}" for file in files)
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
    report.inputs.append(f"clap_ckpt: {path}")
    return htsat


def _index_files(index: Path) -> list[Path]:
    try:
        with open(index, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConversionError(f"{index} is not a valid shard index (no weight_map of file names): {error}") from None
    files = [index.parent / name for name in names]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise ConversionError(f"base LM shard {missing[0]} named in {index} is missing ({len(missing)} missing: "
                              f"{', '.join(missing)}).")
    return files


def _weight_loaders(folder: Path, progress: bool, report: ConversionReport | None = None):
    """``(key, load)`` for every tensor of a Hugging Face model folder; ``load()`` reads that tensor only. The files
    read are listed in ``report.inputs``."""
    from safetensors import SafetensorError, safe_open

    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            files = _index_files(index)
        elif (folder / single).is_file():
            files = [folder / single]
        else:
            continue
        if report is not None:
            report.inputs.extend(f"base LM weights: {file}" for file in files)
        for file in _progress(files, "base LM shards", progress):
            if file.suffix == ".safetensors":
                try:
                    handle = safe_open(str(file), "pt")
                except (SafetensorError, OSError) as error:
                    raise ConversionError(f"base LM weights {file} is not a readable safetensors file (corrupt or "
                                          f"truncated?): {error}") from None
                for key in handle.keys():
                    yield key, (lambda h=handle, k=key: h.get_tensor(k))
            else:
                state = _load_torch_weights(file, "base LM weights", mmap=True)
                for key, tensor in state.items():
                    yield key, (lambda t=tensor: t)
        return
    raise ConversionError(f"No model weights (model.safetensors / pytorch_model.bin) in {folder}.")

