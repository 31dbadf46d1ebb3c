"""bench/advise_score.py's scoring: the tied group at the truth's seed noise, regret, coverage, MAE and
the baselines' picks, on made-up truths (no training)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def score():
    spec = importlib.util.spec_from_file_location("advise_score", ROOT / "bench" / "advise_score.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CASE = {"name": "t", "metric": "accuracy", "labels": ["full", "lora", "loreft"], "sizes": [32, 64, 128, 256]}


def truth_rows(means: dict, spread: float):
    return [{"label": k, "seed": s, "metric": m + d} for k, m in means.items() for s, d in enumerate((-spread, 0, spread))]


def points(at_top: dict, params: dict):
    return [{"label": k, "size": 256, "seed": s, "metric": v, "trainable_params": params[k]}
            for k, v in at_top.items() for s in (0, 1)]


def test_the_tied_group_is_the_truths_own_seed_noise(score):
    truth = score.truth_of(truth_rows({"full": 0.80, "lora": 0.79, "loreft": 0.70}, 0.02))
    best, tied = score.tied_with_best(truth, higher=True)
    assert best == "full" and tied == ["full", "lora"]  # 0.01 apart with a 0.02 spread: a tie; 0.10 is not
    quiet = score.truth_of(truth_rows({"full": 0.80, "lora": 0.79, "loreft": 0.70}, 0.001))
    assert score.tied_with_best(quiet, higher=True)[1] == ["full"]


def test_a_pick_inside_the_tie_is_right_with_its_regret(score):
    pred = {"pick": "lora", "verdict": "predicted",
            "methods": {"full": {"metric": 0.75, "lo": 0.70, "hi": 0.85}, "lora": {"metric": 0.79, "lo": 0.78, "hi": 0.80},
                        "loreft": {"metric": 0.60, "lo": 0.55, "hi": 0.65}}}
    sc = score.score_case(CASE, pred, points({"full": 0.6, "lora": 0.7, "loreft": 0.65}, {"full": 2e7, "lora": 3e5, "loreft": 1e4}),
                          truth_rows({"full": 0.80, "lora": 0.79, "loreft": 0.70}, 0.02), None)
    s = sc["scores"]
    assert s["advise"]["right"] and s["advise"]["regret"] == pytest.approx(0.01)
    assert s["advise"]["n_inside"] == 2 and s["advise"]["coverage"] == pytest.approx(2 / 3)  # loreft's range misses
    assert s["advise"]["mae"] == pytest.approx((0.05 + 0.0 + 0.10) / 3)
    assert s["largest_small"]["pick"] == "lora" and s["largest_small"]["mae"] == pytest.approx((0.2 + 0.09 + 0.05) / 3)
    assert s["always_full"]["pick"] == "full" and s["always_full"]["regret"] == 0
    assert s["most_params"]["pick"] == "full" and s["always_lora"]["pick"] == "lora"
    # loreft is outside the tie: picking it is wrong, with its regret
    sc = score.score_case(CASE, {**pred, "pick": "loreft"}, [], truth_rows({"full": 0.80, "lora": 0.79, "loreft": 0.70}, 0.02), None)
    assert sc["scores"]["advise"]["right"] is False and sc["scores"]["advise"]["regret"] == pytest.approx(0.10)


def test_overall_pools_the_cases(score):
    cases = [{"scores": {"advise": {"right": True, "regret": 0.0, "mae": 0.02, "n_inside": 3, "n_ranges": 3}}},
             {"scores": {"advise": {"right": False, "regret": 0.1, "mae": 0.04, "n_inside": 1, "n_ranges": 3}}}]
    o = score.overall(cases)["advise"]
    assert o["pick_accuracy"] == 0.5 and o["mean_regret"] == pytest.approx(0.05) and o["coverage"] == pytest.approx(4 / 6)


def test_the_rules_of_thumb_lora_is_checked(score):
    sec = {"full_size": 1024, "methods": [{"label": "lora", "r": 8, "target_modules": "all-linear", "train": {"lr": 1e-3}}]}
    score.check_rules_of_thumb(sec, 1e-4, "x.yaml")
    assert score.lora_rank_of_thumb(1024) == 8 and score.lora_rank_of_thumb(20000) == 32
    with pytest.raises(SystemExit, match="train.lr must be 10x full's"):
        score.check_rules_of_thumb(sec, 3e-4, "x.yaml")
    for case in score.CASES:  # every committed case follows them
        score.load_case(case)
