"""``af2-hf serve`` as a real process on a free port, driven by the official ``openai`` client (and curl).

The reference answers come from the ``audio-question-answering`` pipeline run in this process on the same tiny
checkpoint (greedy, or sampling with the same seed): the server must give exactly the pipeline's answers, streamed
or not, alone or with other requests in flight. The README's server examples are run against the same server.
"""

import base64
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

import openai
from af2_testing import REPO_ROOT

EXAMPLE_WAV = REPO_ROOT / "examples" / "data" / "example.wav"
MODEL_NAME = "af2-tiny"  # the folder's name, as in the README
QUESTION = "What is the sound source in this audio?"


# ---------------------------------------------------------------------------------------------- helpers (also demo)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_cli(args: list[str], port: int, log_path, ready_path: str = "/health", timeout: float = 180.0):
    """Starts ``python -m af2_hf.cli ARGS`` and waits (bounded) until http://127.0.0.1:PORT{ready_path} answers."""
    import httpx

    log = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, "-m", "af2_hf.cli", *args], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.close()
            pytest.fail(f"af2-hf {args[0]} exited with {process.returncode}:\n{open(log_path).read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                return process, log
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_process(process, log)
    pytest.fail(f"af2-hf {args[0]} did not answer within {timeout} s:\n{open(log_path).read()[-3000:]}")


def stop_process(process, log) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()


def make_tiny(path):
    from af2_hf.tiny import make_tiny_model

    make_tiny_model(path, seed=0, remote_code=False)
    return path


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("serve") / MODEL_NAME)


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    process, log = start_cli(
        ["serve", "--model", str(tiny_dir), "--port", str(port), "--device", "cpu", "--max-audio-seconds", "20",
         "--max-request-mb", "2", "--max-new-tokens-limit", "64"],
        port,
        log_path,
    )
    yield f"http://127.0.0.1:{port}"
    stop_process(process, log)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from transformers import pipeline

    import af2_hf  # noqa: F401

    return pipeline("audio-question-answering", model=str(tiny_dir), device="cpu")


def _noise_flac(seconds: float, seed: int) -> bytes:
    noise = np.random.default_rng(seed).uniform(-0.5, 0.5, int(22050 * seconds)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, noise, 22050, format="FLAC")
    return buffer.getvalue()


def _audio_message(data: bytes, question: str = QUESTION, fmt: str = "wav") -> list[dict]:
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


def _reference(pipe, audio, question, seed=None, **generate_kwargs):
    from transformers import set_seed

    if seed is not None:
        set_seed(seed)
    result = pipe(audio, question=question, **generate_kwargs)
    return [r["answer"] for r in result] if isinstance(result, list) else result["answer"]


def _stream_text(client, **kwargs) -> tuple[dict, list]:
    """Concatenated deltas per choice index, and the chunks."""
    chunks = list(client.chat.completions.create(model=MODEL_NAME, stream=True, **kwargs))
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts, chunks


# ---------------------------------------------------------------------------------------------- tests


def test_models_endpoint_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_audio_question_is_answered_as_the_pipeline_answers(client, pipe):
    wav = EXAMPLE_WAV.read_bytes()
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=_audio_message(wav), temperature=0, max_tokens=10
    )
    expected = _reference(pipe, str(EXAMPLE_WAV), QUESTION, do_sample=False, max_new_tokens=10)
    assert response.choices[0].message.content == expected and expected.strip()
    assert response.choices[0].message.role == "assistant"
    prompt_ids = pipe.processor(text=QUESTION, audio=str(EXAMPLE_WAV), return_tensors="pt")["input_ids"]
    assert response.usage.prompt_tokens == prompt_ids.shape[1]
    assert 1 <= response.usage.completion_tokens <= 10
    assert response.choices[0].finish_reason == ("length" if response.usage.completion_tokens == 10 else "stop")

    flac = _noise_flac(4.0, seed=1)  # another format, another rate (resampled by the server)
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=_audio_message(flac, "Describe the audio.", "flac"), temperature=0, max_tokens=10
    )
    assert response.choices[0].message.content == _reference(
        pipe, flac, "Describe the audio.", do_sample=False, max_new_tokens=10
    )


def test_streaming_sends_the_same_answer_in_chunks(client):
    messages = _audio_message(EXAMPLE_WAV.read_bytes(), "Describe the audio in detail.")
    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=12)
    texts, chunks = _stream_text(
        client, messages=messages, temperature=0, max_tokens=12, stream_options={"include_usage": True}
    )
    assert texts == {0: whole.choices[0].message.content}
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 1  # streamed token by token, not in one piece
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({c.id for c in chunks}) == 1


