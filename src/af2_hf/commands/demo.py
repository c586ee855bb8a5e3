"""``af2-hf demo``: the Gradio browser demo (upload or record audio, ask, read the streamed answer).

    af2-hf demo --model DIR_OR_REPO [--host 127.0.0.1] [--port 7860] [--max-new-tokens N] [--share]

Needs the ``serve`` extra (``pip install -e ".[serve]"``).
"""

from __future__ import annotations

import os
import sys

from ..cli import CliError
from ._server_options import add_server_arguments, check_port, load_served_model


def add_arguments(parser) -> None:
    add_server_arguments(parser, default_port=7860)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the page's initial token limit (default 128)")
    parser.add_argument("--share", action="store_true", help="also publish a temporary gradio.live link (internet)")


def run(args) -> int:
    check_port(args.port)
    if not 1 <= args.max_new_tokens <= 512:
        raise CliError("--max-new-tokens must be between 1 and 512.")
    try:
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        import gradio  # noqa: F401
    except ImportError as error:
        raise CliError(f"af2-hf demo needs the serve extra (pip install -e \".[serve]\"): {error}") from None
    from ..demo import build_demo, launch_demo
    from ..serving.engine import GenerationEngine
    from ..serving.model_info import describe_model

    reference, pipe, is_tiny = load_served_model(args)
    engine = GenerationEngine(pipe.model, pipe.processor)
    demo = build_demo(engine, describe_model(reference, is_tiny), default_max_new_tokens=args.max_new_tokens)
    print(f"Demo of {reference} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    launch_demo(demo, host=args.host, port=args.port, share=args.share)
    return 0
