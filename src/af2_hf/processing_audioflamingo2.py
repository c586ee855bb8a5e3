"""Processor of Audio Flamingo 2: the AF2 prompt format, the tokenizer and the windowed log-mel features."""

import copy
import os
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import AudioKwargs, ProcessingKwargs, ProcessorMixin
from transformers.utils import logging

from .feature_extraction_audioflamingo2 import (
    AudioFlamingo2FeatureExtractor,
    _is_scalar_number,
    _truncation_enabled,
)
from .audio import load_audio
from .tokenization_audioflamingo2 import AF2_AUDIO_TOKEN, AF2_END_OF_CHUNK_TOKEN

logger = logging.get_logger(__name__)

__all__ = ["AudioFlamingo2Processor", "AF2_CHAT_TEMPLATE"]

# One user turn renders as the original prompt f"<audio>{question.lower().strip()}<SEP>" (one <audio> per audio
# block, always in front of the text, whatever the order of the blocks); an assistant turn renders as the original
# training target f"{answer.lower().strip()}<|endofchunk|>{eos}". `sep_token` and `eos_token` come from the
# tokenizer. The assistant part is wrapped in {% generation %} for return_assistant_tokens_mask.
AF2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set ns = namespace(audio='', text='') -%}"
    "{%- if message['content'] is string -%}"
    "{%- set ns.text = message['content'] -%}"
    "{%- else -%}"
    "{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'audio' -%}"
    "{%- set ns.audio = ns.audio + '<audio>' -%}"
    "{%- elif block['type'] == 'text' -%}"
    "{%- set ns.text = ns.text + (' ' if ns.text else '') + block['text'] -%}"
    "{%- else -%}"
    "{{- raise_exception('Audio Flamingo 2 conversations hold audio and text blocks only, got ' + block['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ns.audio + (ns.text | lower | trim) + sep_token -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if ns.audio -%}"
    "{{- raise_exception('Audio Flamingo 2 assistant turns cannot contain audio.') -}}"
    "{%- endif -%}"
    "{%- generation -%}"
    "{{- (ns.text | lower | trim) + '<|endofchunk|>' + eos_token -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('Audio Flamingo 2 conversations have user and assistant turns only, got '"
    " + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_FEATURE_EXTRACTOR_CALL_KWARGS = ("device", "do_normalize", "do_quantize", "max_num_windows")
_TOKENIZER_CALL_KWARGS = (
    "add_special_tokens",
    "padding",
    "padding_side",
    "truncation",
    "max_length",
    "pad_to_multiple_of",
    "return_attention_mask",
    "return_offsets_mapping",
    "return_token_type_ids",
    "return_length",
)


class AudioFlamingo2AudioKwargs(AudioKwargs, total=False):
    """
    do_normalize (`bool`, *optional*): peak-normalise each waveform (default: the feature extractor's).
    do_quantize (`bool`, *optional*): int16 round trip (default: the feature extractor's).
    max_num_windows (`int`, *optional*): windows kept per audio (default: the feature extractor's).
    """

    do_normalize: bool | None
    do_quantize: bool | None
    max_num_windows: int | None


_TEXT_KWARGS_DEFAULTS = {
    "padding": "longest",
    "padding_side": "left",
    "truncation": True,
    "max_length": 512,
    "add_special_tokens": False,
}


class AudioFlamingo2ProcessorKwargs(ProcessingKwargs, total=False):
    audio_kwargs: AudioFlamingo2AudioKwargs
    # transformers < 5.2x reads the defaults from here only; newer releases from the processor's class attributes.
    _defaults = {"text_kwargs": _TEXT_KWARGS_DEFAULTS, "audio_kwargs": {}}


def _is_single_waveform(audio) -> bool:
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        return audio.ndim == 1
    if isinstance(audio, (list, tuple)):
        return len(audio) > 0 and all(_is_scalar_number(v) for v in audio)
    return True  # a path, bytes or file object


def _is_file_source(audio) -> bool:
    return isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(audio, "read")


