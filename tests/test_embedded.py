"""Slow: the embedded pretrained models load and train (minutes on 2 CPU cores)."""

import json

import pytest

from tunelab.config import load_config
from tunelab.data.demo_sentiment import write_data

pytestmark = pytest.mark.slow


def test_smollm2_answers_and_loss_falls(tmp_path):
    from tunelab.evaluation.scoring import generate
    from tunelab.models.loading import load
    from tunelab.tasks.base import render_prompt
    from tunelab.training.loop import run

    model, tok = load("smollm2-135m")
    answer = generate(model, tok, [render_prompt(tok, "What is the capital of France?", True)], max_new_tokens=12)[0]
    assert "Paris" in answer

    train, dev = write_data(tmp_path / "data", n_train=64, n_eval=16)
    cfg = load_config(None, [
        "model.name=smollm2-135m", "method.name=full", "task.name=sentiment", f"data.train={train}",
        f"data.eval={dev}", "data.max_length=96", "train.max_steps=8", "train.batch_size=8", "train.lr=3e-5",
        "train.log_every=1", "train.progress=false", f"output_dir={tmp_path / 'run'}",
    ])
    run(cfg)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_minilm_head_loads():
    from tunelab.models.loading import load
    from tunelab.tasks.base import HeadSpec

    model, tok = load("minilm-l6", head=HeadSpec("sequence", ["neg", "pos"]))
    assert model.tunelab_new_head == ["classifier"]
    assert model.config.num_labels == 2
