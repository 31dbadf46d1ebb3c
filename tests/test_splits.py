"""Splits for every family (issue 32): ``#rows=a:b`` and ``data.eval_split`` (seeded, deterministic, no overlap),
and one error wording for a missing file."""

from __future__ import annotations

import json

import pytest

from tunelab.config import load_config, task_config
from tunelab.errors import DataError
from tunelab.tasks import TASKS
from tunelab.tasks.splits import read_examples, read_run_data


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# a few rows each family reads, in its own default layout
ROWS = {
    "chat": [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]} for i in range(10)],
    "classification": [{"text": f"good {i}", "label": "pos" if i % 2 else "neg"} for i in range(10)],
    "sentiment": [{"sentence": f"fine {i}", "label": i % 2} for i in range(10)],
    "paraphrase": [{"#1 String": f"a {i}", "#2 String": "b", "Quality": i % 2} for i in range(10)],
    "generation": [{"instruction": f"say {i}", "input": "", "output": "hello"} for i in range(10)],
    "ner": [{"tokens": ["John", "lives", str(i)], "tags": ["B-PER", "O", "O"]} for i in range(10)],
    "preference": [{"prompt": f"q {i}", "chosen": "good", "rejected": "bad"} for i in range(10)],
    "rl": [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(10)],
    "unpaired": [{"prompt": f"q {i}", "completion": "good" if i % 2 else "bad", "label": bool(i % 2)} for i in range(10)],
    "qa": [{"context": f"Mary lives in Paris {i}", "question": "who", "answers": ["Mary"], "title": f"t{i}"} for i in range(10)],
    "reasoning": [{"instruction": f"Tom had {i} apples", "input": "", "output": "", "answer": str(i)} for i in range(10)],
    "summarization": [{"dialogue": f"Tom: hi {i}", "summary": "Tom says hi"} for i in range(10)],
    "text": [{"text": f"some text {i}"} for i in range(10)],
}


def marker(ex) -> str:
    """What tells the rows apart, whatever the family made of them."""
    return json.dumps({k: v for k, v in dict(ex).items() if not k.startswith("_")}, sort_keys=True, default=str)


def test_every_family_is_covered():
    assert set(ROWS) == set(TASKS.names())


@pytest.mark.parametrize("name", sorted(ROWS))
def test_rows_selector_works_for_every_family(tmp_path, name):
    p = jsonl(tmp_path / "d.jsonl", ROWS[name])
    task, cfg = TASKS.get(name), task_config(name, {})
    every = [marker(e) for e in read_examples(task, str(p), cfg)]
    head = [marker(e) for e in read_examples(task, f"{p}#rows=0:8", cfg)]
    tail = [marker(e) for e in read_examples(task, f"{p}#rows=8:", cfg)]
    assert head == every[:8] and tail == every[8:]
    assert len(read_examples(task, f"{p}#rows=2:9", cfg, limit=3)) == 3


@pytest.mark.parametrize("name", sorted(ROWS))
def test_a_missing_file_reads_the_same_for_every_family(tmp_path, name):
    task, cfg = TASKS.get(name), task_config(name, {})
    for source in (tmp_path / "nope.jsonl", f"{tmp_path / 'nope.jsonl'}#rows=0:5"):
        with pytest.raises(DataError, match=rf"^{tmp_path / 'nope.jsonl'}: file not found$"):
            read_examples(task, str(source), cfg)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_eval_split_is_seeded_deterministic_and_disjoint(tmp_path, name):
    p = jsonl(tmp_path / "d.jsonl", ROWS[name])
    task, cfg = TASKS.get(name), task_config(name, {})

    def split(seed):
        data = load_config(None, [f"data.train={p}", "data.eval_split=0.3", f"data.split_seed={seed}"]).data
        train, evals = read_run_data(task, cfg, data)
        return [marker(e) for e in train], [marker(e) for e in evals]

    train, evals = split(0)
    every = [marker(e) for e in read_examples(task, str(p), cfg)]
    assert len(evals) == 3 and not set(train) & set(evals) and sorted(train + evals) == sorted(every)
    assert split(0) == (train, evals)  # deterministic
    assert train == [m for m in every if m in set(train)]  # file order kept
    assert any(split(s)[1] != evals for s in (1, 2, 3))  # the seed draws it


def test_eval_split_keeps_a_qa_articles_questions_together(tmp_path):
    rows = [{"context": f"Mary lives in Paris {a}", "question": f"q{q}", "answers": ["Mary"], "title": f"t{a}"}
            for a in range(6) for q in range(3)]
    p = jsonl(tmp_path / "d.jsonl", rows)
    data = load_config(None, [f"data.train={p}", "data.eval_split=0.3"]).data
    train, evals = read_run_data(TASKS.get("qa"), task_config("qa", {}), data)
    assert len(evals) == 6 and not {e["title"] for e in train} & {e["title"] for e in evals}


def test_eval_split_and_eval_file_are_one_or_the_other(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", ROWS["reasoning"])
    data = load_config(None, [f"data.train={p}", f"data.eval={p}", "data.eval_split=0.2"]).data
    with pytest.raises(ValueError, match="set one of them"):
        read_run_data(TASKS.get("reasoning"), task_config("reasoning", {}), data)
    with pytest.raises(ValueError, match="data.eval_split"):
        load_config(None, ["data.eval_split=1.5"])
