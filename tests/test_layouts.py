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

runner = CliRunner()


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_config(tmp_path, tiny_dir, task: dict, data: dict, **extra) -> dict:
    """Write a config YAML (data paths relative to it), run `tunelab train` on it, return metrics.json."""
    cfg = {"model": str(tiny_dir), "method": {"name": "lora", "r": 2}, "task": {"chat": False, **task},
           "data": {"max_length": 64, **data},
           "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "progress": False, "precision": "fp32", "threads": 1},
           "eval": {"max_new_tokens": 3, **extra.pop("eval", {})}, "output_dir": str(tmp_path / "run"), **extra}
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


def test_closed_book_qa_trains_and_scores_best_match_over_the_answers(tmp_path, tiny_dir, monkeypatch):
    jsonl(tmp_path / "train.jsonl", NQ_OPEN)
    jsonl(tmp_path / "dev.jsonl", NQ_OPEN)
    import tunelab.tasks.qa as qa_mod

    # the model says "the city of Paris" / "Mary Smith" (SQuAD-normalised: articles and case dropped)
    said = iter(["The City of Paris", "mary smith", "nobody", "Tom"])
    monkeypatch.setattr(qa_mod, "generate", lambda model, tok, prompts, **k: [next(said) for _ in prompts])
    dev = [NQ_OPEN[3], NQ_OPEN[0], NQ_OPEN[1], NQ_OPEN[2]]
    jsonl(tmp_path / "dev.jsonl", dev)
    m = train_config(tmp_path, tiny_dir, {"name": "qa", "layout": "nq_open"}, {"train": "train.jsonl", "eval": "dev.jsonl"})
    assert m["metrics"]["exact_match"] == 0.75 and m["metrics"]["n"] == 4


# ---------------------------------------------------------------- multiple choice with a choices dict (CSQA)
CSQA = [{"id": f"q{i}", "question": q, "question_concept": "cup",
         "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["the cupboard", "the floor", "the car", "a tree", "Paris"]},
         "answerKey": k} for i, (q, k) in enumerate([("where do you put a clean cup", "A"), ("what is the capital", "E"),
                                                      ("where does the dog sat", "B"), ("where is the mat", "B")])]


def test_csqa_rows_train_and_score_each_choice_label(tmp_path, tiny_dir):
    jsonl(tmp_path / "train_rand_split.jsonl", CSQA)
    jsonl(tmp_path / "dev_rand_split.jsonl", CSQA[:3])
    m = train_config(tmp_path, tiny_dir, {"name": "reasoning", "layout": "csqa"},
                     {"train": "train_rand_split.jsonl", "eval": "dev_rand_split.jsonl"})["metrics"]
    assert m["n"] == 3 and 0 <= m["accuracy"] <= 1 and "tied_predictions" in m
    preds = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in preds] == ["A", "E", "B"]
    assert all(set(p["output"]) == {"A", "B", "C", "D", "E"} for p in preds)  # every label scored
    from tunelab.config import task_config
    from tunelab.tasks.splits import read_examples

    r, cfg = TASKS.get("reasoning"), task_config("reasoning", {"layout": "csqa", "chat": False})
    ex = read_examples(r, str(tmp_path / "dev_rand_split.jsonl"), cfg)[1]
    assert r.prompt(ex, None, cfg) == "what is the capital\n\nA. the cupboard\nB. the floor\nC. the car\nD. a tree\nE. Paris"
    assert r.target(ex, cfg) == "the correct answer is E"


@pytest.mark.parametrize("name", sorted(__import__("tunelab.data.layouts", fromlist=["LAYOUTS"]).LAYOUTS))
def test_every_layouts_example_row_reads(tmp_path, name):
    """The example row of each layout (the one docs/data.md and `tunelab tasks NAME` show) reads as that layout."""
    from tunelab.config import task_config
    from tunelab.data.layouts import LAYOUTS
    from tunelab.tasks.splits import read_examples

    lay = LAYOUTS[name]
    family = lay.families[0]
    cfg = task_config(family, {"layout": name})
    (ex,) = read_examples(TASKS.get(family), str(jsonl(tmp_path / "d.jsonl", [lay.example])), cfg)
    if family == "reasoning":
        assert ex["kind"] == "choice" and ex["answer"] in ex["choices"]
    elif family == "qa":
        assert ex["answers"] and ex["question"]
    elif family == "summarization":
        assert ex["summary"] and ex["references"][0] == ex["summary"]
    elif family == "ner":
        assert len(ex["tags"]) == len(ex["tokens"]) and set(ex["tags"]) <= set(cfg.labels)
    elif family == "classification":
        assert TASKS.get(family).label_id(ex, cfg.labels) in range(len(cfg.labels))


