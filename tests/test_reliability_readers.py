"""Strict readers: every bad value is an error naming file:line:field (or a counted skip with skip_bad);
nothing becomes the text "None"."""

import json

import pytest

from tunelab.config import task_config
from tunelab.data.readers import read_conll, read_records
from tunelab.errors import DataError
from tunelab.tasks import TASKS


def write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    return p


def jsonl(tmp_path, rows, name="d.jsonl"):
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


def read(task, path, skip_bad=False, **params):
    return TASKS.get(task).read(str(path), task_config(task, params), limit=None, skip_bad=skip_bad)


@pytest.mark.parametrize("value, kind", [(None, "null"), (["a", "b"], "a list"), (float("nan"), "NaN"), (7, "int 7")])
def test_non_text_in_a_text_field_names_file_line_field(tmp_path, value, kind):
    p = jsonl(tmp_path, [{"sentence": "good", "label": 1}, {"sentence": value, "label": 0}])
    with pytest.raises(DataError) as e:
        read("sentiment", p)
    assert f"{p}:2: field 'sentence'" in str(e.value) and kind in str(e.value)
    assert [ex["text"] for ex in read("sentiment", p, skip_bad=True)] == ["good"]  # never "None"


@pytest.mark.parametrize("task, row, field", [
    ("summarization", {"dialogue": None, "summary": "s"}, "dialogue"),
    ("generation", {"instruction": "say hi", "output": ["hi", 3]}, "output"),  # a list of references: texts only
    ("qa", {"context": "Paris is big", "question": 3, "answers": ["Paris"]}, "question"),
    ("reasoning", {"instruction": None, "answer": "3"}, "instruction"),
])
def test_every_family_refuses_non_text(tmp_path, task, row, field):
    p = jsonl(tmp_path, [row])
    with pytest.raises(DataError, match=rf"{p}:1: field '{field}' must be text"):
        read(task, p)


def test_bad_label_values(tmp_path):
    p = jsonl(tmp_path, [{"sentence": "a", "label": [1]}])
    with pytest.raises(DataError, match=rf"{p}:1: field 'label' must be a class name"):
        read("sentiment", p)
    p = jsonl(tmp_path, [{"sentence": "a", "label": float("nan")}], "n.jsonl")
    with pytest.raises(DataError, match=rf"{p}:1: field 'label' is NaN"):
        read("sentiment", p)


def test_duplicate_csv_header_is_an_error(tmp_path):
    p = write(tmp_path, "d.csv", "sentence,label,sentence\na,1,b\n")
    with pytest.raises(DataError, match=rf"{p}:1: duplicate column name\(s\) \['sentence'\]"):
        read_records(p)


def test_conll_wrong_column_count_and_bad_tags_name_the_line(tmp_path):
    p = write(tmp_path, "x.conll", "EU NNP B-ORG\nrejects VBZ O\n\nPeter B-PER\n")
    with pytest.raises(DataError, match=rf"{p}:4: expected 3 columns"):
        read("ner", p)
    p = write(tmp_path, "y.conll", "EU B-ORG\nrejects X\n")
    with pytest.raises(DataError, match=rf"{p}:2: tag 'X' .* is not O, B-TYPE or I-TYPE"):
        read("ner", p)
    assert read_conll(p, tag_col=-1)[0]["tags"] == ["B-ORG", "X"]  # a generic column reader still reads it


@pytest.mark.parametrize("name, body", [
    ("d.jsonl", b'{"sentence": "a", "label": 1}\n{"sentence": "caf\xe9", "label": 0}\n{"sentence": "b", "label": 0}\n'),
    ("d.csv", b"sentence,label\na,1\ncaf\xe9,0\nb,0\n"),
])
def test_non_utf8_names_file_and_line_and_skip_bad_skips_it(tmp_path, name, body):
    p = write(tmp_path, name, body)
    line = 2 if name.endswith("jsonl") else 3
    with pytest.raises(DataError, match=rf"{p}:{line}: not valid UTF-8"):
        read("sentiment", p)
    report = {}
    recs = read_records(p, skip_bad=True, report=report)
    assert [r["sentence"] for r in recs] == ["a", "b"] and report["reasons"] == {"not UTF-8": 1}
    assert recs[1]["_where"] == f"{p}:{line + 1}"  # line numbers stay the file's


