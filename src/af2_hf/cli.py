"""The ``af2-hf`` command line: ``ask``, ``make-tiny`` and the subcommands of :data:`COMMAND_MODULES` (``convert``...).

    af2-hf ask AUDIO "QUESTION" --model DIR_OR_REPO [--greedy] [--max-new-tokens N] [--soundcot] [--device D]
    af2-hf ask --no-audio "QUESTION" --model DIR_OR_REPO [...]    (a text-only prompt)
    af2-hf convert --af2-dir nvidia/audio-flamingo-2 --text-model Qwen/Qwen2.5-3B --output-dir ./af2-3b-hf [...]
    af2-hf make-tiny OUTDIR [--seed N] [--max-num-windows N]

Exit codes: 0 success, 2 usage or input error (no usable model, unreadable audio, a release that does not convert,
no network for a Hub id, ...): a message on stderr, no traceback. Anything else is a bug.

The console script enters through :mod:`af2_hf_cli`, which builds the parser before ``af2_hf/__init__`` (torch,
transformers) runs; :func:`main` completes the package import once a command is about to run.
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


def complete_package_import() -> None:
    """Runs ``af2_hf/__init__`` if the console script deferred it (:mod:`af2_hf_cli`): registers the Auto classes."""
    from af2_hf_cli import DEFERRED_INIT_FLAG

    package = sys.modules.get("af2_hf")
    if package is not None and package.__dict__.pop(DEFERRED_INIT_FLAG, False):
        package.__spec__.loader.exec_module(package)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input rather than a bug: typed ``OSError`` / ``ValueError`` subclasses the
    package raises (unreadable audio, a release that does not convert, a corrupt checkpoint, no network for a Hub
    id...), and safetensors' error for a corrupt file. :func:`main` prints them without a traceback, exit code 2."""
    from safetensors import SafetensorError

    return CliError, OSError, ValueError, SafetensorError


