"""The original AF2 training text and its label masking (``AudioTextData`` + the label loop of ``train_utils.py``)."""

from __future__ import annotations

import torch

__all__ = ["IGNORE_INDEX", "build_training_labels", "format_training_text"]

IGNORE_INDEX = -100


def format_training_text(prompt: str, answer: str, tokenizer, audio_token: str = "<audio>",
                         end_of_chunk_token: str = "<|endofchunk|>") -> str:
    """The original training text ``f"<audio>{prompt}<SEP>{answer}<|endofchunk|>{eos}"`` (prompt and answer are
    lower-cased, then stripped, as ``AudioTextData`` does)."""
    prompt = str(prompt).lower().strip()
    answer = str(answer).lower().strip()
    return f"{audio_token}{prompt}{tokenizer.sep_token}{answer}{end_of_chunk_token}{tokenizer.eos_token}"


def build_training_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    audio_token_id: int,
    sep_token_id: int,
    end_of_chunk_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
) -> tuple[torch.Tensor, list[int]]:
    """Labels of the original AF2 training loop.

    1. padding (pad id or ``attention_mask`` 0), the first two positions and ``<audio>`` are ignored (-100);
    2. of the rest, only tokens after a ``<SEP>`` up to and including the next ``<|endofchunk|>`` are kept — and
       every eos token is kept wherever it is;
    3. a sample whose last real label is an answer token (the answer was cut by ``max_length``, so no
       ``<|endofchunk|>`` closes it) gets that unfinished answer masked back to the previous ignored / eos /
       ``<|endofchunk|>`` label, as ``train_utils.py`` does.

    ``<SEP>`` is detected on ``input_ids`` (``train_utils.py`` ignores only position 0 before scanning, so a
    ``<SEP>`` at position 1 — an empty prompt — still opens the answer; the copy of the statements in ``factory.py``
    ignores positions 0-1 first and would then mask the whole answer). Both give the same labels for every prompt
    that is not empty.

    Returns:
        ``(labels, cut)``: the labels (same shape as ``input_ids``) and the indices of samples whose answer was cut.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must be 2-D and of the same shape, got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}."
        )
    batch, length = input_ids.shape
    real = attention_mask.bool() & (input_ids != pad_token_id)
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)

    is_event = real & ((input_ids == sep_token_id) | (input_ids == end_of_chunk_token_id))
    last_event = torch.where(is_event, positions, torch.full_like(positions, -1)).cummax(dim=1).values
    # The state at position j is set by the last <SEP> / <|endofchunk|> strictly before j.
    previous_event = torch.cat([torch.full_like(last_event[:, :1], -1), last_event[:, :-1]], dim=1)
    previous_token = input_ids.gather(1, previous_event.clamp(min=0))
    in_answer = (previous_event >= 0) & (previous_token == sep_token_id)

    keep = (in_answer | (input_ids == eos_token_id)) & real & (positions >= 2) & (input_ids != audio_token_id)
    labels = torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    cut = []
    closing = (IGNORE_INDEX, eos_token_id, end_of_chunk_token_id)
    for i in range(batch):
        real_positions = real[i].nonzero()
        if real_positions.numel() == 0:
            continue
        j = int(real_positions[-1])
        if int(labels[i, j]) in closing:
            continue
        cut.append(i)
        while j >= 0 and int(labels[i, j]) not in closing:
            labels[i, j] = IGNORE_INDEX
            j -= 1
    return labels, cut
