"""The ``audio-question-answering`` pipeline: one audio + one question in, one generated answer out.

Works with Audio Flamingo 2 (the original prompt format and answer decoding), and with any audio-text-to-text model
whose processor takes ``processor(text=..., audio=...)`` and has a chat template placing the audio (transformers'
Audio Flamingo 3 and Qwen2-Audio, for example).

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

from .audio import AudioLoadError, _describe, _open_source
from .soundcot import SOUNDCOT_MAX_LENGTH, SOUNDCOT_MAX_NEW_TOKENS, reask, soundcot_question

logger = logging.get_logger(__name__)

__all__ = ["AudioQuestionAnsweringPipeline"]

_WAVEFORM_KEYS = ("raw", "array")
_ALLOWED_DICT_KEYS = {"audio", "question", "raw", "array", "sampling_rate", "path", "bytes"}


def _is_af2_processor(processor) -> bool:
    # Duck-typed, so that the copy of the processor class loaded as remote code is recognised as well.
    return hasattr(processor, "format_prompt") and hasattr(processor, "decode_answer")


def _decode_audio_file(source, sampling_rate: int) -> np.ndarray:
    """Generic decoding for non-AF2 models: libsndfile, channels averaged (as librosa.load), librosa resampling."""
    import soundfile as sf

    name = _describe(source)
    handle = _open_source(source)
    try:
        data, rate = sf.read(handle, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, EOFError, OSError) as error:
        raise AudioLoadError(f"Could not read audio from {name}: {error}") from error
    if data.size == 0:
        raise AudioLoadError(f"Audio source {name} contains no samples.")
    waveform = data.mean(axis=1)
    if rate != sampling_rate:
        import librosa

        waveform = librosa.resample(waveform, orig_sr=rate, target_sr=sampling_rate)
    return np.ascontiguousarray(waveform, dtype=np.float32)


class AudioQuestionAnsweringPipeline(Pipeline):
    """
    Answers a question about an audio clip with a generative audio-language model (e.g. Audio Flamingo 2).

    Inputs (each with a question):

    - a path to an audio file (any format libsndfile reads), ``bytes`` of such a file, or a binary file object;
    - a 1-D numpy array / torch tensor at ``sampling_rate`` (default: the feature extractor's rate);
    - ``{"raw": array, "sampling_rate": sr}`` (as the ASR pipeline) or ``{"array": array, "sampling_rate": sr}``
      (a decoded ``datasets`` audio column); waveforms at another rate are resampled with librosa;
    - ``{"audio": <any of the above>, "question": "..."}``; a ``question`` key in the dict overrides the
      ``question=`` argument, which is the default for every input.

    Call forms: ``pipe(audio, question="...")``, ``pipe({"audio": ..., "question": ...})``, a list of inputs (with
    ``batch_size=N`` to batch them; ``question`` may then also be a list, one per input), a generator or a dataset.

    Parameters (at construction or per call): ``question``, ``sampling_rate``, ``max_new_tokens``,
    ``generate_kwargs`` (passed to ``generate``; generation parameters such as ``do_sample=False`` are accepted
    directly too), ``soundcot`` (Audio Flamingo 2 SoundCoT decoding, see ``af2_hf.soundcot``) and
    ``processor_kwargs``.

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
        """Answers ``question`` about each audio input; see the class docstring for the accepted forms.

        Returns:
            ``{"answer": str}`` for one input, a list of those for a list of inputs (an iterator for a generator or
            dataset).
        """
        if inputs is None:
            if "audio" not in kwargs:
                raise ValueError("Pass an audio input: pipe(audio, question='...').")
            inputs = kwargs.pop("audio")
        question = kwargs.get("question")
        if isinstance(question, (list, tuple)):
            if not isinstance(inputs, (list, tuple)) or len(inputs) != len(question):
                raise ValueError("A list of questions needs a list of inputs of the same length.")
            kwargs.pop("question")
            inputs = [self._with_question(item, q) for item, q in zip(inputs, question)]
        kwargs = self._sanitize_call(kwargs)
        return super().__call__(inputs, **kwargs)

    @staticmethod
    def _with_question(item, question):
        if isinstance(item, dict) and "audio" in item:
            return {**item, "question": question}
        if isinstance(item, dict):
            return {"audio": {k: v for k, v in item.items() if k != "question"}, "question": question}
        return {"audio": item, "question": question}

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

    def _split_input(self, item):
        """-> (audio source or waveform, its sampling rate or None, the item's question or None)."""
        if isinstance(item, dict):
            unknown = set(item) - _ALLOWED_DICT_KEYS
            if unknown:
                raise ValueError(
                    f"Unexpected key(s) {sorted(unknown)} in an input dict; use 'audio' and 'question', or "
                    "'raw'/'array' with 'sampling_rate' (also 'path'/'bytes' as in a datasets audio column)."
                )
            question = item.get("question")
            if "audio" in item:
                extra = set(item) - {"audio", "question"}
                if extra:
                    raise ValueError(f"An input dict with 'audio' takes only 'question' beside it, got {sorted(extra)}.")
                audio, rate, inner_question = self._split_input(item["audio"])
                if inner_question is not None:
                    raise ValueError("Give the question once, beside 'audio', not inside it.")
                return audio, rate, question
            waveform_keys = [key for key in _WAVEFORM_KEYS if item.get(key) is not None]
            if len(waveform_keys) > 1:
                raise ValueError("An input dict takes one of 'raw' and 'array', not both.")
            if waveform_keys:
                if item.get("sampling_rate") is None:
                    raise ValueError(
                        f"An input dict with {waveform_keys[0]!r} needs its 'sampling_rate', e.g. "
                        "{'raw': waveform, 'sampling_rate': 16000}."
                    )
                return item[waveform_keys[0]], item["sampling_rate"], question
            if item.get("bytes") is not None:
                return item["bytes"], None, question
            if item.get("path") is not None:
                return item["path"], None, question
            raise ValueError("An input dict needs 'audio', 'raw' or 'array' (with 'sampling_rate'), 'bytes' or 'path'.")
        return item, None, None

    def _waveform(self, audio, rate, target_rate: int) -> np.ndarray:
        if isinstance(audio, torch.Tensor):
            audio = audio.detach().cpu().float().numpy()
        if not isinstance(audio, np.ndarray):
            raise TypeError(
                "Audio must be a path, bytes, a binary file object, a 1-D numpy array / torch tensor, or a dict "
                f"('raw'/'array' + 'sampling_rate', or 'audio' + 'question'); got {type(audio).__name__}."
            )
        if audio.ndim != 1:
            raise ValueError(f"A waveform must be 1-D (mono), got shape {tuple(audio.shape)}.")
        if audio.size == 0:
            raise ValueError("The waveform is empty.")
        if not np.issubdtype(audio.dtype, np.floating):
            raise TypeError(f"A waveform must hold floating-point samples, got dtype {audio.dtype}.")
        if not np.isfinite(audio).all():
            raise ValueError("The waveform contains NaN or infinite samples.")
        if rate is None:
            rate = target_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
            raise ValueError(f"sampling_rate must be a positive integer, got {rate!r}.")
        if rate != target_rate:
            import librosa

            audio = librosa.resample(audio.astype(np.float64), orig_sr=int(rate), target_sr=target_rate)
        return audio

    def _load(self, audio, target_rate: int):
        if isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(audio, "read"):
            if _is_af2_processor(self.processor):
                # The original read_audio: at most max_num_windows windows, channel 0, soxr resampling, peak norm.
                return self.processor.feature_extractor.fetch_audio(audio)
            return _decode_audio_file(audio, target_rate)
        return None

    def _prompt(self, question: str) -> str:
        processor = self.processor
        if _is_af2_processor(processor):
            return processor.format_prompt(question)
        if getattr(processor, "chat_template", None):
            conversation = [
                {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]}
            ]
            return processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        audio_token = getattr(processor, "audio_token", None)
        if audio_token:
            return f"{audio_token}{question}"
        raise ValueError(
            f"{type(processor).__name__} has no chat template and no audio_token: the pipeline cannot build a prompt."
        )

    def preprocess(self, inputs, question=None, sampling_rate=None, soundcot=False, processor_kwargs=None):
        audio, rate, item_question = self._split_input(inputs)
        if item_question is not None:
            question = item_question
        if question is None:
            raise ValueError("Missing question: pass question='...' or {'audio': ..., 'question': '...'}.")
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}.")
        if rate is None:
            rate = sampling_rate
        target_rate = int(self.processor.feature_extractor.sampling_rate)
        # Files carry their own rate: ``sampling_rate`` only applies to waveforms.
        waveform = self._load(audio, target_rate)
        if waveform is None:
            waveform = self._waveform(audio, rate, target_rate)
        processor_kwargs = dict(processor_kwargs or {})
        if soundcot:
            if not _is_af2_processor(self.processor):
                raise ValueError("soundcot=True needs an Audio Flamingo 2 model and processor.")
            question = soundcot_question(question)
            processor_kwargs.setdefault("max_length", SOUNDCOT_MAX_LENGTH)
        return {"prompt": self._prompt(question), "audio": waveform, "processor_kwargs": processor_kwargs}

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
        if not _is_af2_processor(self.processor):
            audios = [np.asarray(audio, dtype=np.float32) for audio in audios]
        elif self.device.type != "cpu":
            # The AF2 feature extractor computes the log-mel where the model is (same numerics as on the CPU).
            processor_kwargs.setdefault("device", self.device)
        inputs = self.processor(
            text=prompts,
            audio=audios,
            sampling_rate=self.processor.feature_extractor.sampling_rate,
            return_tensors="pt",
            **processor_kwargs,
        )
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
