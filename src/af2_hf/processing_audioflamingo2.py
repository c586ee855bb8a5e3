"""Processor of Audio Flamingo 2: the AF2 prompt format, the tokenizer and the windowed log-mel features."""

import copy
import re
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import AudioKwargs, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import PaddingStrategy, logging

from .audio import is_waveform, load_audio
from .feature_extraction_audioflamingo2 import AudioFlamingo2FeatureExtractor, _truncation_enabled
from .tokenization_audioflamingo2 import AF2_AUDIO_TOKEN, AF2_END_OF_CHUNK_TOKEN, plain_text_tokenizer

logger = logging.get_logger(__name__)

__all__ = ["AudioFlamingo2Processor", "AF2_CHAT_TEMPLATE"]

# Private-use characters that delimit message text in a chat rendered for tokenisation: text between them is user
# content (encoded as plain text), the rest is the template's own (control tokens). Never in returned strings.
TEXT_OPEN, TEXT_CLOSE = "\U000f1a20", "\U000f1a21"
_MARKERS = TEXT_OPEN + TEXT_CLOSE
# transformers >= 5.2x marks control tokens in messages with these for `sanitize_control_tokens=True`; every message
# text is plain text here already, so the marks are dropped.
_TRANSFORMERS_MARKS = re.compile("[\U000f0000\U000f0001]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

# The original prompt f"<audio>{question.lower().strip()}<SEP>" and training target
# f"{answer.lower().strip()}<|endofchunk|>{eos}", turn after turn (see the class docstring): a system text goes first,
# followed by one space (written inside the next turn's text, so that the text is encoded as one piece); a user turn
# holds one <audio> per audio block, always in front of its text; assistant turns
# are wrapped in {% generation %} for return_assistant_tokens_mask. Message text is wrapped in text_open/text_close
# (empty unless the processor tokenises the chat). A continued final message (continue_final_message=True) keeps its
# case: it is the start of the answer the model writes.
AF2_CHAT_TEMPLATE = (
    "{%- set open = text_open | default('') -%}"
    "{%- set close = text_close | default('') -%}"
    "{%- set state = namespace(lead='') -%}"
    "{%- for message in messages -%}"
    "{%- set ns = namespace(audio='', text='') -%}"
    "{%- set content = message['content'] if message['content'] is defined else none -%}"
    "{%- if content is string -%}"
    "{%- set ns.text = content -%}"
    "{%- elif content is not none -%}"
    "{%- for block in content -%}"
    "{%- if block['type'] == 'audio' -%}"
    "{%- set ns.audio = ns.audio + '<audio>' -%}"
    "{%- elif block['type'] == 'text' -%}"
    "{%- set ns.text = ns.text + (' ' if ns.text else '') + block['text'] -%}"
    "{%- else -%}"
    "{{- raise_exception('Audio Flamingo 2 conversations hold audio and text blocks only, got ' + block['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if loop.last and (verbatim_final_message | default(false)) -%}"
    "{%- set text = ns.text | trim -%}"
    "{%- else -%}"
    "{%- set text = ns.text | lower | trim -%}"
    "{%- endif -%}"
    "{%- set lead = state.lead -%}"
    "{%- set state.lead = '' -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if not loop.first or ns.audio -%}"
    "{{- raise_exception('Audio Flamingo 2 takes one system turn, first and without audio.') -}}"
    "{%- endif -%}"
    "{%- set state.lead = text + ' ' if text else '' -%}"
    "{%- if loop.last -%}"
    "{{- open + state.lead + close -}}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if ns.audio -%}"
    "{{- (open + lead + close if lead else '') + ns.audio + open + text + close + sep_token -}}"
    "{%- else -%}"
    "{{- open + lead + text + close + sep_token -}}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if ns.audio -%}"
    "{{- raise_exception('Audio Flamingo 2 assistant turns cannot contain audio.') -}}"
    "{%- endif -%}"
    "{{- open + lead + close if lead else '' -}}"
    "{%- generation -%}"
    "{{- open + text + close + '<|endofchunk|>' + eos_token -}}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('Audio Flamingo 2 conversations have system, user and assistant turns, got '"
    " + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Text kwargs this processor's encoder does not implement (the tokenizer's pair / overflow / word-split modes).
_UNSUPPORTED_TEXT_KWARGS = ("text_pair", "text_target", "text_pair_target")
_UNSUPPORTED_TEXT_FLAGS = ("is_split_into_words", "return_overflowing_tokens")
_FEATURE_EXTRACTOR_CALL_KWARGS = ("device", "do_normalize", "do_quantize", "max_num_windows")


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
    # transformers 5.17 reads the defaults from here only; newer releases from the processor's class attributes.
    _defaults = {"text_kwargs": _TEXT_KWARGS_DEFAULTS, "audio_kwargs": {}}


class _Prompt:
    """One sample's text as segments ``(start, text, plain)`` of ``source``: ``plain`` segments are user text (never
    control tokens), the others the prompt's own (control tokens honoured). ``audio_slots`` counts ``<audio>``
    tokens outside plain text."""

    def __init__(self, source: str, segments: list[tuple[int, str, bool]], audio_slots: int):
        self.source, self.segments, self.audio_slots = source, segments, audio_slots


def question_turn(question: str, audio=None) -> dict:
    """The user turn of a chat that asks `question` (plain text) about `audio` (``None``: a text-only question)."""
    content = [] if audio is None else [{"type": "audio", "audio": audio}]
    return {"role": "user", "content": content + [{"type": "text", "text": question}]}


class AudioFlamingo2Processor(ProcessorMixin):
    r"""
    Audio Flamingo 2 processor: an [`AudioFlamingo2FeatureExtractor`] and the AF2 tokenizer (a Qwen2 tokenizer
    prepared with [`prepare_af2_tokenizer`]).

    ``processor(text=..., audio=...)`` takes one audio per text (or none). Each text is one of:

    - a **prompt** holding one ``<audio>`` placeholder (or none, for a text-only prompt): used verbatim, its
      special tokens are control tokens by design (e.g. a training text
      ``"<audio>q<SEP>a<|endofchunk|><|endoftext|>"``);
    - a **question**: a text without ``<audio>`` given with its own audio becomes the original prompt
      ``f"<audio>{question.lower().strip()}<SEP>"``. The question is user text: special-token strings in it
      (``<|endoftext|>``, ``<audio>``, ``<SEP>``, ...) are encoded as plain text, never as control ids;
    - a chat rendered by [`~AudioFlamingo2Processor.apply_chat_template`] (message text is plain text likewise).

    Audio is matched to texts one to one when there are as many audios as texts (``None`` for a text-only sample),
    else in order to the ``<audio>`` placeholders. A sample without audio gets an all-zero ``input_features_mask``
    row; a call without any audio returns ``input_ids`` and ``attention_mask`` only. Text-only questions (the
    original's text-only prompt ``f"{question.lower().strip()}<SEP>"``) come from the chat template, or from
    [`~AudioFlamingo2Processor.apply_question_request`], which takes questions with or without audio and keeps every
    question plain text (``processor(text=...)`` reads a text holding ``<audio>`` as a prompt: ``<audio>`` is a
    placeholder by design on that path only).

    The AF2 audio token is not expanded: the audio enters the model through cross-attention. Texts are tokenised with
    ``max_length=512`` and truncation (a warning names truncated samples) and without added BOS/EOS, as the
    original; the tokenizer's init kwargs (e.g. ``padding_side``) override these defaults, call kwargs override
    both. Padding side: ``"left"`` by default (batched generation); ``padding_side="right"`` for training. Audio
    windows are always padded at the end.

    Chat template: a ``system`` turn (first only) is written as its text and one space in front of the first turn
    (Audio Flamingo's chat data put its task prefix there); every turn is written in the original's one-turn format
    and turns are concatenated: ``<audio>q1<SEP>a1<|endofchunk|><|endoftext|>q2<SEP>``. All message text is
    lower-cased and stripped as the original does, except a final message continued with
    ``continue_final_message=True``. A user turn without audio gives the text-only prompt.

    Audio may be 16 kHz waveforms (numpy, torch, lists) or any source [`af2_hf.load_audio`] reads (paths, bytes,
    binary file objects, ``datasets`` audio dicts and decoders), loaded like the original ``read_audio`` (at most
    ``max_num_windows`` windows).

    Edge cases (see also [`AudioFlamingo2FeatureExtractor`] for waveforms: integer PCM, NaN, silence, channels):

    - ``text=None``: audio only, the result holds the features alone.
    - One text with a 2-D audio array: the array is ONE multi-channel waveform (channel 0 is kept, with a warning).
    - Counts: at most one audio per text; texts and audios that cannot be matched raise `ValueError`.
    - Text must be valid Unicode: lone surrogates (or bytes that are not UTF-8) raise `ValueError`.
    - ``sampling_rate`` describes waveform inputs: missing gives a warning, a different rate a `ValueError`.
    - Lengths: prompts longer than ``max_length`` tokens and audio longer than ``max_num_windows`` windows are
      truncated with a warning; ``truncation=False`` raises a `ValueError` instead (``text_kwargs=`` /
      ``audio_kwargs={"truncation": False}`` for one of them); ``max_length=None`` lifts the prompt limit.

    Args:
        feature_extractor ([`AudioFlamingo2FeatureExtractor`]): the feature extractor.
        tokenizer ([`PreTrainedTokenizerBase`]): the AF2 tokenizer (must contain ``<audio>`` and a sep token).
        chat_template (`str`, *optional*): Jinja chat template; defaults to [`AF2_CHAT_TEMPLATE`].
        audio_token (`str`, *optional*, defaults to ``"<audio>"``): the audio placeholder token.
        end_of_chunk_token (`str`, *optional*, defaults to ``"<|endofchunk|>"``): the end of an answer.
    """

    valid_processor_kwargs = AudioFlamingo2ProcessorKwargs
    text_kwargs = _TEXT_KWARGS_DEFAULTS

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
            if token not in tokenizer.get_vocab():
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

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # The feature extractor is loaded with the class this module imports, not through AutoFeatureExtractor
        # (where af2_hf registers it): with trust_remote_code, transformers loads every module of a checkpoint in
        # its own hashed package, so AutoFeatureExtractor would return another class object than the one this
        # module imports, and the isinstance check in __init__ would fail.
        feature_extractor = AudioFlamingo2FeatureExtractor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [feature_extractor, tokenizer]

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """[`ProcessorMixin.save_pretrained`], leaving this processor as it was: the ``auto_map`` written into the
        saved configs (for ``trust_remote_code`` loading) is not set on the processor or its feature extractor, and
        the tokenizer keeps its processor class."""
        state = [
            (obj, "auto_map", copy.deepcopy(obj.__dict__.get("auto_map"))) for obj in (self, self.feature_extractor)
        ]
        state.append((self.tokenizer, "_processor_class", self.tokenizer.__dict__.get("_processor_class")))
        present = {(id(obj), name): name in obj.__dict__ for obj, name, _ in state}
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            for obj, name, value in state:
                if present[(id(obj), name)]:
                    setattr(obj, name, value)
                else:
                    obj.__dict__.pop(name, None)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "input_features", "input_features_mask"]

    # ------------------------------------------------------------------ call

    def __call__(
        self, text: str | list[str] | None = None, audio=None, **kwargs: Unpack[AudioFlamingo2ProcessorKwargs]
    ) -> BatchFeature:
        """Prepares model inputs.

        Runs ProcessorMixin's steps (``validate_inputs``, ``_merge_kwargs`` with the tokenizer's init kwargs,
        ``_process_audio``) and encodes the text itself, segment by segment, so that user text never becomes
        control tokens (the mixin tokenises whole strings).

        Args:
            text (`str` or `list[str]`, *optional*): prompts, questions or rendered chats (see the class docstring).
            audio (*optional*): one audio per text (``None`` entries for text-only samples) or one per ``<audio>``
                placeholder: waveforms at 16 kHz (numpy / torch / list of floats; a 2-D array is a batch) or any
                source [`af2_hf.load_audio`] reads.
            sampling_rate (`int`, *optional*): the rate of waveform inputs; must be the feature extractor's.
            return_tensors (`str`, *optional*): ``"pt"`` or ``"np"``.
            padding_side, truncation, max_length, padding and the other tokenizer arguments, or ``text_kwargs={...}``.
            device, do_normalize, do_quantize, max_num_windows: feature extractor arguments (or ``audio_kwargs``).

        Returns:
            [`BatchFeature`] with ``input_ids`` and ``attention_mask`` (when there is text) and ``input_features`` and
            ``input_features_mask`` (when some sample has audio).
        """
        for name in ("images", "videos"):
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"{self.__class__.__name__} takes text and audio only, got {name}.")
        texts = None if text is None else _text_list(text)
        items = None if audio is None else self._audio_items(audio, None if texts is None else len(texts))
        if texts is None and items is None:
            raise ValueError("Pass text and audio (one audio per text), text alone, or audio alone.")
        if texts is None and items is not None and any(item is None for item in items):
            raise ValueError("An audio-only call needs an audio for every sample, got None.")
        self.validate_inputs(text=texts, audio=items, **kwargs)
        merged = self._merge_kwargs(
            self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs, audio_kwargs = merged["text_kwargs"], merged["audio_kwargs"]
        return_tensors = text_kwargs.get("return_tensors", audio_kwargs.get("return_tensors"))
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")

        data: dict[str, Any] = {}
        rows = list(range(len(items))) if items is not None else []
        if texts is not None:
            sanitize = bool(text_kwargs.pop("sanitize_control_tokens", False))
            prompts, rows = self.build_prompts(texts, items, sanitize=sanitize)
            data.update(self._encode_prompts(prompts, text_kwargs, merged))
        if items is not None and any(item is not None for item in items):
            features, _ = self._process_audio([item for item in items if item is not None], **audio_kwargs)
            batch = len(texts) if texts is not None else len(items)
            features = _scatter_rows(features, rows, batch, self.feature_extractor.silence_db())
            data.update(features if return_tensors == "pt" else {k: v.cpu().numpy() for k, v in features.items()})
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def validate_inputs(self, text=None, audio=None, **kwargs):
        """Refuses empty lists and deprecated arguments; the matching of texts and audio is [`build_prompts`]."""
        if isinstance(text, list) and len(text) == 0:
            raise ValueError("text is an empty list.")
        if isinstance(audio, list) and len(audio) == 0:
            raise ValueError("audio is an empty list.")
        if "audios" in kwargs and audio is None:
            raise ValueError("You passed keyword argument `audios` which is deprecated. Please use `audio` instead.")

    # ------------------------------------------------------------------ prompts

    def format_prompt(self, question: str, audio: bool = True) -> str:
        """The original AF2 prompt ``f"<audio>{question.lower().strip()}{sep_token}"`` (``audio=False``: the
        text-only prompt, without ``<audio>``). A string: special-token text in ``question`` would be read as control
        tokens if the result is passed back as ``text=``; pass the question itself (with its audio) or use the chat
        template to keep it plain text."""
        return f"{self.audio_token if audio else ''}{str(question).lower().strip()}{self.tokenizer.sep_token}"

    def build_prompts(
        self, texts: list[str], items: list | None, sanitize: bool = False
    ) -> tuple[list[_Prompt], list[int]]:
        """Each text as a [`_Prompt`] and, for every audio in ``items`` (``None`` entries skipped), the row of the
        text it belongs to: one to one when there are as many audios as texts, else in placeholder order."""
        parsed = [_parse_prompt(t if not sanitize else _TRANSFORMERS_MARKS.sub("", t), self.audio_token) for t in texts]
        for index, prompt in enumerate(parsed):
            if prompt.audio_slots > 1:
                raise ValueError(
                    f"Text {index} contains {prompt.audio_slots} {self.audio_token} tokens; Audio Flamingo 2 takes at "
                    "most one audio per text."
                )
        if items is None:
            return self._without_audio(parsed), []
        if len(items) == len(texts):
            return self._one_audio_per_text(parsed, texts, items)
        return self._audio_per_placeholder(parsed, items)

    def _without_audio(self, parsed: list[_Prompt]) -> list[_Prompt]:
        slots = sum(prompt.audio_slots for prompt in parsed)
        if slots:
            raise ValueError(
                f"Found {slots} {self.audio_token} tokens in the text but no audio inputs were passed: pass one audio "
                "per placeholder, or drop the placeholder for a text-only prompt."
            )
        return parsed

    def _one_audio_per_text(self, parsed, texts, items):
        prompts, rows = [], []
        for index, (prompt, item) in enumerate(zip(parsed, items)):
            if item is not None:
                rows.append(index)
            if prompt.audio_slots == 1 and item is None:
                raise ValueError(f"Text {index} has a {self.audio_token} placeholder but its audio is None.")
            if prompt.audio_slots == 0 and item is not None:
                if any(plain for _, _, plain in prompt.segments) or TEXT_OPEN in texts[index]:
                    raise ValueError(f"Text {index} is a chat without an audio slot, but an audio was given for it.")
                prompt = self._question(prompt.source)
            prompts.append(prompt)
        return prompts, rows

    def _audio_per_placeholder(self, parsed, items):
        slots = sum(prompt.audio_slots for prompt in parsed)
        if any(item is None for item in items) or slots != len(items):
            raise ValueError(
                f"Got {len(parsed)} text(s) and {len(items)} audio(s): pass one audio per text (None for a text-only "
                f"sample), or one per {self.audio_token} placeholder. The total number of {self.audio_token} tokens "
                f"in the prompts should be the same as the number of audio inputs passed (found {slots})."
            )
        return parsed, [index for index, prompt in enumerate(parsed) if prompt.audio_slots]

    def _question(self, question: str) -> _Prompt:
        """The original prompt for a question with audio; the question is plain text."""
        text = question.lower().strip()
        audio, sep = self.audio_token, self.tokenizer.sep_token
        segments = [(0, audio, False), (len(audio), text, True), (len(audio) + len(text), sep, False)]
        return _Prompt(audio + text + sep, [segment for segment in segments if segment[1]], 1)

    # ------------------------------------------------------------------ text encoding

    def _encode_prompts(self, prompts: list[_Prompt], text_kwargs: dict, merged: dict) -> dict:
        for key in _UNSUPPORTED_TEXT_KWARGS:
            if text_kwargs.get(key) is not None:
                raise ValueError(f"{self.__class__.__name__} does not take {key}: write the whole prompt as text.")
        for key in _UNSUPPORTED_TEXT_FLAGS:
            if text_kwargs.get(key):
                raise ValueError(f"{self.__class__.__name__} does not support {key}=True.")
        encoded = self._encode_segments(prompts)
        if text_kwargs.get("add_special_tokens"):
            self._check_no_added_special_tokens()
        encoded = self._truncate(encoded, text_kwargs)
        return self._pad(encoded, prompts, text_kwargs, merged)

    def _encode_segments(self, prompts: list[_Prompt]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Ids and character offsets (in each ``prompt.source``) of every prompt: control segments with the tokenizer
        (one batched call), plain segments with its added vocabulary left out. Marker characters belong to the token
        after them."""
        segments = [segment for prompt in prompts for segment in prompt.segments]
        control = [text for _, text, is_plain in segments if not is_plain]
        plain = [text for _, text, is_plain in segments if is_plain]
        control_out = self.tokenizer(
            control, add_special_tokens=False, padding=False, truncation=False, return_offsets_mapping=True,
            split_special_tokens=False,
        ) if control else {"input_ids": [], "offset_mapping": []}
        control_pieces = iter(zip(control_out["input_ids"], control_out["offset_mapping"]))
        plain_encodings = plain_text_tokenizer(self.tokenizer).encode_batch(plain, add_special_tokens=False)
        plain_pieces = iter((encoding.ids, encoding.offsets) for encoding in plain_encodings)
        encoded = []
        for prompt in prompts:
            ids, offsets = [], []
            for start, _, is_plain in prompt.segments:
                segment_ids, segment_offsets = next(plain_pieces if is_plain else control_pieces)
                ids.extend(segment_ids)
                offsets.extend((start + begin, start + end) for begin, end in segment_offsets)
            encoded.append((ids, _attach_markers(offsets, prompt.source)))
        return encoded

    def _check_no_added_special_tokens(self) -> None:
        """``add_special_tokens=True`` adds nothing for the AF2 (Qwen2) tokenizer, as the original; a tokenizer whose
        post-processor adds BOS/EOS is refused rather than silently ignored."""
        post_processor = self.tokenizer.backend_tokenizer.post_processor
        if post_processor is not None and post_processor.num_special_tokens_to_add(False):
            raise ValueError(
                "add_special_tokens=True with a tokenizer that adds BOS/EOS is not supported: Audio Flamingo 2 "
                "prompts carry no added special tokens. Write them into the prompt text if you need them."
            )

    def _truncate(self, encoded: list, text_kwargs: dict) -> list:
        max_length = text_kwargs.get("max_length")
        if max_length is None:
            return encoded
        lengths = [len(ids) for ids, _ in encoded]
        too_long = [index for index, length in enumerate(lengths) if length > max_length]
        if not too_long:
            return encoded
        if not _truncation_enabled(text_kwargs.get("truncation", False)):
            raise ValueError(
                f"Text(s) {too_long} have {[lengths[i] for i in too_long]} tokens, more than max_length="
                f"{max_length} (truncation=False). Shorten them, pass truncation=True to cut them (with a "
                "warning), or max_length=None to allow any length."
            )
        left = self.tokenizer.truncation_side == "left"
        logger.warning(
            f"Truncating text(s) {too_long} to max_length={max_length} tokens (lengths "
            f"{[lengths[i] for i in too_long]}); the {'start' if left else 'end'} of the prompt"
            f"{'' if left else f', including {self.tokenizer.sep_token},'} is lost."
        )
        cut = slice(-max_length, None) if left else slice(0, max_length)
        return [(ids[cut], offsets[cut]) if len(ids) > max_length else (ids, offsets) for ids, offsets in encoded]

    def _pad(self, encoded: list, prompts: list[_Prompt], text_kwargs: dict, merged: dict) -> dict:
        padding = text_kwargs.get("padding", False)
        to_max_length = padding is not True and padding and PaddingStrategy(padding) == PaddingStrategy.MAX_LENGTH
        padded = self.tokenizer.pad(
            {"input_ids": [ids for ids, _ in encoded]},
            padding=padding,
            max_length=text_kwargs.get("max_length") if to_max_length else None,
            pad_to_multiple_of=text_kwargs.get("pad_to_multiple_of"),
            padding_side=text_kwargs.get("padding_side"),
            return_attention_mask=True,
        )
        data = {"input_ids": padded["input_ids"]}
        if text_kwargs.get("return_attention_mask", True) is not False:
            data["attention_mask"] = padded["attention_mask"]
        side = text_kwargs.get("padding_side") or self.tokenizer.padding_side
        if text_kwargs.get("return_offsets_mapping"):
            data["offset_mapping"] = [
                _pad_list(offsets, len(row), (0, 0), side) for (_, offsets), row in zip(encoded, data["input_ids"])
            ]
        if text_kwargs.get("return_length"):
            data["length"] = [len(ids) for ids, _ in encoded]
        if text_kwargs.get("return_token_type_ids"):
            data["token_type_ids"] = [[0] * len(row) for row in data["input_ids"]]
        if text_kwargs.get("return_special_tokens_mask"):
            special = set(self.tokenizer.all_special_ids)
            data["special_tokens_mask"] = [[int(token in special) for token in row] for row in data["input_ids"]]
        if text_kwargs.pop("return_mm_token_type_ids", merged.get("return_mm_token_type_ids", False)):
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(data["input_ids"])
        if text_kwargs.pop("return_text_replacement_offsets", merged.get("return_text_replacement_offsets", False)):
            data["text_replacement_offsets"] = [self._audio_placeholder_spans(prompt) for prompt in prompts]
        return data

    def _audio_placeholder_spans(self, prompt: _Prompt) -> list[dict]:
        """Where each ``<audio>`` placeholder of ``prompt`` is (AF2 does not expand it: the replacement is itself)."""
        spans = []
        for start, text, is_plain in prompt.segments:
            if is_plain:
                continue
            for match in re.finditer(re.escape(self.audio_token), text):
                span = (start + match.start(), start + match.end())
                spans.append({"type": "audio", "span": span, "new_span": span, "text": self.audio_token,
                              "replacement": self.audio_token})
        return spans

    # ------------------------------------------------------------------ audio

    def _audio_items(self, audio, num_texts: int | None) -> list:
        """The audio argument as a list with one entry per audio (``None`` for a text-only sample)."""
        if isinstance(audio, (np.ndarray, torch.Tensor)) and audio.ndim == 2:
            if num_texts == 1:
                return [audio]  # one text: one (multi-channel) waveform, in either orientation
            return [audio] if audio.shape[0] > audio.shape[1] else list(audio)
        if isinstance(audio, (np.ndarray, torch.Tensor)) and audio.ndim > 2:
            raise ValueError(f"Audio arrays must be 1-D (one waveform) or 2-D (a batch), got {tuple(audio.shape)}.")
        if is_waveform(audio) or not isinstance(audio, (list, tuple)):
            return [audio]
        return list(audio)

    def _process_audio(self, audio: list, **kwargs):
        """Loads every audio that is not a waveform with [`af2_hf.load_audio`] and computes the features of all;
        returns them with one (unexpanded) placeholder per audio, as ProcessorMixin's hook does."""
        truncation = _truncation_enabled(kwargs.get("truncation"))
        rate = self.feature_extractor.sampling_rate
        max_seconds = self.feature_extractor.max_audio_seconds(kwargs.get("max_num_windows"))
        waveforms = [
            item if is_waveform(item) else load_audio(item, rate, max_seconds=max_seconds, truncation=truncation)
            for item in audio
        ]
        sampling_rate = self._waveform_sampling_rate(audio, kwargs.get("sampling_rate"))
        feature_kwargs = {key: kwargs[key] for key in _FEATURE_EXTRACTOR_CALL_KWARGS if key in kwargs}
        features = self.feature_extractor(
            waveforms, sampling_rate=sampling_rate, return_tensors="pt", truncation=truncation, **feature_kwargs
        )
        return features, [self.replace_audio_token(features, index) for index in range(len(audio))]

    def replace_audio_token(self, audio_inputs: dict, audio_idx: int, **kwargs) -> str:
        """AF2 keeps one ``<audio>`` per audio: the audio reaches the model through cross-attention."""
        return self.audio_token

    def _waveform_sampling_rate(self, items: list, sampling_rate):
        """The ``sampling_rate`` handed to the feature extractor: the user's for waveforms (`None` makes it warn),
        the extractor's own when every item is loaded (loaded at that rate)."""
        expected = self.feature_extractor.sampling_rate
        if any(is_waveform(item) for item in items):
            return sampling_rate
        if sampling_rate is not None and sampling_rate != expected:
            raise ValueError(
                f"sampling_rate={sampling_rate} was given with audio files: files are read at their own rate and "
                f"resampled to {expected} Hz, so sampling_rate (the rate of waveform inputs) must be {expected} or "
                "left out."
            )
        return expected

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """Renders AF2 conversations with the chat template (see [`AF2_CHAT_TEMPLATE`] and the class docstring).

        With ``tokenize=True`` the audio of every ``{"type": "audio", "path"|"url"|"audio": ...}`` block is loaded
        with [`af2_hf.load_audio`] (the original ``read_audio``) and message text is encoded as plain text: special
        tokens written in a message never become control ids or audio slots. A batch of conversations is accepted.
        """
        template = self._template_source(chat_template)
        if kwargs.get("continue_final_message") and "verbatim_final_message" in template:
            kwargs.setdefault("verbatim_final_message", True)
        if kwargs.get("tokenize", False):
            conversation = self._load_conversation_audio(conversation)
            if "text_open" in template:
                _check_no_markers(conversation)
                kwargs.update(text_open=TEXT_OPEN, text_close=TEXT_CLOSE)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def apply_question_request(self, question, audio=None, **kwargs) -> BatchFeature:
        """Model inputs for questions, as the original ``predict`` prompts them, through the chat template: each
        question is plain text, so special-token text in it (``<audio>``, ``<SEP>``, ``<|endoftext|>``, ...) never
        becomes control ids or audio slots (``processor(text=question, audio=...)`` reads a text holding ``<audio>``
        as a prompt instead). For questions without such text the ids are those of ``processor(text=question,
        audio=audio)``.

        Args:
            question (`str` or `list[str]`): the question(s).
            audio (*optional*): one audio per question (``None`` for a text-only question, which gets the original's
                text-only prompt ``f"{question.lower().strip()}<SEP>"``), in any form the processor takes.
            kwargs: processor arguments (``return_tensors``, ``padding_side``, ``max_num_windows``, ...).

        Returns:
            [`BatchFeature`]: as [`~AudioFlamingo2Processor.__call__`].
        """
        questions = [question] if isinstance(question, str) else list(question)
        items = [None] * len(questions) if audio is None else self._audio_items(audio, len(questions))
        if len(items) != len(questions):
            raise ValueError(
                f"Got {len(questions)} question(s) and {len(items)} audio(s): pass one audio per question (None for a "
                "text-only question)."
            )
        conversations = [[question_turn(text, item)] for text, item in zip(questions, items)]
        return_tensors = kwargs.pop("return_tensors", None)
        return self.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_tensors=return_tensors, processor_kwargs=kwargs
        )

    def _template_source(self, chat_template) -> str:
        templates = self.chat_template if isinstance(self.chat_template, dict) else {"default": self.chat_template}
        if chat_template is None:
            return templates.get("default") or ""
        return templates.get(chat_template, chat_template)

    def _load_conversation_audio(self, conversation):
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and isinstance(
            conversation[0], (list, tuple)
        )
        conversations = conversation if batched else [conversation]
        max_seconds = self.feature_extractor.max_audio_seconds()
        loaded = [
            [self._load_message_audio(message, max_seconds) for message in messages] for messages in conversations
        ]
        return loaded if batched else loaded[0]

    def _load_message_audio(self, message, max_seconds: float):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, (list, tuple)):
            return message
        new_content = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "audio":
                sources = [block[key] for key in ("audio", "url", "path") if key in block]
                if len(sources) != 1:
                    raise ValueError(
                        "An audio block needs exactly one of 'audio', 'url' or 'path', got "
                        f"{sorted(k for k in block if k != 'type')}."
                    )
                source = sources[0]
                if not is_waveform(source):
                    source = load_audio(source, self.feature_extractor.sampling_rate, max_seconds=max_seconds)
                elif isinstance(source, torch.Tensor):
                    source = source.detach().cpu().numpy()
                block = {key: value for key, value in block.items() if key not in ("audio", "url", "path")}
                block["audio"] = np.asarray(source)
            new_content.append(block)
        new_message = copy.copy(message)
        new_message["content"] = new_content
        return new_message

    # ------------------------------------------------------------------ decoding

    def decode_answer(self, token_ids, **kwargs) -> str:
        """The answer in generated ids, as the original ``predict`` returns it: the text after the last sep token,
        without the eos, pad and ``<|endofchunk|>`` tokens. Extra kwargs go to ``tokenizer.decode``."""
        if isinstance(token_ids, (torch.Tensor, np.ndarray)):
            if token_ids.ndim != 1:
                raise ValueError(
                    f"decode_answer takes one sequence, got shape {tuple(token_ids.shape)}; use batch_decode_answers."
                )
            token_ids = token_ids.tolist()
        token_ids = list(token_ids)
        sep = self.tokenizer.sep_token_id
        if sep in token_ids:
            token_ids = token_ids[len(token_ids) - token_ids[::-1].index(sep) :]
        dropped = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.end_of_chunk_token_id}
        return self.tokenizer.decode([token for token in token_ids if token not in dropped], **kwargs)

    def batch_decode_answers(self, sequences, **kwargs) -> list[str]:
        """[`decode_answer`] for every sequence of a batch (e.g. the output of ``generate``)."""
        if isinstance(sequences, (torch.Tensor, np.ndarray)) and sequences.ndim != 2:
            raise ValueError(f"batch_decode_answers takes a 2-D batch, got shape {tuple(sequences.shape)}.")
        return [self.decode_answer(sequence, **kwargs) for sequence in sequences]


