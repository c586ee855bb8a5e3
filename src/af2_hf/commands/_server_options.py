"""Command-line options shared by the commands that serve a model on a port (``af2-hf serve``, ``af2-hf demo``)."""

from __future__ import annotations

import os

from ..cli import MODEL_ENV, CliError


def add_server_arguments(parser, default_port: int) -> None:
    """``--model``, ``--host``, ``--port`` (default ``default_port``) and ``--device``."""
    parser.add_argument("--model", default=None, help=f"converted model directory or Hub repo (default: ${MODEL_ENV})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def check_port(port: int) -> None:
    """Raises `CliError` unless ``port`` is a TCP port number (0 lets the system pick one)."""
    if not 0 <= port <= 65535:
        raise CliError(f"--port must be between 0 and 65535, got {port}.")


def load_served_model(args):
    """The model named by ``--model`` (else ``$AF2_HF_MODEL``) loaded on ``--device``: ``(reference, pipeline,
    is_tiny)``. Raises `CliError` when neither names one."""
    from ..cli import _NO_MODEL_HELP, _load

    reference = args.model or os.environ.get(MODEL_ENV)
    if not reference:
        raise CliError(f"No model given (--model or ${MODEL_ENV}).\n\n{_NO_MODEL_HELP}")
    pipe, is_tiny = _load(reference, args.device)
    return reference, pipe, is_tiny
