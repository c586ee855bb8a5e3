"""SoundCoT (Audio Flamingo 2 chain-of-thought) decoding as the original ``inference_CoT.py`` does it.

The SoundCoT checkpoint answers with ``<SUMMARY>``, ``<CAPTION>``, ``<REASONING>`` and ``<CONCLUSION>`` sections. The
original decodes the answer, lower-cases it, and when the answer has ``<reasoning>`` but no ``</conclusion>`` (the
model rambled until the token limit), it asks again with the reasoning cut short and the conclusion opened:

* if ``</reasoning>`` is present, everything before it is kept;
* otherwise the answer is first cut to its first 512 characters (and stripped), then cut before its last ``.``
  (exactly ``answer[:answer.rfind('.')]``: without any ``.`` this drops the last character, as in the original);
* ``"</REASONING>\\n<CONCLUSION>"`` is appended, and the whole is appended to the prompt
  ``f"<audio>{question}<SEP>"``; prompts are tokenised with at most 1024 tokens and up to 1024 new tokens are
  generated (both for the first and for the second attempt).

The answer of the second attempt is the decoded text after the last ``<SEP>``, so it starts with the kept part of the
first answer; it is lower-cased too. Only Audio Flamingo 2 processors (``format_prompt``/``decode_answer``) are
supported. Prompts are built through the processor's chat template (the question as a user turn, the continuation as
a continued assistant turn): the token ids are the original's, and special-token text written in a question stays
plain text.
"""

from __future__ import annotations

__all__ = [
    "SOUNDCOT_INSTRUCTION",
    "SOUNDCOT_MAX_LENGTH",
    "SOUNDCOT_MAX_NEW_TOKENS",
    "needs_reask",
    "soundcot_continuation",
    "soundcot_generate",
    "soundcot_question",
]

SOUNDCOT_INSTRUCTION = "Output the answer with <SUMMARY>, <CAPTION>, <REASONING>, and <CONCLUSION> tags."
SOUNDCOT_MAX_LENGTH = 1024
SOUNDCOT_MAX_NEW_TOKENS = 1024
_REASONING_CUT_CHARS = 512
_CONCLUSION_OPENING = "</REASONING>\n<CONCLUSION>"


def soundcot_question(question: str) -> str:
    """The question with the SoundCoT tag instruction appended (unless it already contains it, in any case)."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}.")
    if SOUNDCOT_INSTRUCTION.lower() in question.lower():
        return question
    stripped = question.rstrip()
    return f"{stripped} {SOUNDCOT_INSTRUCTION}" if stripped else SOUNDCOT_INSTRUCTION


def needs_reask(answer: str) -> bool:
    """Whether the original would ask again: ``<reasoning>`` present and ``</conclusion>`` missing (case-insensitive,
    as the original compares the lower-cased answer)."""
    lowered = answer.lower()
    return "<reasoning>" in lowered and "</conclusion>" not in lowered


def soundcot_continuation(answer: str) -> str | None:
    """What the original appends to the prompt for its second attempt, or ``None`` when no second attempt is made.

    Args:
        answer: the decoded first answer (the text after ``<SEP>``); it is lower-cased here as in the original.
    """
    answer = answer.lower()
    if not needs_reask(answer):
        return None
    if "</reasoning>" in answer:
        kept = answer.split("</reasoning>")[0]
    else:
        if len(answer) >= _REASONING_CUT_CHARS:
            answer = answer[:_REASONING_CUT_CHARS].strip()
        kept = answer[: answer.rfind(".")]
    return kept + _CONCLUSION_OPENING


def _check_af2_processor(processor) -> None:
    if not (hasattr(processor, "format_prompt") and hasattr(processor, "decode_answer")):
        raise TypeError(
            "SoundCoT decoding needs an Audio Flamingo 2 processor (format_prompt / decode_answer), got "
            f"{type(processor).__name__}."
        )


def _question_inputs(processor, questions: list[str], audios: list, continuations: list[str] | None,
                    processor_kwargs: dict):
    """Model inputs for ``questions`` (plain text, through the chat template: special-token text written in a question
    stays text) with their audio; with ``continuations``, each prompt continued by its text after ``<SEP>`` (the
    original's second attempt, ``f"<audio>{question}<SEP>{continuation}"``)."""
    if continuations is None:
        return processor.apply_question_request(questions, audio=audios, return_tensors="pt", **processor_kwargs)
    from .processing_audioflamingo2 import question_turn

    conversations = [
        [question_turn(question, audio), {"role": "assistant", "content": [{"type": "text", "text": continuation}]}]
        for question, audio, continuation in zip(questions, audios, continuations)
    ]
    return processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                         continue_final_message=True, processor_kwargs=processor_kwargs)


