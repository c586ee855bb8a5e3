"""Training with Hugging Face ``Trainer``: the original AF2 batch format, curriculum presets and generation metrics.

* :class:`AudioFlamingo2DataCollator` turns ``{"audio", "prompt", "answer"}`` examples into training batches exactly
  as the original ``AudioTextData`` + ``DataCollator`` + label masking of ``train_utils.py`` do.
* :func:`set_trainable` applies the curriculum stages of the paper (``pretrain``, ``sft``, ``long``) plus ``full``
  and ``lora``, and reports trainable parameters per component.
* :class:`AudioFlamingo2Trainer` is ``Trainer`` with the original's weight-decay grouping.
* :func:`generate_answers`, :func:`answer_accuracy` and :class:`GenerationAccuracyCallback` evaluate with generation
  (exact-match / multiple-choice accuracy).
* :func:`read_manifest` reads the JSONL manifests of ``examples/finetune.py`` and ``examples/evaluate.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import logging

from .audio import load_audio
from .modeling_audioflamingo2 import AudioFlamingo2ForConditionalGeneration, AudioFlamingo2Model

logger = logging.get_logger(__name__)

__all__ = [
    "AF2_LORA_TARGET_MODULES",
    "TRAINING_STAGES",
    "AudioFlamingo2DataCollator",
    "AudioFlamingo2Trainer",
    "GenerationAccuracyCallback",
    "ManifestError",
    "answer_accuracy",
    "build_training_labels",
    "count_trainable_parameters",
    "format_training_text",
    "generate_answers",
    "load_example_audio",
    "match_choice",
    "normalize_answer",
    "read_manifest",
    "score_answer",
    "set_trainable",
]

IGNORE_INDEX = -100

TRAINING_STAGES = ("pretrain", "sft", "long", "full", "lora")

# LoRA targets: the Qwen2 attention projections of the language model and the projections of the gated
# cross-attention blocks. The audio transformer (query/key/value/dense) and HTSAT (query/key/value) use other names,
# so these suffixes hit only the intended layers.
AF2_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "to_q", "to_kv", "to_out"]


# ----------------------------------------------------------------------------------------------------------------------
# Text and labels
# ----------------------------------------------------------------------------------------------------------------------


def _text_field(value, name: str, index: int) -> str:
    # The original applies str() to prompt and output; accept strings and plain numbers, reject anything else
    # (None would silently become "none").
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"Example {index}: {name!r} must be a string, got {type(value).__name__}.")


def format_training_text(prompt: str, answer: str, tokenizer, audio_token: str = "<audio>",
                         end_of_chunk_token: str = "<|endofchunk|>") -> str:
    """The original training text ``f"<audio>{prompt}<SEP>{answer}<|endofchunk|>{eos}"`` (prompt and answer are
    lower-cased, then stripped, as ``AudioTextData`` does)."""
    prompt = str(prompt).lower().strip()
    answer = str(answer).lower().strip()
    return f"{audio_token}{prompt}{tokenizer.sep_token}{answer}{end_of_chunk_token}{tokenizer.eos_token}"


def build_training_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    audio_token_id: int,
    sep_token_id: int,
    end_of_chunk_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, list[int]]:
    """Labels of the original AF2 training loop.

    1. padding (pad id or ``attention_mask`` 0), the first two positions and ``<audio>`` are ignored (-100);
    2. of the rest, only tokens after a ``<SEP>`` up to and including the next ``<|endofchunk|>`` are kept — and
       every eos token is kept wherever it is;
    3. a sample whose last real label is an answer token (the answer was cut by ``max_length``, so no
       ``<|endofchunk|>`` closes it) gets that unfinished answer masked back to the previous ignored / eos /
       ``<|endofchunk|>`` label, as ``train_utils.py`` does.

    ``<SEP>`` is detected on ``input_ids`` (``train_utils.py`` ignores only position 0 before scanning, so a
    ``<SEP>`` at position 1 — an empty prompt — still opens the answer; the copy of the statements in ``factory.py``
    ignores positions 0-1 first and would then mask the whole answer). Both give the same labels for every prompt
    that is not empty.

    Returns:
        ``(labels, cut)``: the labels (same shape as ``input_ids``) and the indices of samples whose answer was cut.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must be 2-D and of the same shape, got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}."
        )
    batch, length = input_ids.shape
    real = attention_mask.bool() & (input_ids != pad_token_id)
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)

    is_event = real & ((input_ids == sep_token_id) | (input_ids == end_of_chunk_token_id))
    last_event = torch.where(is_event, positions, torch.full_like(positions, -1)).cummax(dim=1).values
    # The state at position j is set by the last <SEP> / <|endofchunk|> strictly before j.
    previous_event = torch.cat([torch.full_like(last_event[:, :1], -1), last_event[:, :-1]], dim=1)
    previous_token = input_ids.gather(1, previous_event.clamp(min=0))
    in_answer = (previous_event >= 0) & (previous_token == sep_token_id)

    keep = (in_answer | (input_ids == eos_token_id)) & real & (positions >= 2) & (input_ids != audio_token_id)
    labels = torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    cut = []
    closing = (IGNORE_INDEX, eos_token_id, end_of_chunk_token_id)
    for i in range(batch):
        real_positions = real[i].nonzero()
        if real_positions.numel() == 0:
            continue
        j = int(real_positions[-1])
        if int(labels[i, j]) in closing:
            continue
        cut.append(i)
        while j >= 0 and int(labels[i, j]) not in closing:
            labels[i, j] = IGNORE_INDEX
            j -= 1
    return labels, cut


