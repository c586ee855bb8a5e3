"""One model, one ``generate`` at a time: the generation queue shared by ``af2-hf serve`` and ``af2-hf demo``.

A :class:`GenerationEngine` owns the model and processor and runs every request in a single worker thread, in the
order they were submitted (a bounded queue: a full queue refuses new work with :class:`QueueFullError`). Requests
never share a batch, so one request's padding, seed or cancellation cannot change another's answer: each answer is
the one the same request gets alone.

A request reports what happens through its ``on_event`` callback (called from the worker thread):

- ``Started()``: the inputs are ready (the request passed the processor's checks) and generation begins;
- ``Delta(index, text)``: more text of answer ``index`` (streaming; the concatenation of the deltas of a choice is
  its final text unless the model itself emits ``<SEP>``, see :class:`_AnswerTracker`);
- ``Finished(result)``: the final :class:`GenerationResult`;
- ``Failed(error)``: :class:`RequestError` for a problem of the request (over-long prompt, ...), any other exception
  for a failure of the server.

The answers are the pipeline's: the processor's chat template builds the inputs (the original prompt; message text is
plain text, never control tokens), ``generate`` runs with the request's parameters, and ``processor.decode_answer``
decodes each sequence.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "Delta",
    "Failed",
    "Started",
    "question_conversation",
    "Finished",
    "GenerationEngine",
    "GenerationRequest",
    "GenerationResult",
    "Job",
    "QueueFullError",
    "RequestError",
]


class RequestError(ValueError):
    """A request the model cannot serve as asked (e.g. its prompt is over the model's limit); an HTTP 4xx."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class QueueFullError(RuntimeError):
    """The generation queue is full: the request was not accepted (retry later)."""


@dataclass
class GenerationRequest:
    """One conversation to answer (the processor's chat format) and how to generate its answer(s).

    ``conversation`` is rendered by the processor's chat template: ``[{"role": "user", "content": [{"type":
    "audio", "audio": waveform}, {"type": "text", "text": question}]}]`` (see :func:`question_conversation`); audio
    blocks hold mono waveforms at the feature extractor's rate (``af2_hf.audio.load_audio``); a conversation without
    an audio block is text only. ``temperature`` 0 means greedy decoding; None leaves a parameter to the model's
    generation config.
    """

    conversation: list[dict]
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    num_choices: int = 1


def question_conversation(question: str, waveform: np.ndarray | None = None) -> list[dict]:
    """The one-turn conversation asking ``question`` about ``waveform`` (None: a text-only question)."""
    content = [] if waveform is None else [{"type": "audio", "audio": waveform}]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


@dataclass
class GenerationResult:
    """The answers of one request with OpenAI's ``finish_reason`` ("stop" or "length") and token counts."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Started:
    pass


@dataclass
class Delta:
    index: int
    text: str


@dataclass
class Finished:
    result: GenerationResult


@dataclass
class Failed:
    error: BaseException


@dataclass
class Job:
    """A submitted request: its events go to ``on_event``; ``cancel()`` stops it (e.g. the client went away)."""

    request: GenerationRequest
    on_event: Callable[[Any], None]
    stream: bool = False
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to (without) the earliest stop string, and whether one was found."""
    positions = [text.find(s) for s in stop if s and s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could still become a stop string (or end in a partial character)."""
    hold = 0
    for s in stop:
        for length in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:length]):
                hold = length
                break
    if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
        hold = max(hold, 1)
    return hold


class _AnswerTracker:
    """What has been streamed of one answer; turns the answer decoded so far into the next delta.

    The original decoding keeps the text after the LAST ``<SEP>``: if the model itself generates ``<SEP>`` the answer
    starts again, and a stream cannot take back what it sent. The tracker then stops streaming that answer and
    reports ``reset`` (the final, non-streamed text is the original decoding's).
    """

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.sent = ""
        self.done = False
        self.reset = False

    def delta(self, answer: str, final: bool = False) -> str:
        if self.done or self.reset:
            return ""
        answer, stopped = cut_at_stop(answer, self.stop)
        if not answer.startswith(self.sent):
            logger.warning("The model generated <SEP>: its answer restarts, and the stream keeps what it sent.")
            self.reset = True
            return ""
        visible = answer if (final or stopped) else answer[: len(answer) - _held_back(answer, self.stop)]
        piece = visible[len(self.sent) :]
        self.sent = visible if len(visible) > len(self.sent) else self.sent
        self.done = stopped or final
        return piece


def _streamer_class():
    from transformers.generation.streamers import BaseStreamer

    class AnswerStreamer(BaseStreamer):
        """Receives the generated tokens of every sequence and sends each answer's new text as ``Delta`` events."""

        def __init__(self, processor, trackers: list[_AnswerTracker], on_event):
            self.processor = processor
            self.trackers = trackers
            self.on_event = on_event
            self.tokens: list[list[int]] | None = None

        def put(self, value):
            if self.tokens is None:  # the first call holds the prompt(s)
                self.tokens = [[] for _ in range(value.shape[0] if value.ndim > 1 else 1)]
                return
            for row, token in enumerate(value.reshape(-1).tolist()):
                self.tokens[row].append(token)
                # One greedy sequence answers every choice; otherwise choice i is sequence i.
                indices = range(len(self.trackers)) if len(self.tokens) == 1 else [row]
                answer = None
                for index in indices:
                    tracker = self.trackers[index]
                    if tracker.done or tracker.reset:
                        continue
                    if answer is None:
                        answer = self.processor.decode_answer(self.tokens[row])
                    piece = tracker.delta(answer)
                    if piece:
                        self.on_event(Delta(index, piece))

        def end(self):
            pass

    return AnswerStreamer


def _cancel_criteria(job: Job):
    import torch
    from transformers import StoppingCriteria

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), job.cancelled, dtype=torch.bool, device=input_ids.device)

    return Cancelled()


class GenerationEngine:
    """Runs generation requests for one model, one at a time, in a worker thread (see the module docstring).

    Args:
        model: an Audio Flamingo 2 model in eval mode.
        processor: its ``AudioFlamingo2Processor``.
        max_queue: requests waiting at most (beyond the one being generated); more raise :class:`QueueFullError`.
    """

    def __init__(self, model, processor, max_queue: int = 16):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}.")
        self.model = model
        self.processor = processor
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._worker = threading.Thread(target=self._work, name="af2-generate", daemon=True)
        self._worker.start()

    @property
    def sampling_rate(self) -> int:
        return int(self.processor.feature_extractor.sampling_rate)

    def max_audio_seconds(self) -> float:
        return float(self.processor.feature_extractor.max_audio_seconds())

    def submit(self, job: Job) -> Job:
        """Queues ``job``; raises :class:`QueueFullError` when the queue is full."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(
                f"The server is busy: {self._queue.maxsize} requests are already waiting. Retry later."
            ) from None
        return job

    def close(self) -> None:
        """Stops the worker after the queued requests (waits for it)."""
        self._queue.put(None)
        self._worker.join()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled:
                continue
            try:
                result = self._generate(job)
            except BaseException as error:  # noqa: BLE001 - reported to the request; the worker keeps serving
                job.on_event(Failed(error))
            else:
                job.on_event(Finished(result))

    # ------------------------------------------------------------------ one request

    def _inputs(self, request: GenerationRequest) -> dict:
        import torch
        from jinja2.exceptions import TemplateError

        processor_kwargs: dict[str, Any] = {"text_kwargs": {"truncation": False}}
        if self.model.device.type != "cpu":  # the log-mel where the model is (same numbers)
            processor_kwargs["audio_kwargs"] = {"device": self.model.device}
        try:
            inputs = self.processor.apply_chat_template(
                request.conversation,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                add_generation_prompt=True,
                processor_kwargs=processor_kwargs,
            )
        except (ValueError, TypeError, TemplateError) as error:
            code = "context_length_exceeded" if "max_length" in str(error) else "invalid_prompt"
            raise RequestError(str(error), param="messages", code=code) from error
        model_inputs = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.model.device)
                if value.is_floating_point():
                    value = value.to(self.model.dtype)
            model_inputs[key] = value
        return model_inputs

    def _generate_kwargs(self, request: GenerationRequest, job: Job, trackers) -> dict:
        from transformers import StoppingCriteriaList

        kwargs: dict[str, Any] = {"stopping_criteria": StoppingCriteriaList([_cancel_criteria(job)])}
        if request.max_new_tokens is not None:
            kwargs["max_new_tokens"] = request.max_new_tokens
        greedy = request.temperature == 0
        if greedy:
            kwargs["do_sample"] = False
        elif request.temperature is not None or request.top_p is not None or request.top_k is not None:
            kwargs["do_sample"] = True
            for name in ("temperature", "top_p", "top_k"):
                if getattr(request, name) is not None:
                    kwargs[name] = getattr(request, name)
        sampling = kwargs.get("do_sample", self.model.generation_config.do_sample)
        if request.num_choices > 1 and sampling:
            kwargs["num_return_sequences"] = request.num_choices
        if request.stop:
            kwargs["stop_strings"] = list(request.stop)
            kwargs["tokenizer"] = self.processor.tokenizer
        if job.stream:
            kwargs["streamer"] = _streamer_class()(self.processor, trackers, job.on_event)
        return kwargs

    def _generate(self, job: Job) -> GenerationResult:
        import torch
        from transformers import set_seed

        request = job.request
        inputs = self._inputs(request)
        job.on_event(Started())
        trackers = [_AnswerTracker(request.stop) for _ in range(request.num_choices)]
        kwargs = self._generate_kwargs(request, job, trackers)
        if request.seed is not None:
            set_seed(request.seed)
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, **kwargs)
        sequences = sequences.cpu()
        if sequences.shape[0] != request.num_choices:  # greedy: one answer, the same for every choice
            sequences = sequences.expand(request.num_choices, -1)
        result = self._result(sequences, inputs["input_ids"].shape[1], kwargs, request.stop)
        if job.stream:
            for index, (tracker, text) in enumerate(zip(trackers, result.texts)):
                piece = tracker.delta(text, final=True)
                if piece:
                    job.on_event(Delta(index, piece))
        return result

    def _result(self, sequences, prompt_length: int, kwargs: dict, stop: tuple[str, ...]) -> GenerationResult:
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        max_new_tokens = kwargs.get("max_new_tokens", self.model.generation_config.max_new_tokens)
        texts, reasons, completion_tokens = [], [], 0
        for sequence in sequences:
            new_tokens = sequence[prompt_length:].tolist()
            ends = [i for i, token in enumerate(new_tokens) if token in eos_ids]
            count = ends[0] + 1 if ends else len(new_tokens)
            text, stopped = cut_at_stop(self.processor.decode_answer(sequence), stop)
            texts.append(text)
            reasons.append("length" if not (ends or stopped) and count >= (max_new_tokens or 0) else "stop")
            completion_tokens += count
        return GenerationResult(texts, reasons, prompt_length, completion_tokens)
