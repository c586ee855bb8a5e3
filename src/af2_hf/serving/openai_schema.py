"""OpenAI chat-completions requests for Audio Flamingo 2: validation and translation into a ``GenerationRequest``.

The accepted subset of the OpenAI schema (``POST /v1/chat/completions``):

- ``messages``: rendered by the model's chat template (``processor.apply_chat_template``; the original one-turn
  prompt for one user message). The conversation ends with a user message holding a question; ``content`` is a
  string, or a list of ``{"type": "text", "text": ...}`` parts and at most one ``{"type": "input_audio",
  "input_audio": {"data": <base64>, "format": "wav"|"mp3"|"flac"|"ogg"}}`` part (one audio in the whole
  conversation: Audio Flamingo 2 takes one audio). Without an audio part the question is text only. ``system`` /
  ``developer`` and earlier turns are passed to the template, which refuses what the model cannot take (a 400).
- ``max_completion_tokens`` / ``max_tokens`` -> ``max_new_tokens``; ``temperature`` (0 = greedy), ``top_p``, ``seed``,
  ``stop`` (up to 4 strings, cut from the answer), ``n`` (answers per request), ``stream`` and
  ``stream_options.include_usage``; ``top_k`` as an extension (as vLLM). Unset parameters follow the model's
  generation config (the releases sample with top-k 30, top-p 0.95).
- Parameters the model cannot honour (tools, logprobs, penalties, response formats, audio output) are refused with a
  400 naming them, not ignored; other unknown fields (``user``, ``metadata``, ...) are ignored.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engine import GenerationRequest, RequestError

__all__ = [
    "AUDIO_FORMATS",
    "ChatCompletionRequest",
    "audio_part",
    "decode_audio_bytes",
    "generation_parameters",
    "parse_chat_request",
    "to_generation_request",
]

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")

#: Fields of the OpenAI schema this server refuses when set to anything but their neutral value.
_UNSUPPORTED: dict[str, Any] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class InputAudio(_Strict):
    data: str = Field(min_length=1)
    format: str


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[Union[TextPart, AudioPart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1)


def _location(error: dict) -> str:
    parts = []
    for item in error.get("loc", ()):
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item not in ("TextPart", "AudioPart", "str", "list[tagged-union[TextPart,AudioPart]]"):
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validates a decoded JSON body; raises :class:`RequestError` naming the first problem."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", code="invalid_request")
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = _location(first)
        raise RequestError(f"Invalid request: {where}: {first['msg']}.", param=where or None, code="invalid_value") from None
    extra = request.model_extra or {}
    for name, neutral in _UNSUPPORTED.items():
        if name in extra and extra[name] not in neutral:
            raise RequestError(
                f"'{name}' is not supported by this Audio Flamingo 2 server (the model answers in plain text).",
                param=name,
                code="unsupported_parameter",
            )
    return request


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _check_messages(request: ChatCompletionRequest) -> AudioPart | None:
    """Checks the conversation's shape; returns its ``input_audio`` part, if any."""
    roles = [message.role for message in request.messages]
    if "tool" in roles or roles[-1] != "user":
        raise RequestError(
            f"The conversation must end with a user message and have no tool messages (got roles {roles}).",
            param="messages",
            code="invalid_messages",
        )
    audios, last_text = [], ""
    for index, message in enumerate(request.messages):
        content = message.content if isinstance(message.content, list) else []
        for part in content:
            if isinstance(part, AudioPart):
                if message.role != "user":
                    raise RequestError(f"messages[{index}]: only user messages may hold audio.",
                                       param=f"messages[{index}].content", code="invalid_messages")
                audios.append(part)
        if index == len(request.messages) - 1:
            if isinstance(message.content, str):
                last_text = message.content.strip()
            else:
                last_text = " ".join(p.text.strip() for p in content if isinstance(p, TextPart)).strip()
    if len(audios) > 1:
        raise RequestError(
            f"The conversation holds {len(audios)} input_audio parts; Audio Flamingo 2 takes one audio.",
            param="messages",
            code="invalid_messages",
        )
    if not last_text:
        raise RequestError(
            "The last user message has no question: add a text part (e.g. 'What is the sound source in this audio?').",
            param=f"messages[{len(roles) - 1}].content",
            code="invalid_messages",
        )
    return audios[0] if audios else None


def _conversation(request: ChatCompletionRequest, waveform) -> list[dict]:
    """The processor's chat format: text parts as text blocks, the audio part as an audio block with ``waveform``."""
    conversation = []
    for message in request.messages:
        content = message.content
        if content is None:
            content = []
        if isinstance(content, str):
            content = [TextPart(type="text", text=content)]
        blocks = [
            {"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "audio", "audio": waveform}
            for part in content
        ]
        conversation.append({"role": _ROLES[message.role], "content": blocks})
    return conversation


def decode_audio_bytes(audio: InputAudio, max_bytes: int) -> bytes:
    """The bytes of an ``input_audio`` part (strict base64); :class:`RequestError` for a bad format or encoding."""
    param = "messages[0].content.input_audio"
    if audio.format.lower() not in AUDIO_FORMATS:
        raise RequestError(
            f"input_audio.format {audio.format!r} is not supported; use one of {list(AUDIO_FORMATS)}.",
            param=param + ".format",
            code="invalid_audio_format",
        )
    data = audio.data
    if data.startswith("data:") and "," in data:  # a data URI is accepted as well
        data = data.split(",", 1)[1]
    if len(data) * 3 // 4 > max_bytes:
        raise RequestError(f"The audio is larger than {max_bytes} bytes.", param=param + ".data", code="audio_too_large")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("input_audio.data is not valid base64.", param=param + ".data", code="invalid_base64") from None


def generation_parameters(request: ChatCompletionRequest, max_new_tokens_limit: int, max_choices: int) -> dict:
    """The ``GenerationRequest`` fields of a validated chat request other than its conversation."""
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        if request.max_tokens != request.max_completion_tokens:
            raise RequestError(
                "max_tokens and max_completion_tokens disagree; send one of them.",
                param="max_completion_tokens",
                code="invalid_value",
            )
    max_new_tokens = request.max_completion_tokens or request.max_tokens
    if max_new_tokens is not None and max_new_tokens > max_new_tokens_limit:
        raise RequestError(
            f"max_completion_tokens {max_new_tokens} is over this server's limit of {max_new_tokens_limit}.",
            param="max_completion_tokens",
            code="invalid_value",
        )
    if request.n > max_choices:
        raise RequestError(f"n={request.n} is over this server's limit of {max_choices}.", param="n", code="invalid_value")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise RequestError("stop takes up to 4 non-empty strings.", param="stop", code="invalid_value")
    return dict(
        max_new_tokens=max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        seed=request.seed,
        stop=tuple(stop),
        num_choices=request.n,
    )


def to_generation_request(request: ChatCompletionRequest, waveform, parameters: dict) -> GenerationRequest:
    """The engine request: the conversation (``waveform``: the decoded ``input_audio`` or None) and ``parameters``
    (from :func:`generation_parameters`)."""
    if (_check_messages(request) is None) != (waveform is None):
        raise ValueError("waveform must be given exactly when the conversation holds an input_audio part.")
    return GenerationRequest(conversation=_conversation(request, waveform), **parameters)


def audio_part(request: ChatCompletionRequest) -> InputAudio | None:
    """The request's ``input_audio`` (after the conversation checks), or None for a text-only conversation."""
    part = _check_messages(request)
    return None if part is None else part.input_audio
