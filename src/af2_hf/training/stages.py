"""Curriculum presets: which parameters train in each AF2 stage (``pretrain``, ``sft``, ``long``) plus ``full`` and
``lora``, and trainable-parameter counts per component."""

from __future__ import annotations

import os

import torch

from ..modeling_audioflamingo2 import AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model

__all__ = [
    "AF2_LORA_TARGET_MODULES",
    "TRAINING_STAGES",
    "count_trainable_parameters",
    "format_parameter_counts",
    "set_trainable",
]

TRAINING_STAGES = ("pretrain", "sft", "long", "full", "lora")

# LoRA targets: the Qwen2 attention projections of the language model and the projections of the gated
# cross-attention blocks. The audio transformer (query/key/value/dense) and HTSAT (query/key/value) use other names,
# so these suffixes hit only the intended layers.
AF2_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "to_q", "to_kv", "to_out"]


_ADAPTER_MARKERS = ("lora_", ".modules_to_save.", ".trainable_tokens_")
_COMPONENTS = ("audio_tower", "audio_transformer", "cross_attention", "language_model", "embed_tokens", "lm_head")


def _af2_parts(model) -> tuple[AudioFlamingo2Model, torch.nn.Module | None]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base, AudioFlamingo2ForConditionalGeneration):
        return base.model, base.lm_head
    if isinstance(base, AudioFlamingo2Model):
        return base, None
    raise TypeError(
        f"Expected an AudioFlamingo2ForConditionalGeneration / AudioFlamingo2Model (or a PEFT model around one), got "
        f"{type(base).__name__}."
    )


def _is_adapter(name: str) -> bool:
    return any(marker in "." + name for marker in _ADAPTER_MARKERS)


def _component(name: str) -> str:
    dotted = "." + name + "."
    if _is_adapter(name):
        return "adapters"
    if ".audio_tower." in dotted:
        return "audio_tower"
    if ".audio_transformer." in dotted:
        return "audio_transformer"
    if ".cross_attention_layers." in dotted:
        return "cross_attention"
    if ".embed_tokens." in dotted:
        return "embed_tokens"
    if ".language_model." in dotted:
        return "language_model"
    if ".lm_head." in dotted:
        return "lm_head"
    return "other"


def count_trainable_parameters(model) -> dict[str, dict[str, int]]:
    """Trainable / total parameters per component: ``audio_tower`` (AF-CLAP), ``audio_transformer``,
    ``cross_attention``, ``language_model`` (without its input embedding), ``embed_tokens``, ``lm_head`` (0 when tied:
    the weight is counted once, under ``embed_tokens``), ``adapters`` (PEFT) and ``total``. Shared parameters are
    counted once. ``embed_tokens`` also holds ``updated_rows``: the rows that receive gradients (all rows, only the
    rows of the added tokens when [`set_trainable`] restricted them, or 0)."""
    af2, _ = _af2_parts(model)
    counts = {name: {"trainable": 0, "total": 0} for name in (*_COMPONENTS, "adapters", "other", "total")}
    for name, param in model.named_parameters():
        for key in (_component(name), "total"):
            counts[key]["total"] += param.numel()
            if param.requires_grad:
                counts[key]["trainable"] += param.numel()
    embedding = af2.get_input_embeddings().weight
    rows = getattr(af2, "_af2_embedding_rows", None)
    if not embedding.requires_grad:
        counts["embed_tokens"]["updated_rows"] = 0
    else:
        counts["embed_tokens"]["updated_rows"] = embedding.shape[0] if rows is None else len(rows)
    if counts["other"]["total"] == 0:
        del counts["other"]
    return counts


def _remove_embedding_hook(af2: AudioFlamingo2Model):
    handle = getattr(af2, "_af2_embedding_hook", None)
    if handle is not None:
        handle.remove()
    af2._af2_embedding_hook = None
    af2._af2_embedding_rows = None


def _restrict_embedding_rows(af2: AudioFlamingo2Model, rows: list[int]):
    weight = af2.get_input_embeddings().weight
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[rows] = 1

    def keep_rows(grad):
        return grad * mask.to(device=grad.device, dtype=grad.dtype)

    af2._af2_embedding_hook = weight.register_hook(keep_rows)
    af2._af2_embedding_rows = list(rows)


