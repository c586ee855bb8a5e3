"""Checks that ``from_pretrained`` runs on an Audio Flamingo 2 folder before it builds a model or reads its weights.

* :func:`check_model_path`: the path is a model folder (or a Hub id); an existing directory without ``config.json`` is
  named for what it is, and an ORIGINAL release (:func:`original_release_hint`) gets the ``af2-hf convert`` command.
* :func:`check_checkpoint_files`: the safetensors files a local folder would be loaded from are complete and readable
  (header, dtypes, offsets, size; every shard of ``model.safetensors.index.json``), each problem naming the file.
* :func:`strict_from_pretrained`: ``PreTrainedModel.from_pretrained`` that raises :class:`CheckpointMismatchError`
  listing every missing, unexpected and differently shaped tensor, or reports them as transformers does with
  ``output_loading_info=True``.

The CLI and the pipeline reuse :func:`original_release_hint`. This module is copied beside exported models (remote
code): it imports nothing from ``af2_hf`` by absolute name.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from transformers.utils import logging

__all__ = [
    "CheckpointFileError",
    "CheckpointMismatchError",
    "ModelFolderError",
    "ModelTypeError",
    "check_checkpoint_files",
    "check_model_path",
    "original_release_hint",
    "strict_from_pretrained",
]

logger = logging.get_logger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: Hub ids of the original releases (their repositories hold safe_ckpt/, clap_ckpt/ and a yaml, no config.json).
ORIGINAL_RELEASE_IDS = (
    "nvidia/audio-flamingo-2",
    "nvidia/audio-flamingo-2-1.5B",
    "nvidia/audio-flamingo-2-0.5B",
    "nvidia/audio-flamingo-2-SoundCoT",
)
#: Bytes per element of the safetensors dtypes whose size is a whole number of bytes.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
#: Sub-byte dtypes safetensors also knows (their sizes are left to safetensors).
_PACKED_DTYPES = {"F4", "F6_E2M3", "F6_E3M2"}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
#: First bytes of torch.save files: a zip archive, or a bare pickle (protocols 2 to 5).
_TORCH_SAVE_STARTS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class CheckpointMismatchError(ValueError):
    """``from_pretrained`` found tensors missing from, unknown to, or shaped differently from an Audio Flamingo 2
    model (transformers only logs these and initialises the missing weights randomly)."""


class CheckpointFileError(OSError):
    """A weight file or shard index of a model folder is missing, truncated or not a valid safetensors file. The
    message names the file and what is wrong with it."""


class ModelTypeError(ValueError):
    """A ``config.json`` of another model type (e.g. a plain Qwen2 language model or a CLAP checkpoint) was given to
    an Audio Flamingo 2 class."""

    def __init__(self, reference: str, model_type: str, expected: str):
        hint = ""
        if model_type == "qwen2":
            hint = (" A Qwen2.5 language model is the base of an AF2 release: convert the release with it, e.g. "
                    f"`af2-hf convert --af2-dir nvidia/audio-flamingo-2 --text-model {reference} "
                    "--output-dir ./af2-hf`.")
        super().__init__(
            f"{reference!r} holds a {model_type!r} model (config.json model_type), not an Audio Flamingo 2 "
            f"({expected!r}) one: nothing was loaded.{hint} Load it with its own class or AutoModel."
        )
        self.model_type = model_type


class ModelFolderError(OSError):
    """The path given to ``from_pretrained`` is not an Audio Flamingo 2 model folder: it does not exist, it holds no
    ``config.json``, or it is an original (unconverted) release."""


# ------------------------------------------------------------------------------------------------------ model path


def _listing(title: str, keys: list[str], limit: int = 50) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{len(keys)} {title}: {shown}"


def _folder_contents(folder: Path, limit: int = 12) -> str:
    names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in folder.iterdir())
    if not names:
        return "it is empty"
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"it holds: {shown}"


def _convert_command(reference: str) -> str:
    output = reference.rstrip("/\\").rsplit("/", 1)[-1] + "-hf"
    return f"af2-hf convert --af2-dir {reference} --output-dir ./{output}"


def _cached_release_file(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``safe_ckpt/metadata.json`` of ``repo_id`` (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "safe_ckpt/metadata.json"), str)
    except Exception:  # an id the cache helper refuses is simply not a cached release
        return False


def original_release_hint(path: str | os.PathLike) -> str | None:
    """A message saying that ``path`` is an ORIGINAL Audio Flamingo 2 release and giving the ``af2-hf convert``
    command to run, or ``None`` when it is not one.

    A local folder is a release when it has ``safe_ckpt/`` or ``clap_ckpt/`` and no ``config.json``; a Hub id when it
    is one of :data:`ORIGINAL_RELEASE_IDS` or the local Hugging Face cache holds its ``safe_ckpt/metadata.json``.
    """
    reference = str(path)
    folder = Path(reference).expanduser()
    if folder.is_dir():
        if (folder / CONFIG_NAME).is_file():
            return None
        found = [name + "/" for name in ("safe_ckpt", "clap_ckpt") if (folder / name).is_dir()]
        if not found:
            return None
        yamls = [*folder.glob("*.y*ml"), *folder.glob("configs/*.y*ml")]
        yamls = sorted(p.relative_to(folder).as_posix() for p in yamls)
        found += yamls[:2]
    elif reference.lower() in {repo_id.lower() for repo_id in ORIGINAL_RELEASE_IDS} or (
        reference.count("/") == 1 and _cached_release_file(reference)
    ):
        found = ["an original release on the Hub"]
    else:
        return None
    return (
        f"{reference!r} is an ORIGINAL Audio Flamingo 2 release ({', '.join(found)}), not a converted Hugging Face "
        f"model. Convert it first (the base Qwen2.5 model comes from the release yaml, or pass --text-model):\n"
        f"  {_convert_command(reference)}\n"
        "then load the output folder."
    )


def _looks_local(reference: str) -> bool:
    """A reference that can only mean a local path (a Hub id is ``name`` or ``namespace/name``)."""
    return (
        reference.startswith((".", "/", "~", "\\"))
        or reference.count("/") > 1
        or os.sep != "/" and os.sep in reference
        or (len(reference) > 1 and reference[1] == ":")
    )


def check_model_path(path: str | os.PathLike, subfolder: str = "") -> None:
    """Raise :class:`ModelFolderError` unless ``path`` can be a model: a Hub id, a JSON file, or a directory whose
    ``subfolder`` holds ``config.json``. The message says what the path is instead (missing, an original release, a
    PEFT adapter, a directory of other files), never only "does not exist" for a directory that does."""
    reference = str(path)
    local = Path(reference).expanduser()
    if local.is_file():
        return
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if (folder / CONFIG_NAME).is_file():
            return
        hint = original_release_hint(local)
        if hint is not None:
            raise ModelFolderError(hint)
        if not folder.is_dir():
            raise ModelFolderError(f"{reference!r} has no subfolder {subfolder!r} ({_folder_contents(local)}).")
        if (folder / ADAPTER_CONFIG_NAME).is_file():
            raise ModelFolderError(
                f"{str(folder)!r} is a PEFT adapter folder (adapter_config.json), not a model: load it with the "
                "model class's from_pretrained (it loads the base model named in adapter_config.json) or with peft."
            )
        raise ModelFolderError(
            f"{str(folder)!r} is a directory but not a Hugging Face model folder: it has no {CONFIG_NAME} "
            f"({_folder_contents(folder)})."
        )
    if os.path.lexists(local):
        raise ModelFolderError(f"{reference!r} is neither a file nor a directory (a broken link?).")
    if _looks_local(reference):
        raise ModelFolderError(f"{reference!r} does not exist (no such file or directory).")
    hint = original_release_hint(reference)
    if hint is not None:
        raise ModelFolderError(hint)


# ------------------------------------------------------------------------------------------------ weight files


def _read_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the size of its data section, checked against the file's size."""
    size = file.stat().st_size
    if size == 0:
        raise CheckpointFileError(f"{file} is empty (0 bytes): the weights were not written or the copy was cut.")
    with open(file, "rb") as handle:
        head = handle.read(64)
        if head.startswith(b"version https://git-lfs"):
            raise CheckpointFileError(
                f"{file} is a Git LFS pointer, not the weights: fetch them (git lfs pull) or download the file again."
            )
        if size < 8:
            raise CheckpointFileError(f"{file} is truncated: {size} bytes, shorter than a safetensors header.")
        (header_length,) = struct.unpack("<Q", head[:8])
        if header_length > min(size - 8, _MAX_HEADER_BYTES):
            if head.startswith(_TORCH_SAVE_STARTS):
                raise CheckpointFileError(f"{file} is a zip/pickle (torch.save) file, not safetensors.")
            raise CheckpointFileError(
                f"{file} is not a valid safetensors file (its first 8 bytes declare a {header_length}-byte header; "
                f"the file holds {size} bytes): truncated, or not safetensors."
            )
        handle.seek(8)
        raw = handle.read(header_length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointFileError(f"{file} has a corrupt safetensors header (not valid JSON: {error}).") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{file} has a corrupt safetensors header (a JSON {type(header).__name__}).")
    return header, size - 8 - header_length


def _check_entry(file: Path, name: str, entry) -> tuple[int, int] | None:
    """The ``(begin, end)`` byte range of one tensor entry (``None`` for a packed dtype left to safetensors)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointFileError(f"{file}: tensor {name!r} has a malformed header entry: {entry!r}.")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPE_BYTES and dtype not in _PACKED_DTYPES:
        raise CheckpointFileError(f"{file}: tensor {name!r} has an unknown dtype {dtype!r}.")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointFileError(f"{file}: tensor {name!r} has an invalid shape {shape!r}.")
    if (
        not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointFileError(f"{file}: tensor {name!r} has invalid data offsets {offsets!r}.")
    if dtype in _PACKED_DTYPES:
        return None
    expected = math.prod(shape) * _DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CheckpointFileError(
            f"{file}: tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes but its offsets span "
            f"{offsets[1] - offsets[0]}: the header is corrupt."
        )
    return offsets[0], offsets[1]


def _check_safetensors_file(file: Path) -> set[str]:
    """The tensor names of a safetensors file, after checking that the file is complete and readable."""
    header, data_size = _read_header(file)
    names = {name for name in header if name != "__metadata__"}
    ends = [span for name in sorted(names) if (span := _check_entry(file, name, header[name])) is not None]
    declared = max((end for _, end in ends), default=0)
    if declared > data_size:
        raise CheckpointFileError(
            f"{file} is truncated: its header declares {declared} bytes of tensor data, the file holds {data_size} "
            f"({declared - data_size} bytes missing). Copy or download it again."
        )
    if declared < data_size and len(ends) == len(names):
        raise CheckpointFileError(
            f"{file} is corrupt: {data_size - declared} bytes follow the last tensor its header declares."
        )
    from safetensors import SafetensorError, safe_open

    try:  # safetensors' own checks (overlapping ranges, trailing bytes, packed dtypes)
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise CheckpointFileError(f"{file} is not a valid safetensors file: {error}.") from None
    return names


def _add_variant(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, _, suffix = name.partition(".")
    return f"{stem}.{variant}.{suffix}"


def _check_index(index_file: Path) -> set[str]:
    """The tensor names of a sharded checkpoint, after checking the index and every shard it names."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointFileError(f"{index_file} is not valid JSON ({error}).") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFileError(f"{index_file} has no valid 'weight_map' (tensor name -> shard file).")
    folder = index_file.parent
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if Path(s).is_absolute() or ".." in Path(s).parts]
    if outside:
        raise CheckpointFileError(f"{index_file} names shards outside its folder: {outside}.")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CheckpointFileError(
            f"{index_file} names {len(missing)} shard file(s) that {folder} does not hold: {', '.join(missing)}."
        )
    contents = {shard: _check_safetensors_file(folder / shard) for shard in shards}
    absent = sorted(name for name, shard in weight_map.items() if name not in contents[shard])
    if absent:
        raise CheckpointFileError(f"{index_file} maps tensors to shards that do not hold them: "
                                  + _listing("tensor(s)", [f"{n} ({weight_map[n]})" for n in absent], 10))
    return set(weight_map)