class AudioFlamingo2Processor(ProcessorMixin):
    r"""
    Audio Flamingo 2 processor: an [`AudioFlamingo2FeatureExtractor`] and the AF2 tokenizer (a Qwen2 tokenizer
    prepared with [`prepare_af2_tokenizer`]).

    ``processor(text=..., audio=...)`` pairs every text with exactly one audio. A plain question becomes the original
    prompt ``f"<audio>{question.lower().strip()}<SEP>"``; a text that already contains ``<audio>`` (once) is used
    verbatim (e.g. a training text ``"<audio>q<SEP>a<|endofchunk|><|endoftext|>"``). The AF2 audio token is not
    expanded: the audio enters the model through cross-attention. Texts are tokenised with ``max_length=512`` and
    truncation (a warning names truncated samples) and without added BOS/EOS, as the original.

    Padding side: ``"left"`` by default, which is what batched generation needs; pass ``padding_side="right"`` for
    training (the original collator pads on the right with ``<|PAD_TOKEN|>``). Audio windows are always padded at
    the end with zero clips (``input_features_mask`` 0).

    Audio may be 16 kHz waveforms (numpy, torch, lists) or paths / bytes / binary file objects, which are loaded
    with [`af2_hf.load_audio`] (the original ``read_audio``; at most ``max_num_windows`` windows are read).

    Edge cases (see also [`AudioFlamingo2FeatureExtractor`] for waveforms: integer PCM, NaN, silence, channels):

    - ``text=None``: audio only, the result holds the features alone. An empty or blank question gives the prompt
      ``"<audio><SEP>"``; non-ASCII questions are lower-cased by Python's ``str.lower`` exactly as in the original.
    - One text with a 2-D audio array: the array is ONE multi-channel waveform in either orientation (channel 0 is
      kept, with a warning). With several texts, or none, a 2-D array is a batch as for the feature extractor.
    - Counts: exactly one audio per text and at most one ``<audio>`` per text, else `ValueError`.
    - ``sampling_rate`` describes waveform inputs. Missing: a warning, and the feature extractor's rate is
      assumed; different from it: `ValueError`. Files are read at their own rate and resampled, so with files only
      a ``sampling_rate`` other than the extractor's is refused as a likely mistake.
    - Lengths: prompts longer than ``max_length`` (512) tokens and audio longer than ``max_num_windows`` windows
      are truncated with a warning naming them, as the original truncates. ``truncation=False`` raises a
      `ValueError` for both instead (``text_kwargs={"truncation": False}`` or ``audio_kwargs={"truncation":
      False}`` for one of them only); ``max_length=None`` lifts the prompt limit.

    Args:
        feature_extractor ([`AudioFlamingo2FeatureExtractor`]): the feature extractor.
        tokenizer ([`PreTrainedTokenizerBase`]): the AF2 tokenizer (must contain ``<audio>`` and a sep token).
        chat_template (`str`, *optional*): Jinja chat template; defaults to [`AF2_CHAT_TEMPLATE`].
        audio_token (`str`, *optional*, defaults to ``"<audio>"``): the audio placeholder token.
        end_of_chunk_token (`str`, *optional*, defaults to ``"<|endofchunk|>"``): the end of an answer.
    """

    valid_processor_kwargs = AudioFlamingo2ProcessorKwargs
    text_kwargs = _TEXT_KWARGS_DEFAULTS
    audio_kwargs = {}

    def __init__(
        self,
        feature_extractor,
        tokenizer,
        chat_template=None,
        audio_token: str = AF2_AUDIO_TOKEN,
        end_of_chunk_token: str = AF2_END_OF_CHUNK_TOKEN,
    ):
        if not isinstance(feature_extractor, AudioFlamingo2FeatureExtractor):
            raise TypeError(
                f"feature_extractor must be an AudioFlamingo2FeatureExtractor, got {type(feature_extractor).__name__}."
            )
        for name, token in (("audio_token", audio_token), ("end_of_chunk_token", end_of_chunk_token)):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id or token not in tokenizer.get_vocab():
                raise ValueError(
                    f"The tokenizer has no {name} {token!r}: prepare it with af2_hf.prepare_af2_tokenizer(tokenizer)."
                )
        if tokenizer.sep_token is None or tokenizer.pad_token is None:
            raise ValueError(
                "The tokenizer needs a sep token and a pad token: prepare it with "
                "af2_hf.prepare_af2_tokenizer(tokenizer)."
            )
        self.audio_token = audio_token
        self.audio_token_id = tokenizer.convert_tokens_to_ids(audio_token)
        self.end_of_chunk_token = end_of_chunk_token
        self.end_of_chunk_token_id = tokenizer.convert_tokens_to_ids(end_of_chunk_token)
        if chat_template is None:
            chat_template = AF2_CHAT_TEMPLATE
        super().__init__(feature_extractor, tokenizer, chat_template=chat_template)

    # ------------------------------------------------------------------ loading

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The feature extractor is loaded with the class this module imports, not through AutoFeatureExtractor
        # (where af2_hf registers it): with trust_remote_code, transformers loads every module of a checkpoint in
        # its own hashed package, so AutoFeatureExtractor would return another class object than the one this
        # module imports, and the isinstance check in __init__ would fail. The class reads the config nested in
        # processor_config.json (or preprocessor_config.json).
        subfolder = kwargs.pop("subfolder", None)
        if subfolder:
            kwargs["subfolder"] = subfolder
        feature_extractor = AudioFlamingo2FeatureExtractor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [feature_extractor, tokenizer]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features", "input_features_mask"]

    # ------------------------------------------------------------------ prompts

    def format_prompt(self, question: str) -> str:
        """The original AF2 prompt: ``f"<audio>{question.lower().strip()}{sep_token}"``."""
        return f"{self.audio_token}{str(question).lower().strip()}{self.tokenizer.sep_token}"

    def _prompts(self, text) -> list[str]:
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings.")
        if len(texts) == 0:
            raise ValueError("text is an empty list.")
        prompts = []
        for index, sample in enumerate(texts):
            count = sample.count(self.audio_token)
            if count == 0:
                prompts.append(self.format_prompt(sample))
            elif count == 1:
                prompts.append(sample)
            else:
                raise ValueError(
                    f"Text {index} contains {count} {self.audio_token} tokens; Audio Flamingo 2 takes exactly one "
                    "audio per text."
                )
        return prompts

    def _audio_items(self, audio, num_texts: int | None) -> list:
        if _is_single_waveform(audio):
            return [audio]
        if isinstance(audio, (np.ndarray, torch.Tensor)):
            if audio.ndim != 2:
                raise ValueError(f"Audio arrays must be 1-D (one waveform) or 2-D (a batch), got {tuple(audio.shape)}.")
            if num_texts == 1:
                return [audio]  # one text: one (multi-channel) waveform, in either orientation
            return [audio] if audio.shape[0] > audio.shape[1] else list(audio)
        items = list(audio)
        if len(items) == 0:
            raise ValueError("audio is an empty list.")
        return items

    def _load_items(self, items: list, max_num_windows: int | None, truncation: bool) -> list:
        max_seconds = self.feature_extractor.max_audio_seconds(max_num_windows)
        rate = self.feature_extractor.sampling_rate
        return [
            load_audio(item, sampling_rate=rate, max_seconds=max_seconds, truncation=truncation)
            if _is_file_source(item)
            else item
            for item in items
        ]

    # ------------------------------------------------------------------ call

    def __call__(self, text=None, audio=None, images=None, videos=None, **kwargs) -> BatchFeature:
        """Prepares model inputs.

        Args:
            text (`str` or `list[str]`): questions (formatted as AF2 prompts) or texts holding one ``<audio>`` each.
            audio: one audio per text: waveforms at 16 kHz (numpy / torch / list of floats; a 2-D array is a batch)
                or paths, bytes or binary file objects.
            sampling_rate (`int`, *optional*): the rate of waveform inputs; must be the feature extractor's (a
                warning when it is missing and waveforms are given).
            return_tensors (`str`, *optional*): ``"pt"`` or ``"np"``.
            padding_side (`str`, *optional*, defaults to ``"left"``): ``"right"`` for training batches.
            truncation (`bool`, *optional*, defaults to `True`): cut prompts over ``max_length`` tokens and audio over
                ``max_num_windows`` windows, with a warning; `False` raises a `ValueError` for either instead.
            max_length (`int`, *optional*, defaults to 512), padding and the other tokenizer arguments, or
                ``text_kwargs={...}``.
            device, do_normalize, do_quantize, max_num_windows: feature extractor arguments (or
                ``audio_kwargs={...}``).

        Returns:
            [`BatchFeature`] with ``input_ids``, ``attention_mask``, ``input_features`` and ``input_features_mask``
            (audio only: the last two; text only is not accepted, AF2 prompts need their audio).
        """
        if images is not None or videos is not None:
            raise ValueError(f"{self.__class__.__name__} takes text and audio only.")
        if text is None and audio is None:
            raise ValueError("Pass text and audio (one audio per text), or audio alone.")
        text_replacement_offsets = kwargs.pop("return_text_replacement_offsets", False)
        kwargs.pop("return_mm_token_type_ids", None)
        merged = self._merge_kwargs(AudioFlamingo2ProcessorKwargs, **kwargs)
        text_kwargs, audio_kwargs = merged["text_kwargs"], merged["audio_kwargs"]
        return_tensors = text_kwargs.get("return_tensors", audio_kwargs.get("return_tensors"))
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")

        prompts = self._prompts(text) if text is not None else None
        if prompts is not None and audio is None:
            raise ValueError(
                f"Got {len(prompts)} text(s) but no audio: Audio Flamingo 2 takes exactly one audio per text."
            )
        items = self._audio_items(audio, None if prompts is None else len(prompts))
        if prompts is not None and len(prompts) != len(items):
            raise ValueError(
                f"Got {len(prompts)} text(s) and {len(items)} audio(s): Audio Flamingo 2 takes exactly one audio "
                "per text."
            )
        audio_truncation = _truncation_enabled(audio_kwargs.get("truncation"))
        sampling_rate = self._waveform_sampling_rate(items, audio_kwargs.get("sampling_rate"))
        waveforms = self._load_items(items, audio_kwargs.get("max_num_windows"), audio_truncation)

        data: dict[str, Any] = {}
        if prompts is not None:
            data.update(self._tokenize(prompts, text_kwargs, return_tensors))
            if text_replacement_offsets:
                data["text_replacement_offsets"] = [[] for _ in prompts]

        feature_kwargs = {key: audio_kwargs[key] for key in _FEATURE_EXTRACTOR_CALL_KWARGS if key in audio_kwargs}
        data.update(
            self.feature_extractor(
                waveforms,
                sampling_rate=sampling_rate,
                return_tensors=return_tensors,
                truncation=audio_truncation,
                **feature_kwargs,
            )
        )
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _waveform_sampling_rate(self, items: list, sampling_rate):
        """The ``sampling_rate`` handed to the feature extractor: the user's for waveforms (`None` makes it warn),
        the extractor's own when every item is a file (loaded at that rate)."""
        expected = self.feature_extractor.sampling_rate
        if any(not _is_file_source(item) for item in items):
            return sampling_rate
        if sampling_rate is not None and sampling_rate != expected:
            raise ValueError(
                f"sampling_rate={sampling_rate} was given with audio files: files are read at their own rate and "
                f"resampled to {expected} Hz, so sampling_rate (the rate of waveform inputs) must be {expected} or "
                "left out."
            )
        return expected

    def _tokenize(self, prompts: list[str], text_kwargs: dict, return_tensors) -> dict:
        call_kwargs = {key: text_kwargs[key] for key in _TOKENIZER_CALL_KWARGS if key in text_kwargs}
        max_length = call_kwargs.get("max_length")
        if max_length is not None:
            lengths = [
                len(ids)
                for ids in self.tokenizer(
                    prompts, add_special_tokens=call_kwargs.get("add_special_tokens", False), truncation=False
                )["input_ids"]
            ]
            too_long = [index for index, length in enumerate(lengths) if length > max_length]
            if too_long and not _truncation_enabled(call_kwargs.get("truncation", False)):
                raise ValueError(
                    f"Text(s) {too_long} have {[lengths[i] for i in too_long]} tokens, more than max_length="
                    f"{max_length} (truncation=False). Shorten them, pass truncation=True to cut them (with a "
                    "warning), or max_length=None to allow any length."
                )
            if too_long:
                logger.warning(
                    f"Truncating text(s) {too_long} to max_length={max_length} tokens (lengths "
                    f"{[lengths[i] for i in too_long]}); the end of the prompt, including {self.tokenizer.sep_token}, "
                    "is lost."
                )
        return dict(self.tokenizer(prompts, return_tensors=return_tensors, **call_kwargs))

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """Renders AF2 conversations with the chat template (see [`AF2_CHAT_TEMPLATE`]).

        With ``tokenize=True`` the audio of every ``{"type": "audio", "path"|"url"|"audio": ...}`` block is loaded
        with [`af2_hf.load_audio`] (the original ``read_audio``, at most ``max_num_windows`` windows) — not with
        transformers' loader, which resamples differently and does not peak-normalise — and the result is
        model-ready. A batch of conversations is accepted as well.
        """
        if kwargs.get("tokenize", False):
            conversation = self._load_conversation_audio(conversation)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def _load_conversation_audio(self, conversation):
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and isinstance(
            conversation[0], (list, tuple)
        )
        conversations = conversation if batched else [conversation]
        max_seconds = self.feature_extractor.max_audio_seconds()
        sampling_rate = self.feature_extractor.sampling_rate
        loaded = []
        for messages in conversations:
            new_messages = []
            for message in messages:
                content = message.get("content") if isinstance(message, dict) else None
                if not isinstance(content, (list, tuple)):
                    new_messages.append(message)
                    continue
                new_content = []
                for block in content:
                    if isinstance(block, dict) and block.get("type") == "audio":
                        sources = [block[key] for key in ("audio", "url", "path") if key in block]
                        if len(sources) != 1:
                            raise ValueError(
                                "An audio block needs exactly one of 'audio', 'url' or 'path', got "
                                f"{sorted(k for k in block if k != 'type')}."
                            )
                        waveform = self.feature_extractor._fetch(sources[0], sampling_rate, max_seconds)
                        if isinstance(waveform, torch.Tensor):
                            waveform = waveform.detach().cpu().numpy()
                        elif isinstance(waveform, (list, tuple)):
                            waveform = np.asarray(waveform, dtype=np.float64)
                        block = {key: value for key, value in block.items() if key not in ("audio", "url", "path")}
                        block["audio"] = waveform
                    new_content.append(block)
                new_message = copy.copy(message)
                new_message["content"] = new_content
                new_messages.append(new_message)
            loaded.append(new_messages)
        return loaded if batched else loaded[0]

    # ------------------------------------------------------------------ decoding

    def decode_answer(self, token_ids, **kwargs) -> str:
        """The answer in generated ids, as the original ``predict`` returns it: the decoded text after the last sep
        token, with the eos, pad and ``<|endofchunk|>`` tokens removed. Extra kwargs go to ``tokenizer.decode``."""
        if isinstance(token_ids, (torch.Tensor, np.ndarray)):
            if token_ids.ndim != 1:
                raise ValueError(
                    f"decode_answer takes one sequence, got shape {tuple(token_ids.shape)}; use batch_decode_answers."
                )
            token_ids = token_ids.tolist()
        text = self.tokenizer.decode(token_ids, **kwargs)
        answer = text.split(self.tokenizer.sep_token)[-1]
        for token in (self.tokenizer.eos_token, self.tokenizer.pad_token, self.end_of_chunk_token):
            if token:
                answer = answer.replace(token, "")
        return answer

    def batch_decode_answers(self, sequences, **kwargs) -> list[str]:
        """[`decode_answer`] for every sequence of a batch (e.g. the output of ``generate``)."""
        if isinstance(sequences, (torch.Tensor, np.ndarray)) and sequences.ndim != 2:
            raise ValueError(f"batch_decode_answers takes a 2-D batch, got shape {tuple(sequences.shape)}.")
        return [self.decode_answer(sequence, **kwargs) for sequence in sequences]
