"""Task `text`: documents from .txt/JSONL/Parquet, EOS between documents, packing without cross-document
attention, loss on every token, perplexity."""

import json

import pytest
import torch

from tunelab.config import task_config
from tunelab.data import feature_cache
from tunelab.data.encoding import Collator
from tunelab.errors import DataError
from tunelab.tasks import TASKS

from conftest import tiny_llama, tiny_tokenizer_obj

TEXT = TASKS.get("text")
DOCS = ["the cat sat on the mat", "the dog was in Paris", "", "Mary visited the capital city of the EU " * 3]


def test_txt_paragraphs_become_documents_with_eos(tmp_path):
    tok = tiny_tokenizer_obj()
    (tmp_path / "a.txt").write_text("\n\n".join(DOCS[:2]) + "\n\n\n" + DOCS[3] + "\n")
    cfg = task_config("text", {})
    ex = TEXT.read(str(tmp_path / "a.txt"), cfg)
    assert len(ex) == 3
    f = feature_cache.features(TEXT, ex, tok, cfg, 64)
    assert tok.decode(f[0]["input_ids"]) == "the cat sat on the mat </s>"
    assert f[0]["labels"] == f[0]["input_ids"]  # loss on every token
    lines = TEXT.read(str(tmp_path / "a.txt"), task_config("text", {"unit": "line"}))
    assert len(lines) > len(ex)


def test_long_documents_are_cut_into_pieces_not_truncated(tmp_path):
    tok = tiny_tokenizer_obj()
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    cfg = task_config("text", {"fields": {"text": "body"}})
    f = feature_cache.features(TEXT, TEXT.read(str(tmp_path / "d.jsonl"), cfg), tok, cfg, 8)
    sizes = [len(tok(d.strip(), add_special_tokens=False)["input_ids"]) + 1 for d in DOCS if d]
    # every token kept except a last piece of one token (nothing can predict it)
    assert int(f.lengths.sum()) == sum(n - (n > 8 and n % 8 == 1) for n in sizes) and max(f.lengths) <= 8
    assert f.stats["dropped"] == 1 and f.stats["rows"] == 4  # the empty document


def test_packing_keeps_documents_apart(tmp_path):
    tok = tiny_tokenizer_obj()
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    cfg = task_config("text", {})
    ex = TEXT.read(str(tmp_path / "d.jsonl"), cfg)
    plain = feature_cache.features(TEXT, ex, tok, cfg, 16)
    packed = feature_cache.features(TEXT, ex, tok, cfg, 16, pack=True)
    assert len(packed) < len(plain) and int(packed.lengths.sum()) == int(plain.lengths.sum())
    row = packed[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) >= 2 and all(row["labels"][s] == -100 for s in starts)  # nothing predicted across the seam
    batch = Collator(tok.pad_token_id)([row])
    mask = batch["attention_mask"][0, 0]
    assert mask.shape == (len(row["input_ids"]),) * 2
    assert not mask[starts[1], starts[1] - 1]  # the second document cannot see the first
    model = tiny_llama()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    assert torch.isfinite(out.logits).all()


def test_evaluate_reports_perplexity(tmp_path):
    tok = tiny_tokenizer_obj()
    (tmp_path / "e.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    cfg = task_config("text", {})
    metrics, _ = TEXT.evaluate(tiny_llama(), tok, TEXT.read(str(tmp_path / "e.jsonl"), cfg), cfg, batch_size=4)
    assert list(metrics)[:2] == ["token_accuracy", "perplexity"]
    assert 10 < metrics["perplexity"] < 1000 and metrics["tokens"] > 20  # random 128-word model: about vocab size


def test_text_column_of_the_wrong_type_names_file_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n.parquet row 1: field 'text' must be text, got int 1 \(the column's Arrow type is int64\)"):
        TEXT.read(str(tmp_path / "n.parquet"), task_config("text", {}))
    with pytest.raises(DataError, match=r"column 'body' is missing \(present: \['text'\]\)"):
        TEXT.read(str(tmp_path / "n.parquet"), task_config("text", {"fields": {"text": "body"}}))