def test_multiple_choice_in_each_hub_shape():
    from tunelab.data.layouts import LAYOUTS

    r = TASKS.get("reasoning")
    got = {}
    for name in ("hellaswag", "piqa", "mmlu", "openbookqa", "arc"):
        from tunelab.data.layouts import transform

        rec = transform("reasoning", name, {})(dict(LAYOUTS[name].example), "x:1")
        ex = r._example({**rec, "_where": "x:1"}, r.Config(), "instruction", "input", "output", "answer")
        got[name] = (ex["choices"], ex["answer"])
    assert got["hellaswag"] == (["A", "B", "C", "D"], "A")  # label "0": an index
    assert got["piqa"] == (["A", "B"], "A")  # sol1/sol2 collected, label 0
    assert got["mmlu"] == (["A", "B", "C", "D"], "B")  # answer 1: an index
    assert got["openbookqa"][1] == "A" and got["arc"] == (["A", "B"], "B")


def test_a_layout_that_does_not_fit_names_the_columns_and_the_layouts_that_would(tmp_path):
    from tunelab.config import task_config
    from tunelab.tasks.splits import read_examples

    p = jsonl(tmp_path / "d.jsonl", [{"goal": "Dry shoes", "sol1": "paper", "sol2": "water", "label": 0}])
    with pytest.raises(DataError, match=r"d.jsonl:1: the row does not have csqa's column\(s\) \['question', 'choices', 'answerKey'\] "
                                         r"\(present: \['goal', 'label', 'sol1', 'sol2'\]\); layouts that fit these columns: piqa"):
        read_examples(TASKS.get("reasoning"), str(p), task_config("reasoning", {"layout": "csqa"}))
    # without a layout, the family's own "missing field" error points at the layouts that fit
    with pytest.raises(DataError, match="these columns fit task.layout: piqa"):
        read_examples(TASKS.get("reasoning"), str(p), task_config("reasoning", {}))
    with pytest.raises(ValueError, match="task.layout='piqa' is not a layout of task 'qa'.*its layouts: nq_open"):
        task_config("qa", {"layout": "piqa"})


# ---------------------------------------------------------------- multi-reference summaries (DialogSum)
def test_dialogsum_test_file_scores_against_all_three_references(tmp_path, tiny_dir, monkeypatch):
    train = [{"id": f"train_{i}", "dialogue": "#Person1#: hi\n#Person2#: hello", "summary": "they say hello",
              "topic": "greeting"} for i in range(4)]
    test = [{"id": f"test_{i}", "dialogue": "#Person1#: hi\n#Person2#: bye", "summary1": "Tom says hi",
             "summary2": f"Mary says bye {i}", "summary3": "they part", "topic1": "t", "topic2": "t", "topic3": "t"}
            for i in range(3)]
    jsonl(tmp_path / "dialogsum.train.jsonl", train)
    jsonl(tmp_path / "dialogsum.test.jsonl", test)
    import tunelab.tasks.summarization as summ

    # the model writes each row's second reference: only scoring against every reference gives ROUGE 1
    monkeypatch.setattr(summ, "generate", lambda model, tok, prompts, **k: [f"Mary says bye {i}" for i in range(len(prompts))])
    m = train_config(tmp_path, tiny_dir, {"name": "summarization", "layout": "dialogsum"},
                     {"train": "dialogsum.train.jsonl", "eval": "dialogsum.test.jsonl"})["metrics"]
    assert m["n"] == 3 and m["rouge1"] == pytest.approx(1.0) and m["rougeL"] == pytest.approx(1.0)


def test_multi_reference_rouge_and_bleu():
    from tunelab.evaluation.metrics import bleu, rouge

    refs = [["the cat sat on the mat", "a dog runs"], ["hello there"]]
    assert rouge(["a dog runs", "hello there"], refs)["rouge1"] == pytest.approx(1.0)
    assert rouge(["a dog runs", "hello there"], [r[0] for r in refs])["rouge1"] < 1.0
    assert bleu(["a dog runs fast today", "hello there my friend"], [["a dog runs fast today", "x"], ["hello there my friend"]]) \
        == pytest.approx(100.0)
    assert bleu(["a dog runs fast today", "hello there my friend"], ["x y z", "hello there my friend"]) < 100.0