def check_checkpoint_files(
    folder: str | os.PathLike, subfolder: str = "", variant: str | None = None, use_safetensors: bool | None = None
) -> set[str] | None:
    """Check the safetensors weights that ``from_pretrained`` would read from a local ``folder`` and return their
    tensor names (``None`` when the folder is read from ``pytorch_model.bin``, left to transformers).

    Raises :class:`CheckpointFileError` naming the file for: no weights at all, both ``model.safetensors`` and a shard
    index (transformers would silently take the single file, e.g. a leftover of an earlier save), an empty, truncated,
    Git-LFS-pointer, pickle or otherwise corrupt file (header length, JSON, dtype, shape, offsets), an index that is
    not JSON or names a missing shard or a tensor its shard lacks.
    """
    base = Path(folder) / subfolder if subfolder else Path(folder)
    single = base / _add_variant(SAFE_WEIGHTS_NAME, variant)
    index = base / _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant)
    if use_safetensors is not False:
        if single.is_file() and index.is_file():
            raise CheckpointFileError(
                f"{base} holds both {single.name} and {index.name} (with its shards): one is a leftover of an earlier "
                f"save, and transformers would load {single.name} without a word. Remove the stale one."
            )
        if single.is_file():
            return _check_safetensors_file(single)
        if index.is_file():
            return _check_index(index)
    if any((base / _add_variant(name, variant)).is_file() for name in TORCH_WEIGHTS_NAMES):
        return None
    raise CheckpointFileError(
        f"{str(base)!r} has a {CONFIG_NAME} but no weights: no {single.name}, {index.name} or "
        f"{_add_variant(TORCH_WEIGHTS_NAMES[0], variant)} ({_folder_contents(base)})."
    )


