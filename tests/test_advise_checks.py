"""advise never gives a confident answer from too little: synthetic learning curves with known winners
(crossing curves, ties, plateaus, a metric stuck at its floor, a law with as many parameters as sizes)."""

from __future__ import annotations

import json

import pytest

from tunelab.report import advise as ra
from tunelab.report import advise_checks as checks
from tunelab.report import html

NOISE = {0: 0.0, 1: 0.01, 2: -0.01}  # relative, per seed


def err_law(a, beta, e):
    return lambda d: a * d ** -beta + e


def rows_for(curves: dict, sizes, seeds=(0, 1, 2), metric="accuracy", noise=NOISE):
    """Runs whose ``metric`` is 1 - error(d) per label; ``curves``: label -> callable or {size: value}."""
    rows, runs = [], []
    for label, c in curves.items():
        for d in sizes:
            for s in seeds:
                name = f"{label}-n{d}-s{s}"
                runs.append({"run": name, "label": label, "size": d, "seed": s})
                if callable(c):
                    value = 1 - c(d) * (1 + noise[s])
                else:
                    value = c[d][s] if isinstance(c[d], list) else c[d]
                rows.append({"run": name, metric: value, "eval_loss": 1.0})
    return rows, runs


def analyse(curves, sizes, full, metric="accuracy", **manifest):
    rows, runs = rows_for(curves, sizes, metric=metric)
    return ra.analyse(rows, {"runs": runs, "sizes": sizes, "full_size": full, "target": metric, **manifest},
                      metric, True)


@pytest.fixture(autouse=True)
def few_boots(monkeypatch):
    monkeypatch.setattr(ra, "N_BOOT", 30)


SIZES = [64, 128, 256, 512]


def test_crossing_curves_pick_the_method_that_wins_at_the_full_size():
    # lora learns fast then flattens (E 0.15); full starts worse and keeps improving (E 0.02): they cross
    # near 700 rows, so the largest small size (512) still favours lora, the full size (4096) full.
    lora, full = err_law(1.0, 0.3, 0.15), err_law(1.9, 0.3, 0.02)
    assert 1 - lora(512) > 1 - full(512) and 1 - full(4096) > 1 - lora(4096) + 0.03
    res = analyse({"lora": lora, "full": full}, SIZES, 4096)
    assert res["pick"] == "full" and res["verdict"] == "predicted" and res["tied"] == ["full"]
    p = res["methods"]["full"]
    assert p["metric"] == pytest.approx(1 - full(4096), abs=0.01)
    assert p["metric_range"]["lo"] <= 1 - full(4096) <= p["metric_range"]["hi"]
    assert any(c["better_above"] == "full" for c in res["crossings"])


def test_a_tie_is_too_close_to_call_and_names_the_tied_group():
    a = err_law(2.0, 0.4, 0.05)
    b = err_law(2.0, 0.4, 0.052)  # 0.002 apart everywhere: inside the seed noise
    res = analyse({"a": a, "b": b, "c": err_law(2.0, 0.4, 0.25)}, SIZES, 4096)
    assert res["verdict"] == "too_close" and sorted(res["tied"]) == ["a", "b"]
    assert "Too close to call" in ra.markdown(res) and "c" not in res["tied"]


def test_a_law_with_as_many_parameters_as_sizes_is_refused_and_says_which_sizes_to_run():
    res = analyse({"a": err_law(2.0, 0.4, 0.05), "b": err_law(1.0, 0.3, 0.1)}, [64, 128, 256], 4096)
    assert res["methods"] == {} and res["verdict"] == "too_little_data"
    assert "3 parameters" in res["errors"]["a"] and "at least 4 sizes" in res["errors"]["a"]
    assert res["suggest_sizes"] == [512, 1024] and "run sizes 512, 1024" in res["verdict_text"]
    md = ra.markdown(res)
    assert "**Too little data to predict.**" in md and "Predicted winner" not in md