def test_fields_eval_maps_the_eval_files_own_columns(tmp_path, tiny_dir):
    jsonl(tmp_path / "train.jsonl", [{"dialogue": "Tom: hi", "summary": "Tom says hi"}] * 4)
    jsonl(tmp_path / "eval.jsonl", [{"text": "Tom: hi", "gold": "Tom says hi"}] * 2)
    m = train_config(tmp_path, tiny_dir, {"name": "summarization", "fields_eval": {"dialogue": "text", "summary": "gold"}},
                     {"train": "train.jsonl", "eval": "eval.jsonl"})["metrics"]
    assert m["n"] == 2


# ---------------------------------------------------------------- CoNLL variants (WNUT-17 .annotated, CoNLL-2003)
WNUT = "@paul\tO\nlives\tO\nin\tO\nParis\tB-location\n\nJohn\tB-person\nSmith\tI-person\nhas\tO\na\tO\ncat\tO\n\n"
CONLL03 = ("-DOCSTART- -X- -X- O\n\nJohn NNP B-NP B-PER\nSmith NNP I-NP I-PER\nlives VBZ B-VP O\nin IN B-PP O\n"
           "Paris NNP B-NP B-LOC\n\n")


def test_wnut17_annotated_files_train_and_score(tmp_path, tiny_dir):
    (tmp_path / "wnut17train.conll").write_text(WNUT * 2)
    (tmp_path / "emerging.test.annotated").write_text(WNUT)
    m = train_config(tmp_path, tiny_dir, {"name": "ner"}, {"train": "wnut17train.conll", "eval": "emerging.test.annotated"})
    assert m["metrics"]["n"] == 2 and "f1" in m["metrics"]


def test_conll_variants_read_alike(tmp_path):
    ner = TASKS.get("ner")
    cfg = ner.Config()
    (tmp_path / "eng.testa").write_text(CONLL03)  # four space-separated columns, -DOCSTART-
    (tmp_path / "wnut.annotated").write_text(WNUT)  # two tab-separated columns, WNUT's suffix
    (tmp_path / "noext").write_text(WNUT)  # no suffix: the content says CoNLL
    a = ner.read(str(tmp_path / "eng.testa"), cfg)
    assert a[0]["tags"] == ["B-PER", "I-PER", "O", "O", "B-LOC"]
    assert ner.read(str(tmp_path / "wnut.annotated"), cfg)[0]["tags"] == ["O", "O", "O", "B-location"]
    assert ner.read(str(tmp_path / "noext"), cfg)[1]["tokens"] == ["John", "Smith", "has", "a", "cat"]
    from tunelab.config import task_config
    from tunelab.tasks.splits import read_examples

    hub = jsonl(tmp_path / "conll2003.jsonl", [{"id": "0", "tokens": ["John", "lives", "in", "Paris"], "ner_tags": [1, 0, 0, 5],
                                                 "pos_tags": [1, 2, 3, 1], "chunk_tags": [0, 0, 0, 0]}])
    (ex,) = read_examples(ner, str(hub), task_config("ner", {"layout": "conll2003"}))
    assert ex["tags"] == ["B-PER", "O", "O", "B-LOC"]


def test_unknown_suffix_error_names_the_config_key(tmp_path):
    (tmp_path / "data.xyz").write_text('{"tokens": ["a"], "tags": ["O"]}\n')
    with pytest.raises(DataError) as e:
        TASKS.get("ner").read(str(tmp_path / "data.xyz"), TASKS.get("ner").Config())
    assert "fmt=" not in str(e.value)
    from tunelab.data.readers import infer_format

    with pytest.raises(DataError, match="or set task.format: conll"):
        infer_format(tmp_path / "data.xyz", "task.format: conll (token columns) or records")


