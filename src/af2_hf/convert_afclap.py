"""Convert an original AF-CLAP release checkpoint into a native Hugging Face folder for :class:`AFClapModel`.

The release checkpoint is ``torch.save({"epoch", "name", "state_dict"})`` of the original ``CLAP`` module wrapped in
DistributedDataParallel (every key ``module.`` + a key of ``CLAP``). It holds no text-tower configuration or tokenizer:
the original builds them from ``google/flan-t5-large``, so the converter takes that repository (a local folder or a
Hub id; only its config and tokenizer files are read) as a second source.

Steps: :func:`load_release_state_dict` (``weights_only=True``, ``module.`` stripped) -> :func:`build_afclap_config`
(every size from the checkpoint's shapes; the T5 config is checked against them) -> :func:`convert_afclap_state_dict`
(the HTSAT rules of :mod:`af2_hf.convert_af2` plus the key rules below) -> :func:`convert_afclap_checkpoint` (strict
load, safetensors + processor files written atomically, remote code).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from .convert_af2 import ConversionError, ConversionReport, build_clap_audio_config, convert_htsat_state_dict
from .convert_af2_release import resolve_source

__all__ = [
    "AFCLAP_KEY_RULES",
    "add_afclap_remote_code",
    "build_afclap_config",
    "convert_afclap_checkpoint",
    "convert_afclap_state_dict",
    "load_release_state_dict",
]

# Original CLAP key (after ``module.``) -> native AFClapModel key, for everything outside the HTSAT body (which
# ``convert_af2.convert_htsat_state_dict`` maps). Rules are regexes applied with ``re.fullmatch``.
AFCLAP_KEY_RULES: tuple[tuple[str, str], ...] = (
    # aff_2d fusion of HTSAT's patch embedding: same module layout in transformers' ClapAudioPatchEmbed.
    (r"audio_branch\.patch_embed\.(fusion_model\..+|mel_conv2d\..+)", r"audio_model.audio_encoder.patch_embed.\1"),
    (r"audio_branch\.tscam_conv\.(weight|bias)", r"audio_tagging.conv.\1"),
    (r"text_branch\.(.+)", r"text_model.\1"),
    (r"(audio|text)_projection\.0\.(weight|bias)", r"\1_projection.linear1.\2"),
    (r"(audio|text)_projection\.2\.(weight|bias)", r"\1_projection.linear2.\2"),
    (r"(audio|text)_transform\.sequential\.0\.(weight|bias)", r"\1_transform.linear1.\2"),
    (r"(audio|text)_transform\.sequential\.3\.(weight|bias)", r"\1_transform.linear2.\2"),
    (r"logit_scale_(a|t)", r"logit_scale_\1"),
)
_HTSAT_PREFIX = "audio_branch."
# Kept apart from the HTSAT body rules (which drop them for AF2): the fusion branch and the tagging head.
_HTSAT_EXTRAS = re.compile(r"audio_branch\.(patch_embed\.(fusion_model|mel_conv2d)|tscam_conv)\..+")
_T5_TIED_COPY = "text_branch.encoder.embed_tokens.weight"  # the same tensor as text_branch.shared.weight
_TEXT_SOURCE_PATTERNS = ["*.json", "*.model", "tokenizer*"]  # never the flan-T5 weights: the checkpoint has them


# ----------------------------------------------------------------------------------------------------------------
# Reading the sources
# ----------------------------------------------------------------------------------------------------------------


def load_release_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a release checkpoint with ``module.`` stripped, read with ``weights_only=True`` (a file
    holding pickled arbitrary objects is refused: unpickling those can run code)."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"AF-CLAP checkpoint {str(path)!r} does not exist.")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"Refusing to load {path}: torch.load(weights_only=True) accepts tensors and plain containers only "
            "(this file holds other pickled objects, or is corrupt)."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} holds no state dict of tensors (expected {{'state_dict': {{...}}}}).")
    return {key.removeprefix("module."): value for key, value in state.items()}


def resolve_checkpoint(source: str | os.PathLike, **hub_kwargs) -> Path:
    """The release ``.pt`` file: ``source`` itself, the one ``clap_ckpt/*.pt`` of a release folder, or that of a Hub
    release (e.g. ``nvidia/audio-flamingo-2``, of which only ``clap_ckpt/`` is downloaded)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        text = str(source)
        if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1 or text.endswith(".pt"):
            raise ConversionError(f"AF-CLAP checkpoint {text!r} is neither a file, a release folder nor a Hub id.")
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id=text, allow_patterns=["clap_ckpt/*"], **hub_kwargs))
    found = sorted((path / "clap_ckpt").glob("*.pt")) or sorted(path.glob("*.pt"))
    if len(found) != 1:
        raise ConversionError(f"Expected one AF-CLAP checkpoint in {path}/clap_ckpt (or {path}); found "
                              f"{[f.name for f in found]}.")
    return found[0]


def resolve_text_source(text_model: str | os.PathLike, **hub_kwargs) -> Path:
    """A local flan-T5 folder as is; otherwise a Hub id whose config and tokenizer files are downloaded (failing at
    once without network, as the AF2 converter does)."""
    return resolve_source(text_model, allow_patterns=_TEXT_SOURCE_PATTERNS, what="Text model", **hub_kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Config from shapes
# ----------------------------------------------------------------------------------------------------------------


def _shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"The checkpoint has no '{key}': not an AF-CLAP (HTSAT + T5) checkpoint.")
    return tuple(state[key].shape)


def _audio_config(state: dict[str, torch.Tensor]):
    htsat = {k[len(_HTSAT_PREFIX):]: v for k, v in state.items() if k.startswith(_HTSAT_PREFIX)}
    body = {k: v for k, v in htsat.items() if not _HTSAT_EXTRAS.fullmatch(_HTSAT_PREFIX + k)}
    audio_config = build_clap_audio_config(body)
    if "patch_embed.fusion_model.local_att.0.weight" in htsat:
        inner, channels = _shape(htsat, "patch_embed.fusion_model.local_att.0.weight")[:2]
        if "patch_embed.mel_conv2d.weight" not in htsat or channels % inner != 0:
            raise ConversionError("Incomplete or inconsistent aff_2d fusion weights in the HTSAT patch embedding.")
        audio_config.enable_fusion = True
        audio_config.fusion_type = "aff_2d"
        audio_config.aff_block_r = channels // inner
    return audio_config


def _text_config(state: dict[str, torch.Tensor], text_dir: Path):
    from transformers import AutoConfig, T5Config

    text_config = AutoConfig.from_pretrained(text_dir)
    if not isinstance(text_config, T5Config):
        raise ConversionError(f"{text_dir} holds a {type(text_config).__name__}, not a T5 config (flan-T5).")
    vocab, width = _shape(state, "text_branch.shared.weight")
    layers = len({m.group(1) for k in state if (m := re.match(r"text_branch\.encoder\.block\.(\d+)\.", k))})
    found = {"vocab_size": vocab, "d_model": width, "num_layers": layers}
    attention = "text_branch.encoder.block.0.layer.0.SelfAttention."
    q_rows = _shape(state, attention + "q.weight")[0]
    buckets, found["num_heads"] = _shape(state, attention + "relative_attention_bias.weight")
    found["relative_attention_num_buckets"] = buckets
    found["d_kv"] = q_rows // found["num_heads"]
    wrong = {k: (getattr(text_config, k), v) for k, v in found.items() if getattr(text_config, k) != v}
    if wrong:
        raise ConversionError(
            f"The T5 config of {text_dir} does not match the checkpoint's text tower (config, checkpoint): {wrong}."
        )
    text_config.use_cache = False
    text_config.is_encoder_decoder = False
    return text_config


def build_afclap_config(state: dict[str, torch.Tensor], text_dir: Path):
    """An :class:`AFClapConfig` for ``state`` (keys without ``module.``): HTSAT and projection sizes from shapes,
    the T5 config from ``text_dir`` checked against the checkpoint."""
    from .configuration_afclap import AFClapConfig

    audio_config, text_config = _audio_config(state), _text_config(state, text_dir)
    projection_dim, audio_width = _shape(state, "audio_projection.0.weight")
    text_projection = _shape(state, "text_projection.0.weight")
    if audio_width != audio_config.hidden_size:
        raise ConversionError(f"audio_projection reads width {audio_width}; HTSAT outputs {audio_config.hidden_size}.")
    if text_projection != (projection_dim, text_config.d_model):
        raise ConversionError(
            f"text_projection.0.weight is {text_projection}; expected {(projection_dim, text_config.d_model)}."
        )
    audio_config.projection_dim = projection_dim
    tagging = state.get("audio_branch.tscam_conv.weight")
    return AFClapConfig(
        audio_config=audio_config, text_config=text_config, projection_dim=projection_dim,
        audio_tagging_num_classes=None if tagging is None else int(tagging.shape[0]),
    )


# ----------------------------------------------------------------------------------------------------------------
# State dict
# ----------------------------------------------------------------------------------------------------------------


def _rename(key: str) -> str | None:
    for pattern, replacement in AFCLAP_KEY_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def convert_afclap_state_dict(
    state: dict[str, torch.Tensor], config, report: ConversionReport | None = None
) -> dict[str, torch.Tensor]:
    """Maps original CLAP keys (without ``module.``) to :class:`AFClapModel` keys.

    The HTSAT body goes through :func:`af2_hf.convert_af2.convert_htsat_state_dict` (which drops the torchlibrosa
    front end and ``head``, a layer the original's forward never calls); the fusion branch and the tagging head
    ``tscam_conv`` are mapped by :data:`AFCLAP_KEY_RULES`; the tied T5 copy
    ``encoder.embed_tokens.weight`` must equal ``shared.weight``; any other key no rule places is an error.
    """
    report = report if report is not None else ConversionReport()
    htsat = {
        key[len(_HTSAT_PREFIX):]: value
        for key, value in state.items()
        if key.startswith(_HTSAT_PREFIX) and not _HTSAT_EXTRAS.fullmatch(key)
    }
    out = convert_htsat_state_dict(htsat, config.audio_config, prefix="audio_model.", report=report)
    unknown = []
    for key, value in state.items():
        if key.startswith(_HTSAT_PREFIX) and not _HTSAT_EXTRAS.fullmatch(key):
            continue
        if key == _T5_TIED_COPY:
            if not torch.equal(value, state.get("text_branch.shared.weight", torch.empty(0))):
                raise ConversionError(f"{key} differs from text_branch.shared.weight (they are tied in T5).")
            report.drop("text_branch.encoder.embed_tokens.weight (tied to shared.weight; verified equal)", key)
            continue
        native = _rename(key)
        if native is None:
            unknown.append(key)
            continue
        out[native] = value
        report.sources[native] = f"afclap_ckpt:{key}"
    if unknown:
        raise ConversionError("Unmapped AF-CLAP checkpoint keys: " + ", ".join(sorted(unknown)))
    return out


def _load_model(config, state_dict: dict[str, torch.Tensor]):
    from .modeling_afclap import AFClapModel

    with torch.device("meta"):
        model = AFClapModel(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict) - {"text_model.encoder.embed_tokens.weight"})
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ConversionError(f"Converted state dict does not fit AFClapModel: missing {missing}, unexpected "
                              f"{unexpected}.")
    if "text_model.encoder.embed_tokens.weight" in expected:
        state_dict = {**state_dict, "text_model.encoder.embed_tokens.weight": state_dict["text_model.shared.weight"]}
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:  # differently shaped tensors (e.g. a T5 config whose d_ff does not fit)
        raise ConversionError(f"The checkpoint does not fit the AF-CLAP config built for it: {error}") from None
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def add_afclap_remote_code(directory: str | os.PathLike) -> list[Path]:
    """Copies the AF-CLAP modules (and what they import relatively) into a saved folder and writes ``auto_map``,
    so it loads with ``trust_remote_code=True`` where ``af2_hf`` is not installed (as :mod:`af2_hf.export` does for
    AF2). The ``zero-shot-audio-classification`` pipeline is transformers' own and needs no code."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from .configuration_afclap import AFClapConfig
    from .feature_extraction_afclap import AFClapFeatureExtractor
    from .modeling_afclap import AFClapModel
    from .processing_afclap import AFClapProcessor

    directory = Path(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != AFClapConfig.model_type:
        raise ValueError(f"{config_path} describes model_type {config.get('model_type')!r}, not 'afclap'.")

    def reference(cls) -> str:
        return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"

    copied: list[Path] = []
    for cls in (AFClapConfig, AFClapModel, AFClapFeatureExtractor, AFClapProcessor):
        module_file = Path(sys.modules[cls.__module__].__file__)
        for source in [module_file, *map(Path, get_relative_import_files(module_file))]:
            target = directory / source.name
            if target not in copied:
                shutil.copyfile(source, target)
                copied.append(target)
    config["auto_map"] = {"AutoConfig": reference(AFClapConfig), "AutoModel": reference(AFClapModel)}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    entries = {"AutoProcessor": reference(AFClapProcessor), "AutoFeatureExtractor": reference(AFClapFeatureExtractor)}
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = directory / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data["auto_map"] = {**data.get("auto_map", {}), **entries}
            if isinstance(data.get("feature_extractor"), dict):
                data["feature_extractor"]["auto_map"] = {**data["feature_extractor"].get("auto_map", {}), **entries}
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return copied


def _processor(text_dir: Path, config):
    from transformers import AutoTokenizer

    from .feature_extraction_afclap import AFClapFeatureExtractor
    from .processing_afclap import AFClapProcessor

    tokenizer = AutoTokenizer.from_pretrained(text_dir)
    tokenizer.model_max_length = config.text_context_length
    feature_extractor = AFClapFeatureExtractor(feature_size=config.audio_config.num_mel_bins)
    return AFClapProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def convert_afclap_checkpoint(
    checkpoint: str | os.PathLike,
    text_model: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    remote_code: bool = True,
    verbose: bool = True,
    hub_kwargs: dict | None = None,
) -> ConversionReport:
    """Convert a release checkpoint (``epoch_*.pt``) + the flan-T5 config/tokenizer into ``output_dir``.

    Args:
        checkpoint: the release ``.pt`` file, or a release folder / Hub id holding it in ``clap_ckpt/``.
        text_model: the flan-T5 folder or Hub id the original builds its text tower and tokenizer from
            (``google/flan-t5-large`` for the release); only config and tokenizer files are read.
        output_dir: the folder to write (``model.safetensors``, ``config.json``, processor and tokenizer files). It
            is built beside the target and renamed into place at the end; a non-empty folder is refused unless
            ``overwrite`` (then replaced whole).
        remote_code: also write the modules and ``auto_map`` for ``trust_remote_code=True`` loading.

    Returns:
        The :class:`ConversionReport` (printed when ``verbose``).
    """
    from .atomic import atomic_output_dir

    report = ConversionReport()
    # The target is checked first (a non-empty folder is refused before any work); nothing appears there unless the
    # whole conversion succeeds.
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        state = load_release_state_dict(resolve_checkpoint(checkpoint, **(hub_kwargs or {})))
        text_dir = resolve_text_source(text_model, **(hub_kwargs or {}))
        config = build_afclap_config(state, text_dir)
        model = _load_model(config, convert_afclap_state_dict(state, config, report))
        processor = _processor(text_dir, config)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if remote_code:
            add_afclap_remote_code(staging)
    report.notes.append(
        f"written to {output_dir} ({sum(p.numel() for p in model.parameters())} parameters, float32)."
    )
    if verbose:
        print(report.summary().replace("Audio Flamingo 2 conversion summary", "AF-CLAP conversion summary"))
    return report
