"""``af2-hf convert``: an original Audio Flamingo 2 release (safe_ckpt + clap_ckpt + yaml) to the Transformers format.

    af2-hf convert --af2-dir nvidia/audio-flamingo-2 --text-model Qwen/Qwen2.5-3B --output-dir ./af2-3b-hf [...]

The same arguments as ``python conversion/convert_af2_to_hf.py`` (which builds its parser from
:func:`add_arguments`); the work is :func:`af2_hf.convert_af2.convert_af2_checkpoint`.
"""

from __future__ import annotations

from ..cli import CliError

DESCRIPTION = "Convert an original Audio Flamingo 2 release to the native Transformers format."


def add_arguments(parser) -> None:
    parser.add_argument("--af2-dir", required=True,
                        help="original release folder or Hub id (e.g. nvidia/audio-flamingo-2)")
    parser.add_argument("--text-model", default=None,
                        help="base LM + tokenizer folder or Hub id (default: the yaml's lang_encoder_path)")
    parser.add_argument("--output-dir", required=True,
                        help="folder to write; must be new or empty unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output-dir whole (it is swapped in only once complete)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--config-yaml", default=None, help="release yaml (default: configs/*.yaml)")
    parser.add_argument("--cross-attention-head-dim", type=int, default=None,
                        help="head size of the gated cross-attention (default: the original's dim_head, 64)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from ..atomic import OutputDirectoryNotEmptyError
    from ..convert_af2 import ConversionError, convert_af2_checkpoint

    try:
        convert_af2_checkpoint(
            args.af2_dir, args.text_model, args.output_dir, dtype=args.dtype, push_to_hub=args.push_to_hub,
            overwrite=args.overwrite, config_yaml=args.config_yaml,
            cross_attention_head_dim=args.cross_attention_head_dim, max_shard_size=args.max_shard_size,
            private=args.private or None, progress=not args.no_progress,
        )
    except OutputDirectoryNotEmptyError as error:
        raise CliError(f"{error} (--overwrite)") from None
    except ConversionError as error:
        raise CliError(f"conversion failed, nothing was written: {error}") from None
    except OSError as error:
        raise CliError(f"conversion could not read its inputs, nothing was written: {error}") from None
    return 0
