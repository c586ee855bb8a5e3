"""`af2-hf evaluate` in one process on a tiny model: scores of each task kind, per-task summaries, a broken audio
file reported in its row, resuming after a stop (and after a torn last line) without duplicates, every input form
(manifest, save_to_disk folder, parquet; an audiofolder where torchcodec is installed) giving the same
predictions, and input errors (exit 2)."""

import importlib.util
import json
import shutil

import pytest

from af2_hf.cli import main as cli_main
from af2_hf.evaluation import batch_plan, caption_scores, format_summary, score_answer, summarize
from af2_hf.evaluation.metrics import score_row
from af2_hf.evaluation.results import ResultsFile, ResultsFileError
from evaluate_testing import ROWS, make_workspace, read_rows, read_summary


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    make_workspace(root)
    return root


def evaluate(workspace, data, output, *extra):
    code = cli_main(["evaluate", str(data), "--model", str(workspace / "model"), "--output", str(output),
                     "--max-new-tokens", "4", "--batch-size", "2", "--no-progress", *extra])
    return code


def test_scores_of_each_task_kind():
    assert score_answer("(b) yes", "yes", ["no", "yes"]) == (True, "yes")
    assert score_answer("yes", "B", ["no", "yes"])[0]  # an answer given as its option letter
    assert score_answer("maybe", "yes", ["no", "yes"]) == (False, None)
    assert score_row({"kind": "open", "prediction": "A sine tone.", "answer": "a sine tone"}) == {
        "exact_match": False, "correct": True}
    unreadable = {"kind": "multiple_choice", "prediction": None, "answer": "a", "choices": ["a"]}
    assert score_row(unreadable)["correct"] is False

    references = [["a dog barks loudly", "a dog is barking"], ["rain falls on a tin roof"]]
    perfect = caption_scores(["A dog barks loudly.", "rain falls on a tin roof"], references)
    poor = caption_scores(["a car passes", "birds sing"], references)
    assert perfect["rouge_l"] == pytest.approx(1.0) and perfect["bleu_1"] == pytest.approx(1.0, abs=1e-6)
    for name in ("bleu_1", "bleu_4", "rouge_l", "cider_d"):
        assert perfect[name] > poor[name], name

    rows = [
        {"task": "mc", "kind": "multiple_choice", "prediction": "yes", "answer": "yes", "choices": ["no", "yes"]},
        {"task": "mc", "kind": "multiple_choice", "prediction": None, "answer": "no", "choices": ["no", "yes"],
         "error": "AudioLoadError: broken"},
        {"task": "qa", "kind": "open", "prediction": "One.", "answer": "one"},
        {"task": "cap", "kind": "caption", "prediction": "a dog barks", "references": references[0]},
    ]
    rows = [{**row, **score_row(row)} for row in rows]
    summary = summarize(rows)
    assert summary["tasks"]["mc"] == {"kind": "multiple_choice", "examples": 2, "errors": 1, "accuracy": 0.5,
                                      "correct": 1, "graded": 2, "unmatched": 0}
    assert summary["tasks"]["qa"]["accuracy"] == 1.0 and summary["tasks"]["qa"]["exact_match"] == 0.0
    assert summary["tasks"]["cap"]["captions_scored"] == 1 and "cider_d" in summary["tasks"]["cap"]
    overall = summary["overall"]
    assert overall["examples"] == 4 and overall["graded"] == 3 and overall["correct"] == 2
    assert set(overall["by_kind"]) == {"multiple_choice", "open", "caption"} and "cider_d" not in overall
    table = format_summary(summary)
    assert all(name in table for name in ("mc", "qa", "cap", "overall:", "cider_d"))


