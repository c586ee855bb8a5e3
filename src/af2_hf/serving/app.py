"""The FastAPI application of ``af2-hf serve``: OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models``.

Every error is a JSON body in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
request (schema, audio that cannot be decoded, over-long audio or prompt, unsupported parameters), 404 for another
model name or an unknown route, 413 for a body over the size limit, 503 when the generation queue is full, 500 for a
failure of the server itself. Streaming answers are server-sent events (``data: {chunk}`` lines, then
``data: [DONE]``); a request is checked (and its prompt prepared) before the stream starts, so a bad request gets its
4xx even when it asks for a stream.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..audio import AudioLoadError, load_audio
from .engine import (
    Delta,
    Failed,
    Finished,
    GenerationEngine,
    GenerationResult,
    Job,
    QueueFullError,
    RequestError,
)
from .openai_schema import (
    audio_part,
    decode_audio_bytes,
    generation_parameters,
    parse_chat_request,
    to_generation_request,
)

__all__ = ["ServerLimits", "create_app"]

_STATUS_BY_CODE = {"model_not_found": 404, "request_too_large": 413, "audio_too_large": 413}


@dataclass(frozen=True)
class ServerLimits:
    """Request limits: body size (bytes), audio length (seconds), new tokens and answers per request."""

    max_request_bytes: int = 64 * 2**20
    max_audio_seconds: float = 300.0
    max_new_tokens: int = 1024
    max_choices: int = 4


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else ("server_error" if status == 500 else "service_unavailable")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status
    )


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = RequestError(f"The request body is larger than {limit} bytes.", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


class _ChatHandler:
    """One ``/v1/chat/completions`` request, from the raw body to the (streamed) response."""

    def __init__(self, engine: GenerationEngine, model_id: str, limits: ServerLimits):
        self.engine = engine
        self.model_id = model_id
        self.limits = limits

    async def __call__(self, http_request: Request):
        body = await _read_body(http_request, self.limits.max_request_bytes)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(f"The request body is not valid JSON: {error}.", code="invalid_json") from None
        request = parse_chat_request(payload)
        if request.model != self.model_id:
            raise RequestError(
                f"The model {request.model!r} does not exist on this server; it serves {self.model_id!r}.",
                param="model",
                code="model_not_found",
            )
        part = audio_part(request)
        parameters = generation_parameters(request, self.limits.max_new_tokens, self.limits.max_choices)
        waveform = None if part is None else await self._waveform(part)
        generation = to_generation_request(request, waveform, parameters)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(generation, lambda event: loop.call_soon_threadsafe(events.put_nowait, event), stream=request.stream)
        self.engine.submit(job)
        try:
            first = await self._next(events)
        except BaseException:
            job.cancel()
            raise
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            stream = self._stream(events, job, completion_id, created, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while not isinstance(first, Finished):
                first = await self._next(events)
        finally:
            job.cancel()  # a no-op once finished; stops the generation if this request was abandoned
        return JSONResponse(self._completion(first.result, completion_id, created))

    async def _waveform(self, part):
        data = decode_audio_bytes(part, self.limits.max_request_bytes)
        try:
            return await run_in_threadpool(
                load_audio,
                data,
                sampling_rate=self.engine.sampling_rate,
                max_seconds=self.limits.max_audio_seconds,
                truncation=False,
            )
        except AudioLoadError as error:
            raise RequestError(str(error), param="messages[0].content.input_audio.data", code="invalid_audio") from None
        except ValueError as error:  # longer than the limit (truncation=False)
            raise RequestError(
                f"{error} This server takes at most {self.limits.max_audio_seconds:g} s of audio.",
                param="messages[0].content.input_audio.data",
                code="audio_too_long",
            ) from None

    @staticmethod
    async def _next(events: asyncio.Queue):
        """The next event; a failure is raised (a RequestError becomes a 4xx)."""
        event = await events.get()
        if isinstance(event, Failed):
            raise event.error
        return event

    def _chunk(self, completion_id: str, created: int, choices: list, usage: dict | None = None) -> str:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.model_id,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def _stream(self, events: asyncio.Queue, job: Job, completion_id: str, created: int, include_usage: bool):
        num = job.request.num_choices
        try:
            for index in range(num):
                delta = {"role": "assistant", "content": ""}
                yield self._chunk(completion_id, created, [{"index": index, "delta": delta, "finish_reason": None}])
            while True:
                try:
                    event = await self._next(events)
                except Exception as error:  # noqa: BLE001 - the 200 is sent: report in the stream, then end it
                    message = str(error) or type(error).__name__
                    yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                    break
                if isinstance(event, Delta):
                    choice = {"index": event.index, "delta": {"content": event.text}, "finish_reason": None}
                    yield self._chunk(completion_id, created, [choice])
                elif isinstance(event, Finished):
                    for index, reason in enumerate(event.result.finish_reasons):
                        choice = {"index": index, "delta": {}, "finish_reason": reason}
                        yield self._chunk(completion_id, created, [choice])
                    if include_usage:
                        yield self._chunk(completion_id, created, [], usage=_usage(event.result))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    def _completion(self, result: GenerationResult, completion_id: str, created: int) -> dict:
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": self.model_id,
            "choices": [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason,
                    "logprobs": None,
                }
                for index, (text, reason) in enumerate(zip(result.texts, result.finish_reasons))
            ],
            "usage": _usage(result),
        }


def _usage(result: GenerationResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def create_app(engine: GenerationEngine, model_id: str, limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``'s model under the name ``model_id``."""
    limits = limits or ServerLimits()
    app = FastAPI(title="af2-hf serve", description="OpenAI-compatible server for Audio Flamingo 2")
    created = int(time.time())
    model_entry = {"id": model_id, "object": "model", "created": created, "owned_by": "af2-hf"}
    chat = _ChatHandler(engine, model_id, limits)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, error: RequestError):
        return error_response(_STATUS_BY_CODE.get(error.code, 400), str(error), error.param, error.code)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, error: QueueFullError):
        return error_response(503, str(error), None, "queue_full")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), None, None)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, error: Exception):
        return error_response(500, f"Internal error: {type(error).__name__}: {error}", None, "internal_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_entry]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name != model_id:
            raise RequestError(f"The model {name!r} does not exist on this server.", param="model", code="model_not_found")
        return model_entry

    app.add_api_route("/v1/chat/completions", chat, methods=["POST"])
    return app
