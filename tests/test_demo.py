"""``af2-hf demo``: the answer stream in-process, and the real page in a headless Chromium (playwright).

The browser test starts ``af2-hf demo`` as a process on a free port with a tiny model, opens it in Debian's
``chromium`` (playwright's Python API with that executable; playwright's own browser download is not needed), uploads
the example clip, picks an example question, switches on greedy decoding, asks, and reads the answer, which must be
the pipeline's. A screenshot is saved in the test's temporary folder. It skips only where no Chromium executable is
found (``.ci/run`` installs Debian's ``chromium``; ``AF2_CHROMIUM`` may name another one).
"""

import os
import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

from af2_testing import REPO_ROOT
from test_serve import free_port, make_tiny, start_cli, stop_process

EXAMPLE_WAV = REPO_ROOT / "examples" / "data" / "example.wav"


def _chromium() -> str | None:
    candidates = [os.environ.get("AF2_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")]
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("demo") / "af2-tiny")


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from transformers import pipeline

    import af2_hf  # noqa: F401

    return pipeline("audio-question-answering", model=str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def engine(pipe):
    from af2_hf.serving.engine import GenerationEngine

    engine = GenerationEngine(pipe.model, pipe.processor)
    yield engine
    engine.close()


def test_answer_stream_grows_to_the_pipeline_answer(engine, pipe):
    from af2_hf.demo import answer_stream

    question = "Describe the audio in detail."
    steps = list(answer_stream(engine, str(EXAMPLE_WAV), question, greedy=True, max_new_tokens=10))
    expected = pipe(str(EXAMPLE_WAV), question=question, do_sample=False, max_new_tokens=10)["answer"]
    assert steps[-1] == expected and len(steps) > 2
    assert all(later.startswith(earlier) for earlier, later in zip(steps, steps[1:]))


def test_answer_stream_refuses_bad_input(engine, tmp_path):
    from af2_hf.demo import answer_stream

    with pytest.raises(ValueError, match="Ask a question"):
        list(answer_stream(engine, str(EXAMPLE_WAV), "  ", greedy=True, max_new_tokens=4))
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio")
    with pytest.raises(ValueError, match="could not be read"):
        list(answer_stream(engine, str(junk), "What is it?", greedy=True, max_new_tokens=4))
    # The engine still serves afterwards.
    assert list(answer_stream(engine, str(EXAMPLE_WAV), "What is it?", greedy=True, max_new_tokens=3))


def test_model_name_and_licence(tiny_dir, tmp_path):
    from af2_hf.serving.model_info import RELEASE_LICENCE, describe_model

    tiny = describe_model(str(tiny_dir), random_weights=True)
    assert tiny.name == "af2-tiny" and "RANDOM" in tiny.licence
    converted = tmp_path / "audio-flamingo-2-hf"
    converted.mkdir()
    assert describe_model(str(converted), random_weights=False).licence == RELEASE_LICENCE
    shutil.copy(REPO_ROOT / "MODEL_CARD.md", converted / "README.md")  # published folders carry the card
    assert "nvidia-oneway-noncommercial" in describe_model(str(converted), random_weights=False).licence


def test_demo_in_a_headless_chromium(tiny_dir, pipe, tmp_path):
    chromium = _chromium()
    if chromium is None and os.environ.get("CI"):
        pytest.fail("No Chromium executable found in CI: .ci/run installs Debian's chromium; the demo's browser test "
                    "must run there.")
    if chromium is None:
        pytest.skip("No Chromium executable found (apt-get install chromium, or set AF2_CHROMIUM): the browser test "
                    "of af2-hf demo cannot run here.")
    port = free_port()
    process, log = start_cli(
        ["demo", "--model", str(tiny_dir), "--port", str(port), "--device", "cpu", "--max-new-tokens", "12"],
        port,
        tmp_path / "demo.log",
        ready_path="/",
    )
    question = "Describe the audio in detail."  # one of the page's example questions
    expected = pipe(str(EXAMPLE_WAV), question=question, do_sample=False, max_new_tokens=12)["answer"]
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                page.wait_for_selector("#ask", timeout=60_000)
                info = page.locator("#model-info").inner_text()
                assert "af2-tiny" in info and "Licence" in info and "RANDOM" in info
                page.locator("#audio input[type=file]").set_input_files(str(EXAMPLE_WAV))
                expect(page.locator("#audio")).to_contain_text("0:03", timeout=30_000)  # uploaded: a 3 s player
                page.get_by_role("button", name=question).click()  # the example fills the question
                expect(page.locator("#question textarea")).to_have_value(question, timeout=30_000)
                page.locator("#greedy input[type=checkbox]").check()
                page.locator("#ask").click()
                page.wait_for_function(
                    "expected => document.querySelector('#answer textarea').value === expected",
                    arg=expected,
                    timeout=120_000,
                )
                page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            finally:
                browser.close()
    finally:
        stop_process(process, log)
    assert (tmp_path / "demo.png").stat().st_size > 10_000
