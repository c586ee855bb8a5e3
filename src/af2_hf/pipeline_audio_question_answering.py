"""The ``audio-question-answering`` pipeline: an audio (or none) + a question in, one generated answer out.

Works with Audio Flamingo 2 (the original prompt format and answer decoding), and with any audio-text-to-text model
whose processor takes ``processor(text=..., audio=...)`` and has a chat template placing the audio (transformers'
Audio Flamingo 3 and Qwen2-Audio, for example).

The steps, one function or method each: :func:`split_input` (what an input holds) -> :meth:`preprocess` (the audio
through :func:`af2_hf.load_audio`, the one loader of the package; the text) -> :meth:`_collate` (one processor call
per batch) -> :meth:`_forward` (``generate``, answer decoding, SoundCoT) -> :meth:`postprocess`.

This module is copied into exported checkpoints (remote code): it only imports transformers, third-party packages and
its sibling modules relatively.
"""

from __future__ import annotations

import collections.abc
import os
from typing import Any

import numpy as np
import torch
from transformers.generation import GenerationConfig
from transformers.pipelines.base import Pipeline
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator
from transformers.utils import logging

from .audio import is_waveform, load_audio
from .soundcot import SOUNDCOT_MAX_LENGTH, SOUNDCOT_MAX_NEW_TOKENS, reask, soundcot_question

logger = logging.get_logger(__name__)

__all__ = ["REMOTE_CODE_TASK", "AudioQuestionAnsweringPipeline", "split_input"]

# The task under which a saved or exported folder lists this pipeline's code (``custom_pipelines``). It differs from
# the registered "audio-question-answering": transformers resolves a folder's custom pipelines before its registry and
# always asks trust_remote_code for them, so a folder listing the registered name would shadow af2_hf's pipeline.
REMOTE_CODE_TASK = "audioflamingo2-audio-question-answering"

# Keys of a pipeline input dict: the pipeline's own and those of an audio value (a ``datasets`` audio dict, or
# {"raw", "sampling_rate"} as the ASR pipeline takes).
_AUDIO_VALUE_KEYS = {"raw", "array", "sampling_rate", "path", "bytes"}
_PIPELINE_KEYS = {"audio", "question"}


def _is_af2_processor(processor) -> bool:
    # Duck-typed, so that the copy of the processor class loaded as remote code is recognised as well.
    return hasattr(processor, "format_prompt") and hasattr(processor, "decode_answer")


def split_input(item) -> tuple[Any, Any]:
    """One pipeline input -> (its audio value, or `None` for a text-only prompt; its own question or `None`).

    An input is an audio value (anything [`af2_hf.load_audio`] reads), `None` (no audio), or a dict: ``{"audio":
    <audio value or None>, "question": str}``; a dict without ``"audio"`` is itself an audio value
    (``{"array", "sampling_rate"}``, ``{"path", "bytes"}``, ``{"raw", "sampling_rate"}``), optionally with a
    ``"question"``; ``{"question": str}`` alone is a text-only prompt.
    """
    if not isinstance(item, dict):
        return item, None
    unknown = set(item) - _AUDIO_VALUE_KEYS - _PIPELINE_KEYS
    if unknown:
        raise ValueError(
            f"Unexpected key(s) {sorted(unknown)} in an input dict; use 'audio' and 'question', or "
            "'raw'/'array' with 'sampling_rate' (also 'path'/'bytes' as in a datasets audio column)."
        )
    question = item.get("question")
    if "audio" in item:
        extra = set(item) - _PIPELINE_KEYS
        if extra:
            raise ValueError(f"An input dict with 'audio' takes only 'question' beside it, got {sorted(extra)}.")
        if isinstance(item["audio"], dict) and "question" in item["audio"]:
            raise ValueError("Give the question once, beside 'audio', not inside it.")
        return item["audio"], question
    audio = {key: value for key, value in item.items() if key != "question"}
    if sum(audio.get(key) is not None for key in ("raw", "array")) > 1:
        raise ValueError("An input dict takes one of 'raw' and 'array', not both.")
    return (audio or None), question