#: Subcommands that live in their own module of ``af2_hf.commands``: name -> (module, one-line help). Each module
#: defines ``add_arguments(parser)`` and ``run(args) -> int`` and imports torch/transformers only inside ``run`` (so
#: that ``--help`` stays fast); ``run`` raises :class:`CliError` for user errors.
COMMAND_MODULES: dict[str, tuple[str, str]] = {
    "convert": ("convert", "convert an original AF2 release (safe_ckpt + clap_ckpt + yaml) to Hugging Face format"),
    "example-audio": ("example_audio", "write the 3-second example clip (for trying the commands)"),
    "serve": ("serve", "OpenAI-compatible HTTP server (chat completions with input_audio; needs the serve extra)"),
    "demo": ("demo", "Gradio browser demo: upload or record audio, ask, read the answer (needs the serve extra)"),
    "clap": ("clap", "AF-CLAP: zero-shot labels of an audio file (clap labels), release conversion (clap convert)"),
    "evaluate": ("evaluate", "evaluate or label a dataset (JSONL manifest or datasets), in one process or many"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="af2-hf",
        description="Audio Flamingo 2 for Hugging Face Transformers: ask questions about audio, convert releases.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    ask = commands.add_parser("ask", help="answer a question about an audio file (or a text-only question)",
                              usage="af2-hf ask (AUDIO QUESTION | --no-audio QUESTION) [options]")
    ask.add_argument("audio", nargs="?", metavar="AUDIO",
                     help="audio file (wav, flac, ogg, mp3, ...); at most the model's window limit is used")
    ask.add_argument("question", metavar="QUESTION",
                     help="the question, e.g. \"What is the sound source in this audio?\"")
    ask.add_argument("--no-audio", action="store_true",
                     help="a text-only prompt: give QUESTION alone (the model answers without audio)")
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

    tiny = commands.add_parser("make-tiny", help="write a tiny random-weight AF2 checkpoint (offline; answers are noise)")
    tiny.add_argument("outdir", help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.add_argument("--max-num-windows", type=int, default=30,
                      help="10-second windows the feature extractor keeps (default 30 = 5 minutes)")
    tiny.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTDIR whole")
    for name, (module_name, help_text) in COMMAND_MODULES.items():
        module = importlib.import_module(f"af2_hf.commands.{module_name}")
        module.add_arguments(commands.add_parser(name, help=help_text))
    return parser


_SUPPORTED_MODEL_TYPES = ("audioflamingo2", "audioflamingo3", "qwen2_audio")  # what the pipeline runs
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def check_device(device: str | None) -> str:
    """``device`` (default: cuda when available, else cpu) if torch can use it; CliError naming the problem."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps).") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                           f"{'no GPU found' if torch.version.cuda else 'a CPU-only build'}); use --device cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CliError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here.")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {device!r}: MPS is not available here; use --device cpu.")
    return device


def check_model_folder(path: Path, reference: str) -> None:
    """CliError unless ``path`` looks like a converted model folder: not empty, not an original release, a readable
    config.json of a model type the pipeline runs, and weights."""
    import json

    if not any(path.iterdir()):
        raise CliError(f"Model folder {reference!r} is empty: it holds no model.\n\n{_NO_MODEL_HELP}")
    _refuse_original_release(reference)
    config_file = path / "config.json"
    if not config_file.is_file():
        content = ", ".join(sorted(p.name for p in path.iterdir())[:8])
        raise CliError(f"Model folder {reference!r} has no config.json, so it is not a Hugging Face model folder "
                       f"(it holds: {content}).\n\n{_NO_MODEL_HELP}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise CliError(f"{config_file} is not valid JSON (corrupt or truncated?): {error}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise CliError(f"{reference!r} holds a {model_type!r} model, not an Audio Flamingo 2 model (config.json "
                       f"model_type {model_type!r}; `af2-hf ask` runs {', '.join(_SUPPORTED_MODEL_TYPES)}).")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise CliError(f"Model folder {reference!r} has a config.json but no weights ({_WEIGHT_FILES[0]} or "
                       "an index of shards): an incomplete copy or conversion?")


def _refuse_original_release(reference: str) -> None:
    """CliError with the ``af2-hf convert`` command when ``reference`` is an ORIGINAL release (a folder, a known or
    cached Hub id: see :func:`af2_hf.loading.original_release_hint`)."""
    from .loading import original_release_hint

    hint = original_release_hint(reference)
    if hint:
        raise CliError(f"{hint}\n\n{_NO_MODEL_HELP}")


def resolve_model_reference(model_reference: str) -> tuple[str, bool]:
    """``(reference, local_files_only)`` for ``--model``: a checked local folder, or a Hub id that can be fetched
    now (or is cached); CliError otherwise, without waiting on the network."""
    from .hub_access import hub_files_mode

    path = Path(model_reference).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"--model {model_reference!r} is a file; pass a model folder.\n\n{_NO_MODEL_HELP}")
    if path.is_dir():
        check_model_folder(path, model_reference)
        return str(path), False
    if model_reference.startswith((".", "/", "~")) or model_reference.count("/") > 1:
        raise CliError(f"Model folder {model_reference!r} does not exist.\n\n{_NO_MODEL_HELP}")
    _refuse_original_release(model_reference)
    try:
        return model_reference, hub_files_mode(model_reference, "--model")
    except OSError as error:
        raise CliError(f"{error}\n\n{_NO_MODEL_HELP}") from None


def _load(model_reference: str, device: str | None):
    """(pipeline, is_random_tiny) for a local directory or a Hub repo; CliError with guidance otherwise."""
    device = check_device(device)
    reference, local_files_only = resolve_model_reference(model_reference)
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForMultimodalLM, AutoProcessor

    from .pipeline_audio_question_answering import AudioQuestionAnsweringPipeline
    from .tiny import RANDOM_WEIGHTS_MARKER

    hub = {"trust_remote_code": False, "local_files_only": local_files_only}
    try:
        config = AutoConfig.from_pretrained(reference, **hub)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = ""
        if "config.json" in first_line and not Path(reference).is_dir():
            hint = (f"\nIf {reference} is an ORIGINAL release on the Hub (safe_ckpt/, clap_ckpt/, a yaml), convert "
                    f"it first: af2-hf convert --af2-dir {reference} --output-dir ./{reference.split('/')[-1]}-hf")
        raise CliError(f"Could not load the model config of {model_reference!r}: {first_line}{hint}\n\n"
                       f"{_NO_MODEL_HELP}") from None
    if config.model_type not in _SUPPORTED_MODEL_TYPES:
        raise CliError(f"{model_reference!r} holds a {config.model_type!r} model, not an Audio Flamingo 2 model.")
    try:
        model = AutoModelForMultimodalLM.from_pretrained(reference, config=config, **hub)
        processor = AutoProcessor.from_pretrained(reference, **hub)
    except (OSError, ValueError, SafetensorError) as error:
        raise CliError(f"Could not load the model/processor from {model_reference!r} (corrupt or incomplete "
                       f"files?): {error}") from None
    pipe = AudioQuestionAnsweringPipeline(model=model.eval(), processor=processor, device=device)
    path = Path(reference)
    return pipe, path.is_dir() and (path / RANDOM_WEIGHTS_MARKER).is_file()


def _ask(args) -> int:
    from .audio import AudioLoadError

    model_reference = args.model or os.environ.get(MODEL_ENV)
    if not model_reference:
        raise CliError(f"No model given (--model or ${MODEL_ENV}).\n\n{_NO_MODEL_HELP}")
    if args.no_audio and args.audio is not None:
        raise CliError(f"--no-audio takes the question alone, got an audio argument too ({args.audio!r}).")
    if args.audio is None and not args.no_audio:
        raise CliError("Give an audio file and a question (af2-hf ask AUDIO QUESTION), or --no-audio QUESTION for "
                       "a text-only prompt.")
    if args.audio is not None and not os.path.isfile(args.audio):
        raise CliError(f"Audio file {args.audio!r} does not exist.")
    if args.no_audio and args.soundcot:
        raise CliError("--soundcot answers questions about audio: it cannot be used with --no-audio.")
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


def _make_tiny(args) -> int:
    from .tiny import make_tiny_model

    if args.max_num_windows < 1:
        raise CliError("--max-num-windows must be at least 1.")
    out = Path(args.outdir)
    if out.exists() and not out.is_dir():
        raise CliError(f"{args.outdir!r} exists and is not a directory.")
    try:
        model, _ = make_tiny_model(out, seed=args.seed, max_num_windows=args.max_num_windows,
                                   overwrite=args.overwrite)
    except FileExistsError as error:
        raise CliError(f"{error} (--overwrite)") from None
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"Wrote a tiny RANDOM-weight Audio Flamingo 2 ({parameters:.1f}M parameters) to {out}.")
    print("Its answers are noise: it is for trying the commands offline. Try:")
    print("  af2-hf example-audio ./example.wav")
    print(f'  af2-hf ask ./example.wav "What is the sound source in this audio?" --model {out}')
    return 0


def run_command(run, args) -> int:
    """``run(args)``; a user error (:func:`user_errors`) is printed as ``error: ...`` on stderr, exit code 2."""
    try:
        return run(args)
    except user_errors() as error:
        message = str(error) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    args = parser.parse_args(argv)
    complete_package_import()
    if args.command == "ask":
        return run_command(_ask, args)
    if args.command == "make-tiny":
        return run_command(_make_tiny, args)
    module = importlib.import_module(f"af2_hf.commands.{COMMAND_MODULES[args.command][0]}")
    return run_command(module.run, args)


if __name__ == "__main__":
    sys.exit(main())
