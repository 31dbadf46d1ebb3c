"""Public data layouts read as they come (issue 32): a few rows written here in each set's exact layout,
trained (tiny model, two steps) and scored through a config file alone, with no converter."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import DataError
from tunelab.tasks import TASKS

from conftest import tiny_llama, tiny_tokenizer_obj

runner = CliRunner()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(d)
    tiny_tokenizer_obj().save_pretrained(d)
    return d


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_config(tmp_path, llama_dir, task: dict, data: dict, **extra) -> dict:
    """Write a config YAML (data paths relative to it), run `tunelab train` on it, return metrics.json."""
    cfg = {"model": str(llama_dir), "method": {"name": "lora", "r": 2}, "task": {"chat": False, **task},
           "data": {"max_length": 64, **data},
           "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "progress": False, "precision": "fp32", "threads": 1},
           "eval": {"max_new_tokens": 3, **extra.pop("eval", {})}, "output_dir": "run", **extra}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["train", str(tmp_path / "run.yaml")])
    assert res.exit_code == 0, res.output
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


# ---------------------------------------------------------------- closed-book QA (NQ-Open, TriviaQA)
NQ_OPEN = [{"question": "who lives in Paris", "answer": ["Mary", "Mary Smith"]},
           {"question": "where does Tom live", "answer": ["Berlin"]},
           {"question": "who has a cat", "answer": ["Tom"]},
           {"question": "what is the capital", "answer": ["Paris", "the city of Paris"]}]


def test_closed_book_qa_reads_question_and_answer_list(tmp_path):
    """The regression of issue 32: NQ-Open rows (no context) read as qa, every answer kept as a reference."""
    qa = TASKS.get("qa")
    cfg = qa.Config(fields={"answers": "answer"})
    rows = qa.read(str(jsonl(tmp_path / "nq.jsonl", NQ_OPEN)), cfg)
    assert [r["answers"] for r in rows] == [r["answer"] for r in NQ_OPEN]
    assert all(r["context"] == "" for r in rows)
    prompt = qa.prompt(rows[0], None, cfg)
    assert "Context" not in prompt and "who lives in Paris" in prompt
    with pytest.raises(DataError, match="task.formulation: lm"):  # extractive needs a context: the error says so
        qa.read(str(tmp_path / "nq.jsonl"), qa.Config(fields={"answers": "answer"}, formulation="head"))


def test_closed_book_qa_trains_and_scores_best_match_over_the_answers(tmp_path, llama_dir, monkeypatch):
    jsonl(tmp_path / "train.jsonl", NQ_OPEN)
    jsonl(tmp_path / "dev.jsonl", NQ_OPEN)
    import tunelab.tasks.qa as qa_mod

    # the model says "the city of Paris" / "Mary Smith" (SQuAD-normalised: articles and case dropped)
    said = iter(["The City of Paris", "mary smith", "nobody", "Tom"])
    monkeypatch.setattr(qa_mod, "generate", lambda model, tok, prompts, **k: [next(said) for _ in prompts])
    dev = [NQ_OPEN[3], NQ_OPEN[0], NQ_OPEN[1], NQ_OPEN[2]]
    jsonl(tmp_path / "dev.jsonl", dev)
    m = train_config(tmp_path, llama_dir, {"name": "qa", "layout": "nq_open"}, {"train": "train.jsonl", "eval": "dev.jsonl"})
    assert m["metrics"]["exact_match"] == 0.75 and m["metrics"]["n"] == 4