def _chat(question: str, has_audio: bool) -> list[dict]:
    content = ([{"type": "audio"}] if has_audio else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


class AudioQuestionAnsweringPipeline(Pipeline):
    """
    Answers a question about an audio clip (or a text-only question) with a generative audio-language model (e.g.
    Audio Flamingo 2).

    Inputs (each with a question):

    - anything [`af2_hf.load_audio`] reads: a path to an audio file (any format libsndfile reads), ``bytes`` of such
      a file, a binary file object, a 1-D numpy array / torch tensor at ``sampling_rate`` (default: the feature
      extractor's rate; other rates are resampled), a ``datasets`` audio value (``{"array", "sampling_rate"}``,
      ``{"path", "bytes"}`` from ``Audio(decode=False)``, or the ``AudioDecoder`` of ``datasets`` 4+), or
      ``{"raw": array, "sampling_rate": sr}`` (as the ASR pipeline);
    - `None`: a text-only prompt (no audio): ``pipe(None, question="...")``, ``pipe(question="...")`` or
      ``{"audio": None, "question": "..."}``;
    - ``{"audio": <any of the above>, "question": "..."}``; a ``question`` key in the dict overrides the
      ``question=`` argument, which is the default for every input.

    Call forms: ``pipe(audio, question="...")``, ``pipe({"audio": ..., "question": ...})``, a list of inputs (with
    ``batch_size=N`` to batch them; ``question`` may then also be a list, one per input), a generator or a dataset.
    A batch may mix samples with and without audio: a text-only sample gets an all-zero ``input_features_mask`` row
    and the model skips its gated cross-attention blocks.

    Parameters (at construction or per call): ``question``, ``sampling_rate``, ``max_new_tokens``,
    ``generate_kwargs`` (passed to ``generate``; generation parameters such as ``do_sample=False`` are accepted
    directly too), ``soundcot`` (Audio Flamingo 2 SoundCoT decoding, see ``af2_hf.soundcot``; audio samples only)
    and ``processor_kwargs``.

    Returns ``{"answer": str}`` per input (a list of such dicts per input when ``num_return_sequences > 1``). For
    Audio Flamingo 2 the answer is decoded exactly as the original ``predict`` does (the text after the last
    ``<SEP>``, without eos / pad / ``<|endofchunk|>``); for other models it is the decoded new tokens without special
    tokens.

    Batches are built by the processor itself (one call per batch, left padding): it pads the text and the audio the
    way its model expects (AF2 pads with masked zero windows, AF3 concatenates windows), which transformers' generic
    per-key collation cannot do.
    """

    _load_processor = True
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                "The audio-question-answering pipeline needs a processor (tokenizer + feature extractor): pass "
                "`processor=` or a model directory/repo that contains one."
            )
        if getattr(self.processor, "feature_extractor", None) is None:
            raise ValueError(f"{type(self.processor).__name__} has no feature_extractor: it cannot process audio.")
        if not self.model.can_generate():
            raise ValueError(f"{type(self.model).__name__} cannot generate text.")
        if "audio" not in getattr(self.model, "input_modalities", ("audio",)):
            raise ValueError(f"{type(self.model).__name__} does not take audio input.")

    def save_pretrained(self, save_directory, **kwargs):
        """transformers' ``Pipeline.save_pretrained`` (the model, this module as remote code, ``custom_pipelines``)
        with the pipeline listed under :data:`REMOTE_CODE_TASK`, plus the processor (which the base method does not
        save), so the folder answers both ``pipeline("audio-question-answering", model=folder)`` with af2_hf and
        ``pipeline(REMOTE_CODE_TASK, model=folder, trust_remote_code=True)`` without it."""
        registered = getattr(type(self), "_registered_impl", {}).get("audio-question-answering", {})
        self._registered_impl = {REMOTE_CODE_TASK: {"impl": type(self), "pt": registered.get("pt", ()),
                                                    "type": "multimodal"}}
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            del self._registered_impl
        self.processor.save_pretrained(save_directory)

    # ------------------------------------------------------------------ parameters

    def _sanitize_parameters(
        self,
        question=None,
        sampling_rate=None,
        max_new_tokens=None,
        generate_kwargs=None,
        soundcot=None,
        processor_kwargs=None,
        **kwargs,
    ):
        if kwargs:
            raise TypeError(f"Unexpected argument(s) for the audio-question-answering pipeline: {sorted(kwargs)}.")
        preprocess_params: dict[str, Any] = {}
        forward_params: dict[str, Any] = {}
        if question is not None:
            if not isinstance(question, str):
                raise TypeError(f"question must be a string, got {type(question).__name__}.")
            preprocess_params["question"] = question
        if sampling_rate is not None:
            preprocess_params["sampling_rate"] = sampling_rate
        if soundcot is not None:
            preprocess_params["soundcot"] = bool(soundcot)
            forward_params["soundcot"] = bool(soundcot)
        if processor_kwargs is not None:
            if not isinstance(processor_kwargs, dict):
                raise TypeError("processor_kwargs must be a dict.")
            preprocess_params["processor_kwargs"] = processor_kwargs
        if generate_kwargs is not None:
            if not isinstance(generate_kwargs, dict):
                raise TypeError("generate_kwargs must be a dict.")
            forward_params["generate_kwargs"] = dict(generate_kwargs)
        if max_new_tokens is not None:
            if generate_kwargs is not None and "max_new_tokens" in generate_kwargs:
                raise ValueError("max_new_tokens is given twice: as an argument and in generate_kwargs.")
            forward_params.setdefault("generate_kwargs", {})["max_new_tokens"] = max_new_tokens
        return preprocess_params, forward_params, {}

    def _sanitize_call(self, kwargs: dict) -> dict:
        # Generation parameters given directly to a call (e.g. do_sample=False) go to generate_kwargs, as at init.
        generation_keys = {key for key in vars(GenerationConfig()) if not key.startswith("_")}
        direct = {key: kwargs.pop(key) for key in list(kwargs) if key in generation_keys and key != "max_new_tokens"}
        if direct:
            generate_kwargs = dict(kwargs.get("generate_kwargs") or {})
            for key, value in direct.items():
                if key in generate_kwargs:
                    raise ValueError(f"{key} is given twice: as an argument and in generate_kwargs.")
                generate_kwargs[key] = value
            kwargs["generate_kwargs"] = generate_kwargs
        return kwargs

    # ------------------------------------------------------------------ call

    def __call__(self, inputs=None, **kwargs):
        """Answers ``question`` about each input (an audio, or `None` for a text-only prompt); see the class
        docstring for the accepted forms.

        Returns:
            ``{"answer": str}`` for one input, a list of those for a list of inputs (an iterator for a generator or
            dataset).
        """
        if "audio" in kwargs:
            if inputs is not None:
                raise ValueError("Pass the audio once: pipe(audio, question=...) or pipe(audio=..., question=...).")
            inputs = kwargs.pop("audio")
        if inputs is None and "question" not in kwargs:
            raise ValueError("Pass a question: pipe(audio, question='...'), or pipe(None, question='...') without "
                             "audio.")
        question = kwargs.get("question")
        if isinstance(question, (list, tuple)):
            if inputs is None:
                inputs = [None] * len(question)
            if not isinstance(inputs, (list, tuple)) or len(inputs) != len(question):
                raise ValueError("A list of questions needs a list of inputs of the same length.")
            kwargs.pop("question")
            inputs = [self._with_question(item, q) for item, q in zip(inputs, question)]
        kwargs = self._sanitize_call(kwargs)
        return super().__call__(inputs, **kwargs)

    @staticmethod
    def _with_question(item, question):
        audio, _ = split_input(item)
        return {"audio": audio, "question": question}

    def run_single(self, inputs, preprocess_params, forward_params, postprocess_params):
        model_inputs = self._collate([self.preprocess(inputs, **preprocess_params)])
        model_outputs = self.forward(model_inputs, **forward_params)
        return self.postprocess(model_outputs, **postprocess_params)

    def get_iterator(
        self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params, postprocess_params
    ):
        if isinstance(inputs, collections.abc.Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:
            if num_workers > 1:
                logger.warning("An iterable input is read with num_workers=1.")
                num_workers = 1
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
        if "TOKENIZERS_PARALLELISM" not in os.environ:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        loader = torch.utils.data.DataLoader(
            dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=self._collate
        )
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    # ------------------------------------------------------------------ preprocess

    def _load(self, audio, sampling_rate):
        """The waveform of one audio value with [`af2_hf.load_audio`]: for AF2 the original ``read_audio`` (at most
        ``max_num_windows`` windows, channel 0, soxr resampling, peak normalisation); for other models the samples
        as stored (channel 0, resampled), float32."""
        extractor = self.processor.feature_extractor
        target_rate = int(extractor.sampling_rate)
        is_af2 = _is_af2_processor(self.processor)
        waveform = load_audio(
            audio,
            sampling_rate=target_rate,
            max_seconds=extractor.max_audio_seconds() if is_af2 else None,
            source_sampling_rate=sampling_rate if is_waveform(audio) else None,  # files, dicts: their own rate
            normalize=is_af2,
        )
        return waveform if is_af2 else waveform.astype(np.float32, copy=False)

    def _text(self, question: str, has_audio: bool, soundcot: bool) -> str:
        """What the processor gets as the text of one sample. AF2: the question itself (the batch goes through
        ``processor.apply_question_request``: the original prompt, or its text-only form, with the question as plain
        text), with the SoundCoT instruction appended for SoundCoT (whose second attempt continues the prompt).
        Other models: their chat template."""
        processor = self.processor
        if not _is_af2_processor(processor):
            if getattr(processor, "chat_template", None):
                return processor.apply_chat_template(_chat(question, has_audio), tokenize=False,
                                                     add_generation_prompt=True)
            audio_token = getattr(processor, "audio_token", None)
            if audio_token:
                return f"{audio_token}{question}" if has_audio else question
            raise ValueError(
                f"{type(processor).__name__} has no chat template and no audio_token: the pipeline cannot build a "
                "prompt."
            )
        if soundcot:
            return soundcot_question(question)
        return question

    def preprocess(self, inputs, question=None, sampling_rate=None, soundcot=False, processor_kwargs=None):
        audio, item_question = split_input(inputs)
        if item_question is not None:
            question = item_question
        if question is None:
            raise ValueError("Missing question: pass question='...' or {'audio': ..., 'question': '...'}.")
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}.")
        if soundcot and not _is_af2_processor(self.processor):
            raise ValueError("soundcot=True needs an Audio Flamingo 2 model and processor.")
        if soundcot and audio is None:
            raise ValueError("soundcot=True answers questions about audio: this input has no audio.")
        waveform = None if audio is None else self._load(audio, sampling_rate)
        processor_kwargs = dict(processor_kwargs or {})
        if soundcot:
            processor_kwargs.setdefault("max_length", SOUNDCOT_MAX_LENGTH)
        return {"prompt": self._text(question, waveform is not None, soundcot), "audio": waveform,
                "processor_kwargs": processor_kwargs}

    def _collate(self, items: list[dict]) -> dict:
        processor_kwargs = dict(items[0]["processor_kwargs"])
        # Text only (the audio padding is the processor's own business): left padding for batched generation.
        text_kwargs = dict(processor_kwargs.pop("text_kwargs", None) or {})
        for key, value in (("padding", True), ("padding_side", "left")):
            if key not in processor_kwargs:
                text_kwargs.setdefault(key, value)
        processor_kwargs["text_kwargs"] = text_kwargs
        prompts = [item["prompt"] for item in items]
        audios = [item["audio"] for item in items]
        if _is_af2_processor(self.processor):
            # one audio (or None) per text; the AF2 feature extractor computes the log-mel where the model is
            audio_arg = audios if any(audio is not None for audio in audios) else None
            if self.device.type != "cpu":
                processor_kwargs.setdefault("device", self.device)
        else:  # in the order of the prompts' audio tokens
            audio_arg = [audio for audio in audios if audio is not None] or None
        if audio_arg is not None:
            processor_kwargs.setdefault("sampling_rate", self.processor.feature_extractor.sampling_rate)
        if _is_af2_processor(self.processor):
            inputs = self.processor.apply_question_request(prompts, audio=audios, return_tensors="pt",
                                                           **processor_kwargs)
        else:
            inputs = self.processor(text=prompts, audio=audio_arg, return_tensors="pt", **processor_kwargs)
        for name in getattr(self.processor, "unused_input_names", None) or ():
            inputs.pop(name, None)
        return {
            "model_inputs": dict(inputs),
            "prompts": prompts,
            "audios": audios,
            "processor_kwargs": processor_kwargs,
        }

    # ------------------------------------------------------------------ forward

    def _forward(self, batch, generate_kwargs=None, soundcot=False):
        generate_kwargs = dict(generate_kwargs or {})
        if soundcot and "max_new_tokens" not in generate_kwargs and "max_length" not in generate_kwargs:
            generate_kwargs["max_new_tokens"] = SOUNDCOT_MAX_NEW_TOKENS
        if hasattr(self, "_prepare_generate_kwargs"):  # transformers >= 5.20
            generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        elif "generation_config" not in generate_kwargs:  # older: the pipeline's prepared generation config
            generate_kwargs["generation_config"] = self.generation_config
        model_inputs = {}
        for key, value in batch["model_inputs"].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.to(self.model.dtype)
            model_inputs[key] = value
        input_ids = model_inputs["input_ids"]
        sequences = self.model.generate(**model_inputs, **generate_kwargs)
        batch_size = input_ids.shape[0]
        per_input = sequences.shape[0] // batch_size
        if _is_af2_processor(self.processor):
            flat = [self.processor.decode_answer(sequence) for sequence in sequences]
        else:
            new_tokens = sequences[:, input_ids.shape[1] :]
            flat = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        if soundcot:
            if per_input != 1:
                raise ValueError("soundcot=True takes one answer per input (num_return_sequences=1).")
            flat = reask(
                self.model,
                self.processor,
                batch["prompts"],
                batch["audios"],
                flat,
                processor_kwargs=batch["processor_kwargs"],
                **generate_kwargs,
            )
        answers = [flat[i * per_input : (i + 1) * per_input] for i in range(batch_size)]
        return {"answers": answers}

    def postprocess(self, model_outputs):
        answers = model_outputs["answers"]
        # Unbatched by the iterator: the list of one input's answers; otherwise a batch of one.
        if answers and isinstance(answers[0], list):
            if len(answers) != 1:
                raise RuntimeError(f"Expected the answers of one input, got {len(answers)}.")
            answers = answers[0]
        if len(answers) == 1:
            return {"answer": answers[0]}
        return [{"answer": answer} for answer in answers]
