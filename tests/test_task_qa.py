"""QA family: SQuAD reader with leak-free article splits, stride windows, span extraction, metrics."""

import json
from types import SimpleNamespace

import pytest
import torch

from tunelab.data.encoding import Collator
from tunelab.errors import DataError
from tunelab.tasks import TASKS
from tunelab.tasks import qa as qa_mod
from tunelab.tasks.qa import answer_tokens, best_span, install_qa_labels, windows
from tunelab.tasks.shared import split_source

from conftest import shared_data

QA = TASKS.get("qa")
LONG = ("the cat sat on the mat and the dog sat on the mat . " * 3 + "Mary lives in Paris . " + "the dog has the cat . " * 3).strip()


def squad(tmp_path, n_articles=3):
    data = []
    for a in range(n_articles):
        paras = []
        for p in range(2):
            ctx = f"article {a} paragraph {p}: John Smith lives in Paris."
            paras.append({"context": ctx, "qas": [
                {"id": f"q{a}{p}{k}", "question": f"who lives in Paris {k}?",
                 "answers": [{"text": "John Smith", "answer_start": ctx.index("John")},
                             {"text": "Smith", "answer_start": ctx.index("Smith")}]} for k in range(2)]})
        data.append({"title": f"T{a}", "paragraphs": paras})
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


def test_read_squad_and_article_split_has_no_leak(tmp_path):
    path = squad(tmp_path)
    cfg = QA.Config()
    every = QA.read(str(path), cfg, limit=None, skip_bad=False)
    assert len(every) == 12 and every[0]["answers"] == ["John Smith", "Smith"] and every[0]["answer_starts"] == [23, 28]
    train = QA.read(f"{path}#articles=0:2", cfg, limit=None, skip_bad=False)
    evals = QA.read(f"{path}#articles=2:", cfg, limit=None, skip_bad=False)
    assert {e["title"] for e in train} == {"T0", "T1"} and {e["title"] for e in evals} == {"T2"}
    assert not {e["context"] for e in train} & {e["context"] for e in evals}
    assert sorted(e["id"] for e in train + evals) == sorted(e["id"] for e in every)
    assert len(QA.read(f"{path}#articles=0:2", cfg, limit=3, skip_bad=False)) == 3
    assert split_source("a/b.json#articles=:5") == ("a/b.json", slice(None, 5))
    assert split_source("a/b.json") == ("a/b.json", None)


@pytest.mark.parametrize("source,msg", [("#articles=1-3", "START:STOP"), ("#split=0:1", "unknown selector 'split'"),
                                        ("#articles=7:9", "holds no questions")])
def test_article_selector_errors(tmp_path, source, msg):
    with pytest.raises(DataError, match=msg):
        QA.read(str(squad(tmp_path)) + source, QA.Config(), limit=None, skip_bad=False)


