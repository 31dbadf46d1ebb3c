"""The tokenization pipeline: cache hits, identical features on every path, lazy packing, counts, and a
chat run through the training loop."""

import json

import numpy as np
import pytest

from tunelab.config import load_config, task_config
from tunelab.data import feature_cache
from tunelab.data.encoding import pack
from tunelab.tasks import TASKS

from conftest import tiny_llama, tiny_tokenizer_obj

CONV = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi the dog"},
        {"role": "user", "content": "how many apples"}, {"role": "assistant", "content": "yes 3"}]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def chat_tok():
    tok = tiny_tokenizer_obj()
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    return tok


def chat_file(path, n=30):
    rows = [{"messages": CONV[: 2 + 2 * (i % 2)]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def same(a, b):
    assert len(a) == len(b) and list(a.lengths) == list(b.lengths)
    assert all(a[i] == b[i] for i in range(len(a)))


def test_second_run_comes_from_the_cache(tmp_path, cache):
    task, tok, cfg = TASKS.get("chat"), chat_tok(), task_config("chat", {"template": "chatml"})
    ex = task.read(chat_file(tmp_path / "c.jsonl"), cfg)
    first = feature_cache.features(task, ex, tok, cfg, 64, cache=True)
    again = feature_cache.features(task, task.read(str(tmp_path / "c.jsonl"), cfg), tok, cfg, 64, cache=True)
    assert not first.stats["cached"] and again.stats["cached"]
    same(first, again)
    same(first, feature_cache.features(task, ex, tok, cfg, 64, cache=False))
    assert len(list((cache / "features").glob("*.arrow"))) == 1
    other = feature_cache.features(task, ex, tok, task_config("chat", {"template": "zephyr"}), 64, cache=True)
    assert not other.stats["cached"] and not feature_cache.features(task, ex, tok, cfg, 32, cache=True).stats["cached"]
    assert other[0] != first[0]
    chat_file(tmp_path / "c.jsonl", n=31)  # the data changed: a new key
    assert not feature_cache.features(task, task.read(str(tmp_path / "c.jsonl"), cfg), tok, cfg, 64, cache=True).stats["cached"]


def test_per_row_fallback_is_identical_through_the_cache_and_two_processes(tmp_path, monkeypatch):
    task, tok = TASKS.get("sentiment"), tiny_tokenizer_obj()
    cfg = task_config("sentiment", {"chat": False, "template": "{text} ?", "labels": ["no", "yes"]})
    words = "the cat sat on mat dog was in John Mary".split()
    ex = [{"text": " ".join(words[i % 7: i % 7 + 3]), "label": str(i % 2), "_where": f"f:{i}"} for i in range(40)]
    plain = [task.encode(e, tok, cfg, 16) for e in ex]
    mem = feature_cache.features(task, ex, tok, cfg, 16, cache=False)
    disk = feature_cache.features(task, ex, tok, cfg, 16, cache=True)
    assert [mem[i] for i in range(40)] == plain
    same(mem, disk)
    monkeypatch.setenv("TUNELAB_NUM_PROC", "2")
    ex2 = [dict(e, text=e["text"] + " a") for e in ex]
    same(feature_cache.features(task, ex2, tok, cfg, 16, cache=True), feature_cache.features(task, ex2, tok, cfg, 16, cache=False))


def test_head_features_keep_scalar_labels_and_token_types(tmp_path):
    task, tok = TASKS.get("paraphrase"), tiny_tokenizer_obj()
    cfg = task_config("paraphrase", {"formulation": "head"})
    ex = [{"text": "the cat", "text_pair": "a dog", "label": str(i % 2), "_where": f"f:{i}"} for i in range(6)]
    got = feature_cache.features(task, ex, tok, cfg, 16, cache=True)
    assert [got[i] for i in range(6)] == [task.encode(e, tok, cfg, 16) for e in ex]


def test_lazy_packing_matches_data_pack():
    lengths = np.array([5, 3, 7, 2, 9, 1, 4])
    feats = [{"input_ids": list(range(n)), "labels": list(range(10, 10 + n)), "prompt_len": n // 2} for n in lengths]
    base = feature_cache._ListRows.from_features(feats, np.zeros(len(feats), np.int8))
    packed = feature_cache.Packed(feature_cache.Features(base, np.arange(len(feats))), 10)
    assert [packed[i] for i in range(len(packed))] == pack(feats, 10)
    assert list(packed.lengths) == [len(r["input_ids"]) for r in pack(feats, 10)]


def test_chat_run_through_the_loop_reports_data_facts(tmp_path):
    d = tmp_path / "model"
    tiny_llama().save_pretrained(d)
    chat_tok().save_pretrained(d)
    train, dev = chat_file(tmp_path / "train.jsonl", 24), chat_file(tmp_path / "dev.jsonl", 4)
    cfg = load_config(None, [f"model.name={d}", "method.name=full", "task.name=chat", "task.template=chatml",
                             f"data.train={train}", f"data.eval={dev}", "data.max_length=32", "train.batch_size=4",
                             "train.max_steps=6", "train.lr=3e-3", "train.progress=false", "train.precision=fp32",
                             "train.threads=1", "eval.max_new_tokens=4", f"output_dir={tmp_path / 'run'}"])
    import tunelab.training.loop as train_mod

    train_mod.run(cfg)
    from tunelab.results import read_metrics

    rec = read_metrics(tmp_path / "run")
    m = {**rec["metrics"], **rec["run"]}
    assert m["data_rows"] == 24 and m["data_dropped"] == 0 and m["steps"] == 6 and m["truncated_rows"] == 0
    assert {"rougeL", "perplexity", "eval_loss"} <= set(rec["metrics"])
    log = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]


def test_a_familys_own_feature_keys_survive_the_cache(tmp_path):
    task, tok = TASKS.get("preference"), tiny_tokenizer_obj()
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": "the cat", "chosen": f"yes {i}", "rejected": "no"}) + "\n" for i in range(6)))
    cfg = task_config("preference", {"chat": False})
    ex = task.read(str(path), cfg, limit=None, skip_bad=False)
    got = feature_cache.features(task, ex, tok, cfg, 32, cache=True)
    assert [got[i] for i in range(len(ex))] == [task.encode(e, tok, cfg, 32) for e in ex]
    assert "rejected_input_ids" in got[0]
