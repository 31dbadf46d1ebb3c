"""Readers: every format, where-tags, bad rows (raise naming file/line/field, or skip and count), real files."""

from __future__ import annotations

import json
import logging

import pytest

from tunelab.data import readers
from tunelab.data.readers import parse_hub_name, read_conll, read_records, read_squad
from tunelab.errors import DataError

from conftest import shared_data


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def test_jsonl_where_and_blank_lines(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"x": 1}\n\n{"x": 2}\n')
    recs = read_records(p)
    assert [r["x"] for r in recs] == [1, 2]
    assert [r["_where"] for r in recs] == [f"{p}:1", f"{p}:3"]


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"x": 1}\n{"x": \n{"x": 3}\n')
    with pytest.raises(DataError, match=rf"{p}:2: invalid JSON"):
        read_records(p)


def test_required_field_missing_and_empty(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n{"text": "  ", "label": 0}\n')
    with pytest.raises(DataError, match=rf"{p}:2: field 'label' is missing"):
        read_records(p, required=["text", "label"])
    with pytest.raises(DataError, match=rf"{p}:3: field 'text' is empty"):
        read_records(p, required=["text"])


def test_skip_bad_counts_reasons_and_logs(tmp_path, caplog):
    p = write(tmp_path, "a.jsonl", '{"t": "a", "y": 1}\nnot json\n{"t": "b"}\n{"t": "", "y": 2}\n[1]\n{"t": "c", "y": 0}\n')
    report = {}
    with caplog.at_level(logging.WARNING, logger="tunelab.data.readers"):
        recs = read_records(p, skip_bad=True, required=["t", "y"], report=report)
    assert [r["t"] for r in recs] == ["a", "c"]
    assert report == {"skipped": 4, "reasons": {"bad json": 1, "missing field 'y'": 1, "empty field 't'": 1,
                                                 "not an object": 1}}
    assert "skipped 4 bad rows" in caplog.text and f"{p}:2" in caplog.text


def test_empty_results_are_errors(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no records read: it holds no records"):
        read_records(write(tmp_path, "e.jsonl", "\n\n"))
    with pytest.raises(DataError, match="all 2 rows were bad"):
        read_records(write(tmp_path, "b.jsonl", "x\ny\n"), skip_bad=True)
    with pytest.raises(DataError, match="no records"):
        read_records(write(tmp_path, "h.csv", "a,b\n"))


def test_limit(tmp_path):
    p = write(tmp_path, "a.jsonl", "".join(json.dumps({"i": i}) + "\n" for i in range(10)))
    assert [r["i"] for r in read_records(p, limit=3)] == [0, 1, 2]


def test_json_array_where_index_and_bad_item(tmp_path):
    p = write(tmp_path, "a.json", json.dumps([{"q": "a"}, {"q": "b"}]))
    assert [r["_where"] for r in read_records(p)] == [f"{p}:[0]", f"{p}:[1]"]
    p2 = write(tmp_path, "b.json", json.dumps([{"q": "a"}, 5]))
    with pytest.raises(DataError, match=r"b.json:\[1\]: expected a JSON object"):
        read_records(p2)
    p3 = write(tmp_path, "c.json", '[{"q": "a"},\n {"q": }]')
    with pytest.raises(DataError, match=r"c.json:2: invalid JSON"):
        read_records(p3)


def test_json_that_is_really_jsonl(tmp_path):
    p = write(tmp_path, "a.json", '{"x": 1}\n{"x": 2}\n')
    assert [r["_where"] for r in read_records(p)] == [f"{p}:1", f"{p}:2"]


def test_csv_quoted_multiline_row_where_is_first_physical_line(tmp_path):
    p = write(tmp_path, "a.csv", 'text,label\n"two\nlines",1\nplain,0\n')
    recs = read_records(p)
    assert [(r["text"], r["label"], r["_where"]) for r in recs] == [
        ("two\nlines", "1", f"{p}:2"), ("plain", "0", f"{p}:4")]


def test_csv_wrong_column_count(tmp_path):
    p = write(tmp_path, "a.csv", "text,label\na,1\nb,1,extra\n")
    with pytest.raises(DataError, match=rf"{p}:3: expected 2 columns \['text', 'label'\], got 3"):
        read_records(p)
    report = {}
    assert len(read_records(p, skip_bad=True, report=report)) == 1
    assert report["reasons"] == {"column count": 1}


def test_mrpc_like_tsv_bom_and_bare_quotes(tmp_path):
    text = ('\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n'
            '1\t11\t12\tHe said " the witness " left .\t" The witness " left , he said .\n'
            '0\t21\t22\t"A quote\tclosing" later .\n')
    p = write(tmp_path, "dev.tsv", text)
    recs = read_records(p)
    assert list(recs[0])[:2] == ["Quality", "#1 ID"]  # BOM stripped from the first column name
    assert recs[0]["#2 String"] == '" The witness " left , he said .'
    assert recs[1]["#1 String"] == '"A quote' and recs[1]["#2 String"] == 'closing" later .'
    assert recs[1]["_where"] == f"{p}:3"
    # quote-aware reading merges the quoted tab: the column count is then wrong, and that is reported
    with pytest.raises(DataError, match="dev.tsv:3: expected 5 columns"):
        read_records(p, quoting="minimal")
    with pytest.raises(DataError, match="unknown quoting"):
        read_records(p, quoting="sometimes")


def test_conll_sentences_docstart_and_columns(tmp_path):
    text = ("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"
            "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n")
    p = write(tmp_path, "eng.testa", text)
    recs = read_records(p)
    assert recs == [{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"], "_where": f"{p}:3"},
                    {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"], "_where": f"{p}:7"}]
    pos = read_conll(p, token_col=0, tag_col=1)
    assert pos[0]["tags"] == ["NNP", "VBZ"]


def test_conll_short_line_rejects_sentence(tmp_path):
    p = write(tmp_path, "x.conll", "a B-X\nb\n\nc O\n")
    with pytest.raises(DataError, match=rf"{p}:2: expected at least 2 columns"):
        read_conll(p, tag_col=1)
    report = {}
    recs = read_conll(p, tag_col=1, skip_bad=True, report=report)
    assert [r["tokens"] for r in recs] == [["c"]] and report["skipped"] == 1


SQUAD = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
    {"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where is Paris?", "answers": [
            {"text": "France", "answer_start": 12}, {"text": "in France", "answer_start": 9}]},
        {"id": "q2", "question": "", "answers": []}]}]}]}


