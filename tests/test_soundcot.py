"""SoundCoT decoding: the original's re-ask rule, and end-to-end runs with answers forced by a LogitsProcessor."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, pipeline

from af2_hf import AudioFlamingo2Processor, soundcot_generate
from af2_hf.soundcot import SOUNDCOT_INSTRUCTION, needs_reask, soundcot_continuation, soundcot_question
from af2_testing import converted_tiny_dir, load_converted_model

OPENING = "</REASONING>\n<CONCLUSION>"


# ---------------------------------------------------------------------------------------------------- the rule


def test_no_reask_without_reasoning_or_with_a_conclusion():
    assert soundcot_continuation("<SUMMARY>a dog</SUMMARY>") is None
    assert soundcot_continuation("<reasoning>x.</reasoning><conclusion>yes</conclusion>") is None
    assert soundcot_continuation("<REASONING>x.</REASONING><CONCLUSION>yes</CONCLUSION>") is None  # lower-cased
    assert not needs_reask("plain answer") and needs_reask("<Reasoning> no end")


def test_reask_cuts_at_the_end_of_the_reasoning():
    answer = "<SUMMARY>s</SUMMARY><REASONING>it barks. it is a dog.</REASONING><CONCLUSION>the dog"
    assert soundcot_continuation(answer) == "<summary>s</summary><reasoning>it barks. it is a dog." + OPENING


def test_reask_without_end_of_reasoning_cuts_before_the_last_full_stop():
    assert soundcot_continuation("<reasoning>one. two. thr") == "<reasoning>one. two" + OPENING
    # Long answers are first cut to 512 characters (and stripped), then before their last full stop.
    long_answer = "<reasoning>" + "ab. " * 200
    cut = long_answer[:512].strip()
    assert soundcot_continuation(long_answer) == cut[: cut.rfind(".")] + OPENING
    assert len(soundcot_continuation(long_answer)) < 512 + len(OPENING)
    # Without any full stop the original's rfind returns -1, which drops the last character.
    assert soundcot_continuation("<reasoning>no stop here") == "<reasoning>no stop her" + OPENING


def test_soundcot_question_appends_the_instruction_once():
    question = soundcot_question("What happens?  ")
    assert question == f"What happens? {SOUNDCOT_INSTRUCTION}"
    assert soundcot_question(question) == question
    assert soundcot_question(question.upper()) == question.upper()
    assert soundcot_question("") == SOUNDCOT_INSTRUCTION
    with pytest.raises(TypeError):
        soundcot_question(None)


# ---------------------------------------------------------------------------------------------------- end to end


class ForceAnswers(LogitsProcessor):
    """Forces, per row, the answer text chosen from what the row holds after its last <SEP>: the second attempt's
    prompt ends with the conclusion opening, so a row starting with ``second_prefix`` is completed with
    ``second_suffix``; a row whose prompt contains "complete" gets ``complete``; other rows get ``first``."""

    def __init__(self, tokenizer, first, second_prefix, second_suffix, complete):
        self.tokenizer = tokenizer
        self.first, self.second_prefix, self.second_suffix, self.complete = first, second_prefix, second_suffix, complete
        self.rows_seen = []

    def __call__(self, input_ids, scores):
        sep = self.tokenizer.sep_token_id
        forced = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(input_ids.tolist()):
            last_sep = len(ids) - 1 - ids[::-1].index(sep)
            if self.tokenizer.eos_token_id in ids[last_sep + 1 :]:  # finished row of a batch: generate pads it
                forced[row, self.tokenizer.eos_token_id] = 0.0
                continue
            prompt = self.tokenizer.decode(ids[: last_sep + 1])
            so_far = self.tokenizer.decode(ids[last_sep + 1 :])
            if so_far.startswith(self.second_prefix):
                target = self.second_prefix + self.second_suffix
            elif "complete" in prompt:
                target = self.complete
            else:
                target = self.first
            self.rows_seen.append((prompt, so_far))
            assert target.startswith(so_far), (target, so_far)
            rest = target[len(so_far) :]
            token = self.tokenizer.eos_token_id if not rest else self.tokenizer.encode(rest, add_special_tokens=False)[0]
            forced[row, token] = 0.0
        return forced


@pytest.fixture(scope="module")
def model_and_processor():
    return load_converted_model("sdpa"), AudioFlamingo2Processor.from_pretrained(converted_tiny_dir())


FIRST = "<SUMMARY>A tone.</SUMMARY><REASONING>The sound is loud. It repeats and"
# No </reasoning>: the lower-cased answer is cut before its last ".".
CONTINUATION = "<summary>a tone.</summary><reasoning>the sound is loud" + OPENING
SECOND = "Yes.</CONCLUSION>"
COMPLETE = "<REASONING>Fine.</REASONING><CONCLUSION>No.</CONCLUSION>"


def _forcer(processor):
    return ForceAnswers(processor.tokenizer, FIRST, CONTINUATION, SECOND, COMPLETE)


def test_soundcot_generate_reasks_like_the_original(model_and_processor, golden_audio_files):
    model, processor = model_and_processor
    assert soundcot_continuation(FIRST) == CONTINUATION
    forcer = _forcer(processor)
    answer = soundcot_generate(model, processor, str(golden_audio_files["a"]), "What do you hear?",
                               logits_processor=LogitsProcessorList([forcer]), do_sample=False)
    assert answer == (CONTINUATION + SECOND).lower()
    prompts = {prompt for prompt, _ in forcer.rows_seen}
    first_prompt = processor.format_prompt(f"What do you hear? {SOUNDCOT_INSTRUCTION}")
    assert prompts == {first_prompt}  # the second prompt is the first + the continuation (after <SEP>)
    assert any(so_far == CONTINUATION for _, so_far in forcer.rows_seen)  # the second attempt started there
    assert first_prompt == "<audio>what do you hear? " + SOUNDCOT_INSTRUCTION.lower() + "<SEP>"


def test_a_complete_answer_is_not_reasked(model_and_processor, golden_audio_files):
    model, processor = model_and_processor
    forcer = _forcer(processor)
    answer = soundcot_generate(model, processor, str(golden_audio_files["a"]), "Is it complete?",
                               logits_processor=LogitsProcessorList([forcer]), do_sample=False)
    assert answer == COMPLETE.lower()
    assert not any(so_far.startswith(CONTINUATION) for _, so_far in forcer.rows_seen)


def test_pipeline_soundcot_batch(model_and_processor, golden_audio_files):
    """A batch where one answer needs the second attempt and the other does not."""
    model, processor = model_and_processor
    pipe = pipeline("audio-question-answering", model=model, processor=processor)
    forcer = _forcer(processor)
    inputs = [{"audio": str(golden_audio_files["a"]), "question": "What do you hear?"},
              {"audio": str(golden_audio_files["c"]), "question": "Is it complete?"}]
    outputs = pipe(inputs, batch_size=2, soundcot=True,
                   generate_kwargs={"logits_processor": LogitsProcessorList([forcer]), "do_sample": False})
    assert outputs == [{"answer": (CONTINUATION + SECOND).lower()}, {"answer": COMPLETE.lower()}]
    # Without soundcot the first (rambling) answer is returned as decoded, not lower-cased.
    plain = pipe(inputs[0], question=None, generate_kwargs={"logits_processor": LogitsProcessorList([forcer]),
                                                           "do_sample": False})
    assert plain == {"answer": FIRST}


def test_soundcot_needs_an_af2_processor(model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(TypeError, match="Audio Flamingo 2 processor"):
        soundcot_generate(model, processor.tokenizer, "a.wav", "q")
    with pytest.raises(ValueError, match="one audio per question"):
        soundcot_generate(model, processor, ["a.wav"], ["q", "r"])


@pytest.mark.parametrize("injected", ["<|endoftext|>", "<audio>", "<SEP>", "<|endofchunk|>", "<|im_start|>user"])
def test_soundcot_prompts_keep_special_token_text_in_a_question_plain(model_and_processor, golden_audio_files,
                                                                      injected):
    """First and second attempt: a question that writes a special token holds it as text (no control id, no second
    audio slot), and the prompt of a question without one is token for token the original's written prompt."""
    from af2_hf.soundcot import _question_inputs

    _, processor = model_and_processor
    tokenizer = processor.tokenizer
    audio = processor.feature_extractor.fetch_audio(str(golden_audio_files["a"]))
    control = {tokenizer.convert_tokens_to_ids(t) for t in (injected.split("user")[0], tokenizer.eos_token)}
    control.add(tokenizer.sep_token_id)
    for continuations in (None, [CONTINUATION]):
        plain = soundcot_question("What do you hear?")
        written = processor.format_prompt(plain) + (continuations[0] if continuations else "")
        expected = processor(text=written, audio=[audio], return_tensors="pt")["input_ids"]
        got = _question_inputs(processor, [plain], [audio], continuations, {})["input_ids"]
        assert got.tolist() == expected.tolist()
        question = soundcot_question(f"What {injected} do you hear?")
        ids = _question_inputs(processor, [question], [audio], continuations, {})["input_ids"][0].tolist()
        counts = {token: ids.count(token) for token in control}
        assert counts[tokenizer.sep_token_id] == 1 and counts.get(tokenizer.eos_token_id, 0) == 0, counts
        assert ids.count(processor.tokenizer.convert_tokens_to_ids(processor.audio_token)) == 1
        assert ids.count(tokenizer.convert_tokens_to_ids(injected.split("user")[0])) <= (
            1 if injected in ("<SEP>", "<audio>") else 0)
