"""Reasoning family: LLM-Adapters and GSM8K readers, answer kinds and candidates, answer extraction,
choice scoring and generated-answer accuracy."""

import json

import pytest

from tunelab.errors import DataError
from tunelab.tasks import TASKS
from tunelab.tasks import reasoning as rmod
from tunelab.tasks.reasoning import candidates, extract_choice, extract_letter, extract_number

from conftest import shared_data

R = TASKS.get("reasoning")
ARC = ("Please choose the correct answer to the question: Which is a mammal?\n\nAnswer1: a cat Answer2: a fish "
       "Answer3: a frog\n\nAnswer format: answer1/answer2/answer3")
ROWS = [
    {"instruction": "Tom had 3 apples and bought 4. How many?", "input": "", "output": "\nA: 3 + 4 = 7. The answer is 7.", "answer": "7.0"},
    {"instruction": "Pick. Answer Choices: (A) 1 (B) 2", "input": "", "output": "The answer is (B).", "answer": "B"},
    {"instruction": ARC, "input": "", "output": "the correct answer is answer1", "answer": "answer1"},
    {"instruction": "Is Paris in France?\n\nAnswer format: true/false", "input": "", "output": "", "answer": "true"},
    {"instruction": "The cat _ sat. Option1: Tom Option2: Mary", "input": "", "output": "", "answer": "Option2"},
]


def write(tmp_path, rows, name="test.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_kinds_and_candidates(tmp_path):
    ex = R.read(str(write(tmp_path, ROWS)), R.Config(), limit=None, skip_bad=False)
    assert [e["kind"] for e in ex] == ["number", "letter", "choice", "choice", "choice"]
    assert ex[2]["choices"] == ["answer1", "answer2", "answer3"] and ex[3]["choices"] == ["true", "false"]
    assert ex[4]["choices"] == ["option1", "option2"] and ex[4]["answer"] == "option2"  # no format line: from the text
    assert candidates("Solution1: x Solution2: y", "solution1") == ["solution1", "solution2"]
    # a target is made when the output is empty
    assert R.target(ex[3], R.Config()) == "the correct answer is true"
    assert R.target({**ex[0], "output": ""}, R.Config()) == "The answer is 7.0."


def test_read_gsm8k_jsonl(tmp_path):
    row = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
           "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 1,072"}
    ex = R.read(str(write(tmp_path, [row], "train.jsonl")), R.Config(), limit=None, skip_bad=False)[0]
    assert ex["instruction"] == row["question"] and ex["answer"] == "1072" and ex["kind"] == "number"
    assert ex["output"] == "In May she sold 48/2 = 24 clips.\nIn all 48+24 = 72 clips.\nThe answer is 1072."


def test_read_errors(tmp_path):
    bad = [{"instruction": "x", "input": "", "output": "", "answer": "maybe"}]
    with pytest.raises(DataError, match=r"test.json:\[0\]: field 'answer' = 'maybe' is not a number"):
        R.read(str(write(tmp_path, bad)), R.Config(), limit=None, skip_bad=False)
    with pytest.raises(DataError, match=r"gold answer 'answer4' is not among the offered choices"):
        R.read(str(write(tmp_path, [{**ROWS[2], "answer": "answer4"}])), R.Config(), limit=None, skip_bad=False)
    with pytest.raises(DataError, match="field 'instruction' is missing"):
        R.read(str(write(tmp_path, [{"question": "q", "answer": "4"}])), R.Config(), limit=None, skip_bad=False)
    assert len(R.read(str(write(tmp_path, bad + ROWS[:1])), R.Config(), limit=None, skip_bad=True)) == 1


def test_answer_extraction():
    assert extract_number("3 + 4 = 7. The answer is 1,234.5 apples") == 1234.5
    assert extract_number("it fell by -3.5 degrees, so -2") == -2.0
    assert extract_number("The answer is 7.") == 7.0  # a trailing full stop is not a decimal part
    assert extract_number("no idea") is None
    assert extract_letter("A train goes 60 km/h (B) is wrong. The answer is (D).") == "D"
    assert extract_letter("A is wrong, so C") == "C"
    assert extract_letter("none") is None
    assert extract_choice("I think the correct answer is Answer2, not answer1", ["answer1", "answer2"]) == "answer2"
    assert extract_choice("answer10", ["answer1", "answer10"]) == "answer10"
    assert extract_choice("dunno", ["true", "false"]) is None