# ------------------------------------------------------------------------------------------------ from_pretrained


def _check_model_type(config_file: Path, expected: str) -> None:
    """Refuse a ``config.json`` of another model type before its weights are looked at (the config class checks it
    again when it reads the file)."""
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return  # unreadable: the config class reports it
    if model_type is not None and model_type != expected:
        raise ModelTypeError(str(config_file.parent), model_type, expected)


def _local_checkpoint_names(path, kwargs: dict, expected_model_type: str) -> set[str] | None:
    """Check a local folder's weight files (see :func:`check_checkpoint_files`); ``None`` when not applicable."""
    if path is None or kwargs.get("state_dict") is not None or kwargs.get("gguf_file"):
        return None
    folder, subfolder = Path(str(path)).expanduser(), kwargs.get("subfolder") or ""
    if not folder.is_dir():
        check_model_path(path, subfolder)  # a missing local path or an original release's Hub id
        return None
    if (folder / subfolder / ADAPTER_CONFIG_NAME).is_file() and not (folder / subfolder / CONFIG_NAME).is_file():
        return None  # a PEFT adapter: transformers loads its base model, whose folder the config checks
    if kwargs.get("config") is None:
        check_model_path(folder, subfolder)
        _check_model_type(folder / subfolder / CONFIG_NAME, expected_model_type)
    elif (hint := original_release_hint(folder)) is not None:
        raise ModelFolderError(hint)
    return check_checkpoint_files(folder, subfolder, kwargs.get("variant"), kwargs.get("use_safetensors"))