def test_read_records_with_field_map(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"doc": "Paris is in France .", "q": "where is Paris ?", "a": "France", "t": "geo"},
            {"doc": "Tom has a cat .", "q": "what has Tom ?", "a": ["a cat", "cat"], "t": "pets"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = QA.Config(fields={"context": "doc", "question": "q", "answers": "a", "title": "t"})
    ex = QA.read(str(path), cfg, limit=None, skip_bad=False)
    assert ex[0]["answers"] == ["France"] and ex[0]["answer_starts"] == [12] and ex[1]["answer_starts"] == [8, 10]
    assert [e["title"] for e in QA.read(f"{path}#articles=1:", cfg, limit=None, skip_bad=False)] == ["pets"]
    path.write_text(json.dumps({"doc": "x", "a": "x"}) + "\n")
    with pytest.raises(DataError, match=r"qa.jsonl:1: field 'q' is missing"):
        QA.read(str(path), cfg, limit=None, skip_bad=False)


def test_stride_windows_cover_and_overlap(tiny_tokenizer):
    wins = windows(tiny_tokenizer, "who lives in Paris ?", LONG, max_length=24, stride=6)
    assert len(wins) > 3
    n_question = 5
    ctx_tokens = tiny_tokenizer(LONG, add_special_tokens=False)["input_ids"]
    covered = set()
    for w in wins:
        assert len(w["input_ids"]) <= 24
        assert all(o is None for o in w["offsets"][:n_question])  # question tokens are never answers
        covered |= {o for o in w["offsets"] if o is not None}
    assert len(covered) == len(ctx_tokens)  # every context token is in some window
    for a, b in zip(wins, wins[1:], strict=False):  # consecutive windows share `stride` context tokens
        shared = [o for o in a["offsets"] if o is not None and o in set(b["offsets"])]
        assert len(shared) == 6


def test_long_question_and_big_stride_are_tamed(tiny_tokenizer):
    # a 75-token question in a 32-token window: cut to half the window, stride capped (no tokenizer abort)
    wins = windows(tiny_tokenizer, "who lives in Paris ? " * 15, LONG, max_length=32, stride=30)
    assert len(wins) > 1 and all(len(w["input_ids"]) <= 32 for w in wins)
    assert all(sum(o is None for o in w["offsets"]) == 16 for w in wins)


def test_encode_head_picks_the_window_with_the_answer(tiny_tokenizer):
    start = LONG.index("Mary lives in Paris")
    ex = {"context": LONG, "question": "who lives in Paris ?", "answers": ["Mary lives in Paris"],
          "answer_starts": [start], "_where": "f:1"}
    feat = QA.encode(ex, tiny_tokenizer, QA.Config(formulation="head", stride=6), 24)
    assert len(feat["labels"]) == len(feat["input_ids"])
    s, e = feat["labels"].index(qa_mod.START), feat["labels"].index(qa_mod.END)
    assert sum(lab != -100 for lab in feat["labels"]) == 2
    assert tiny_tokenizer.decode(feat["input_ids"][s : e + 1]) == "Mary lives in Paris"
    assert feat["prompt_len"] == len(feat["input_ids"]) <= 24
    with pytest.raises(DataError, match="f:2: answer 'Tom' is not at character 3"):
        QA.encode({**ex, "answers": ["Tom"], "answer_starts": [3], "_where": "f:2"}, tiny_tokenizer, QA.Config(formulation="head"), 24)
    assert answer_tokens([None, (0, 3), (4, 9)], 4, 9) == (2, 2)
    assert answer_tokens([None, (0, 3), (4, 9)], 2, 9) == (1, 2)
    assert answer_tokens([None, (0, 3)], 4, 9) is None  # not in this window


def test_best_span_rules():
    offsets = [None, None, (0, 3), (4, 7), (8, 11), (12, 15)]
    start = torch.tensor([9.0, 0, 1, 5, 0, 0])  # the best start logit is on a question token: ignored
    end = torch.tensor([9.0, 0, 0, 0, 4, 1])
    assert best_span(start, end, offsets, max_answer_tokens=30, n_best=20) == (9.0, 3, 4)
    assert best_span(start, end, offsets, max_answer_tokens=1, n_best=20)[1:] in {(3, 3), (2, 2), (4, 4), (5, 5)}
    assert best_span(start, end, offsets, max_answer_tokens=1, n_best=20) == (5.0, 3, 3)
    # end before start is never chosen
    assert best_span(torch.tensor([0.0, 0, 0, 9]), torch.tensor([0.0, 9, 0, 0]), [(0, 1), (1, 2), (2, 3), (3, 4)], 30, 20)[1:] == (3, 3)
    assert best_span(start[:2], end[:2], [None, None], 30, 20) is None


class SpanOracle(torch.nn.Module):
    """Start logits high on token ids `starts`, end logits high on `ends` (position-independent)."""

    def __init__(self, starts: list[int], ends: list[int]):
        super().__init__()
        self.s, self.e, self.w = torch.tensor(starts), torch.tensor(ends), torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return SimpleNamespace(start_logits=torch.isin(input_ids, self.s).float() * 5 + self.w,
                               end_logits=torch.isin(input_ids, self.e).float() * 5 + self.w)


def test_extractive_evaluate_over_windows(tiny_tokenizer):
    start = LONG.index("Mary")
    ex = [{"id": "1", "context": LONG, "question": "who lives in Paris ?", "answers": ["Mary"],
           "answer_starts": [start, start], "_where": "f:1"},
          {"id": "2", "context": "Tom has a cat .", "question": "who has a cat ?", "answers": ["Tom"],
           "answer_starts": [0], "_where": "f:2"}]
    ids = tiny_tokenizer.convert_tokens_to_ids
    # "Mary ... lives" (only in a later window; "lives" before "Mary" or too far is not a span)
    model = SpanOracle([ids("Mary"), ids("Tom")], [ids("lives"), ids("Tom")])
    cfg = QA.Config(formulation="head", window=24, stride=6, max_answer_tokens=4)
    metrics, preds = QA.evaluate(model, tiny_tokenizer, ex, cfg, batch_size=3)
    assert preds[0]["prediction"] == "Mary lives" and preds[1]["prediction"] == "Tom"
    # "Mary lives" vs "Mary": EM 0, F1 2/3; "Tom": EM 1, F1 1
    assert metrics == pytest.approx({"f1": (2 / 3 + 1) / 2, "exact_match": 0.5, "n": 2})
    assert list(metrics)[0] == "f1"


def test_qa_head_trains_with_labels(tiny_tokenizer):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    model = install_qa_labels(BertForQuestionAnswering(BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)))
    ex = {"context": "Tom has a cat .", "question": "who has a cat ?", "answers": ["Tom"], "answer_starts": [0], "_where": "-"}
    feats = [QA.encode(ex, tiny_tokenizer, QA.Config(formulation="head"), 32)] * 2
    batch = Collator(tiny_tokenizer.pad_token_id)(feats)
    batch.pop("prompt_mask")
    seen = {}
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and seen["start_positions"].tolist() == [5, 5] == seen["end_positions"].tolist()
    batch["labels"] = torch.tensor([qa_mod.span_labels(batch["input_ids"].shape[1], 2, 4)] * 2)
    model(**batch)
    assert seen["start_positions"].tolist() == [2, 2] and seen["end_positions"].tolist() == [4, 4]


