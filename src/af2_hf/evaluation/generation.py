"""Batched generation for evaluation: answers of a batch of ``{"audio", "prompt"}`` examples, batch plans (in order,
or by audio length to cut padding) and answers generated shard-wise by the processes of a multi-process run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..example_audio import load_example_audio, text_field
from .distributed import all_gather, process_index

__all__ = ["batch_plan", "generate_answers", "generate_batch", "generate_answers_sharded"]


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def batch_plan(indices: Sequence[int], batch_size: int, lengths: Sequence[float] | None = None) -> list[list[int]]:
    """Cuts ``indices`` into batches of ``batch_size``: in the given order, or, with ``lengths`` (one per index),
    longest first (ties in index order) so that each batch holds audio of similar length and little padding. The
    plan depends only on its arguments, never on the number of processes: a batch is the same batch in a run of 1
    or N processes (which then takes batches ``rank, rank + N, ...``)."""
    _check_batch_size(batch_size)
    indices = list(indices)
    if lengths is not None:
        if len(lengths) != len(indices):
            raise ValueError(f"Got {len(lengths)} lengths for {len(indices)} indices.")
        order = sorted(range(len(indices)), key=lambda k: (-lengths[k], indices[k]))
        indices = [indices[k] for k in order]
    return [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]


@torch.no_grad()
def generate_batch(model, processor, prompts: Sequence[str], waveforms: Sequence, max_new_tokens: int = 64,
                   max_num_windows: int | None = None, **generate_kwargs) -> list[str]:
    """Answers for one batch: prompts and waveforms at the feature extractor's rate, left-padded, greedy unless
    ``generate_kwargs`` say otherwise, decoded as the original ``predict``
    ([`AudioFlamingo2Processor.decode_answer`])."""
    device = next(model.parameters()).device
    inputs = processor(
        text=list(prompts),
        audio=list(waveforms),
        sampling_rate=processor.feature_extractor.sampling_rate,
        max_num_windows=max_num_windows,
        padding_side="left",
        return_tensors="pt",
    ).to(device)
    generate_kwargs.setdefault("do_sample", False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    sequences = output.sequences if hasattr(output, "sequences") else output
    return processor.batch_decode_answers(sequences[:, inputs["input_ids"].shape[1] :])


def _batch_inputs(processor, examples: Sequence[Mapping], indices: Sequence[int], audio_key: str, prompt_key: str,
                  max_num_windows: int | None) -> tuple[list[str], list]:
    prompts, waveforms = [], []
    for index in indices:
        example = examples[index]
        if not isinstance(example, Mapping) or audio_key not in example or prompt_key not in example:
            raise KeyError(f"Example {index} needs {audio_key!r} and {prompt_key!r} fields.")
        prompts.append(text_field(example[prompt_key], prompt_key, index))
        waveforms.append(load_example_audio(example[audio_key], processor.feature_extractor, max_num_windows,
                                            where=f"Example {index} audio"))
    return prompts, waveforms


def _generate_plan(model, processor, examples, batches, audio_key, prompt_key, max_new_tokens, max_num_windows,
                   bar, generate_kwargs) -> dict[int, str]:
    answers = {}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            prompts, waveforms = _batch_inputs(processor, examples, batch, audio_key, prompt_key, max_num_windows)
            predictions = generate_batch(model, processor, prompts, waveforms, max_new_tokens, max_num_windows,
                                         **generate_kwargs)
            answers.update(zip(batch, predictions))
            if bar is not None:
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return answers


def generate_answers(
    model,
    processor,
    examples: Sequence[Mapping],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    audio_key: str = "audio",
    prompt_key: str = "prompt",
    max_num_windows: int | None = None,
    progress: bool = False,
    **generate_kwargs,
) -> list[str]:
    """Greedy (by default) answers of ``model`` for ``{"audio", "prompt"}`` examples, batched in order with left
    padding, decoded as the original ``predict`` does ([`AudioFlamingo2Processor.decode_answer`]). ``progress`` shows
    a tqdm bar. Extra keyword arguments go to ``generate``. The model's train/eval mode is restored afterwards."""
    _check_batch_size(batch_size)
    examples = list(examples)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc="generating", unit="example")
    try:
        answers = _generate_plan(model, processor, examples, batch_plan(range(len(examples)), batch_size), audio_key,
                                 prompt_key, max_new_tokens, max_num_windows, bar, generate_kwargs)
    finally:
        if bar is not None:
            bar.close()
    return [answers[index] for index in range(len(examples))]


def generate_answers_sharded(model, processor, examples: Sequence[Mapping], batch_size: int = 8,
                             max_new_tokens: int = 64, audio_key: str = "audio", prompt_key: str = "prompt",
                             max_num_windows: int | None = None, **generate_kwargs) -> list[str]:
    """:func:`generate_answers` split over the processes of a running process group (DDP): the batches of the
    single-process plan are dealt out (batch ``k`` to rank ``k % world_size``), each process generates its own and
    every process receives all answers in example order. Each process does 1/N of the work, and every batch holds
    the same examples as in one process, so the answers equal a single-process run's. Without a process group it is
    :func:`generate_answers`."""
    _check_batch_size(batch_size)
    examples = list(examples)
    rank, world_size = process_index()
    batches = batch_plan(range(len(examples)), batch_size)[rank::world_size]
    mine = _generate_plan(model, processor, examples, batches, audio_key, prompt_key, max_new_tokens,
                          max_num_windows, None, generate_kwargs)
    answers = {}
    for part in all_gather(mine):
        answers.update(part)
    return [answers[index] for index in range(len(examples))]