def test_squad_one_record_per_question(tmp_path):
    p = write(tmp_path, "dev-v1.1.json", json.dumps(SQUAD))
    report = {}
    recs = read_records(p, skip_bad=True, report=report)  # inferred from content: .json holding SQuAD
    assert report == {"skipped": 1, "reasons": {"missing field 'question'": 1}}
    assert recs == [{"id": "q1", "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
                     "answers": ["France", "in France"], "answer_starts": [12, 9],
                     "_where": f"{p}:data[0].paragraphs[0].qas[0]"}]
    with pytest.raises(DataError, match=r"qas\[1\]: field 'question' is missing or empty"):
        read_squad(p)
    ctx = recs[0]["context"]
    assert ctx[12:12 + len("France")] == "France"


def test_unknown_suffix_and_fmt(tmp_path):
    p = write(tmp_path, "a.xyz", "x")
    with pytest.raises(DataError, match="cannot infer the format from suffix '.xyz'"):
        read_records(p)
    with pytest.raises(DataError, match="unknown fmt 'parquet'"):
        read_records(p, fmt="parquet")
    q = write(tmp_path, "rows.data", "a|b\n1|2\n")
    assert read_records(q, fmt="csv", delimiter="|")[0] == {"a": "1", "b": "2", "_where": f"{q}:2"}


def test_hub_name_parsing():
    assert parse_hub_name("hf:HuggingFaceH4/no_robots:train") == ("HuggingFaceH4/no_robots", None, "train", None)
    assert parse_hub_name("hf:HuggingFaceH4/no_robots:test@v1.0") == ("HuggingFaceH4/no_robots", None, "test", "v1.0")
    assert parse_hub_name("hf:nyu-mll/glue:mrpc:validation@refs/pr/3") == ("nyu-mll/glue", "mrpc", "validation", "refs/pr/3")
    assert parse_hub_name("hf:owner/name@abc123") == ("owner/name", None, "train", "abc123")
    assert parse_hub_name("nyu-mll/glue", "test") == ("nyu-mll/glue", None, "test", None)
    assert parse_hub_name("hf:imdb") == ("imdb", None, "train", None)
    assert parse_hub_name("hf:nyu-mll/glue/mrpc:test") == ("nyu-mll/glue", "mrpc", "test", None)  # the older form
    with pytest.raises(DataError, match="conflicts"):
        parse_hub_name("hf:owner/name:train", "test")


