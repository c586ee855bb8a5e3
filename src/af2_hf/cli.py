"""The ``af2-hf`` command line: ``ask``, ``convert`` and ``make-tiny``.

    af2-hf ask AUDIO "QUESTION" --model DIR_OR_REPO [--greedy] [--max-new-tokens N] [--soundcot] [--device D]
    af2-hf convert --af2-dir nvidia/audio-flamingo-2 --text-model Qwen/Qwen2.5-3B --output-dir ./af2-3b-hf [...]
    af2-hf make-tiny OUTDIR [--seed N] [--max-num-windows N]

Exit codes: 0 success, 1 conversion failure, 2 usage or input error (no usable model, unreadable audio, ...).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

__all__ = ["main"]

MODEL_ENV = "AF2_HF_MODEL"

_NO_MODEL_HELP = """\
An Audio Flamingo 2 model in Hugging Face format is needed. Either:
  * convert an original release (downloads it; needs internet):
      af2-hf convert --af2-dir nvidia/audio-flamingo-2 --text-model Qwen/Qwen2.5-3B --output-dir ./audio-flamingo-2-hf
    then pass --model ./audio-flamingo-2-hf;
  * or pass a converted checkpoint on the Hub with --model USER/REPO (downloaded into the Hugging Face cache; needs
    internet the first time);
  * or, to try the commands offline, make a tiny random model (its answers are noise):
      af2-hf make-tiny ./af2-tiny   and pass --model ./af2-tiny