def _head_keys_of_base_checkpoint(model, checkpoint_names: set[str] | None, missing: list[str]) -> list[str]:
    """Missing keys that transformers initialises on purpose: the head (e.g. an untied ``lm_head``) of a model loaded
    from a checkpoint of its base model (no checkpoint name starts with ``base_model_prefix``)."""
    prefix = model.base_model_prefix
    if not checkpoint_names or not hasattr(model, prefix) or any(n.startswith(prefix + ".") for n in checkpoint_names):
        return []
    return [key for key in missing if not key.startswith(prefix + ".")]


def _mismatch_message(cls, path, missing, unexpected, mismatched, errors) -> str:
    parts = []
    if missing:
        parts.append(_listing("missing tensor(s) (would be randomly initialised)", missing))
    if unexpected:
        parts.append(_listing("unexpected tensor(s) (unknown to the model)", unexpected))
    if mismatched:
        parts.append(_listing("tensor(s) with another shape", mismatched))
    if errors:
        parts.append(_listing("loading error(s)", errors))
    return (
        f"The checkpoint {str(path)!r} does not match {cls.__name__}: " + "; ".join(parts)
        + ". Pass strict=False to load it anyway (missing weights are then random), or ignore_mismatched_sizes=True "
        "to re-initialise differently shaped ones; output_loading_info=True returns these lists instead of raising."
    )