@pytest.mark.parametrize("name, why", [
    ("hf:", "repository '' is not 'name' or 'owner/name'"),
    ("hf:a/b/c/d:train", "repository 'a/b/c/d'"),
    ("hf:owner//name", "repository 'owner//name'"),
    ("hf:owner/name:cfg:train:extra", "3 ':' parts after the repository"),
    ("hf:owner/name::train", "an empty or padded ':' part"),
    ("hf:owner/name:train@", "revision '' after '@'"),
    ("hf:owner/name@a@b", "revision 'a@b'"),
    ("hf:owner/name/cfg:other:train", "two configs: 'cfg' after '/' and 'other' after ':'"),
    ("hf:owner/na me", "repository 'owner/na me'"),
])
def test_malformed_hub_ids_are_refused(name, why):
    with pytest.raises(DataError) as e:
        parse_hub_name(name)
    assert str(e.value).startswith(f"{name}: malformed hub id ({why}") and "hf:owner/name[:config][:split][@revision]" in str(e.value)


def test_hub_dispatch_uses_load_dataset(monkeypatch, tmp_path):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"sentence": "good", "label": 1}, {"sentence": "", "label": 0}]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    report = {}
    recs = read_records("hf:nyu-mll/glue:sst2:validation", required=["sentence"], skip_bad=True, report=report)
    assert calls == [("nyu-mll/glue", "sst2", "validation")]
    assert recs == [{"sentence": "good", "label": 1, "_where": "hf:nyu-mll/glue:sst2:validation:[0]"}]
    assert report["skipped"] == 1
    read_records("HuggingFaceH4/no_robots", split="train")
    assert calls[-1] == ("HuggingFaceH4/no_robots", None, "train")

    def failing(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match=r"cannot load hub dataset 'HuggingFaceH4/no_robots' \(config None, split 'test', "
                       r"revision 'v1'\): ConnectionError"):
        read_records("hf:HuggingFaceH4/no_robots:test@v1")
    # a missing file that looks like a file path is a file error, not a hub lookup
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "nope" / "eng.testa")
    assert readers._is_hub_name("glue/sst2") and not readers._is_hub_name("./glue")


@pytest.mark.data
@pytest.mark.parametrize("rel,kwargs,count", [
    ("sst2/dev.tsv", {"required": ["sentence", "label"]}, 872),
    ("mrpc/dev.tsv", {"required": ["Quality", "#1 String", "#2 String"]}, 408),
    ("mrpc/train.tsv", {}, 3667),
    ("conll2003/eng.testa", {}, 3250),
    ("squad_v1.1/dev-v1.1.json", {}, 10570),
    ("samsum/val.json", {"required": ["dialogue", "summary"]}, 818),
    ("llm_adapters/gsm8k/test.json", {"required": ["instruction", "answer"]}, 1319),
    ("llm_adapters/boolq/test.json", {"required": ["instruction", "answer"]}, 3270),
    ("gsm8k/test.jsonl", {"required": ["question", "answer"]}, 1319),
])
def test_real_files_row_counts(rel, kwargs, count):
    recs = read_records(shared_data(*rel.split("/")), **kwargs)
    assert len(recs) == count
    if rel.startswith("conll2003"):
        assert sum(len(r["tokens"]) for r in recs) == 51362
    if rel.startswith("mrpc"):
        assert all(r["Quality"] in ("0", "1") for r in recs)
    if rel.startswith("squad"):
        assert all(r["context"][s:s + len(a)] == a for r in recs
                   for a, s in zip(r["answers"], r["answer_starts"], strict=True))


@pytest.mark.data
def test_real_samsum_train_has_one_empty_dialogue():
    report = {}
    recs = read_records(shared_data("samsum", "train.json"), required=["dialogue"], skip_bad=True, report=report)
    assert len(recs) == 14731 and report == {"skipped": 1, "reasons": {"empty field 'dialogue'": 1}}
