"""Processor of AF-CLAP: the flan-T5 tokenizer as the original calls it, plus the fusion features of the clips."""

from __future__ import annotations

from collections.abc import Sequence

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

__all__ = ["AFClapProcessor"]


def _check_texts(text) -> list[str]:
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}.")
    if len(texts) == 0:
        raise ValueError("The list of texts is empty: give at least one text (label, caption or query).")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"Text(s) {empty} are empty or whitespace only: AF-CLAP has nothing to embed.")
    return list(texts)


class AFClapProcessor(ProcessorMixin):
    r"""
    AF-CLAP processor: [`AFClapFeatureExtractor`] for audio and the flan-T5 tokenizer for text.

    Texts are tokenized as the original ``CLAP_Module.tokenizer``: ``padding="max_length"``, ``truncation=True``,
    ``max_length=77`` (EOS appended; a longer text keeps its first 76 tokens and EOS). Unlike the original, a single
    text (or a one-element list) gives a `(1, 77)` batch instead of failing. Empty texts are refused.

    Args:
        feature_extractor ([`AFClapFeatureExtractor`]): the audio features.
        tokenizer ([`T5Tokenizer`]): the flan-T5 tokenizer.
        text_context_length (`int`, *optional*, defaults to 77): tokens per text, EOS included.
    """

    def __init__(self, feature_extractor=None, tokenizer=None, text_context_length: int = 77, **kwargs):
        self.text_context_length = text_context_length
        super().__init__(feature_extractor, tokenizer, **kwargs)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        audio=None,
        sampling_rate: int | None = None,
        crop_indices=None,
        generator=None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Tokenize ``text`` and/or compute the features of ``audio``.

        Args:
            text: a text or a list of texts.
            audio: a clip or a list of clips (see [`AFClapFeatureExtractor.__call__`]).
            sampling_rate, crop_indices, generator: passed to the feature extractor.
            return_tensors: `"pt"` (default), `"np"` or `None`.

        Returns:
            [`BatchFeature`] with `input_ids`/`attention_mask` `(num_texts, 77)` and/or `input_features`
            `(num_clips, 4, 1001, mel_bins)`/`is_longer` `(num_clips, 1)`.
        """
        if text is None and audio is None:
            raise ValueError("Give text, audio, or both.")
        data = {}
        if text is not None:
            # The original's call; a caller's padding/truncation/max_length override it (the model re-packs any
            # padding to the 77 positions it reads, see AFClapModel.pack_text).
            tokenizer_kwargs = {"padding": "max_length", "truncation": True, "max_length": self.text_context_length}
            encoded = self.tokenizer(
                _check_texts(text), return_tensors=return_tensors, **{**tokenizer_kwargs, **kwargs}
            )
            data.update(encoded)
        if audio is not None:
            features = self.feature_extractor(
                audio, sampling_rate=sampling_rate, crop_indices=crop_indices, generator=generator,
                return_tensors=return_tensors,
            )
            data.update(features)
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features", "is_longer"]