def generate_answers(model, processor, questions: list[str], audios: list, continuations: list[str] | None = None,
                     processor_kwargs=None, **generate_kwargs):
    """Runs the processor on ``questions``/``audios`` (one audio per question, left padding; ``continuations``: see
    :func:`_question_inputs`), ``model.generate`` and returns the decoded AF2 answers (``processor.decode_answer``),
    one per question."""
    processor_kwargs = dict(processor_kwargs or {})
    text_kwargs = dict(processor_kwargs.pop("text_kwargs", None) or {})
    for key, value in (("padding", True), ("padding_side", "left")):
        if key not in processor_kwargs:
            text_kwargs.setdefault(key, value)
    processor_kwargs["text_kwargs"] = text_kwargs
    processor_kwargs.setdefault("sampling_rate", processor.feature_extractor.sampling_rate)
    inputs = _question_inputs(processor, list(questions), list(audios), continuations, processor_kwargs)
    inputs = _to_model(inputs, model)
    sequences = model.generate(**inputs, **generate_kwargs)
    return [processor.decode_answer(sequence) for sequence in sequences]


def _to_model(inputs, model) -> dict:
    import torch

    device, dtype = model.device, model.dtype
    moved = {}
    for key, value in dict(inputs).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


def reask(model, processor, questions: list[str], audios: list, answers: list[str], processor_kwargs=None,
          **generate_kwargs) -> list[str]:
    """The SoundCoT second attempt for every answer that needs one; returns the final, lower-cased answers.

    ``questions`` are the first attempt's questions (with the instruction; prompted as ``f"<audio>{question}<SEP>"``),
    ``answers`` their decoded answers."""
    if not (len(questions) == len(audios) == len(answers)):
        raise ValueError(f"Got {len(questions)} questions, {len(audios)} audios and {len(answers)} answers.")
    final = [answer.lower() for answer in answers]
    redo = [(index, soundcot_continuation(answer)) for index, answer in enumerate(answers)]
    redo = [(index, continuation) for index, continuation in redo if continuation is not None]
    if not redo:
        return final
    processor_kwargs = dict(processor_kwargs or {})
    processor_kwargs.setdefault("max_length", SOUNDCOT_MAX_LENGTH)
    second = generate_answers(
        model,
        processor,
        [questions[index] for index, _ in redo],
        [audios[index] for index, _ in redo],
        continuations=[continuation for _, continuation in redo],
        processor_kwargs=processor_kwargs,
        **generate_kwargs,
    )
    for (index, _), answer in zip(redo, second):
        final[index] = answer.lower()
    return final


def soundcot_generate(model, processor, audio, question, add_instruction: bool = True, **generate_kwargs):
    """SoundCoT answer(s) for one audio and question, or for lists of both, decoded as the original does.

    Args:
        model: an AF2 model (the SoundCoT release), processor: its [`AudioFlamingo2Processor`].
        audio: a path, bytes, a 16 kHz waveform, or a list of those; question: a string or a list of strings.
        add_instruction: append [`SOUNDCOT_INSTRUCTION`] to questions that do not contain it.
        generate_kwargs: passed to ``model.generate`` (default ``max_new_tokens=1024`` as the original; sampling as
            the model's generation config unless e.g. ``do_sample=False`` is given).

    Returns:
        The lower-cased answer (a string), or a list of answers for list inputs.
    """
    _check_af2_processor(processor)
    single = isinstance(question, str)
    questions = [question] if single else list(question)
    audios = [audio] if single else list(audio)
    if len(questions) != len(audios):
        raise ValueError(f"Got {len(questions)} questions and {len(audios)} audios; give one audio per question.")
    if add_instruction:
        questions = [soundcot_question(q) for q in questions]
    elif not all(isinstance(q, str) for q in questions):
        raise TypeError("questions must be strings.")
    waveforms = [processor.feature_extractor.fetch_audio(a) for a in audios]
    generate_kwargs.setdefault("max_new_tokens", SOUNDCOT_MAX_NEW_TOKENS)
    processor_kwargs = {"max_length": SOUNDCOT_MAX_LENGTH}
    first = generate_answers(model, processor, questions, waveforms, processor_kwargs=processor_kwargs,
                             **generate_kwargs)
    answers = reask(model, processor, questions, waveforms, first, processor_kwargs=processor_kwargs, **generate_kwargs)
    return answers[0] if single else answers