def strict_from_pretrained(load, cls, path, *model_args, strict: bool = True, **kwargs):
    """``load(path, *model_args, **kwargs)`` (a bound ``PreTrainedModel.from_pretrained``) with Audio Flamingo 2's
    checks. Local weight files are checked first (:func:`check_checkpoint_files`); a corrupt safetensors file read
    from the Hub is reported as :class:`CheckpointFileError`.

    * ``output_loading_info=True`` or ``strict=False``: transformers' behaviour (missing weights are initialised and
      logged, and reported in the returned loading info).
    * Otherwise strict: :class:`CheckpointMismatchError` lists every missing, unexpected and differently shaped
      tensor. Not errors, as in transformers: the ``lm_head`` of a full checkpoint loaded into the base model (it is
      dropped), the head of a model loaded from its base model's checkpoint (initialised, with a warning), shapes
      with ``ignore_mismatched_sizes=True``, and tensors given in code (``from_pretrained(None, state_dict=...)``).
    """
    from safetensors import SafetensorError

    checkpoint_names = _local_checkpoint_names(path, kwargs, cls.config_class.model_type)
    report = kwargs.pop("output_loading_info", False)
    relaxed = report or not strict or path is None
    mismatch_allowed = kwargs.get("ignore_mismatched_sizes", False)
    if not relaxed:
        # Let transformers finish loading differently shaped tensors (instead of raising without naming them), so
        # that every problem is listed at once below.
        kwargs["ignore_mismatched_sizes"] = True
    try:
        model, info = load(path, *model_args, output_loading_info=True, **kwargs)
    except SafetensorError as error:
        raise CheckpointFileError(f"A safetensors file of {str(path)!r} is corrupt: {error}.") from None
    if relaxed:
        return (model, info) if report else model
    missing = sorted(info.get("missing_keys") or ())
    head = _head_keys_of_base_checkpoint(model, checkpoint_names, missing)
    if head:
        logger.warning("%s loaded from a checkpoint of its base model: %s newly initialised.", cls.__name__,
                       ", ".join(head))
        missing = [key for key in missing if key not in head]
    unexpected = sorted(info.get("unexpected_keys") or ())
    if not hasattr(model, "lm_head"):
        unexpected = [key for key in unexpected if not key.startswith("lm_head.")]
    mismatched = [] if mismatch_allowed else sorted(
        f"{key} (checkpoint {tuple(saved)}, model {tuple(expected)})"
        for key, saved, expected in (info.get("mismatched_keys") or ())
    )
    errors = [str(message) for message in info.get("error_msgs") or ()]
    if missing or unexpected or mismatched or errors:
        raise CheckpointMismatchError(_mismatch_message(cls, path, missing, unexpected, mismatched, errors))
    return model
