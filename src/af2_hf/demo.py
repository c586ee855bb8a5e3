"""The browser demo of ``af2-hf demo``: a Gradio page to upload or record audio, ask a question and read the answer
as it is generated.

The page shows the model's name and licence (see :mod:`af2_hf.serving.model_info`), a few example questions, a
greedy-decoding switch and a token limit. Generation goes through the server's :class:`GenerationEngine` (one
``generate`` at a time, the answer streamed token by token). Audio without a question is refused; a question
without audio is asked text only. Gradio comes with the ``serve`` extra (``pip install -e ".[serve]"``).
"""

from __future__ import annotations

import os
import queue

from .audio import AudioLoadError, load_audio
from .serving.engine import (
    Delta,
    Failed,
    Finished,
    GenerationEngine,
    GenerationRequest,
    Job,
    RequestError,
    question_conversation,
)
from .serving.model_info import ModelInfo

__all__ = ["EXAMPLE_QUESTIONS", "answer_stream", "build_demo", "launch_demo"]

EXAMPLE_QUESTIONS = (
    "What is the sound source in this audio?",
    "Describe the audio in detail.",
    "Is there any speech, music, or noise in the recording?",
    "What genre is this music, and which instruments play?",
)

_SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")


def _header(info: ModelInfo) -> str:
    note = " Its answers are noise." if info.random_weights else ""
    return (
        "# Audio Flamingo 2\n"
        "Upload or record a clip (up to the model's limit), ask a question about it, and read the answer as it is "
        f"generated.{note}\n\n**Model:** `{info.name}`  \n**Licence:** {info.licence}"
    )


def answer_stream(engine: GenerationEngine, audio_path, question: str, greedy: bool, max_new_tokens: int):
    """Yields the answer so far (the Gradio event handler; also usable without Gradio).

    Raises `ValueError` for a missing question or unreadable / over-long audio, and :class:`RequestError` for a
    prompt the model refuses.
    """
    question = (question or "").strip()
    if not question:
        raise ValueError("Ask a question (type one, or click an example).")
    waveform = None
    if audio_path:
        try:
            waveform = load_audio(
                audio_path, engine.sampling_rate, max_seconds=engine.max_audio_seconds(), truncation=False
            )
        except AudioLoadError as error:
            raise ValueError(f"The audio could not be read: {error}") from None
    events: queue.Queue = queue.Queue()
    request = GenerationRequest(
        question_conversation(question, waveform),
        max_new_tokens=int(max_new_tokens),
        temperature=0.0 if greedy else None,
    )
    job = engine.submit(Job(request, events.put, stream=True))
    text = ""
    try:
        while True:
            event = events.get()
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Delta):
                text += event.text
                yield text
            elif isinstance(event, Finished):
                yield event.result.texts[0]
                return
    finally:
        job.cancel()


def build_demo(engine: GenerationEngine, info: ModelInfo, default_max_new_tokens: int = 128):
    """The Gradio ``Blocks`` of the demo, for ``engine``'s model (``info``: its name and licence)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def respond(audio_path, question, greedy, max_new_tokens):
        try:
            yield from answer_stream(engine, audio_path, question, greedy, max_new_tokens)
        except (ValueError, RequestError) as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title=f"Audio Flamingo 2 - {info.name}") as demo:
        gr.Markdown(_header(info), elem_id="model-info")
        with gr.Row():
            with gr.Column():
                audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Audio", elem_id="audio")
                question = gr.Textbox(label="Question", lines=2, elem_id="question",
                                      placeholder="What is the sound source in this audio?")
                gr.Examples(examples=[[q] for q in EXAMPLE_QUESTIONS], inputs=[question], label="Example questions")
                with gr.Row():
                    greedy = gr.Checkbox(label="Greedy decoding (as the benchmarks)", value=False, elem_id="greedy")
                    max_new_tokens = gr.Slider(1, 512, value=default_max_new_tokens, step=1,
                                               label="Max new tokens", elem_id="max-new-tokens")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                answer = gr.Textbox(label="Answer", lines=8, interactive=False, elem_id="answer")
        inputs = [audio, question, greedy, max_new_tokens]
        ask.click(respond, inputs=inputs, outputs=answer)
        question.submit(respond, inputs=inputs, outputs=answer)
    return demo


def launch_demo(demo, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Serves ``demo`` (blocks until stopped), with system fonts: the page needs no font download."""
    import gradio as gr

    theme = gr.themes.Default(font=list(_SYSTEM_FONTS), font_mono=["ui-monospace", "monospace"])
    demo.queue().launch(server_name=host, server_port=port, share=share, show_error=True, quiet=True, theme=theme)