def set_trainable(model, stage: str, train_embeddings: bool | str | None = None, verbose: bool = True) -> dict:
    """Sets ``requires_grad`` for an AF2 training stage and returns :func:`count_trainable_parameters`.

    Stages (paper §4 and the original ``create_model_and_transforms``):

    * ``"pretrain"``: audio transformer + gated cross-attention; AF-CLAP and the LM frozen.
    * ``"sft"``: additionally AF-CLAP (the original's ``clap_config.finetune``); its BatchNorm then trains too.
    * ``"long"``: audio transformer + cross-attention (long-audio fine-tuning; pair it with a feature extractor of
      more windows).
    * ``"full"``: every parameter.
    * ``"lora"``: every base parameter frozen; only PEFT's parameters (``lora_*``, ``modules_to_save``,
      ``trainable_tokens``) keep the ``requires_grad`` PEFT gave them. Call it before or after
      ``peft.get_peft_model`` (which itself freezes the base model).

    Input embeddings (``train_embeddings``):

    * ``None`` (default): as the original — in ``pretrain``/``sft``/``long`` the embedding is trainable but only
      the rows of ``<audio>`` and ``<|endofchunk|>`` receive gradients (``"added"``); in ``full`` every row
      trains (``"all"``); in ``lora`` it is frozen.
    * ``True``: the same as ``None`` for every stage but ``lora``, where it is an error (use PEFT's
      ``modules_to_save`` or ``trainable_token_indices`` to train embeddings with LoRA).
    * ``"added"`` / ``"all"``: force one of the two; ``False``: freeze the embedding.

    Tied embeddings: ``lm_head.weight`` IS the embedding matrix, so it follows the embedding (with ``"added"`` only
    the rows of the two added tokens move, in both roles — as in the original, which masked the gradient of the
    shared matrix). An untied ``lm_head`` trains only in ``full``.

    The ``"added"`` restriction is a gradient hook on the embedding weight: it works in one process and with DDP,
    but does not survive FSDP wrapping (FSDP replaces the parameters; all rows then train, as in the original with
    FSDP without ``use_orig_params``). Weight decay would still shrink the frozen rows: use
    [`AudioFlamingo2Trainer`] (decay only on cross-attention, as the original) or ``weight_decay=0``. Calling the
    function again replaces the previous setting. A frozen AF-CLAP keeps its BatchNorm in eval mode under
    ``model.train()``.

    Args:
        model: an [`AudioFlamingo2ForConditionalGeneration`] / [`AudioFlamingo2Model`], or a PEFT model around one.
        stage (`str`): one of ``TRAINING_STAGES``.
        train_embeddings (`bool`, `str` or `None`): see above.
        verbose (`bool`): print the counts (on the main process only).

    Returns:
        `dict`: per-component ``{"trainable": int, "total": int}`` (see :func:`count_trainable_parameters`).
    """
    if stage not in TRAINING_STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose one of {TRAINING_STAGES}.")
    if train_embeddings not in (None, True, False, "added", "all"):
        raise ValueError(f"train_embeddings must be None, True, False, 'added' or 'all', got {train_embeddings!r}.")
    af2, lm_head = _af2_parts(model)
    if stage == "lora":
        if train_embeddings not in (None, False):
            raise ValueError(
                "In the 'lora' stage only PEFT's parameters train; to train embeddings with LoRA use "
                "LoraConfig(modules_to_save=[...]) or LoraConfig(trainable_token_indices=...)."
            )
        rows_mode = None
    elif train_embeddings is False:
        rows_mode = None
    elif train_embeddings in ("added", "all"):
        rows_mode = train_embeddings
    else:
        rows_mode = "all" if stage == "full" else "added"

    _remove_embedding_hook(af2)
    for name, param in model.named_parameters():
        if not _is_adapter(name):
            param.requires_grad_(stage == "full")
    if stage in ("pretrain", "sft", "long"):
        af2.audio_transformer.requires_grad_(True)
        af2.cross_attention_layers.requires_grad_(True)
    if stage == "sft":
        af2.audio_tower.requires_grad_(True)

    embedding = af2.get_input_embeddings().weight
    embedding.requires_grad_(rows_mode is not None)
    if rows_mode == "added":
        config = af2.config
        rows = sorted({config.audio_token_id, config.end_of_chunk_token_id})
        if max(rows) >= embedding.shape[0]:
            raise ValueError(
                f"The added token ids {rows} are outside the embedding ({embedding.shape[0]} rows): resize the "
                "token embeddings to len(tokenizer) first."
            )
        _restrict_embedding_rows(af2, rows)
    if lm_head is not None and lm_head.weight is not embedding and stage != "full":
        lm_head.weight.requires_grad_(False)
    # Train/eval mode of a frozen audio tower (BatchNorm statistics) follows the new flags at once.
    if af2.training:
        af2.train()

    counts = count_trainable_parameters(model)
    if verbose and int(os.environ.get("RANK", "0")) == 0:
        print(format_parameter_counts(counts, title=f"AF2 stage {stage!r}"))
    return counts


def format_parameter_counts(counts: dict, title: str = "trainable parameters") -> str:
    lines = [f"{title}:", f"  {'component':<18}{'trainable':>14}{'total':>14}"]
    for name, entry in counts.items():
        extra = ""
        if name == "embed_tokens" and entry.get("trainable"):
            extra = f"  ({entry['updated_rows']} rows updated)"
        lines.append(f"  {name:<18}{entry['trainable']:>14,}{entry['total']:>14,}{extra}")
    return "\n".join(lines)