# ----------------------------------------------------------------------------------------------------------------------
# Audio of an example
# ----------------------------------------------------------------------------------------------------------------------


def _array_to_rate(array, rate, target_rate: int, max_seconds: float, where: str) -> np.ndarray:
    """An in-memory waveform at ``rate`` -> mono float64 at ``target_rate``, with ``load_audio``'s steps: truncate to
    ``max_seconds`` first, divide by the peak if samples leave [-1, 1], resample with librosa. (Peak normalisation
    follows in the feature extractor.)"""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise ValueError(f"{where}: sampling_rate must be a positive integer, got {rate!r}.")
    if isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    data = np.asarray(array, dtype=np.float64)
    if data.ndim != 1:
        raise ValueError(f"{where}: expected a 1-D (mono) waveform, got shape {tuple(data.shape)}.")
    if data.size == 0:
        raise ValueError(f"{where}: the waveform is empty.")
    if not np.isfinite(data).all():
        raise ValueError(f"{where}: the waveform contains NaN or infinite samples.")
    data = data[: int(max_seconds * rate)]
    if data.max() > 1 or data.min() < -1:
        data = data / max(abs(data.max()), abs(data.min()))
    if rate != target_rate:
        import librosa

        data = librosa.resample(data, orig_sr=int(rate), target_sr=target_rate)
        if data.size == 0:
            raise ValueError(f"{where}: the waveform is too short to resample to {target_rate} Hz.")
    return data