def test_generative_evaluate_and_template(monkeypatch, tiny_tokenizer, llama):
    ex = [{"id": "1", "context": "Tom has a cat .", "question": "who has a cat ?", "answers": ["Tom"], "answer_starts": [0], "_where": "f:1"}]
    cfg = QA.Config(chat=False)
    prompt = QA.prompt(ex[0], tiny_tokenizer, cfg)
    assert prompt.endswith("Context: Tom has a cat .\nQuestion: who has a cat ?")
    feat = QA.encode(ex[0], tiny_tokenizer, cfg, 64)
    assert tiny_tokenizer.decode([t for t, lab in zip(feat["input_ids"], feat["labels"], strict=True) if lab != -100],
                                 skip_special_tokens=True) == "Tom"
    monkeypatch.setattr(qa_mod, "generate", lambda m, t, prompts, **kw: ["the Tom."])
    metrics, preds = QA.evaluate(llama, tiny_tokenizer, ex, cfg, batch_size=2, gen={})
    assert metrics["exact_match"] == 1.0 and preds[0]["reference"] == ["Tom"]
    monkeypatch.undo()
    metrics, _ = QA.evaluate(llama, tiny_tokenizer, ex, cfg, batch_size=2, gen={"max_new_tokens": 3})
    assert metrics["n"] == 1


@pytest.mark.data
def test_real_squad_dev_article_split():
    path = shared_data("squad_v1.1", "dev-v1.1.json")
    cfg = QA.Config()
    train = QA.read(f"{path}#articles=0:40", cfg, limit=None, skip_bad=False)
    evals = QA.read(f"{path}#articles=40:48", cfg, limit=None, skip_bad=False)
    assert len(train) + len(evals) == 10570
    assert not {e["title"] for e in train} & {e["title"] for e in evals}
    assert not {e["context"] for e in train} & {e["context"] for e in evals}
    assert not {e["id"] for e in train} & {e["id"] for e in evals}
    assert all(e["context"][s : s + len(a)] == a for e in train[:2000] for s, a in zip(e["answer_starts"], e["answers"], strict=True))