def test_evaluate_generated_answers(monkeypatch, tmp_path, tiny_tokenizer, llama):
    ex = R.read(str(write(tmp_path, ROWS[:3])), R.Config(), limit=None, skip_bad=False)
    ex[0]["answer"] = "7"
    outs = {0: "3 + 4 = 7.0004, so the answer is 7.0004", 1: "hmm", 2: "the correct answer is answer1"}

    def fake(model, tok, prompts, **kw):
        assert kw["max_new_tokens"] == 256 and kw["batch_size"] == 2
        return [outs[i] for i in range(len(prompts))]

    monkeypatch.setattr(rmod, "generate", fake)
    metrics, preds = R.evaluate(llama, tiny_tokenizer, ex, R.Config(scoring="generate"), batch_size=2, gen={"max_new_tokens": 256})
    # 7.0004 is within 0.001 of 7; "hmm" has no letter
    assert metrics == {"accuracy": pytest.approx(2 / 3), "n": 3, "no_answer": 1}
    assert [p["prediction"] for p in preds] == [7.0004, None, "answer1"] and preds[0]["correct"]


def test_evaluate_choice_scoring(monkeypatch, tmp_path, tiny_tokenizer, llama):
    ex = R.read(str(write(tmp_path, ROWS[2:4])), R.Config(), limit=None, skip_bad=False)
    seen = {}

    def fake(model, tok, prompts, choices, batch_size, split=False):
        seen.update(prompts=prompts, choices=choices)
        return [[-3.0, -1.0, -2.0], [-0.5, -0.7]]

    monkeypatch.setattr(rmod, "score_choices", fake)
    cfg = R.Config(chat=False)
    metrics, preds = R.evaluate(llama, tiny_tokenizer, ex, cfg, batch_size=2, gen={})
    assert seen["prompts"][1] == "Is Paris in France?\n\nAnswer format: true/falsethe correct answer is"
    assert seen["choices"] == [[" answer1", " answer2", " answer3"], [" true", " false"]]
    assert metrics == {"accuracy": 0.5, "n": 2, "no_answer": 0, "tied_predictions": 0}
    assert preds[0]["prediction"] == "answer2" and preds[0]["output"] == {"answer1": -3.0, "answer2": -1.0, "answer3": -2.0}
    # the training target ends exactly with the scored continuation
    feat = R.encode(ex[0], tiny_tokenizer, cfg, 128)
    assert tiny_tokenizer.decode([t for t, lab in zip(feat["input_ids"], feat["labels"], strict=True) if lab != -100],
                                 skip_special_tokens=True) == "the correct answer is answer1"
    # exactly tied top scores (bf16 logits round choices together) are counted, never silently decided
    monkeypatch.setattr(rmod, "score_choices", lambda *a, **k: [[-1.0, -1.0, -2.0], [-0.5, -0.7]])
    metrics, preds = R.evaluate(llama, tiny_tokenizer, ex, cfg, batch_size=2, gen={})
    assert metrics["tied_predictions"] == 1 and preds[0]["tied"] and "tied" not in preds[1]
    monkeypatch.undo()  # and for real with the tiny Llama
    metrics, preds = R.evaluate(llama, tiny_tokenizer, ex, cfg, batch_size=2, gen={})
    assert metrics["n"] == 2 and all(p["prediction"] in e["choices"] for p, e in zip(preds, ex, strict=True))


@pytest.mark.data
def test_real_llm_adapters_and_gsm8k():
    expect = {"gsm8k": ("number", 1319), "AQuA": ("letter", 254), "boolq": ("choice", 3270), "piqa": ("choice", 1838),
              "social_i_qa": ("choice", 1954), "winogrande": ("choice", 1267), "ARC-Challenge": ("choice", 1172),
              "openbookqa": ("choice", 500), "mawps": ("number", 238)}
    for name, (kind, n) in expect.items():
        ex = R.read(str(shared_data("llm_adapters", name, "test.json")), R.Config(), limit=None, skip_bad=False)
        assert len(ex) == n and {e["kind"] for e in ex} == {kind}, name
        if kind == "choice":  # the reference outputs name the gold label first
            assert all(extract_choice(e["output"], e["choices"]) == e["answer"] for e in ex), name
    for name in ("boolq", "ARC-Easy", "openbookqa"):
        assert R.read(str(shared_data("llm_adapters", name, "train.json")), R.Config(), limit=None, skip_bad=False)
    train = R.read(str(shared_data("gsm8k", "train.jsonl")), R.Config(), limit=None, skip_bad=False)
    assert len(train) == 7473 and all(extract_number(e["output"]) == float(e["answer"]) for e in train)