# ---------------------------------------------------------------------------------------------------- helpers


def _text_list(text) -> list[str]:
    """``text`` as a list of valid Unicode strings (bytes are decoded as UTF-8)."""
    texts = [text] if isinstance(text, (str, bytes, bytearray)) else text
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}.")
    result = []
    for index, sample in enumerate(texts):
        if isinstance(sample, (bytes, bytearray)):
            try:
                sample = bytes(sample).decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"Text {index} is bytes that are not valid UTF-8 (byte {error.start}: {error.reason}); decode it "
                    "with the right encoding first."
                ) from None
        if not isinstance(sample, str):
            raise TypeError(f"text must be a string or a list of strings; text {index} is {type(sample).__name__}.")
        surrogate = _LONE_SURROGATE.search(sample)
        if surrogate is not None:
            raise ValueError(
                f"Text {index} contains a lone surrogate (U+{ord(surrogate.group()):04X} at character "
                f"{surrogate.start()}), which is not valid Unicode: it usually comes from undecodable bytes (e.g. "
                "os.fsdecode or errors='surrogateescape'); decode the source with errors='replace' or fix it."
            )
        result.append(sample)
    return result


def _parse_prompt(text: str, audio_token: str) -> _Prompt:
    """Splits a text at the plain-text markers of a rendered chat: marked parts are plain, the rest control. An
    unclosed marker runs to the end (a continued final message is cut after its text)."""
    segments, position, slots = [], 0, 0
    while position < len(text):
        opening = text.find(TEXT_OPEN, position)
        control_end = len(text) if opening < 0 else opening
        control = text[position:control_end].replace(TEXT_CLOSE, "")
        if control:
            segments.append((position, control, False))
            slots += control.count(audio_token)
        if opening < 0:
            break
        closing = text.find(TEXT_CLOSE, opening + 1)
        plain_end = len(text) if closing < 0 else closing
        if plain_end > opening + 1:
            segments.append((opening + 1, text[opening + 1 : plain_end], True))
        position = plain_end + 1
    return _Prompt(text, segments, slots)