def load_example_audio(audio, feature_extractor, max_num_windows: int | None = None, where: str = "audio"):
    """The waveform of one example at the feature extractor's rate.

    Accepted: a path / bytes / binary file object (read with [`af2_hf.load_audio`], the original ``read_audio``); a
    1-D array, tensor or list of numbers already at the feature extractor's rate; a ``datasets`` audio dict
    ``{"array", "sampling_rate"}`` (resampled if needed) or ``{"path", "bytes"}`` (what ``Audio(decode=False)``
    gives: decoded here with soundfile, so torchcodec is not needed); or a decoder object with
    ``get_all_samples()`` (torchcodec's ``AudioDecoder``, what ``datasets`` 4+ returns with ``decode=True``; channel
    0 is kept).
    """
    rate = feature_extractor.sampling_rate
    max_seconds = feature_extractor.max_audio_seconds(max_num_windows)
    if isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(audio, "read"):
        return load_audio(audio, sampling_rate=rate, max_seconds=max_seconds)
    if isinstance(audio, Mapping):
        if audio.get("array") is not None:
            if "sampling_rate" not in audio:
                raise ValueError(f"{where}: an audio dict with 'array' needs 'sampling_rate'.")
            return _array_to_rate(audio["array"], audio["sampling_rate"], rate, max_seconds, where)
        if audio.get("bytes") is not None:
            return load_audio(audio["bytes"], sampling_rate=rate, max_seconds=max_seconds)
        if audio.get("path") is not None:
            return load_audio(audio["path"], sampling_rate=rate, max_seconds=max_seconds)
        raise ValueError(
            f"{where}: an audio dict needs 'array' + 'sampling_rate', 'bytes' or 'path'; got keys {sorted(audio)}."
        )
    if hasattr(audio, "get_all_samples"):
        samples = audio.get_all_samples()
        data = samples.data
        if data.dim() == 2:
            data = data[0]
        return _array_to_rate(data, int(samples.sample_rate), rate, max_seconds, where)
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        if audio.ndim != 1:
            raise ValueError(f"{where}: expected a 1-D waveform at {rate} Hz, got shape {tuple(audio.shape)}.")
        return audio
    if isinstance(audio, (list, tuple)):
        return np.asarray(audio, dtype=np.float64)  # the feature extractor validates the values
    raise TypeError(
        f"{where}: unsupported audio of type {type(audio).__name__}; pass a path, bytes, a 1-D waveform at {rate} Hz "
        "or a datasets audio dict."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Data collator
# ----------------------------------------------------------------------------------------------------------------------


class AudioFlamingo2DataCollator:
    r"""
    Collates ``{"audio", "prompt", "answer"}`` examples into AF2 training batches, as the original does.

    Per example the text ``f"<audio>{prompt}<SEP>{answer}<|endofchunk|>{eos}"`` is built (prompt and answer
    lower-cased and stripped) and tokenised without added special tokens, truncated to ``max_length``; the batch is
    right-padded with the pad token (``attention_mask`` 0). Audio goes through the processor's feature extractor:
    windows of 10 s, a batch padded with silent windows whose ``input_features_mask`` is 0. Labels follow the
    original masking (see [`build_training_labels`]).

    Answers cut by ``max_length``: the original ``train_utils.py`` prints a warning and masks the unfinished answer
    (the ``factory.py`` debug branch, which overwrites the ignored labels with the id of ``"-"``, is a debugging aid
    and is not reproduced). This collator does the same: it logs a warning naming the samples and their lengths and
    masks their unfinished answers, so a cut sample never trains on an answer without its end. A batch in which every
    label is ignored gives a NaN loss; raise ``max_length`` if that happens.

    Args:
        processor ([`AudioFlamingo2Processor`]): its tokenizer (prepared with [`prepare_af2_tokenizer`]) and feature
            extractor are used.
        max_length (`int`, *optional*, defaults to 512): token limit per sample (the original ``max_tokens``).
        audio_key, prompt_key, answer_key (`str`): field names of the examples.
        max_num_windows (`int`, *optional*): windows per audio (default: the feature extractor's).
        pad_to_multiple_of (`int`, *optional*): pad the token length to a multiple of this.

    Audio of an example: see [`load_example_audio`] (paths, arrays at 16 kHz, ``datasets`` audio dicts).
    Use ``remove_unused_columns=False`` in ``TrainingArguments``: the Trainer would otherwise drop these fields.
    """

    def __init__(
        self,
        processor,
        max_length: int = 512,
        audio_key: str = "audio",
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        max_num_windows: int | None = None,
        pad_to_multiple_of: int | None = None,
    ):
        tokenizer = getattr(processor, "tokenizer", None)
        feature_extractor = getattr(processor, "feature_extractor", None)
        if tokenizer is None or feature_extractor is None or not hasattr(processor, "audio_token"):
            raise TypeError(
                f"processor must be an AudioFlamingo2Processor (tokenizer + feature extractor), got "
                f"{type(processor).__name__}."
            )
        for name, value in (
            ("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of), ("max_num_windows", max_num_windows)
        ):
            if value is None and name != "max_length":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if max_length < 4:
            raise ValueError(f"max_length={max_length} cannot hold <audio>, <SEP>, <|endofchunk|> and eos.")
        if tokenizer.sep_token_id is None or tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(
                "The tokenizer needs sep, pad and eos tokens: prepare it with af2_hf.prepare_af2_tokenizer(tokenizer)."
            )
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError(
                "The pad token equals the eos token: eos labels would be masked as padding. Prepare the tokenizer "
                "with af2_hf.prepare_af2_tokenizer (pad = <|PAD_TOKEN|>)."
            )
        self.processor = processor
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.max_length = max_length
        self.audio_key, self.prompt_key, self.answer_key = audio_key, prompt_key, answer_key
        self.max_num_windows = max_num_windows
        self.pad_to_multiple_of = pad_to_multiple_of
        self.token_ids = dict(
            audio_token_id=processor.audio_token_id,
            sep_token_id=tokenizer.sep_token_id,
            end_of_chunk_token_id=processor.end_of_chunk_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    def format_text(self, prompt: str, answer: str) -> str:
        return format_training_text(
            prompt, answer, self.tokenizer, self.processor.audio_token, self.processor.end_of_chunk_token
        )

    def _fields(self, examples) -> list[tuple[Any, str, str]]:
        if isinstance(examples, Mapping) or not isinstance(examples, Sequence) or len(examples) == 0:
            raise TypeError("The collator takes a non-empty list of examples (dicts).")
        fields = []
        for index, example in enumerate(examples):
            if not isinstance(example, Mapping):
                raise TypeError(f"Example {index} is a {type(example).__name__}, not a dict.")
            missing = [key for key in (self.audio_key, self.prompt_key, self.answer_key) if key not in example]
            if missing:
                hint = (
                    " The Trainer removed the columns: pass remove_unused_columns=False in TrainingArguments."
                    if len(missing) == 3
                    else ""
                )
                raise KeyError(
                    f"Example {index} lacks {missing} (has {sorted(example)}).{hint}"
                )
            prompt = _text_field(example[self.prompt_key], self.prompt_key, index)
            answer = _text_field(example[self.answer_key], self.answer_key, index)
            fields.append((example[self.audio_key], prompt, answer))
        return fields

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
        lengths = [len(ids) for ids in encoded]
        too_long = [i for i, n in enumerate(lengths) if n > self.max_length]
        encoded = [ids[: self.max_length] for ids in encoded]
        width = max(len(ids) for ids in encoded)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        if too_long:
            logger.warning(
                f"Samples {too_long} of the batch have {[lengths[i] for i in too_long]} tokens and are cut to "
                f"max_length={self.max_length}; their unfinished answers are masked (no loss), as in the original."
            )
        return input_ids, attention_mask, too_long

    def __call__(self, examples) -> BatchFeature:
        fields = self._fields(examples)
        texts = [self.format_text(prompt, answer) for _, prompt, answer in fields]
        input_ids, attention_mask, _ = self._tokenize(texts)
        labels, cut = build_training_labels(input_ids, attention_mask, **self.token_ids)
        no_answer = [i for i in range(len(texts)) if i not in cut and not (labels[i] != IGNORE_INDEX).any()]
        if no_answer:
            logger.warning(f"Samples {no_answer} of the batch have no answer tokens left to train on.")

        waveforms = [
            load_example_audio(audio, self.feature_extractor, self.max_num_windows, where=f"Example {index} audio")
            for index, (audio, _, _) in enumerate(fields)
        ]
        features = self.feature_extractor(
            waveforms,
            sampling_rate=self.feature_extractor.sampling_rate,
            max_num_windows=self.max_num_windows,
            return_tensors="pt",
        )
        return BatchFeature(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "input_features": features["input_features"],
                "input_features_mask": features["input_features_mask"],
                "labels": labels,
            }
        )


# ----------------------------------------------------------------------------------------------------------------------
# Curriculum presets
# ----------------------------------------------------------------------------------------------------------------------

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


class AudioFlamingo2Trainer(Trainer):
    """``Trainer`` with the original AF2 weight-decay grouping: weight decay applies only to the gated
    cross-attention parameters (with LoRA: to the adapters of the cross-attention projections); everything else,
    including the embedding rows that [`set_trainable`] keeps still, gets none. Everything else is the stock
    ``Trainer``."""

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name in super().get_decay_parameter_names(model) if "cross_attention_layers" in name]


# ----------------------------------------------------------------------------------------------------------------------
# Generation and accuracy
# ----------------------------------------------------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"[^\w\s]")
_SPACES = re.compile(r"\s+")
_LETTER_OPTION = re.compile(r"^\(?([a-z])[\).:]\s*(.*)$")


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed (for exact-match accuracy)."""
    text = _PUNCTUATION.sub(" ", str(text).lower())
    return _SPACES.sub(" ", text).strip()


def match_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The choice a free-text prediction selects, or ``None``.

    In order: a choice equal to the prediction (after :func:`normalize_answer`); a leading option letter
    ("(b) ...", "b) ...", "b. ...") selecting the choice at that position; the one choice
    contained in the prediction as whole words (a choice inside a longer contained one does not count; two or more
    distinct choices give ``None``)."""
    if not choices:
        raise ValueError("match_choice needs a non-empty list of choices.")
    normalized = [normalize_answer(choice) for choice in choices]
    raw = str(prediction).strip().lower()
    pred = normalize_answer(prediction)
    for choice, norm in zip(choices, normalized):
        if pred == norm:
            return choice
    letter = _LETTER_OPTION.match(raw)
    if letter:
        index = ord(letter.group(1)) - ord("a")
        rest = normalize_answer(letter.group(2))
        if 0 <= index < len(choices) and (not rest or rest == normalized[index]):
            return choices[index]
    padded = f" {pred} "
    contained = [(norm, choice) for choice, norm in zip(choices, normalized) if norm and f" {norm} " in padded]
    # A choice inside a longer contained choice ("rain" in "heavy rain") does not count on its own.
    maximal = [
        (norm, choice) for norm, choice in contained
        if not any(other != norm and f" {norm} " in f" {other} " for other, _ in contained)
    ]
    return maximal[0][1] if len(maximal) == 1 else None


def score_answer(prediction: str, answer: str, choices: Sequence[str] | None = None) -> tuple[bool, str | None]:
    """``(correct, selected)`` for one prediction: with ``choices`` the prediction selects a choice
    (:func:`match_choice`, ``selected`` may be ``None``) that must equal the answer after :func:`normalize_answer`;
    without, the normalised prediction must equal the normalised answer (``selected`` is the prediction)."""
    if choices:
        selected = match_choice(prediction, choices)
        return selected is not None and normalize_answer(selected) == normalize_answer(answer), selected
    return normalize_answer(prediction) == normalize_answer(answer), prediction


def answer_accuracy(predictions: Sequence[str], answers: Sequence[str],
                    choices: Sequence[Sequence[str] | None] | None = None) -> dict[str, float]:
    """Accuracy of generated answers. With ``choices[i]`` (multiple choice) the prediction is mapped to a choice
    with :func:`match_choice` and compared with the answer; without, the normalised texts must be equal.

    Returns:
        ``{"accuracy", "correct", "total", "unmatched"}`` (``unmatched``: multiple-choice predictions selecting no
        choice)."""
    if len(predictions) != len(answers):
        raise ValueError(f"Got {len(predictions)} predictions for {len(answers)} answers.")
    if choices is not None and len(choices) != len(answers):
        raise ValueError(f"Got {len(choices)} choice lists for {len(answers)} answers.")
    correct = unmatched = 0
    for i, (prediction, answer) in enumerate(zip(predictions, answers)):
        options = choices[i] if choices is not None else None
        is_correct, selected = score_answer(prediction, answer, options)
        correct += is_correct
        unmatched += bool(options) and selected is None
    total = len(answers)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total, "unmatched": unmatched}


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def generate_answers(
    model,
    processor,
    examples: Sequence[Mapping],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    audio_key: str = "audio",
    prompt_key: str = "prompt",
    max_num_windows: int | None = None,
    progress: bool = False,
    **generate_kwargs,
) -> list[str]:
    """Greedy (by default) answers of ``model`` for ``{"audio", "prompt"}`` examples, batched with left padding,
    decoded as the original ``predict`` does ([`AudioFlamingo2Processor.decode_answer`]). ``progress`` shows a tqdm
    bar. Extra keyword arguments go to ``generate``. The model's train/eval mode is restored afterwards."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    examples = list(examples)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generate_kwargs.setdefault("do_sample", False)
    answers: list[str] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc="generating", unit="example")
    try:
        for offset, chunk in zip(range(0, len(examples), batch_size), _batches(examples, batch_size)):
            prompts, waveforms = [], []
            for index, example in enumerate(chunk, start=offset):
                if not isinstance(example, Mapping) or audio_key not in example or prompt_key not in example:
                    raise KeyError(f"Example {index} needs {audio_key!r} and {prompt_key!r} fields.")
                prompts.append(_text_field(example[prompt_key], prompt_key, index))
                waveforms.append(
                    load_example_audio(
                        example[audio_key], processor.feature_extractor, max_num_windows, where=f"Example {index} audio"
                    )
                )
            inputs = processor(
                text=prompts,
                audio=waveforms,
                sampling_rate=processor.feature_extractor.sampling_rate,
                max_num_windows=max_num_windows,
                padding_side="left",
                return_tensors="pt",
            ).to(device)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
            sequences = output.sequences if hasattr(output, "sequences") else output
            answers.extend(processor.batch_decode_answers(sequences[:, inputs["input_ids"].shape[1] :]))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return answers


class GenerationAccuracyCallback(TrainerCallback):
    """Adds generation accuracy to every ``Trainer.evaluate``: generates answers for ``examples``
    (``{"audio", "prompt", "answer"[, "choices"]}``), scores them with :func:`answer_accuracy`, puts
    ``{metric_prefix}_accuracy`` into the returned metrics and the log history, and keeps the predictions in
    ``last_predictions``. Every process generates for the full list (fine for single-process and DDP runs)."""

    def __init__(self, processor, examples: Sequence[Mapping], batch_size: int = 8, max_new_tokens: int = 32,
                 metric_prefix: str = "eval_generation", answer_key: str = "answer", choices_key: str = "choices",
                 **generate_kwargs):
        examples = list(examples)
        if not examples:
            raise ValueError("GenerationAccuracyCallback needs at least one example.")
        for index, example in enumerate(examples):
            if answer_key not in example:
                raise KeyError(f"Example {index} has no {answer_key!r} field.")
        self.processor = processor
        self.examples = examples
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.metric_prefix = metric_prefix
        self.answer_key = answer_key
        self.choices_key = choices_key
        self.generate_kwargs = generate_kwargs
        self.last_predictions: list[str] = []

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        predictions = generate_answers(
            model, self.processor, self.examples, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
            **self.generate_kwargs,
        )
        self.last_predictions = predictions
        scores = answer_accuracy(
            predictions,
            [str(example[self.answer_key]) for example in self.examples],
            [example.get(self.choices_key) for example in self.examples],
        )
        new = {f"{self.metric_prefix}_{key}": value for key, value in scores.items()}
        if metrics is not None:
            metrics.update(new)
        state.log_history.append({**new, "step": state.global_step})
        if state.is_world_process_zero:
            logger.info(f"generation accuracy at step {state.global_step}: {scores}")


# ----------------------------------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------------------------------


class ManifestError(ValueError):
    """A JSONL manifest line is not valid."""


_FIELD_ALIASES = {"audio": ("audio", "name"), "prompt": ("prompt",), "answer": ("answer", "output")}


def read_manifest(path, audio_root=None, require_answer: bool = True) -> list[dict]:
    """Reads a JSONL manifest: one JSON object per line (blank lines are skipped) with

    * ``"audio"`` (or ``"name"``, the original dataset files' key): path of the audio file; a relative path is
      resolved against ``audio_root`` (default: the manifest's folder);
    * ``"prompt"``: the question / instruction;
    * ``"answer"`` (or ``"output"``, the original's key): the target text (needed unless ``require_answer=False``);
    * optional ``"choices"``: list of strings (multiple choice; used by the accuracy);
    * other keys are kept as they are.

    Returns a list of dicts with the canonical keys ``audio`` (absolute path), ``prompt``, ``answer`` (if present),
    plus the other fields. Raises :class:`ManifestError` naming the line on bad input, ``FileNotFoundError`` for a
    missing manifest."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Manifest {path!r} does not exist.")
    root = os.path.dirname(os.path.abspath(path)) if audio_root is None else os.fspath(audio_root)
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ManifestError(f"{where}: not valid JSON ({error.msg}).") from error
            if not isinstance(item, dict):
                raise ManifestError(f"{where}: expected a JSON object, got {type(item).__name__}.")
            row = dict(item)
            for canonical, aliases in _FIELD_ALIASES.items():
                present = [key for key in aliases if key in item]
                if len(present) > 1:
                    raise ManifestError(f"{where}: give only one of {present}.")
                if not present:
                    if canonical == "answer" and not require_answer:
                        continue
                    raise ManifestError(f"{where}: missing field {' / '.join(repr(a) for a in aliases)}.")
                value = row.pop(present[0])
                if canonical == "audio":
                    if not isinstance(value, str) or not value:
                        raise ManifestError(f"{where}: 'audio' must be a non-empty path string.")
                    value = value if os.path.isabs(value) else os.path.join(root, value)
                elif not isinstance(value, str) and not (
                    isinstance(value, (int, float)) and not isinstance(value, bool)
                ):
                    raise ManifestError(f"{where}: {canonical!r} must be a string, got {type(value).__name__}.")
                row[canonical] = value if canonical == "audio" else str(value)
            if "choices" in row:
                choices = row["choices"]
                if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                    raise ManifestError(f"{where}: 'choices' must be a non-empty list of strings.")
            rows.append(row)
    if not rows:
        raise ManifestError(f"Manifest {path!r} holds no examples.")
    return rows