# ---------------------------------------------------------------- a CSV sentiment set (IMDB as a Kaggle CSV)
def test_imdb_csv_trains_with_a_held_out_share(tmp_path, tiny_dir):
    with open(tmp_path / "IMDB Dataset.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for i in range(10):
            w.writerow([f"A fine film, {i}.<br /><br />Truly." if i % 2 else f"Dull, {i}.", "positive" if i % 2 else "negative"])
    m = train_config(tmp_path, tiny_dir, {"name": "sentiment", "layout": "imdb_csv"},
                     {"train": "IMDB Dataset.csv", "eval_split": 0.3})
    assert m["metrics"]["n"] == 3 and "accuracy" in m["metrics"] and "tied_predictions" in m["metrics"]
    assert m["run"]["data_rows"] == 7  # the held-out rows are not trained on


# ---------------------------------------------------------------- tunelab tasks NAME
@pytest.mark.parametrize("name", sorted(TASKS.names()))
def test_tasks_name_prints_settings_formulations_layouts_and_an_example_row(name):
    res = runner.invoke(app, ["tasks", name])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "task.formulation:" in out and "Formulations (task.formulation): lm" in out
    assert "Data layouts (task.layout: NAME):" in out and "Example row" in out
    example = json.loads(out.split("Example row (no layout needed):\n", 1)[1].strip().splitlines()[0])
    assert example  # an example row, as JSON
    if name == "reasoning":
        assert "task.kind: 'auto'   (one of auto, number, letter, choice)" in out and "csqa:" in out and "piqa:" in out
    if name == "qa":
        assert "Formulations (task.formulation): lm, head, seq2seq" in out and "nq_open:" in out


def test_tasks_lists_families_and_refuses_unknown_names():
    res = runner.invoke(app, ["tasks"])
    assert res.exit_code == 0 and "reasoning" in res.output and "tunelab tasks NAME" in res.output
    res = runner.invoke(app, ["tasks", "reasonin"])
    assert res.exit_code != 0 and "did you mean 'reasoning'" in res.output


@pytest.mark.parametrize("name", sorted(TASKS.names()))
def test_each_familys_example_row_reads(tmp_path, name):
    from tunelab.config import task_config
    from tunelab.data.layouts import DEFAULT_ROWS
    from tunelab.tasks.splits import read_examples

    ex = read_examples(TASKS.get(name), str(jsonl(tmp_path / "d.jsonl", [DEFAULT_ROWS[name]])), task_config(name, {}))
    assert len(ex) == 1


def test_docs_list_every_layout_with_its_example_row():
    from pathlib import Path

    from tunelab.data.layouts import LAYOUTS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    for lay in LAYOUTS.values():
        assert f"| `{lay.name}` |" in doc and f"`{json.dumps(lay.example)}`" in doc, lay.name


def test_nli_pairs_with_label_ids_train_through_a_layout(tmp_path, tiny_dir):
    rows = [{"premise": "the cat sat", "hypothesis": h, "label": y} for h, y in
            (("a cat sat", 0), ("the dog sat", 2), ("a cat is", 1), ("no cat", -1))] * 2  # -1: no gold label (dropped)
    jsonl(tmp_path / "snli_1.0_train.jsonl", rows)
    jsonl(tmp_path / "snli_1.0_dev.jsonl", rows)
    m = train_config(tmp_path, tiny_dir, {"name": "classification", "layout": "snli"},
                     {"train": "snli_1.0_train.jsonl", "eval": "snli_1.0_dev.jsonl"})["metrics"]
    assert m["n"] == 6 and "macro_f1" in m
    preds = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert {p["reference"] for p in preds} == {"entailment", "neutral", "contradiction"}


def test_table_families_take_no_layout():
    from tunelab.config import task_config

    with pytest.raises(ValueError, match="task 'chat' reads its data as an Arrow table"):
        task_config("chat", {"layout": {"messages": "dialog"}})


@pytest.mark.data
def test_shared_sst2_reads_through_its_layout_with_a_held_out_share():
    from tunelab.config import load_config, task_config
    from tunelab.tasks.splits import read_run_data

    from conftest import shared_data

    path = shared_data("sst2", "dev.tsv")
    data = load_config(None, [f"data.train={path}", "data.eval_split=0.1", "data.split_seed=3"]).data
    cfg = task_config("classification", {"layout": "sst2", "quoting": "none"})
    assert cfg.labels == ["negative", "positive"]
    train, evals = read_run_data(TASKS.get("classification"), cfg, data)
    assert (len(train), len(evals)) == (784, 88)  # 872 rows, a tenth held out
    assert not {e["_where"] for e in train} & {e["_where"] for e in evals}