def test_sampling_parameters_seed_n_and_stop(client, pipe):
    messages = _audio_message(EXAMPLE_WAV.read_bytes())
    sampled = dict(messages=messages, temperature=0.9, top_p=0.9, max_completion_tokens=12, seed=7, n=2)
    first = client.chat.completions.create(model=MODEL_NAME, **sampled)
    again = client.chat.completions.create(model=MODEL_NAME, **sampled)
    answers = [choice.message.content for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1]
    assert answers == [choice.message.content for choice in again.choices]  # the seed makes it reproducible
    assert answers == _reference(pipe, str(EXAMPLE_WAV), QUESTION, seed=7, do_sample=True, temperature=0.9,
                                 top_p=0.9, max_new_tokens=12, num_return_sequences=2)
    texts, _ = _stream_text(client, **sampled)
    assert texts == {0: answers[0], 1: answers[1]}

    one = {**sampled, "n": 1}
    full = client.chat.completions.create(model=MODEL_NAME, **one).choices[0].message.content
    # A stop string that first occurs inside the answer: the answer is cut before it.
    start = next(i for i in range(1, len(full) - 1) if full.find(full[i : i + 2]) == i)
    stop = full[start : start + 2]
    stopped = client.chat.completions.create(model=MODEL_NAME, stop=[stop, "never-generated"], **one)
    assert stopped.choices[0].message.content == full[:start]
    assert stopped.choices[0].finish_reason == "stop"
    texts, _ = _stream_text(client, stop=stop, **one)
    assert texts == {0: full[:start]}


def test_text_only_question(client, pipe):
    question = "Which instrument plays the main theme?"
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=8
    )
    assert response.choices[0].message.content == _reference(pipe, None, question, do_sample=False, max_new_tokens=8)
    texts, _ = _stream_text(client, messages=[{"role": "user", "content": [{"type": "text", "text": question}]}],
                            temperature=0, max_tokens=8)
    assert texts == {0: response.choices[0].message.content}


def _request(client, index):
    """Request number ``index`` of the concurrency test: distinct audio, questions, seeds, stream or not."""
    audio = EXAMPLE_WAV.read_bytes() if index % 2 == 0 else _noise_flac(2.0 + index, seed=index)
    messages = _audio_message(audio, f"Describe sound number {index}.", "wav" if index % 2 == 0 else "flac")
    params = dict(messages=messages, max_tokens=6 + index, seed=100 + index)
    params.update(temperature=0) if index % 3 == 0 else params.update(temperature=1.0, top_p=0.95)
    if index % 2:
        return _stream_text(client, **params)[0][0]
    return client.chat.completions.create(model=MODEL_NAME, **params).choices[0].message.content


def test_concurrent_requests_get_the_answers_they_get_alone(client):
    sequential = [_request(client, index) for index in range(6)]
    assert len(set(sequential)) > 1
    with ThreadPoolExecutor(max_workers=6) as executor:
        concurrent = list(executor.map(lambda index: _request(client, index), range(6)))
    assert concurrent == sequential


@pytest.mark.parametrize(
    "change, status, code",
    [
        ({"model": "gpt-4o"}, 404, "model_not_found"),
        ({"messages": []}, 400, "invalid_value"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}, 400,
         "invalid_messages"),  # nothing to answer
        ({"messages": [{"role": "user", "content": _audio_message(b"a")[0]["content"] * 2}]}, 400,
         "invalid_messages"),  # two audios

        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
         "invalid_value"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "@@@",
                                                                                          "format": "wav"}}]}]},
         400, "invalid_messages"),  # no question
        ({"messages": _audio_message(b"@", fmt="m4a")}, 400, "invalid_audio_format"),
        ({"messages": _audio_message(b"this is not audio at all")}, 400, "invalid_audio"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter"),
        ({"temperature": 3}, 400, "invalid_value"),
        ({"max_tokens": 65}, 400, "invalid_value"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, 400, "invalid_value"),
        ({"n": 5}, 400, "invalid_value"),
        ({"messages": _audio_message(EXAMPLE_WAV.read_bytes(), "word " * 600)}, 400, "context_length_exceeded"),
        ({"messages": _audio_message(_noise_flac(25.0, seed=3), fmt="flac")}, 400, "audio_too_long"),
        ({"messages": _audio_message(_noise_flac(60.0, seed=4), fmt="flac")}, 413, "request_too_large"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_get_a_4xx_json_error(server, client, change, status, code, stream):
    import httpx

    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": stream}
    body.update(change)
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    # The official client raises its typed errors for them.
    if code == "model_not_found" and not stream:
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=body["messages"])


def test_malformed_bodies_and_the_server_survives(server, client):
    import httpx

    for content in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = httpx.post(f"{server}/v1/chat/completions", content=content, timeout=30,
                              headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["code"] in ("invalid_json", "invalid_request")
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL_NAME, messages=_audio_message(b"RIFF\x00\x00junk"))
    assert raised.value.code == "invalid_audio"
    assert httpx.get(f"{server}/v1/unknown", timeout=10).status_code == 404
    assert client.chat.completions.create(model=MODEL_NAME, messages=_audio_message(EXAMPLE_WAV.read_bytes()),
                                          max_tokens=2).choices[0].message.content is not None


def test_system_turn_goes_through_the_chat_template(client, pipe):
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": QUESTION}]
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=4)
    rendered = pipe.processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert response.usage.prompt_tokens == rendered["input_ids"].shape[1]
    alone = pipe.processor.apply_chat_template(messages[1:], tokenize=True, return_dict=True, return_tensors="pt")
    assert rendered["input_ids"].shape[1] > alone["input_ids"].shape[1]