The model can also be set with the {env} environment variable.""".format(env=MODEL_ENV)


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


#: Subcommands that live in their own module of ``af2_hf.commands``: name -> (module, one-line help). Each module
#: defines ``add_arguments(parser)`` and ``run(args) -> int`` and imports torch/transformers only inside ``run`` (so
#: that ``--help`` stays fast); ``run`` raises :class:`CliError` for user errors.
COMMAND_MODULES: dict[str, tuple[str, str]] = {
    "serve": ("serve", "OpenAI-compatible HTTP server (chat completions with input_audio; needs the serve extra)"),
    "demo": ("demo", "Gradio browser demo: upload or record audio, ask, read the answer (needs the serve extra)"),
    "clap": ("clap", "AF-CLAP: zero-shot labels of an audio file (clap labels), release conversion (clap convert)"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="af2-hf",
        description="Audio Flamingo 2 for Hugging Face Transformers: ask questions about audio, convert releases.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    ask = commands.add_parser("ask", help="answer a question about an audio file")
    ask.add_argument("audio", help="audio file (wav, flac, ogg, mp3, ...); at most the model's window limit is used")
    ask.add_argument("question", help="the question, e.g. \"What is the sound source in this audio?\"")
    ask.add_argument("--model", default=None,
                     help=f"converted model directory or Hub repo (default: ${MODEL_ENV})")
    ask.add_argument("--greedy", action="store_true",
                     help="greedy decoding (as the original benchmarks); default: sampling as the release "
                          "generation config (top_k 30, top_p 0.95)")
    ask.add_argument("--max-new-tokens", type=int, default=None,
                     help="maximum number of generated tokens (default: the model's generation config)")
    ask.add_argument("--soundcot", action="store_true",
                     help="SoundCoT decoding (for nvidia/audio-flamingo-2-SoundCoT): adds the tag instruction and "
                          "re-asks when the conclusion is missing, as the original inference_CoT.py")
    ask.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cuda if available)")
    ask.add_argument("--seed", type=int, default=None, help="random seed for sampling")

    commands.add_parser(
        "convert",
        help="convert an original AF2 release (safe_ckpt + clap_ckpt + yaml) to Hugging Face format",
        description="Options as conversion/convert_af2_to_hf.py; see `af2-hf convert --help`.",
        add_help=False,
    )

    tiny = commands.add_parser("make-tiny", help="write a tiny random-weight AF2 checkpoint (offline; answers are noise)")
    tiny.add_argument("outdir", help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.add_argument("--max-num-windows", type=int, default=30,
                      help="10-second windows the feature extractor keeps (default 30 = 5 minutes)")
    for name, (module_name, help_text) in COMMAND_MODULES.items():
        module = importlib.import_module(f"af2_hf.commands.{module_name}")
        module.add_arguments(commands.add_parser(name, help=help_text))
    return parser


def _load(model_reference: str, device: str | None):
    """(pipeline, is_random_tiny) for a local directory or a Hub repo; CliError with guidance otherwise."""
    import torch
    from transformers import AutoConfig, AutoModelForMultimodalLM, AutoProcessor

    from .pipeline_audio_question_answering import AudioQuestionAnsweringPipeline
    from .tiny import RANDOM_WEIGHTS_MARKER

    path = Path(model_reference).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"--model {model_reference!r} is a file; pass a model directory.\n\n{_NO_MODEL_HELP}")
    if not path.exists() and (model_reference.startswith((".", "/", "~")) or model_reference.count("/") > 1):
        raise CliError(f"Model directory {model_reference!r} does not exist.\n\n{_NO_MODEL_HELP}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = ""
            if (path / "safe_ckpt").is_dir():
                hint = (
                    " It looks like an ORIGINAL release (safe_ckpt/): convert it first with\n"
                    f"  af2-hf convert --af2-dir {model_reference} --output-dir {model_reference.rstrip('/')}-hf\n"
                )
            raise CliError(f"{model_reference!r} has no config.json: not a Hugging Face model directory.{hint}\n"
                           f"{_NO_MODEL_HELP}")
        reference = str(path)
    else:
        reference = model_reference
    try:
        config = AutoConfig.from_pretrained(reference, trust_remote_code=False)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CliError(
            f"Could not load the model {model_reference!r} (no local directory of that name, and it could not be "
            f"downloaded from the Hub - no network, or not a Hugging Face model): {first_line}\n\n{_NO_MODEL_HELP}"
        ) from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForMultimodalLM.from_pretrained(reference, config=config, trust_remote_code=False)
        processor = AutoProcessor.from_pretrained(reference, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise CliError(f"Could not load the model/processor from {model_reference!r}: {error}") from None
    pipe = AudioQuestionAnsweringPipeline(model=model.eval(), processor=processor, device=device)
    return pipe, path.is_dir() and (path / RANDOM_WEIGHTS_MARKER).is_file()


def _ask(args) -> int:
    from .audio import AudioLoadError

    model_reference = args.model or os.environ.get(MODEL_ENV)
    if not model_reference:
        raise CliError(f"No model given (--model or ${MODEL_ENV}).\n\n{_NO_MODEL_HELP}")
    if not os.path.isfile(args.audio):
        raise CliError(f"Audio file {args.audio!r} does not exist.")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CliError("--max-new-tokens must be at least 1.")
    pipe, is_tiny = _load(model_reference, args.device)
    if is_tiny:
        print(f"note: {model_reference} holds tiny RANDOM weights (af2-hf make-tiny): the answer is noise.",
              file=sys.stderr)
    generate_kwargs = {}
    if args.greedy:
        generate_kwargs["do_sample"] = False
    if args.max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = args.max_new_tokens
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    try:
        result = pipe(args.audio, question=args.question, generate_kwargs=generate_kwargs,
                      soundcot=True if args.soundcot else None)
    except AudioLoadError as error:
        raise CliError(str(error)) from None
    print(result["answer"] if isinstance(result, dict) else result[0]["answer"])
    return 0


def _convert(argv: list[str]) -> int:
    from .convert_af2 import main as convert_main

    try:
        return convert_main(argv)
    except OSError as error:
        print(f"error: conversion could not read its inputs: {error}\n"
              "(Hub ids need internet; a local folder works offline.)", file=sys.stderr)
        return 2


def _make_tiny(args) -> int:
    from .tiny import make_tiny_model

    if args.max_num_windows < 1:
        raise CliError("--max-num-windows must be at least 1.")
    out = Path(args.outdir)
    if out.exists() and not out.is_dir():
        raise CliError(f"{args.outdir!r} exists and is not a directory.")
    model, _ = make_tiny_model(out, seed=args.seed, max_num_windows=args.max_num_windows)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"Wrote a tiny RANDOM-weight Audio Flamingo 2 ({parameters:.1f}M parameters) to {out}.")
    print("Its answers are noise: it is for trying the commands offline. Try:")
    print(f'  af2-hf ask examples/data/example.wav "What is the sound source in this audio?" --model {out}')
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        return _convert(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "ask":
            return _ask(args)
        if args.command == "make-tiny":
            return _make_tiny(args)
        if args.command in COMMAND_MODULES:
            module = importlib.import_module(f"af2_hf.commands.{COMMAND_MODULES[args.command][0]}")
            return module.run(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
