"""tunelab predict on prompts alone: predictions JSONL without references (metrics skipped), the same
command with references still scores, training data still needs its targets, bad rows are named."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from test_chat_cli import make_run
from tunelab.cli import app
from tunelab.errors import DataError
from tunelab.evaluation.scoring import generate
from tunelab.tasks import TASKS
from tunelab.tasks.base import targets_optional

from conftest import tiny_llama

runner = CliRunner()
GEN, SUM = TASKS.get("generation"), TASKS.get("summarization")


def rows(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_predict_prompts_alone_jsonl_and_csv(tmp_path):
    run, model, tok = make_run(tmp_path, "lora", {"r": 2})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "hello"}\n{"instruction": "the cat sat", "input": "on the mat"}\n')
    out = tmp_path / "preds.jsonl"
    res = runner.invoke(app, ["predict", str(run), "--input", str(prompts), "-o", str(out), "eval.max_new_tokens=5"])
    assert res.exit_code == 0, res.output
    assert "2 of 2 examples have no reference: no metrics" in res.output and "rougeL" not in res.output
    got = rows(out)
    assert [g["input"] for g in got] == ["hello", "the cat sat\n\non the mat"] and all("reference" not in g for g in got)
    cfg = GEN.Config()
    want = generate(model, tok, [GEN.prompt({"instruction": "hello", "input": ""}, tok, cfg),
                                 GEN.prompt({"instruction": "the cat sat", "input": "on the mat"}, tok, cfg)],
                    max_new_tokens=5)
    assert [g["prediction"] for g in got] == want and got[0]["where"].endswith("prompts.jsonl:1")
    # A CSV with its own column name, mapped with task.fields.
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\nhello\n")
    res = runner.invoke(app, ["predict", str(run), "-i", str(csv), "-o", str(out), "eval.max_new_tokens=5",
                              "task.fields={instruction: prompt}"])
    assert res.exit_code == 0, res.output
    assert [g["prediction"] for g in rows(out)] == want[:1]
    # With references the same command still scores them.
    refs = tmp_path / "refs.jsonl"
    refs.write_text('{"instruction": "hello", "output": "hi"}\n')
    res = runner.invoke(app, ["predict", str(run), "-i", str(refs), "-o", str(out), "eval.max_new_tokens=5"])
    assert res.exit_code == 0 and '"rougeL"' in res.output and '"eval_loss"' in res.output, res.output
    assert rows(out)[0]["reference"] == "hi"


def test_predict_bad_prompt_files_name_the_row(tmp_path):
    run, _, _ = make_run(tmp_path, "lora", {"r": 2})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hello"}\n{"question": "what"}\n')
    res = runner.invoke(app, ["predict", str(run), "-i", str(bad), "-o", str(tmp_path / "p.jsonl")])
    assert res.exit_code == 2 and "bad.jsonl:2: field 'instruction' is missing" in res.output, res.output
    assert "Traceback" not in res.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"instruction": ""}\n')
    res = runner.invoke(app, ["predict", str(run), "-i", str(empty), "-o", str(tmp_path / "p.jsonl")])
    assert res.exit_code == 2 and "no records with 'instruction' filled" in res.output, res.output


def test_targets_stay_required_outside_predict_and_summarization_predicts(tmp_path, tiny_tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text('{"instruction": "hello"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'output' is missing"):
        GEN.read(str(path), GEN.Config(), limit=None, skip_bad=False)
    path.write_text('{"dialogue": "John : hello"}\n{"dialogue": "Mary : hi", "summary": "Mary says hi"}\n')
    with pytest.raises(DataError, match="field 'summary' is missing"):
        SUM.read(str(path), SUM.Config(), limit=None, skip_bad=False)
    with targets_optional():
        ex = SUM.read(str(path), SUM.Config(chat=False), limit=None, skip_bad=False)
    assert [e["summary"] for e in ex] == ["", "Mary says hi"]
    metrics, preds = SUM.evaluate(tiny_llama(), tiny_tokenizer, ex, SUM.Config(chat=False), batch_size=2,
                                  gen={"max_new_tokens": 3})
    assert metrics == {"n": 2, "without_reference": 1}
    assert "reference" not in preds[0] and preds[1]["reference"] == "Mary says hi"
