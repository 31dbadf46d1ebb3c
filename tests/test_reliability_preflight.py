"""Fail before training, not after: each mistake below is a clear error raised before step 1 (no log line,
no checkpoint), naming the row or the setting."""

import json

import pytest

import tunelab.training.loop as train_mod
from test_train import cfg_for, data  # noqa: F401  (fixtures)
from tunelab.config import load_config
from tunelab.errors import DataError

from conftest import tiny_tokenizer_obj


def nothing_trained(out):
    return not (out / "log.jsonl").exists() and not (out / "checkpoints").exists()


def test_eval_label_unseen_in_training(tiny_dir, data, tmp_path):  # noqa: F811
    train, dev = data
    rows = [json.loads(ln) for ln in dev.read_text().splitlines()]
    rows[2]["label"] = 7
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = load_config(None, [f"model.name={tiny_dir}", "task.name=classification", "task.chat=false",
                             f"data.train={train}", f"data.eval={dev}", "train.max_steps=2", "train.progress=false",
                             f"output_dir={out}", "task.template={text} ?", "task.fields={text: sentence}"])
    with pytest.raises(DataError, match=rf"{dev}:3: field 'label' has value '7'"):
        train_mod.run(cfg)
    assert nothing_trained(out)


def test_label_words_of_the_wrong_length(tiny_dir, data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"task.label_words has 3 words .* but there are 2 labels"):
        train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=2", "task.label_words=[a, b, c]"))
    assert nothing_trained(out)


def test_template_key_the_data_lacks(tiny_dir, data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"task.template '\{review\} \?' uses \{review\}, which task 'sentiment' does not provide"):
        train_mod.run(cfg_for(tiny_dir, data, out, "train.max_steps=2", "task.template={review} ?"))
    assert nothing_trained(out)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A headless tiny BERT with 128 positions (the task adds its head)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, pad_token_id=0)).save_pretrained(d)
    tiny_tokenizer_obj().save_pretrained(d)
    return d


def test_ner_eval_type_unseen_and_eval_length_above_positions(bert, tmp_path):
    train = tmp_path / "train.conll"
    train.write_text("John B-PER\nvisited O\nParis B-LOC\n\n")
    dev = tmp_path / "dev.conll"
    dev.write_text("Mary B-PER\nvisited O\nGoogle B-ORG\n\n")
    base = [f"model.name={bert}", "task.name=ner", "task.formulation=head", f"data.train={train}",
            "train.max_steps=2", "train.progress=false", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(DataError, match=rf"{dev}:1: tag 'B-ORG' (has an entity type the training data never has|is not in the label set)"):
        train_mod.run(load_config(None, base + [f"data.eval={dev}"]))
    long = tmp_path / "long.conll"
    long.write_text("".join("Paris B-LOC\n" if i == 0 else "the O\n" for i in range(200)) + "\n")
    with pytest.raises(ValueError, match=rf"{long}:1: this eval sentence is longer than the model's 128 positions.*"
                                         "task.eval_max_length=128"):
        train_mod.run(load_config(None, base + [f"data.eval={long}"]))
    assert nothing_trained(tmp_path / "run")


def test_qa_eval_window_above_positions(bert, tmp_path):
    ctx = "Paris is the capital . " + "the cat sat on the mat . " * 30
    rows = [{"context": ctx, "question": "what is the capital ?", "answers": ["Paris"], "answer_starts": [0]}]
    d = tmp_path / "qa.jsonl"
    d.write_text(json.dumps(rows[0]) + "\n")
    dev = tmp_path / "qa-dev.jsonl"  # train == eval is refused (a leak)
    dev.write_text(d.read_text())
    cfg = load_config(None, [f"model.name={bert}", "task.name=qa", "task.formulation=head", f"data.train={d}",
                             f"data.eval={dev}", "train.max_steps=2", "train.progress=false", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"longer than the model's 128 positions and task.window=384"):
        train_mod.run(cfg)


def test_qa_eval_question_longer_than_the_window(bert, tmp_path):
    ctx = "Paris is the capital . the cat sat on the mat ."
    question = "what is the name of the city that is the capital of the country where the cat sat on the mat ?"
    d = tmp_path / "qa.jsonl"
    d.write_text(json.dumps({"context": ctx, "question": "what is the capital ?", "answers": ["Paris"],
                             "answer_starts": [0]}) + "\n")
    dev = tmp_path / "qa-dev.jsonl"
    dev.write_text(json.dumps({"context": ctx, "question": question, "answers": ["Paris"], "answer_starts": [0]}) + "\n")
    out = tmp_path / "run"
    cfg = load_config(None, [f"model.name={bert}", "task.name=qa", "task.formulation=head", f"data.train={d}",
                             f"data.eval={dev}", "task.window=16", "task.stride=4", "train.max_steps=2",
                             "train.progress=false", f"output_dir={out}"])
    with pytest.raises(ValueError, match=rf"{dev}:1: the question is \d+ tokens .*no room for the context in task.window=16"):
        train_mod.run(cfg)
    assert nothing_trained(out)


def test_lr_far_from_the_methods_range_is_warned(tiny_dir, data, tmp_path, capsys):  # noqa: F811
    train_mod.run(cfg_for(tiny_dir, data, tmp_path / "run", "train.lr=1e6", "train.max_steps=0"))
    out = capsys.readouterr().out
    assert "warning: train.lr=1e+06 is" in out and "the recommended learning rate of method 'full', 2e-05" in out
    from tunelab.training.preflight import warn_lr

    assert "of method 'lora', 0.0003" in warn_lr("lora", {}, 1e-9)[0] and "1/" in warn_lr("lora", {}, 1e-9)[0]
    assert warn_lr("lora", {}, 3e-4) == [] and warn_lr("lora", {}, None) == [] and warn_lr("full", {}, 1e-3) == []


def test_eval_before_without_eval_data_is_warned(tiny_dir, data, tmp_path, capsys):  # noqa: F811
    train_mod.run(cfg_for(tiny_dir, data, tmp_path / "run", "data.eval=", "eval.before=true", "train.max_steps=0"))
    assert "warning: eval.before=true but there is no eval data (data.eval is not set)" in capsys.readouterr().out
