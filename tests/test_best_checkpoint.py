"""The best checkpoint: chosen on a metric that measures the task, in that metric's direction (one table,
``tunelab.evaluation.metrics``, that the report reads too), saved with ``best.json``, and usable:
``tunelab eval/predict/merge/export RUN --checkpoint best`` load it through ``load_trained``."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import tunelab
from test_run_directory import lm_rows, merged_logits, train
from tunelab.cli import app
from tunelab.evaluation import metrics as M

from conftest import tiny_llama

runner = CliRunner()


def test_one_direction_table_for_the_loop_and_the_report():
    from tunelab.report import tables

    assert tables.higher_is_better is M.higher_is_better and tables.LOWER_IS_BETTER is M.LOWER_IS_BETTER
    assert not M.higher_is_better("perplexity") and not M.higher_is_better("eval_loss") and M.higher_is_better("f1")


@pytest.mark.parametrize("metrics, name", [
    ({"accuracy": 0.5, "macro_f1": 0.4, "n": 8, "eval_loss": 1.0}, "accuracy"),
    ({"token_accuracy": 0.1, "perplexity": 90.0, "tokens": 50, "n": 4}, "token_accuracy"),
    ({"n": 4, "without_reference": 4, "eval_loss": 2.5}, "eval_loss"),  # generation without references
    ({"perplexity": float("nan"), "tokens": 0, "n": 0, "eval_loss": 3.0}, "eval_loss"),
    ({"n": 4, "without_reference": 4}, None),
])
def test_selection_metric_measures_the_task(metrics, name):
    assert M.selection_metric(metrics) == name


def _lora_b(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


@pytest.mark.parametrize("key, scores, best_step", [
    ("perplexity", [10.0, 5.0, 7.0], 2),  # lower is better: the old rule kept step 1 (the worst)
    ("eval_loss", [2.0, 3.0, 1.5], 3),
    ("accuracy", [0.5, 0.8, 0.7], 2),
])
def test_keep_best_follows_the_metrics_direction(tmp_path, key, scores, best_step):
    from tunelab.training.loop import _keep_best
    from tunelab.training.run_directory import best_checkpoint, method_dir

    model = tunelab.attach(tiny_llama(), "lora", r=2)
    pos = {"step": 0, "best": None, "best_metric": None}
    kept = {}
    for step, score in enumerate(scores, start=1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01 * step)
        pos["step"] = step
        metrics = {key: score, "n": 4} if key != "eval_loss" else {"n": 4, "without_reference": 4, key: score}
        _keep_best(model, metrics, tmp_path, pos)
        kept[step] = _lora_b(model)
    info = best_checkpoint(tmp_path)
    assert info == {"step": best_step, "metric": key, "value": scores[best_step - 1],
                    "higher_is_better": key == "accuracy"}
    loaded = tunelab.load(tunelab.attach(tiny_llama(), "lora", r=2), method_dir(tmp_path, "best"))
    for n, t in _lora_b(loaded).items():
        assert torch.equal(t, kept[best_step][n])


@pytest.fixture(scope="module")
def lm_base(tmp_path_factory):
    from test_export_gguf import bpe_tokenizer

    d = tmp_path_factory.mktemp("lm-base")
    tiny_llama(vocab_size=320).save_pretrained(d)
    bpe_tokenizer().save_pretrained(d)
    return d


def test_best_checkpoint_evaluates_merges_and_exports(lm_base, tmp_path):
    from tunelab.training.run_directory import best_checkpoint, load_trained

    run = train(tmp_path, lm_base, lm_rows(), lm_rows()[:6], "train.eval_every=1", "train.max_steps=3")
    info = best_checkpoint(run)
    assert info["metric"] == "accuracy" and 1 <= info["step"] <= 3
    steps = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    scores = [s["eval"]["accuracy"] for s in steps if "eval" in s] + [json.loads((run / "metrics.json").read_text())["metrics"]["accuracy"]]
    assert info["value"] == max(scores)  # the final evaluation competes too

    res = runner.invoke(app, ["eval", str(run), "--checkpoint", "best"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert json.loads(out[out.index("{\n"):])["accuracy"] == info["value"]

    for args in (["merge", str(run), str(tmp_path / "merged"), "--dtype", "fp32", "--checkpoint", "best"],
                 ["export", str(run), str(tmp_path / "peft"), "--format", "peft", "--checkpoint", "best"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args, res.output)
    assert "--checkpoint best" in (tmp_path / "merged" / "README.md").read_text()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    model, _, _ = load_trained(run, device="cpu", checkpoint="best")
    with torch.no_grad():
        ref = model.eval()(ids).logits
    assert (merged_logits(tmp_path / "merged", ids) - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))


def test_a_run_without_evaluations_during_training_says_so(lm_base, tmp_path):
    run = train(tmp_path, lm_base, lm_rows(), lm_rows()[:4])
    assert not (run / "checkpoints" / "best").exists()
    res = runner.invoke(app, ["eval", str(run), "--checkpoint", "best"])
    assert res.exit_code != 0 and "train.eval_every" in res.output, res.output
    res = runner.invoke(app, ["merge", str(run), str(tmp_path / "m"), "--checkpoint", "bets"])
    assert res.exit_code != 0 and "allowed: final, best" in res.output, res.output
