"""``Trainer`` with the original AF2 weight-decay grouping, and a callback adding generation accuracy to
``Trainer.evaluate`` (generation shared out over the processes of a DDP run)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from ..evaluation.generation import generate_answers_sharded
from ..evaluation.metrics import answer_accuracy

logger = logging.get_logger(__name__)

__all__ = ["AudioFlamingo2Trainer", "GenerationAccuracyCallback"]


class AudioFlamingo2Trainer(Trainer):
    """``Trainer`` with the original AF2 weight-decay grouping: weight decay applies only to the gated
    cross-attention parameters (with LoRA: to the adapters of the cross-attention projections); everything else,
    including the embedding rows that [`set_trainable`] keeps still, gets none. Everything else is the stock
    ``Trainer``."""

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name in super().get_decay_parameter_names(model) if "cross_attention_layers" in name]


class GenerationAccuracyCallback(TrainerCallback):
    """Adds generation accuracy to every ``Trainer.evaluate``: generates answers for ``examples``
    (``{"audio", "prompt", "answer"[, "choices"]}``), scores them with :func:`answer_accuracy`, puts
    ``{metric_prefix}_accuracy`` into the returned metrics and the log history, and keeps the predictions in
    ``last_predictions``. In a multi-process (DDP) run the batches are shared out over the processes and the answers
    gathered ([`generate_answers_sharded`]): each process generates 1/N of them, and the metric equals a
    single-process run's."""

    def __init__(self, processor, examples: Sequence[Mapping], batch_size: int = 8, max_new_tokens: int = 32,
                 metric_prefix: str = "eval_generation", answer_key: str = "answer", choices_key: str = "choices",
                 **generate_kwargs):
        examples = list(examples)
        if not examples:
            raise ValueError("GenerationAccuracyCallback needs at least one example.")
        for index, example in enumerate(examples):
            if answer_key not in example:
                raise KeyError(f"Example {index} has no {answer_key!r} field.")
        self.processor = processor
        self.examples = examples
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.metric_prefix = metric_prefix
        self.answer_key = answer_key
        self.choices_key = choices_key
        self.generate_kwargs = generate_kwargs
        self.last_predictions: list[str] = []

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        predictions = generate_answers_sharded(
            model, self.processor, self.examples, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
            **self.generate_kwargs,
        )
        self.last_predictions = predictions
        scores = answer_accuracy(
            predictions,
            [str(example[self.answer_key]) for example in self.examples],
            [example.get(self.choices_key) for example in self.examples],
        )
        new = {f"{self.metric_prefix}_{key}": value for key, value in scores.items()}
        if metrics is not None:
            metrics.update(new)
        state.log_history.append({**new, "step": state.global_step})
        if state.is_world_process_zero:
            logger.info(f"generation accuracy at step {state.global_step}: {scores}")
