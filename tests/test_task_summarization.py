"""Summarization family: SAMSum-style reader, template, encoding, ROUGE evaluation."""

import json

import pytest

from tunelab.errors import DataError
from tunelab.tasks import TASKS
from tunelab.tasks import summarization as summ_mod

from conftest import shared_data

SUM = TASKS.get("summarization")


def write(tmp_path, rows, name="samsum.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def test_read_normalises_and_drops_empty(tmp_path):
    path = write(tmp_path, [{"id": "1", "dialogue": "Tom: hi\r\nMary: hello\r\n", "summary": "Tom says hi. "},
                            {"id": "2", "dialogue": "", "summary": "nothing"},
                            {"id": "3", "dialogue": "Tom: bye", "summary": "Tom says bye."}])
    ex = SUM.read(str(path), SUM.Config(), limit=None, skip_bad=False)
    assert [e["id"] for e in ex] == ["1", "3"]
    assert ex[0]["dialogue"] == "Tom: hi\nMary: hello" and ex[0]["summary"] == "Tom says hi."
    assert len(SUM.read(str(path), SUM.Config(), limit=1, skip_bad=False)) == 1


def test_field_map_and_missing_field(tmp_path):
    path = write(tmp_path, [{"article": "a long text", "highlights": "short"}], "news.json")
    ex = SUM.read(str(path), SUM.Config(fields={"dialogue": "article", "summary": "highlights"}), limit=None, skip_bad=False)
    assert ex[0]["dialogue"] == "a long text" and ex[0]["id"].endswith("news.json:[0]")
    with pytest.raises(DataError, match=r"news.json:\[0\]: field 'dialogue' is missing"):
        SUM.read(str(path), SUM.Config(), limit=None, skip_bad=False)
    with pytest.raises(ValueError, match="only the 'lm' formulation"):
        SUM.head(SUM.Config(formulation="head"), ex)


def test_template_and_encode(tiny_tokenizer):
    ex = {"id": "1", "dialogue": "Tom: hello", "summary": "Tom says hello .", "_where": "-"}
    cfg = SUM.Config(chat=False, template="Summarize: {dialogue}\nSummary:")
    assert SUM.prompt(ex, tiny_tokenizer, cfg) == "Summarize: Tom: hello\nSummary:"
    feat = SUM.encode(ex, tiny_tokenizer, cfg, 64)
    target = [t for t, lab in zip(feat["input_ids"], feat["labels"], strict=True) if lab != -100]
    assert tiny_tokenizer.decode(target) == "Tom says hello. </s>"  # the target, then EOS
    assert feat["prompt_len"] == len(tiny_tokenizer("Summarize: Tom: hello\nSummary:")["input_ids"])


def test_evaluate_rouge(monkeypatch, tiny_tokenizer, llama):
    ex = [{"id": "1", "dialogue": "Tom: hi", "summary": "the cat sat on the mat", "_where": "a"},
          {"id": "2", "dialogue": "Tom: bye", "summary": "Tom says bye", "_where": "b"}]
    seen = {}

    def fake(model, tok, prompts, **kw):
        seen.update(kw)
        return ["the cat sat", "Tom says bye"]

    monkeypatch.setattr(summ_mod, "generate", fake)
    metrics, preds = SUM.evaluate(llama, tiny_tokenizer, ex, SUM.Config(), batch_size=3, gen={"max_new_tokens": 20})
    assert metrics["rouge1"] == pytest.approx((2 / 3 + 1) / 2) and metrics["rougeL"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["rouge2"] == pytest.approx((2 * 0.4 / 1.4 + 1) / 2) and metrics["n"] == 2
    assert list(metrics)[0] == "rouge1" and seen == {"max_new_tokens": 20, "batch_size": 3, "split": False}
    assert preds[1] == {"id": "2", "where": "b", "input": "Tom: bye", "prediction": "Tom says bye", "reference": "Tom says bye"}
    monkeypatch.undo()
    metrics, _ = SUM.evaluate(llama, tiny_tokenizer, ex, SUM.Config(), batch_size=2, gen={"max_new_tokens": 3})
    assert metrics["n"] == 2


@pytest.mark.data
def test_real_samsum():
    counts = {}
    for split in ("train", "val", "test"):
        counts[split] = len(SUM.read(str(shared_data("samsum", f"{split}.json")), SUM.Config(), limit=None, skip_bad=False))
    assert counts == {"train": 14731, "val": 818, "test": 819}  # train: one empty dialogue dropped