def test_f1_stuck_at_zero_is_left_out_without_chance_loss_and_blocks_a_confident_call():
    # The NER case: LoRA's F1 is 0 at the small sizes (it has not started), LoReFT learns
    # steadily. LoRA cannot be fitted; since it measured better at the largest size, there is no call.
    loreft = {64: 0.30, 128: 0.40, 256: 0.48, 512: 0.55}
    lora = {64: 0.0, 128: 0.0, 256: 0.0, 512: 0.70}
    curves = {"loreft": {d: [v, v + 0.005, v - 0.005] for d, v in loreft.items()},
              "lora": {d: [v, v + 0.004, v - 0.004] if v else [0.0] * 3 for d, v in lora.items()}}
    res = analyse(curves, SIZES, 4096, metric="f1")
    assert [c["d"] for c in res["plateau"]["lora"]["at_floor"]] == [64, 128, 256]
    assert "lora" in res["errors"] and "loreft" in res["methods"]
    assert res["verdict"] == "too_little_data" and res["pick"] == "lora"
    assert "lora could not be fitted and measured better than loreft" in res["verdict_text"]
    # With LoRA still worse at the largest size, LoReFT is a fair pick among the fitted methods.
    curves["lora"][512] = [0.2, 0.204, 0.196]
    res = analyse(curves, SIZES, 4096, metric="f1")
    assert res["pick"] == "loreft" and res["verdict"] == "predicted"


def test_accuracy_at_the_majority_class_is_detected_as_a_floor():
    # A method predicting the majority class gets the class share whatever the seed; another learns.
    learns = err_law(1.5, 0.4, 0.05)
    stuck = {d: [0.55, 0.55, 0.55] for d in SIZES}
    stuck[512] = [0.60, 0.62, 0.61]
    res = analyse({"learns": learns, "stuck": stuck}, SIZES, 4096)
    assert [c["d"] for c in res["plateau"]["stuck"]["at_floor"]] == [64, 128, 256]
    assert "stuck" in res["errors"] and res["pick"] == "learns"
    assert any("every seed at the same worst value" in w for w in res["plateau"]["stuck"]["warnings"])


def test_identical_runs_everywhere_are_degenerate_and_a_real_law_is_not():
    # Every run at one value: nothing learned anywhere (each cell flagged); a real law with varied
    # values never is.
    same = [{"d": d, "x": None, "loss": 0.45} for d in SIZES for _ in range(3)]
    checks.mark_worst({"a": same})
    assert [c["d"] for c in checks.floor_cells(same, 1.0)["at_floor"]] == SIZES
    varied = [{"d": d, "x": None, "loss": 0.5 * d ** -0.3 * (1 + n)} for d in SIZES for n in (0, 0.01, -0.01)]
    checks.mark_worst({"a": varied})
    assert checks.floor_cells(varied, 1.0)["at_floor"] == []


def test_a_prediction_beyond_what_the_measured_fall_allows_is_implausible():
    # A power law falls ever more slowly per doubling of D: from the largest size it cannot fall faster
    # than the steepest measured step continued in log D; a law predicting below that is not believed.
    ps = [{"d": d, "loss": v * (1 + n)} for d, v in zip(SIZES, [0.45, 0.40, 0.36, 0.33], strict=True)
          for n in (0, 0.005, -0.005)]
    bound = checks.plausible_range(ps, 0.25, 4096)
    assert bound["plausible"] and bound["floor"] < 0.25
    low = checks.plausible_range(ps, 0.05, 4096)
    assert not low["plausible"] and "steepest measured fall" in low["why"]


def test_the_stated_range_is_wider_than_the_seed_interval_and_inside_the_metric_range():
    res = analyse({"a": err_law(3.0, 0.35, 0.02), "b": err_law(1.0, 0.2, 0.1)}, SIZES, 16384)
    for p in res["methods"].values():
        ci, rng = p["metric_ci"], p["metric_range"]
        assert rng["lo"] <= ci["lo"] and rng["hi"] >= ci["hi"]
        assert 0.0 <= rng["lo"] <= rng["hi"] <= 1.0


def test_markdown_is_rendered_in_the_html():
    out = html.inline_markdown("**Predicted winner: lora** (F1 <0.9>) `advise --sizes`")
    assert out.startswith("<strong>Predicted winner: lora</strong>") and "**" not in out
    assert "&lt;0.9&gt;" in out and "<code>advise --sizes</code>" in out


