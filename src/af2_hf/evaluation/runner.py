"""One evaluation run over an :class:`ExampleTable`, in one process or in every process of a launcher's group: the
pending examples (those not yet in the results file) are cut into batches by audio length, batch ``k`` goes to rank
``k % N``, and after every step rank 0 gathers the rows, orders them and appends them to the results file; at the
end rank 0 writes the file in example order and the summary."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..audio import AudioLoadError
from ..example_audio import load_example_audio
from .distributed import broadcast_from_main, all_gather, gather_to_main, process_index
from .generation import batch_plan, generate_batch
from .inputs import ExampleTable
from .metrics import score_row, summarize
from .results import ResultsFile, ResultsFileError, write_json_atomic

__all__ = ["RunSettings", "default_summary_path", "evaluate_examples"]

#: Errors of one example's audio that are written into its row (the run goes on).
AUDIO_ERRORS = (AudioLoadError, OSError, ValueError, TypeError)


@dataclass
class RunSettings:
    """How :func:`evaluate_examples` batches, generates and reports (see its arguments)."""

    summary_path: Path
    batch_size: int = 8
    max_new_tokens: int = 64
    max_num_windows: int | None = None
    sort_by_length: bool = True
    max_batches: int | None = None
    progress: bool = True
    generate_kwargs: dict = field(default_factory=dict)


def default_summary_path(output: str | Path) -> Path:
    """``predictions.jsonl`` -> ``predictions.summary.json``."""
    output = Path(output)
    return output.with_name(output.stem + ".summary.json")


def _resume_state(examples: ExampleTable, results: ResultsFile, overwrite: bool) -> dict:
    """Rank 0: the indices already written (checked against the inputs), or the error that stops the run."""
    try:
        results.lock()
        if overwrite:
            results.remove()
        done = results.read()
        for row in done:
            index = row["index"]
            if index >= len(examples) or row.get("prompt") != examples.rows[index]["prompt"]:
                raise ResultsFileError(
                    f"{results.path} holds results of other inputs (example {index} does not match): choose another "
                    "output file, or pass --overwrite to start again."
                )
        return {"done": sorted(row["index"] for row in done)}
    except (ResultsFileError, OSError) as error:
        results.unlock()
        return {"error": f"{type(error).__name__}: {error}"}


def _audio_lengths(examples: ExampleTable, pending: Sequence[int], rank: int, world_size: int) -> list[float]:
    """Durations of the pending examples, read by every process for its share of them."""
    mine = {index: examples.audio_seconds(index) for index in pending[rank::world_size]}
    lengths: dict[int, float] = {}
    for part in all_gather(mine):
        lengths.update(part)
    return [lengths[index] for index in pending]


def _result_rows(model, processor, examples: ExampleTable, batch: Sequence[int], max_new_tokens: int,
                 max_num_windows: int | None, generate_kwargs: Mapping) -> list[dict]:
    """Rows of one batch: each example's audio loaded (a failure goes into that row's ``error``), the rest generated
    together and scored."""
    rows, waveforms, loaded = [], [], []
    for index in batch:
        row = {**examples.rows[index], "prediction": None}
        audio = examples.audio(index)
        if isinstance(audio, Mapping) and audio.get("path") and "audio_path" not in row:
            row["audio_path"] = audio["path"]
        try:
            waveforms.append(load_example_audio(audio, processor.feature_extractor, max_num_windows,
                                                where=f"Example {index} audio"))
            loaded.append(row)
        except AUDIO_ERRORS as error:
            row["error"] = f"{type(error).__name__}: {error}"
        rows.append(row)
    if loaded:
        predictions = generate_batch(model, processor, [row["prompt"] for row in loaded], waveforms, max_new_tokens,
                                     max_num_windows, **generate_kwargs)
        for row, prediction in zip(loaded, predictions):
            row["prediction"] = prediction
    for row in rows:
        row.update(score_row(row))
    return rows


def evaluate_examples(
    model,
    processor,
    examples: ExampleTable,
    output: str | Path,
    *,
    summary_path: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_num_windows: int | None = None,
    sort_by_length: bool = True,
    max_batches: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **generate_kwargs,
) -> dict | None:
    """Generates and scores every example of ``examples`` not yet in ``output`` and returns the summary (on rank 0;
    ``None`` on the other ranks).

    Run it in every process of a process group (see :func:`init_from_environment`) or in a single process: each
    process takes batches ``rank, rank + N, ...`` of the plan (:func:`batch_plan`: pending examples longest first,
    ``batch_size`` per batch, the same batches for any N) and rank 0 appends each step's rows to ``output`` in
    example order. A restarted run reads ``output``, skips the examples already there (a torn last line is dropped)
    and never writes one twice; ``overwrite`` starts again. ``max_batches`` stops each process after that many
    batches (a later run resumes). When every example is written, ``output`` is rewritten in example order.

    A row holds the example's fields, ``prediction`` and its scores (:func:`score_row`); an example whose audio cannot
    be read gets ``"error"`` (and ``prediction`` null) and the run goes on. The summary (:func:`summarize` plus
    ``complete``, ``processes``, ``generated``, ``seconds``, ``examples_per_second`` of this run) is written as JSON to
    ``summary_path`` (default :func:`default_summary_path`). Extra keyword arguments go to ``generate``.
    """
    rank, world_size = process_index()
    results = ResultsFile(output)
    state = broadcast_from_main(_resume_state(examples, results, overwrite) if rank == 0 else None)
    if "error" in state:
        raise ResultsFileError(state["error"])
    settings = RunSettings(Path(summary_path or default_summary_path(output)), batch_size, max_new_tokens,
                           max_num_windows, sort_by_length, max_batches, progress, generate_kwargs)
    try:
        return _run(model, processor, examples, results, set(state["done"]), settings)
    finally:
        results.unlock()


def _run(model, processor, examples: ExampleTable, results: ResultsFile, done: set, settings: RunSettings):
    """The generation loop over the pending examples; rank 0 writes, then returns the summary."""
    rank, world_size = process_index()
    pending = [index for index in range(len(examples)) if index not in done]
    lengths = _audio_lengths(examples, pending, rank, world_size) if settings.sort_by_length else None
    plan = batch_plan(pending, settings.batch_size, lengths)
    steps = math.ceil(len(plan) / world_size)
    if settings.max_batches is not None:
        steps = min(steps, settings.max_batches)

    bar = None
    if settings.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), initial=len(done), desc="evaluating", unit="example", dynamic_ncols=True)
    start = time.perf_counter()
    generated = 0
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            position = step * world_size + rank
            batch = plan[position] if position < len(plan) else []
            rows = _result_rows(model, processor, examples, batch, settings.max_new_tokens, settings.max_num_windows,
                                settings.generate_kwargs)
            gathered = gather_to_main(rows)
            if rank == 0:
                step_rows = sorted((row for part in gathered for row in part), key=lambda row: row["index"])
                results.append(step_rows)
                generated += len(step_rows)
                if bar is not None:
                    bar.update(len(step_rows))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    if rank != 0:
        return None
    seconds = time.perf_counter() - start
    return _finish(results, examples, settings.summary_path, world_size, generated, seconds)


def _finish(results: ResultsFile, examples: ExampleTable, summary_path, world_size: int, generated: int,
            seconds: float) -> dict:
    rows = results.read()
    complete = len(rows) == len(examples)
    if complete:
        results.rewrite_ordered(rows)
    summary = summarize(rows)
    summary.update(
        complete=complete, examples=len(examples), written=len(rows), processes=world_size, generated=generated,
        seconds=round(seconds, 3), examples_per_second=round(generated / seconds, 3) if seconds > 0 else None,
        output=str(results.path), source=examples.source,
    )
    write_json_atomic(summary_path, summary)
    return summary
