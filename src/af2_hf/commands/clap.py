"""``af2-hf clap``: AF-CLAP zero-shot labels of an audio file, and conversion of the release checkpoint.

    af2-hf clap labels AUDIO --labels "a dog barking" "rain" ... --model DIR_OR_REPO [--template "{}"] [--device D]
    af2-hf clap convert --checkpoint nvidia/audio-flamingo-2 --text-model google/flan-t5-large --output-dir ./afclap-hf
"""

from __future__ import annotations

import os

from ..cli import CliError


def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="clap_command", metavar="ACTION")
    actions.required = True
    labels = actions.add_parser("labels", help="rank text labels for an audio file (zero-shot classification)")
    labels.add_argument("audio", help="audio file (wav, flac, ogg, mp3, ...)")
    labels.add_argument("--labels", nargs="+", required=True, help="candidate labels")
    labels.add_argument("--model", required=True, help="converted AF-CLAP folder or Hub repo")
    labels.add_argument("--template", default="{}",
                        help='text template of a label (default "{}": the label itself, e.g. "This is a sound of {}.")')
    labels.add_argument("--device", default=None, help="torch device (default: cpu)")

    convert = actions.add_parser("convert", help="convert the AF-CLAP release checkpoint to Hugging Face format")
    convert.add_argument("--checkpoint", required=True,
                         help="the release .pt file, or the AF2 release folder / Hub id holding it in clap_ckpt/ "
                              "(e.g. nvidia/audio-flamingo-2)")
    convert.add_argument("--text-model", default="google/flan-t5-large",
                         help="flan-T5 folder or Hub id: text config and tokenizer (default google/flan-t5-large)")
    convert.add_argument("--output-dir", required=True)
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _labels(args) -> int:
    import torch
    from transformers import AutoModel, AutoProcessor

    from ..audio import AudioLoadError

    if not os.path.isfile(args.audio):
        raise CliError(f"Audio file {args.audio!r} does not exist.")
    if "{}" not in args.template:
        raise CliError('--template must contain "{}" where the label goes.')
    try:
        model = AutoModel.from_pretrained(args.model).eval()
        processor = AutoProcessor.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise CliError(f"Could not load an AF-CLAP model from {args.model!r}: {error}") from None
    if type(model).__name__ != "AFClapModel":
        raise CliError(f"{args.model!r} holds a {type(model).__name__}, not an AF-CLAP model.")
    if args.device:
        model = model.to(args.device)
    try:
        inputs = processor(text=[args.template.format(label) for label in args.labels], audio=args.audio)
    except (AudioLoadError, ValueError) as error:
        raise CliError(str(error)) from None
    with torch.inference_mode():
        logits = model(**inputs.to(model.device)).logits_per_audio[0]
    for probability, label in sorted(zip(logits.softmax(-1).tolist(), args.labels), reverse=True):
        print(f"{probability:.4f}\t{label}")
    return 0


def _convert(args) -> int:
    from ..atomic import OutputDirectoryNotEmptyError
    from ..convert_afclap import convert_afclap_checkpoint
    from ..convert_af2 import ConversionError

    try:
        convert_afclap_checkpoint(args.checkpoint, args.text_model, args.output_dir, overwrite=args.overwrite)
    except (ConversionError, OutputDirectoryNotEmptyError, OSError) as error:
        raise CliError(f"AF-CLAP conversion failed: {error}") from None
    return 0


def run(args) -> int:
    return _labels(args) if args.clap_command == "labels" else _convert(args)
