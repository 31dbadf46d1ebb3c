"""Sources beyond JSON/CSV: Parquet, Arrow, save_to_disk folders, folders of files, hub ids with
config/split/revision, streaming; paths relative to the config file; preference pairs."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunelab.config import load_config
from tunelab.data.readers import load_table, read_preferences, read_records
from tunelab.errors import DataError

ROWS = [{"text": f"row {i}", "label": i % 2} for i in range(5)]
CONV = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_parquet_and_arrow_files(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    t = load_table(tmp_path / "a.parquet")
    assert len(t.ds) == 5 and t.ds[2]["text"] == "row 2" and t.where(2).endswith("a.parquet row 3")
    recs = read_records(str(tmp_path / "a.parquet"), required=["text"])
    assert recs[4]["label"] == 0 and recs[0]["_where"].endswith("a.parquet row 1")
    ds = datasets.Dataset.from_list(ROWS)
    ds.map(lambda r: r, cache_file_name=str(tmp_path / "s.arrow"))  # datasets' own stream format
    assert len(load_table(tmp_path / "s.arrow").ds) == 5
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, pa.Table.from_pylist(ROWS).schema) as w:
        w.write_table(pa.Table.from_pylist(ROWS))  # the IPC file format
    assert load_table(tmp_path / "f.arrow").ds[1]["text"] == "row 1"


def test_save_to_disk_folders(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert len(load_table(tmp_path / "one").ds) == 5
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_table(tmp_path / "dd").ds) == 5 and len(load_table(tmp_path / "dd", split="test").ds) == 2
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train', 'test'\]"):
        load_table(tmp_path / "dd", split="validation")


def test_folder_of_files_names_the_file_of_each_row(tmp_path):
    (tmp_path / "d").mkdir()
    for k in range(2):
        (tmp_path / "d" / f"part{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    t = load_table(tmp_path / "d")
    assert len(t.ds) == 6 and t.where(4).endswith("part1.jsonl row 2")
    (tmp_path / "d" / "x.csv").write_text("text,label\na,1\n")
    with pytest.raises(DataError, match=r"files of one format, found \['.csv', '.jsonl'\]"):
        load_table(tmp_path / "d")
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="holds no data files"):
        load_table(tmp_path / "e")


def test_hub_ids_with_config_split_revision_and_streaming(monkeypatch):
    calls = []

    def fake(repo, config=None, split=None, revision=None, streaming=False):
        calls.append((repo, config, split, revision, streaming))
        if streaming:
            return datasets.IterableDataset.from_generator(lambda: iter(ROWS))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    t = load_table("hf:owner/name:cfg:test@abc123")
    assert calls[-1] == ("owner/name", "cfg", "test", "abc123", False) and t.where(0) == "hf:owner/name:cfg:test@abc123 row 1"
    load_table("hf:HuggingFaceH4/no_robots:train@v1")  # owner/name is one repository; @revision is not the split
    assert calls[-1] == ("HuggingFaceH4/no_robots", None, "train", "v1", False)
    t = load_table("hf:someset", streaming=True)
    assert calls[-1] == ("someset", None, "train", None, True) and len(t.ds) == 5  # streamed into Arrow once

    def broken(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(DataError, match=r"cannot load hub dataset 'someset' \(config None, split 'train', revision None\)"):
        load_table("hf:someset")


def test_chat_parquet_with_a_wrong_column_type(tmp_path):
    from tunelab.config import task_config
    from tunelab.tasks import TASKS

    pq.write_table(pa.table({"messages": ["not a list"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet row 1: field 'messages' must be a list of turns, got str 'not a list' "
                       r"\(the column's Arrow type is string\)$"):
        TASKS.get("chat").read(str(tmp_path / "c.parquet"), task_config("chat", {}))
    pq.write_table(pa.Table.from_pylist([{"messages": CONV}]), tmp_path / "ok.parquet")
    assert len(TASKS.get("chat").read(str(tmp_path / "ok.parquet"), task_config("chat", {}))) == 1


def test_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "data" / "t.jsonl").write_text("{}\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "old.jsonl").write_text("{}\n")
    y = tmp_path / "cfg" / "run.yaml"
    y.write_text("task: chat\ndata: {train: 'data/t.jsonl#rows=0:900', eval: hf:owner/set:test}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(y)
    assert cfg.data.train == f"{tmp_path / 'cfg' / 'data' / 't.jsonl'}#rows=0:900" and cfg.data.eval == "hf:owner/set:test"
    y.write_text("task: chat\ndata: {train: old.jsonl, eval: glue/sst2, }\n")
    cfg = load_config(y)  # exists only relative to the shell: kept (with a warning); a hub-like name: kept
    assert cfg.data.train == "old.jsonl" and cfg.data.eval == "glue/sst2"
    y.write_text("task: chat\ndata: {train: missing.jsonl}\n")
    assert load_config(y).data.train == str(tmp_path / "cfg" / "missing.jsonl")  # the error will name this path
    assert load_config(y, ["data.train=old.jsonl"]).data.train == "old.jsonl"  # overrides: relative to the shell


def write(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_preference_pairs_plain_and_chat(tmp_path):
    plain = read_preferences(write(tmp_path, [{"prompt": "q", "chosen": "good", "rejected": "bad"}]))
    assert plain[0]["form"] == "plain" and plain[0]["chosen"] == "good"
    whole = [{"chosen": CONV, "rejected": CONV[:1] + [{"role": "assistant", "content": "go away"}]}]
    chat = read_preferences(write(tmp_path, whole))
    assert chat[0]["prompt"] == CONV[:1] and chat[0]["rejected"] == [{"role": "assistant", "content": "go away"}]
    share = [{"prompt": [{"from": "human", "value": "hi"}], "chosen": [{"from": "gpt", "value": "a"}],
              "rejected": [{"from": "gpt", "value": "b"}]}]
    assert read_preferences(write(tmp_path, share))[0]["chosen"] == [{"role": "assistant", "content": "a"}]
    mapped = read_preferences(write(tmp_path, [{"q": "x", "w": "a", "l": "b"}]), fields={"prompt": "q", "chosen": "w", "rejected": "l"})
    assert mapped[0]["prompt"] == "x"


@pytest.mark.parametrize("row, match", [
    ({"prompt": "q", "chosen": "a"}, r"p.jsonl:1: field 'rejected' is missing"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, r"field 'rejected' is empty"),
    ({"chosen": "a", "rejected": "b"}, r"p.jsonl:1: field 'prompt' is missing \(plain pairs need a prompt\)"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"prompt": "q", "chosen": "Good  answer.\n", "rejected": " Good answer."},
     r"p.jsonl:1: 'chosen' and 'rejected' are identical after whitespace normalisation: the pair carries no preference"),
    ({"chosen": CONV, "rejected": CONV[:1] + [{"role": "assistant", "content": "hello\n\n"}]},
     r"p.jsonl:1: 'chosen' and 'rejected' are identical after whitespace normalisation"),
    ({"prompt": "q", "chosen": "a", "rejected": CONV}, "both be text or both be turn lists"),
    ({"chosen": CONV, "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]},
     r"field 'rejected': the last turn is 'user'"),
    ({"chosen": CONV, "rejected": [{"role": "wizard", "content": "y"}]}, r"field 'rejected': turn 0: field 'role' has unknown role 'wizard'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, r"field 'chosen' must be text or a list of turns, got int"),
])
def test_bad_preference_pairs(tmp_path, row, match):
    with pytest.raises(DataError, match=match):
        read_preferences(write(tmp_path, [row]))


def test_preference_skip_bad_counts(tmp_path):
    report = {}
    rows = [{"prompt": "q", "chosen": "a", "rejected": "a"}, {"prompt": "q", "chosen": "a", "rejected": "b"}]
    assert len(read_preferences(write(tmp_path, rows), skip_bad=True, report=report)) == 1
    assert report["skipped"] == 1
