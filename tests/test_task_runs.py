"""Every family and formulation through the real loop (`tunelab.training.loop.run`): tiny models saved to a
folder, a few fixture rows, two steps; and the example configs of these families validate."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import tunelab.training.loop as train_mod
from tunelab.config import load_config
from tunelab.results import read_metrics
from tunelab.tasks import TASKS

from conftest import SHARED_DATA, tiny_tokenizer_obj

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAMILIES = ("ner", "qa", "summarization", "generation", "reasoning")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=0)).save_pretrained(d)
    tiny_tokenizer_obj().save_pretrained(d)
    return d


def fixture_data(tmp_path, task):
    """(train, eval) paths with a few rows in the family's native format."""
    if task == "ner":
        text = "John NNP B-NP B-PER\nSmith NNP I-NP I-PER\nlives VBZ B-VP O\nin IN B-PP O\nParis NNP B-NP B-LOC\n\n" * 3
        (tmp_path / "ner.train").write_text(text)
        return tmp_path / "ner.train", tmp_path / "ner.train"
    if task == "qa":
        ctx = "Tom has a cat . Mary lives in Paris ."
        data = [{"title": f"t{a}", "paragraphs": [{"context": ctx, "qas": [
            {"id": f"{a}", "question": "who lives in Paris ?", "answers": [{"text": "Mary", "answer_start": 16}]}]}]}
            for a in range(4)]
        (tmp_path / "squad.json").write_text(json.dumps({"data": data}))
        return f"{tmp_path / 'squad.json'}#articles=0:3", f"{tmp_path / 'squad.json'}#articles=3:4"
    if task == "summarization":
        rows = [{"id": str(i), "dialogue": "Tom: hi\r\nMary: hello", "summary": "Tom says hi"} for i in range(4)]
    elif task == "generation":
        rows = [{"instruction": "say hello", "input": "", "output": "hello"} for _ in range(4)]
    else:
        rows = [{"instruction": "Is Paris a city ?\n\nAnswer format: true/false", "input": "",
                 "output": "the correct answer is true", "answer": "true"},
                {"instruction": "Tom had 3 apples", "input": "", "output": "The answer is 3.", "answer": "3"}] * 2
    (tmp_path / "d.json").write_text(json.dumps(rows))
    return tmp_path / "d.json", tmp_path / "d.json"


@pytest.mark.parametrize("task,formulation", [(t, "lm") for t in FAMILIES] + [("ner", "head"), ("qa", "head")])
def test_two_steps_through_the_loop(task, formulation, tiny_dir, bert_dir, tmp_path, monkeypatch):
    train, dev = fixture_data(tmp_path, task)
    if dev == train:  # the same rows under another name: train == eval is refused as a leak
        dev = train.with_name("dev-" + train.name)
        dev.write_text(train.read_text())
    model = bert_dir if formulation == "head" else tiny_dir
    cfg = load_config(None, [
        f"model.name={model}", "method.name=full", f"task.name={task}", f"task.formulation={formulation}",
        "task.chat=false", f"data.train={train}", f"data.eval={dev}", "data.max_length=48",
        "train.max_steps=2", "train.batch_size=2", "train.lr=1e-3", "train.progress=false", "train.precision=fp32",
        "train.threads=1", "eval.max_new_tokens=3", f"output_dir={tmp_path / 'run'}",
    ])
    record = train_mod.run(cfg)
    metrics = record["metrics"]
    assert record["run"]["steps"] == 2 and metrics["n"] >= 1
    first = next(iter(metrics))
    assert isinstance(metrics[first], float)
    # every task metric survives into metrics.json["metrics"] as a number (a NER run's entity precision once
    # read "float32", overwritten by the training precision)
    saved = read_metrics(tmp_path / "run")
    assert saved["metrics"] == metrics and saved["run"]["precision"] == "float32"
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()), metrics
    lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == metrics["n"] and {"prediction", "reference"} <= set(json.loads(lines[0]))


def example_configs():
    # Sweep configs (compare/scale sections) are checked by test_examples.py.
    plain = [p for p in EXAMPLES.glob("*.yaml") if not ({"compare", "scale", "advise"} & set(yaml.safe_load(p.read_text())))]
    return sorted(p for p in plain if load_config(p).task.name in FAMILIES) if EXAMPLES.exists() else []


def test_every_family_has_examples():
    names = {load_config(p).task.name for p in example_configs()}
    assert names == set(FAMILIES)
    formulations = {(load_config(p).task.name, load_config(p).task.params().get("formulation", "lm")) for p in example_configs()}
    assert {("ner", "head"), ("qa", "head")} <= formulations


@pytest.mark.data
@pytest.mark.parametrize("path", example_configs(), ids=lambda p: p.name)
def test_example_config_reads_its_data(path):
    if not SHARED_DATA.exists():
        pytest.skip("shared data absent")
    cfg = load_config(path)
    task = TASKS.get(cfg.task.name)
    tcfg = task.Config(**cfg.task.params())
    for source in (cfg.data.train, cfg.data.eval):  # relative to the config file, which load_config resolves
        assert source and "/shared/data/" in source and Path(source.split("#")[0]).resolve().exists(), source
        rows = task.read(source, tcfg, limit=5, skip_bad=False)
        assert len(rows) == 5