def test_non_utf8_json_names_the_line(tmp_path):
    p = write(tmp_path, "d.json", b'[\n{"sentence": "a", "label": 1},\n{"sentence": "caf\xe9", "label": 0}\n]')
    with pytest.raises(DataError, match=rf"{p}:3: not valid UTF-8"):
        read("sentiment", p)


@pytest.mark.parametrize("formulation", ["lm", "head"])
def test_squad_answer_start_checked_in_every_formulation(tmp_path, formulation):
    squad = {"data": [{"title": "T", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where?", "answers": [{"text": "France", "answer_start": 3}]}]}]}]}
    p = write(tmp_path, "s.json", json.dumps(squad))
    with pytest.raises(DataError, match=r"answer 'France' is not at character 3"):
        read("qa", p, formulation=formulation)
    p = jsonl(tmp_path, [{"context": "Paris is in France.", "question": "Where?", "answers": ["Spain"]}])
    with pytest.raises(DataError, match=r"answer 'Spain' does not occur in the context .*closed-book"):
        read("qa", p, formulation=formulation)


def test_long_rows_are_cut_in_the_document_never_the_instruction_or_header(tmp_path):
    from conftest import tiny_tokenizer_obj

    tok = tiny_tokenizer_obj()
    task = TASKS.get("summarization")
    cfg = task_config("summarization", {"chat": False, "template": "Summarize the dialogue : {dialogue} Summary :"})
    ex = {"id": "1", "dialogue": " ".join(["Tom : hi Mary"] * 40), "summary": "Tom says hi", "_where": "x:1"}
    f = task.encode(ex, tok, cfg, 40)
    assert f["truncated"] and len(f["input_ids"]) <= 40
    text = tok.decode(f["input_ids"][: f["prompt_len"]])
    assert text.startswith("Summarize the dialogue : Tom : hi Mary") and text.endswith("Summary :")
    assert tok.decode([t for t in f["labels"] if t >= 0]).startswith("Tom says hi")
    short = task.encode({**ex, "dialogue": "Tom : hi"}, tok, cfg, 40)
    assert "truncated" not in short


def test_truncated_rows_are_counted_in_the_run_facts(tmp_path):
    import json as _json

    import tunelab.training.loop as train_mod
    from tunelab.config import load_config

    from conftest import tiny_llama, tiny_tokenizer_obj

    model = tmp_path / "m"
    tiny_llama().save_pretrained(model)
    tiny_tokenizer_obj().save_pretrained(model)
    rows = [{"sentence": ("the cat sat on the mat . " * (12 if i % 2 else 1)).strip(), "label": i % 2} for i in range(8)]
    d = tmp_path / "d.jsonl"
    d.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    rec = train_mod.run(load_config(None, [
        f"model.name={model}", "method.name=full", "task.name=sentiment", "task.chat=false", 'task.labels=["no", "yes"]',
        "task.template=Is it good ? {text} Answer :", f"data.train={d}", "data.max_length=24", "train.max_steps=1",
        "train.progress=false", "eval.loss=false", f"output_dir={tmp_path / 'run'}"]))
    assert rec["run"]["truncated_rows"] == 4


# ---------------------------------------------------------------- Parquet / Arrow: read exactly or refuse
def parquet(tmp_path, columns, name="d.parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("values, kind", [([["a", "b"], ["c"]], 'a list (["a", "b"])'), ([0, 1], "int 0")])
def test_parquet_non_text_in_a_text_field_is_refused(tmp_path, values, kind):
    p = parquet(tmp_path, {"sentence": values, "label": [1, 0]})
    with pytest.raises(DataError) as e:
        read("sentiment", p)  # never the text "['a', 'b']" or "0"
    assert str(e.value) == f"{p} row 1: field 'sentence' must be text, got {kind}"
    p = parquet(tmp_path, {"text": values}, "t.parquet")
    with pytest.raises(DataError, match=rf"t.parquet row 1: field 'text' must be text, got {kind[:5]}.*\(the column's Arrow type is"):
        read("text", p)


def test_table_bad_row_names_its_own_row_and_field(tmp_path):
    p = parquet(tmp_path, {"text": ["a", "b", "c", "d", None]})
    with pytest.raises(DataError) as e:
        read("text", p)
    assert str(e.value) == f"{p} row 5: field 'text' is missing or null, expected text"
    assert len(read("text", p, skip_bad=True)) == 5  # dropped and counted when encoded
    j = jsonl(tmp_path, [{"text": t} for t in ["a", "b", "c", "d", 5]], "t.jsonl")
    with pytest.raises(DataError) as e:
        read("text", j)
    assert str(e.value) == f"{j} row 5: field 'text' must be text, got int 5"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    c = parquet(tmp_path, {"messages": [conv, conv, None]}, "c.parquet")
    with pytest.raises(DataError) as e:
        read("chat", c)
    assert str(e.value) == f"{c} row 3: field 'messages' is missing or null, expected a list of turns"


def test_unreadable_parquet_and_arrow_files_name_the_file(tmp_path):
    import pyarrow as pa

    from tunelab.data.readers import load_table

    good = parquet(tmp_path, {"text": [f"row {i}" for i in range(50)]})
    cases = {"cut.parquet": (good.read_bytes()[:200], "not a readable Parquet file (corrupt, truncated or not Parquet)"),
             "junk.parquet": (b"PAR1 these are not parquet pages PAR1", "not a readable Parquet file"),
             "text.arrow": (b"just some text, no Arrow at all", "not a readable Arrow file")}
    schema = pa.schema([("text", pa.string())])
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        w.write_table(pa.table({"text": [f"row {i}" for i in range(50)]}))
    cases["cut.arrow"] = ((tmp_path / "f.arrow").read_bytes()[:300], "not a readable Arrow file")
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError) as e:
            load_table(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: {msg}"), str(e.value)
    empty = parquet(tmp_path, {"text": pa.array([], pa.string())}, "empty.parquet")
    with pa.OSFile(str(tmp_path / "empty.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema):
        pass
    for p in (empty, tmp_path / "empty.arrow"):
        with pytest.raises(DataError) as e:
            read("text", p)
        assert str(e.value) == f"{p}: the file holds no rows"


def test_nul_characters_in_text_are_refused_naming_the_row(tmp_path):
    msg = "field 'sentence' contains a NUL character (\\x00) at character 3: binary or mis-encoded data"
    p = jsonl(tmp_path, [{"sentence": "good", "label": 1}, {"sentence": "ba\x00d", "label": 0}])
    with pytest.raises(DataError) as e:
        read("sentiment", p)
    assert str(e.value).startswith(f"{p}:2: {msg}")
    assert [ex["text"] for ex in read("sentiment", p, skip_bad=True)] == ["good"]
    c = write(tmp_path, "d.csv", "sentence,label\ngood,1\nba\x00d,0\n")
    with pytest.raises(DataError) as e:
        read("sentiment", c)
    assert str(e.value).startswith(f"{c}:3: {msg}")
    t = parquet(tmp_path, {"text": ["fine", "also fine", "bi\x00nary"]})
    with pytest.raises(DataError) as e:
        read("text", t)
    assert str(e.value).startswith(f"{t} row 3: field 'text' contains a NUL character (\\x00) at character 3")