def _attach_markers(offsets: list[tuple[int, int]], source: str) -> list[tuple[int, int]]:
    """Offsets with the opening markers right before a token counted as part of it (so a generation span, which
    starts at the marker, starts at a token)."""
    attached, previous = [], 0
    for begin, end in offsets:
        while begin > previous and source[begin - 1] == TEXT_OPEN:
            begin -= 1
        attached.append((begin, end))
        previous = max(previous, end)
    return attached


def _check_no_markers(conversation) -> None:
    """Message text may not contain the processor's private plain-text markers."""
    conversations = conversation if conversation and isinstance(conversation[0], (list, tuple)) else [conversation]
    for messages in conversations:
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
            blocks = [content] if isinstance(content, str) else content or []
            for block in blocks:
                value = block if isinstance(block, str) else block.get("text") if isinstance(block, dict) else None
                if isinstance(value, str) and any(marker in value for marker in _MARKERS):
                    raise ValueError(
                        "A message contains U+F1A20 or U+F1A21, private-use characters the Audio Flamingo 2 processor "
                        "reserves to delimit message text; remove them."
                    )


def _pad_list(values: list, length: int, fill, side: str) -> list:
    padding = [fill] * (length - len(values))
    return padding + values if side == "left" else values + padding


def _scatter_rows(features, rows: list[int], batch: int, fill: float) -> dict:
    """The features of the samples with audio placed at their rows of a batch of ``batch`` samples; the others get
    padding windows (``fill``) and an all-zero ``input_features_mask`` row."""
    values, mask = features["input_features"], features["input_features_mask"]
    if rows == list(range(batch)):
        return {"input_features": values, "input_features_mask": mask}
    full_values = values.new_full((batch, *values.shape[1:]), fill)
    full_mask = mask.new_zeros((batch, *mask.shape[1:]))
    index = torch.tensor(rows, device=values.device)
    full_values[index], full_mask[index] = values, mask
    return {"input_features": full_values, "input_features_mask": full_mask}
