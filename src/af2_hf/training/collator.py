"""Data collation: ``{"audio", "prompt", "answer"}`` examples -> AF2 training batches, as the original does."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import logging

from ..example_audio import load_example_audio, text_field
from .labels import IGNORE_INDEX, build_training_labels, format_training_text

logger = logging.get_logger(__name__)

__all__ = ["AudioFlamingo2DataCollator"]


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
            prompt = text_field(example[self.prompt_key], self.prompt_key, index)
            answer = text_field(example[self.answer_key], self.answer_key, index)
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