def test_batch_plan_is_by_length_and_independent_of_processes():
    plan = batch_plan([3, 5, 7, 9, 11], 2, lengths=[1.0, 3.0, 2.0, 3.0, 0.5])
    assert plan == [[5, 9], [7, 3], [11]]
    assert batch_plan(range(5), 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        batch_plan([1], 0)


def test_results_file_drops_a_torn_line_and_refuses_corruption(tmp_path):
    results = ResultsFile(tmp_path / "r.jsonl")
    results.append([{"index": 1, "prediction": "a"}, {"index": 0, "prediction": "b"}])
    with open(results.path, "a") as handle:
        handle.write('{"index": 2, "predic')  # a crash in the middle of a write
    assert [row["index"] for row in results.read()] == [1, 0]
    assert results.path.read_text().endswith("\n")
    results.rewrite_ordered(results.read())
    assert [row["index"] for row in results.read()] == [0, 1]
    results.append([{"index": 1, "prediction": "again"}])
    with pytest.raises(ResultsFileError, match="written twice"):
        results.read()


def test_evaluate_resumes_without_duplicates_and_reports_broken_audio(workspace, capsys):
    manifest = workspace / "eval.jsonl"
    full = workspace / "full.jsonl"
    assert evaluate(workspace, manifest, full, "--overwrite") == 0
    rows = read_rows(full)
    assert [row["index"] for row in rows] == list(range(len(ROWS)))
    broken = rows[3]
    assert broken["prediction"] is None and broken["correct"] is False
    assert broken["error"].startswith("AudioLoadError") and "3.wav" in broken["error"]
    assert all(row["prediction"] is not None for i, row in enumerate(rows) if i != 3)
    assert [row["kind"] for row in rows] == ["multiple_choice", "open", "caption", "multiple_choice", "caption",
                                             "open", "unlabelled"]
    summary = read_summary(full)
    assert summary["complete"] and summary["processes"] == 1 and summary["overall"]["errors"] == 1
    assert set(summary["tasks"]) == {"sounds", "captions", "unlabelled"}
    assert summary["tasks"]["captions"]["captions_scored"] == 2
    assert "per task:" in capsys.readouterr().err

    # Stopped after one batch, then a crash in the middle of the next write: the rerun completes exactly once.
    part = workspace / "part.jsonl"
    assert evaluate(workspace, manifest, part, "--overwrite", "--max-batches", "1") == 0
    first = read_rows(part)
    assert len(first) == 2 and read_summary(part)["complete"] is False
    with open(part, "a") as handle:
        handle.write(json.dumps(rows[0])[:25])
    assert evaluate(workspace, manifest, part) == 0
    resumed = read_rows(part)
    assert [row["index"] for row in resumed] == list(range(len(ROWS)))
    assert resumed == rows  # the same batches as the uninterrupted run, so the same predictions
    summary = read_summary(part)
    assert summary["complete"] and summary["generated"] == len(ROWS) - 2
    assert summary["tasks"] == read_summary(full)["tasks"]
    # A finished run has nothing left to do.
    assert evaluate(workspace, manifest, part) == 0
    assert read_rows(part) == rows and read_summary(part)["generated"] == 0

    # Two runs never write the same results file at once.
    holder = ResultsFile(part)
    holder.lock()
    try:
        assert evaluate(workspace, manifest, part) == 2
        assert "Another running evaluation" in capsys.readouterr().err
    finally:
        holder.unlock()

    # Results of other inputs are not resumed.
    other = workspace / "other.jsonl"
    other.write_text(json.dumps({"audio": "clips/0.wav", "prompt": "Something else?"}) + "\n")
    assert evaluate(workspace, other, part) == 2
    assert "other inputs" in capsys.readouterr().err


def test_dataset_inputs_give_the_manifest_predictions(workspace, capsys):
    from datasets import Audio, Dataset

    expected = workspace / "manifest.jsonl"
    assert evaluate(workspace, workspace / "eval.jsonl", expected, "--overwrite") == 0
    expected_rows = read_rows(expected)

    records = [{"audio": str(workspace / "clips" / f"{i}.wav"), "prompt": row["prompt"], "task": row["task"],
                "answer": row.get("answer"), "choices": row.get("choices"), "references": row.get("references")}
               for i, row in enumerate(ROWS)]
    dataset = Dataset.from_list(records).cast_column("audio", Audio())
    dataset.save_to_disk(str(workspace / "saved"))
    dataset.to_parquet(str(workspace / "eval.parquet"))
    folder = workspace / "audiofolder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as handle:
        for i, record in enumerate(records):
            shutil.copy(record["audio"], folder / f"{i}.wav")
            metadata = {key: value for key, value in record.items() if key != "audio"}
            handle.write(json.dumps({**metadata, "file_name": f"{i}.wav"}) + "\n")

    sources = [("saved", workspace / "saved"), ("parquet", workspace / "eval.parquet")]
    if importlib.util.find_spec("torchcodec") is not None:
        sources.append(("audiofolder", folder))
    else:  # datasets >= 4 encodes an audiofolder's files with torchcodec: without it, a clear error
        assert evaluate(workspace, folder, workspace / "audiofolder.jsonl") == 2
        assert "needs torchcodec" in capsys.readouterr().err
    for name, source in sources:
        output = workspace / f"{name}.jsonl"
        assert evaluate(workspace, source, output, "--overwrite") == 0, name
        got = read_rows(output)
        assert [r["prediction"] for r in got] == [r["prediction"] for r in expected_rows], name
        assert [r["kind"] for r in got] == [r["kind"] for r in expected_rows], name
        assert got[3]["error"].startswith("AudioLoadError"), name
        assert read_summary(output)["tasks"] == read_summary(expected)["tasks"], name


def test_evaluate_input_errors_exit_2(workspace, tmp_path, capsys):
    assert evaluate(workspace, tmp_path / "missing.jsonl", tmp_path / "o.jsonl") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "data.txt").write_text("hello")
    assert evaluate(workspace, tmp_path / "data.txt", tmp_path / "o.jsonl") == 2
    assert "not an input" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"audio": "a.wav", "prompt": "q", "choices": ["a", "b"]}) + "\n")
    assert evaluate(workspace, bad, tmp_path / "o.jsonl") == 2
    assert "multiple-choice row needs" in capsys.readouterr().err
    assert cli_main(["evaluate", str(workspace / "eval.jsonl"), "--model", str(tmp_path), "--output",
                     str(tmp_path / "o.jsonl")]) == 2
