"""Confidence intervals over seeds and the paired bootstrap over eval examples (no models)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tunelab.report import stats


def test_t_interval_matches_the_textbook_formula():
    ci = stats.t_interval([0.80, 0.82, 0.84])
    # mean 0.82, s = 0.02, t(0.975, 2) = 4.3027 -> half = 4.3027 * 0.02 / sqrt(3) = 0.04968
    assert ci["mean"] == pytest.approx(0.82) and ci["std"] == pytest.approx(0.02)
    assert ci["half"] == pytest.approx(4.302653 * 0.02 / np.sqrt(3), rel=1e-5)
    assert ci["lo"] == pytest.approx(0.82 - ci["half"]) and ci["n"] == 3
    one = stats.t_interval([0.5])
    assert one["mean"] == 0.5 and one["lo"] is None and one["half"] is None
    assert stats.t_interval([])["mean"] is None


def test_paired_bootstrap_no_difference_and_a_real_one():
    rng = np.random.default_rng(1)
    base = {f"ex{i}": float(v) for i, v in enumerate(rng.random(500) < 0.7)}
    same = stats.paired_bootstrap(base, dict(base), n_boot=2000)
    assert same["diff"] == 0 and same["p"] == 1.0 and same["lo"] == same["hi"] == 0
    # b gets 40 extra examples right out of 500: +0.08, well outside the noise of pairing
    flipped = [k for k, v in base.items() if v == 0][:40]
    better = {k: (1.0 if k in flipped else v) for k, v in base.items()}
    t = stats.paired_bootstrap(better, base, n_boot=2000)
    assert t["diff"] == pytest.approx(0.08) and t["p"] < 0.01 and 0 < t["lo"] < 0.08 < t["hi"]
    assert t["n_examples"] == 500


def test_paired_bootstrap_is_calibrated_under_the_null():
    """Two methods with the same 70% accuracy: p < 0.05 in about 5% of repeats, not more."""
    rng = np.random.default_rng(0)
    hits = 0
    for rep in range(100):
        a = {f"k{i}": float(rng.random() < 0.7) for i in range(200)}
        b = {f"k{i}": float(rng.random() < 0.7) for i in range(200)}
        t = stats.paired_bootstrap(a, b, n_boot=500, seed=rep)
        hits += t["p"] < 0.05
        assert (t["lo"] <= 0 <= t["hi"]) or t["p"] < 0.1  # the CI excludes 0 only with a small p
    assert hits <= 12
    with pytest.raises(ValueError, match="shared eval examples"):
        stats.paired_bootstrap({"x": 1.0}, {"y": 1.0})


def test_pooled_averages_each_example_over_seeds():
    got = stats.pooled([{"a": 1.0, "b": 0.0, "c": 1.0}, {"a": 0.0, "b": 0.0}])
    assert got == {"a": 0.5, "b": 0.0}  # only examples every seed scored


def test_example_scores_per_task_kind():
    cls = [{"where": "dev.tsv:2", "prediction": "positive", "reference": "positive"},
           {"where": "dev.tsv:3", "prediction": "negative", "reference": "positive"}]
    s, kind = stats.example_scores(cls)
    assert kind == "match" and s == {"dev.tsv:2": 1.0, "dev.tsv:3": 0.0}
    qa = [{"id": "q1", "prediction": "the Eiffel tower", "reference": ["Eiffel Tower", "tower"]}]
    s, kind = stats.example_scores(qa)
    assert kind == "token_f1" and s["q1"] == pytest.approx(2 * 2 / (3 + 2))
    gen = [{"where": f"a.json:[{i}]", "prediction": "the cat sat on the mat", "reference": "a cat sat on a mat today"}
           for i in range(3)]
    s, kind = stats.example_scores(gen)
    # LCS "cat sat on mat" = 4 tokens; F1 = 2*4/(6+7)
    assert kind == "rougeL" and s["a.json:[0]"] == pytest.approx(8 / 13)
    rs = [{"where": "t:1", "prediction": "A", "reference": "B", "correct": True}]
    assert stats.example_scores(rs) == ({"t:1": 1.0}, "correct")


def test_bad_predictions_file_names_the_line(tmp_path):
    (tmp_path / "predictions.jsonl").write_text(json.dumps({"prediction": "a", "reference": "a"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"predictions.jsonl:2: not valid JSON"):
        stats.read_predictions(tmp_path)
    (tmp_path / "predictions.jsonl").write_text(json.dumps({"text": "no prediction"}) + "\n")
    with pytest.raises(ValueError, match=r"predictions.jsonl:1: expected an object with 'prediction'"):
        stats.read_predictions(tmp_path)
    assert stats.read_predictions(tmp_path / "nowhere") is None


def test_environment_names_versions_and_hardware():
    env = stats.environment()
    assert env["torch"] and env["python"] and "cores" in env["cpu"]
