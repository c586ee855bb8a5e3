"""Tokenizer set-up of Audio Flamingo 2: a base Qwen2(.5) tokenizer plus the AF2 special tokens, and the plain-text
encoder that keeps user text from turning into control tokens."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

__all__ = [
    "AF2_AUDIO_TOKEN",
    "AF2_END_OF_CHUNK_TOKEN",
    "AF2_PAD_TOKEN",
    "AF2_SEP_TOKEN",
    "plain_text_tokenizer",
    "prepare_af2_tokenizer",
]

AF2_AUDIO_TOKEN = "<audio>"
AF2_END_OF_CHUNK_TOKEN = "<|endofchunk|>"
AF2_PAD_TOKEN = "<|PAD_TOKEN|>"
AF2_SEP_TOKEN = "<SEP>"


def prepare_af2_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Turns a base tokenizer into the AF2 tokenizer, in place, exactly as the original ``create_model_and_transforms``.

    Adds ``<audio>``, ``<|endofchunk|>`` and ``<|PAD_TOKEN|>`` as extra special tokens, in that order (new ids are
    appended in this order: for Qwen2.5 and the golden tiny tokenizer they follow the base vocabulary), makes
    ``<|PAD_TOKEN|>`` the pad token, and adds ``<SEP>`` as sep token if the tokenizer has no sep token (an existing
    sep token is kept, as in the original). The tokens are special: never split, removed by
    ``skip_special_tokens=True``, and kept by ``save_pretrained``/``from_pretrained``.

    Unlike the original (transformers 4.x ``add_special_tokens`` replaced the list of additional special tokens),
    existing extra special tokens of the base tokenizer stay in its ``extra_special_tokens`` list; token ids are the
    same either way. The function is idempotent. Resize the model's embeddings to ``len(tokenizer)`` afterwards.

    Returns:
        the same tokenizer object.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"Expected a transformers tokenizer, got {type(tokenizer).__name__}.")
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AF2_AUDIO_TOKEN, AF2_END_OF_CHUNK_TOKEN, AF2_PAD_TOKEN]},
        replace_extra_special_tokens=False,
    )
    tokenizer.pad_token = AF2_PAD_TOKEN
    if tokenizer.sep_token is None:
        tokenizer.add_special_tokens({"sep_token": AF2_SEP_TOKEN})
    return tokenizer


def plain_text_tokenizer(tokenizer: PreTrainedTokenizerBase):
    """The backend pipeline of ``tokenizer`` (normaliser, pre-tokeniser, model, post-processor) WITHOUT its added
    vocabulary, as a ``tokenizers.Tokenizer``: text it encodes never becomes an added or special token.

    ``split_special_tokens=True`` only splits tokens marked special; tokens added as non-special (Qwen2.5's
    ``<tool_call>``, ``<|fim_prefix|>``, ...) would still be matched. Text without any added-token string gets the
    ids (and offsets) that ``tokenizer`` gives it, because ``tokenizer`` runs the same pipeline on the text between
    its added tokens.

    Raises:
        TypeError: ``tokenizer`` has no ``tokenizers`` backend (a slow tokenizer).
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"{type(tokenizer).__name__} has no `tokenizers` backend: Audio Flamingo 2 encodes user text apart from "
            "its control tokens with a fast tokenizer (load it with AutoTokenizer.from_pretrained(..., use_fast=True))."
        )
    plain = Tokenizer(backend.model)
    plain.normalizer = backend.normalizer
    plain.pre_tokenizer = backend.pre_tokenizer
    plain.post_processor = backend.post_processor
    plain.decoder = backend.decoder
    return plain
