"""A tiny, random-weight Audio Flamingo 2 with a real (tiny) tokenizer, built offline.

``make_tiny_model(out_dir)`` (behind ``af2-hf make-tiny``) writes a complete checkpoint directory - model, processor,
tokenizer, generation config and the remote-code files - in a second or two, without any download. Its answers are
noise: it exists to try the commands, the pipeline and the export on a machine without a converted release.

The tokenizer is a byte-level BPE trained here on a short built-in text, with the Qwen2 pre-tokenizer (it is a
``Qwen2Tokenizer``), then prepared as the AF2 tokenizer (``<audio>``, ``<|endofchunk|>``, ``<|PAD_TOKEN|>``, ``<SEP>``).
"""

from __future__ import annotations

import os

import torch

__all__ = ["RANDOM_WEIGHTS_MARKER", "build_tiny_tokenizer", "make_tiny_model"]

RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS.txt"

_CORPUS = """\
What is the sound source in this audio? Answer briefly.
Describe the audio in detail. What happens around ten seconds?
Is there any speech, music, or noise in the recording? List them, comma-separated.
A dog barks twice while cars pass by on a wet street, and a man speaks in the distance.
An acoustic guitar plays a slow melody in a major key; the tempo is about ninety beats per minute.
The recording contains birds singing, wind blowing through trees and a distant airplane engine.
A woman is speaking on the phone, then a door closes and footsteps fade away.
Rain falls on a metal roof while thunder rumbles. The sound is loud and continuous.
Which instrument plays the main theme? The piano plays the main theme, accompanied by strings.
How many people are talking? Two people are talking, a child and an adult.
Identify the genre of the music: electronic dance music with a steady bass drum.
Output the answer with <SUMMARY>, <CAPTION>, <REASONING>, and <CONCLUSION> tags.
The audio starts with a sine tone at 440 Hz, followed by a chirp and a short burst of white noise.
Classify the sound event: siren, alarm, baby crying, glass breaking, engine idling, applause.
Summarize the long audio: first a lecture, then a round of questions, and finally applause.
0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 60 seconds minutes hertz kilohertz decibels.
"""


def build_tiny_tokenizer(vocab_size: int = 640):
    """A byte-level BPE ``Qwen2Tokenizer`` trained on a built-in text, prepared as the AF2 tokenizer (deterministic).

    Args:
        vocab_size: size of the trained BPE vocabulary (at least the 256 byte symbols); ``<|endoftext|>`` (eos) and
            the four AF2 tokens are added on top.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from .tokenization_audioflamingo2 import prepare_af2_tokenizer

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet):
        raise ValueError(f"vocab_size must be at least {len(byte_alphabet)} (the byte alphabet), got {vocab_size}.")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=byte_alphabet, special_tokens=[], show_progress=False
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(merge) for merge in bpe.model.get_merges()] if hasattr(bpe.model, "get_merges") else None
    if merges is None:
        import json

        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    vocab = dict(sorted(vocab.items(), key=lambda item: item[1]))
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    return prepare_af2_tokenizer(tokenizer)


def make_tiny_model(
    out_dir: str | os.PathLike,
    seed: int = 0,
    max_num_windows: int = 30,
    remote_code: bool = True,
    overwrite: bool = False,
):
    """Writes a tiny random AF2 checkpoint to ``out_dir`` and returns ``(model, processor)``.

    The audio tower is a 4-stage HTSAT with 16-wide patches (128-wide output), a 1-layer audio transformer, and a
    2-layer Qwen2 language model of width 64. The cross-attention gates are opened (tanh(0.7), tanh(0.4)) so that
    the answers depend on the audio. Generation defaults are the release's (sampling with top_k 30, top_p 0.95,
    ``max_new_tokens`` 256). ``save_pretrained`` writes the model and processor code (the AF2 classes are
    registered for remote code); ``remote_code`` also runs :func:`af2_hf.add_remote_code` (the ``AutoModel`` entry
    and the ``audio-question-answering`` pipeline, which ``pipeline()`` then loads only with
    ``trust_remote_code=True``). The folder is written beside ``out_dir`` and renamed at the end; a non-empty
    ``out_dir`` is refused unless ``overwrite`` (then replaced whole).
    """
    from transformers import GenerationConfig

    from .atomic import atomic_output_dir
    from .configuration_audioflamingo2 import AudioFlamingo2Config
    from .export import add_remote_code
    from .feature_extraction_audioflamingo2 import AudioFlamingo2FeatureExtractor
    from .modeling_audioflamingo2 import AudioFlamingo2ForConditionalGeneration
    from .processing_audioflamingo2 import AudioFlamingo2Processor

    tokenizer = build_tiny_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<audio>", "<|endofchunk|>")}
    config = AudioFlamingo2Config(
        audio_config=dict(
            patch_embeds_hidden_size=16,
            depths=[1, 1, 1, 1],
            num_attention_heads=[1, 2, 2, 4],
            enable_fusion=False,
            hidden_size=128,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        audio_transformer_num_layers=1,
        audio_transformer_num_heads=2,
        audio_transformer_intermediate_size=128,
        cross_attention_num_heads=2,
        cross_attention_head_dim=16,
        audio_token_id=ids["<audio>"],
        end_of_chunk_token_id=ids["<|endofchunk|>"],
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AudioFlamingo2ForConditionalGeneration(config).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # The default init (std 0.02) leaves the residual stream close to the input embedding, and a model with tied
        # embeddings then repeats its last input token. Fan-in scaled weights (output projections x3) and larger
        # embeddings, as in the golden tiny model, make the text and the audio move the logits.
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.startswith("model.audio_tower") and name != "lm_head":
                std = module.in_features**-0.5 * (3.0 if name.endswith(("o_proj", "down_proj")) else 1.0)
                module.weight.normal_(0.0, std, generator=generator)
        model.get_input_embeddings().weight.normal_(0.0, 0.5, generator=generator)
        for block in model.model.cross_attention_layers:
            block.attn_gate.fill_(0.7)
            block.ff_gate.fill_(0.4)
        # Log-mel features are around -40 dB: give the input BatchNorm statistics of that scale.
        model.model.audio_tower.audio_encoder.batch_norm.running_mean.fill_(-40.0)
        model.model.audio_tower.audio_encoder.batch_norm.running_var.fill_(100.0)
    model.generation_config = GenerationConfig(
        do_sample=True,
        top_k=30,
        top_p=0.95,
        temperature=1.0,
        max_new_tokens=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = AudioFlamingo2Processor(AudioFlamingo2FeatureExtractor(max_num_windows=max_num_windows), tokenizer)

    with atomic_output_dir(out_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if remote_code:
            add_remote_code(staging)
        (staging / RANDOM_WEIGHTS_MARKER).write_text(
            "This Audio Flamingo 2 checkpoint was made by `af2-hf make-tiny`: tiny and RANDOM weights.\n"
            "Its answers are noise; use it to try the commands, the pipeline and the export offline.\n",
            encoding="utf-8",
        )
    return model, processor