def test_the_report_page_shows_the_verdict_in_bold(tmp_path):
    from tunelab.report import build_report

    rows, runs = rows_for({"a": err_law(2.0, 0.4, 0.05), "b": err_law(1.0, 0.3, 0.2)}, SIZES)
    for r in rows:
        d = tmp_path / "runs" / r["run"]
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"metrics": {k: v for k, v in r.items() if k != "run"},
                                                    "run": {"method": "lora", "seed": 0}}))
    manifest = {"kind": "advise", "runs": runs, "sizes": SIZES, "full_size": 4096, "target": "accuracy",
                "metric": "accuracy", "methods": ["a", "b"]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    page = build_report(tmp_path).read_text()
    assert "<strong>Predicted winner: a</strong>" in page and "**Predicted winner" not in page


def test_the_same_runs_in_another_order_give_the_same_advice():
    rows, runs = rows_for({"a": err_law(2.0, 0.4, 0.05), "b": err_law(1.0, 0.3, 0.1)}, SIZES)
    manifest = {"sizes": SIZES, "full_size": 4096, "target": "accuracy"}
    one = ra.analyse(rows, {**manifest, "runs": runs}, "accuracy", True)
    two = ra.analyse(rows[::-1], {**manifest, "runs": runs[::-1]}, "accuracy", True)
    for k in ("a", "b"):
        assert one["methods"][k]["metric_range"] == pytest.approx(two["methods"][k]["metric_range"], rel=1e-6)


def test_the_stated_range_allows_for_the_seeds_a_user_will_run():
    # Seeds 0.02 apart at the two largest sizes (pooled sd 0.014): the range grows by 2·sd/√2 = 0.02
    # on each side beyond the law's own; the smaller sizes' wider spread is not used.
    ps = [{"d": d, "x": None, "loss": v} for d, vs in
          {64: (0.5, 0.6), 128: (0.40, 0.42), 256: (0.30, 0.32), 512: (0.25, 0.27)}.items() for v in vs]
    noise = checks.run_noise(ps)
    assert noise["n"] == 2 and noise["sd"] == pytest.approx(0.01 * 2**0.5) and noise["half"] == pytest.approx(0.02)
    res = analyse({"a": err_law(2.0, 0.4, 0.05), "b": err_law(1.0, 0.3, 0.2)}, SIZES, 4096)
    p = res["methods"]["a"]
    assert p["loss_range"]["hi"] - p["law_range"]["hi"] == pytest.approx(p["run_noise"]["half"])
    assert p["run_noise"]["half"] > 0


def test_too_close_to_call_picks_the_best_measured_at_the_largest_small_size():
    # b is flatter (the law puts a ahead at 4,096 rows) but measured better at 512 rows; the ranges
    # overlap, so the pick is the measurement nearest the full size, and the law's winner is named.
    a = err_law(2.0, 0.4, 0.05)
    b_err = {64: a(64) - 0.06, 128: a(128) - 0.03, 256: a(256) - 0.012, 512: a(512) - 0.003}
    b = {d: [1 - e * (1 + n) for n in NOISE.values()] for d, e in b_err.items()}
    res = analyse({"a": a, "b": b}, SIZES, 4096)
    assert res["verdict"] == "too_close" and res["law_winner"] == "a" and res["pick"] == "b"
    assert "b measured best at 512 rows and is the pick" in res["verdict_text"]


def test_a_metric_that_does_not_improve_with_data_is_not_extrapolated():
    # At a fixed step budget more rows can mean fewer passes and no gain (CoNLL NER here: F1 0.33 at
    # 32 rows, 0.23 at 256): the prediction is the largest size's value, said so, not the law's.
    falls = {64: 0.33, 128: 0.30, 256: 0.26, 512: 0.23}
    curves = {"falls": {d: [v, v + 0.003, v - 0.003] for d, v in falls.items()}, "learns": err_law(2.0, 0.4, 0.5)}
    res = analyse(curves, SIZES, 4096, metric="f1")
    p = res["methods"]["falls"]
    assert p["metric"] == pytest.approx(0.23) and "law_prediction" in p and "no gain with data" in p["no_gain"]
    assert p["metric_range"]["lo"] <= 0.23 <= p["metric_range"]["hi"]
    assert "no gain with data" in ra.markdown(res) and "no_gain" not in res["methods"]["learns"]


def test_a_value_recurring_exactly_across_runs_is_a_degenerate_output():
    # One class for every row scores that class's share (0.647 here) whatever the method, size and seed.
    share = 0.6466666666666667
    stuck = {64: [share, share, share], 128: [share, share, share], 256: [0.66, 0.67, 0.68], 512: [0.70, 0.71, 0.72]}
    other = {64: [share, 0.55, 0.56], 128: [0.60, 0.61, 0.62], 256: [0.65, 0.66, 0.64], 512: [0.69, 0.70, 0.71]}
    res = analyse({"stuck": stuck, "other": other}, SIZES, 4096)
    assert [c["d"] for c in res["plateau"]["stuck"]["at_floor"]] == [64, 128]
    assert res["plateau"]["other"]["at_floor"] == []  # one run at that value is not a cell at the floor
    assert any("recurs exactly across runs" in w for w in res["plateau"]["stuck"]["warnings"])
