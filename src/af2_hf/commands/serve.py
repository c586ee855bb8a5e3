"""``af2-hf serve``: an OpenAI-compatible HTTP server for an Audio Flamingo 2 model (FastAPI + uvicorn).

    af2-hf serve --model DIR_OR_REPO [--host 127.0.0.1] [--port 8000] [--served-model-name NAME] [limits...]

See ``af2_hf.serving`` for the API. Needs the ``serve`` extra (``pip install -e ".[serve]"``).
"""

from __future__ import annotations

import sys

from ..cli import CliError
from ._server_options import add_server_arguments, check_port, load_served_model


def add_arguments(parser) -> None:
    add_server_arguments(parser, default_port=8000)
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the folder's name, or the Hub repo id)")
    parser.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body in MiB (default 64)")
    parser.add_argument("--max-audio-seconds", type=float, default=None,
                        help="longest audio accepted (default: the model's limit, max_num_windows x 10 s)")
    parser.add_argument("--max-new-tokens-limit", type=int, default=1024,
                        help="largest max_completion_tokens a request may ask for (default 1024)")
    parser.add_argument("--max-choices", type=int, default=4, help="largest n per request (default 4)")
    parser.add_argument("--queue-size", type=int, default=16,
                        help="requests that may wait for the model; more get a 503 (default 16)")


def _check(args) -> None:
    check_port(args.port)
    for name in ("max_new_tokens_limit", "max_choices", "queue_size"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1.")
    if not args.max_request_mb > 0:
        raise CliError("--max-request-mb must be positive.")
    if args.max_audio_seconds is not None and not args.max_audio_seconds > 0:
        raise CliError("--max-audio-seconds must be positive.")


def run(args) -> int:
    try:
        import uvicorn

        from ..serving.app import ServerLimits, create_app
    except ImportError as error:
        raise CliError(f"af2-hf serve needs the serve extra (pip install -e \".[serve]\"): {error}") from None
    from ..serving.engine import GenerationEngine
    from ..serving.model_info import describe_model

    _check(args)
    reference, pipe, is_tiny = load_served_model(args)
    info = describe_model(reference, is_tiny)
    engine = GenerationEngine(pipe.model, pipe.processor, max_queue=args.queue_size)
    model_limit = engine.max_audio_seconds()
    max_audio = model_limit if args.max_audio_seconds is None else args.max_audio_seconds
    if max_audio > model_limit:
        raise CliError(f"--max-audio-seconds {max_audio:g} is over the model's limit of {model_limit:g} s.")
    limits = ServerLimits(
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_audio_seconds=max_audio,
        max_new_tokens=args.max_new_tokens_limit,
        max_choices=args.max_choices,
    )
    model_id = args.served_model_name or info.name
    app = create_app(engine, model_id, limits)
    if is_tiny:
        print(f"note: {reference} holds tiny RANDOM weights (af2-hf make-tiny): the answers are noise.", file=sys.stderr)
    print(f"Serving {model_id!r} (licence: {info.licence}) on http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