def test_engine_queue_is_bounded_and_cancelled_jobs_stop(pipe):
    from af2_hf.serving.engine import (
        Finished,
        GenerationEngine,
        GenerationRequest,
        Job,
        QueueFullError,
        Started,
        question_conversation,
    )

    engine = GenerationEngine(pipe.model, pipe.processor, max_queue=1)
    started, release = threading.Event(), threading.Event()
    first_events, second_events = [], []

    def hold_the_worker(event):  # the worker waits inside the first job until released
        first_events.append(event)
        if isinstance(event, Started):
            started.set()
            release.wait(60)

    request = GenerationRequest(question_conversation(QUESTION), max_new_tokens=40, temperature=0)
    first = engine.submit(Job(request, hold_the_worker))
    assert started.wait(60)
    second = engine.submit(Job(request, second_events.append))  # waits in the queue
    with pytest.raises(QueueFullError):
        engine.submit(Job(request, second_events.append))
    first.cancel()
    second.cancel()
    release.set()
    engine.close()
    assert isinstance(first_events[-1], Finished)
    assert first_events[-1].result.completion_tokens == 1  # stopped after the token in flight
    assert second_events == []  # cancelled before it started: never run


def test_stream_tracker_holds_back_possible_stop_strings_and_partial_characters():
    from af2_hf.serving.engine import _AnswerTracker

    tracker = _AnswerTracker(stop=("END", "!!"))
    pieces = [tracker.delta(text) for text in ("a", "ab!", "abE", "abEN", "abENx", "abENx\ufffd", "abENx\u00e9", "abENx\u00e9END and")]
    assert pieces == ["a", "b", "", "", "ENx", "", "\u00e9", ""] and tracker.done
    assert tracker.sent == "abENx\u00e9"  # the final text: cut before the stop string
    restarted = _AnswerTracker(stop=())
    assert restarted.delta("first") == "first" and restarted.delta("new") == "" and restarted.reset
    final = _AnswerTracker(stop=("END",))
    assert final.delta("xE") == "x" and final.delta("xE", final=True) == "E"


def test_binds_loopback_by_default():
    from af2_hf.cli import _build_parser

    assert _build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert _build_parser().parse_args(["demo"]).host == "127.0.0.1"


# ---------------------------------------------------------------------------------------------- README examples


def _readme_blocks(language: str) -> list[str]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_server_examples_run_against_the_server(server, tmp_path):
    port = server.rsplit(":", 1)[1]
    shell = [block for block in _readme_blocks("console") if "curl " in block]
    commands = [line[2:] for block in shell for line in block.splitlines() if line.startswith("$ ")]
    assert any(c.startswith("af2-hf serve --model ./af2-tiny") for c in commands)
    assert any(c.startswith("af2-hf demo --model ./af2-tiny") for c in commands)
    curls = [c.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for c in commands if c.startswith("curl ")]
    assert curls
    for command in curls:
        output = subprocess.run(["bash", "-c", command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                                check=True).stdout
        assert json.loads(output)["choices"][0]["message"]["content"] is not None, output
    clients = [block for block in _readme_blocks("py") if "openai" in block]
    assert len(clients) == 1
    code = clients[0].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
