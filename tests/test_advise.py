"""tunelab advise on synthetic losses that follow a known law per method (no models)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tunelab.report import advise as ra
from tunelab.sweeps import advise as adv
from tunelab.sweeps.runner import SerialExecutor

# lora is better with little data, full with more: the curves cross near D = 676.
LAWS = {"lora": {"A": 2.0, "beta": 0.3, "E": 0.3}, "full": {"A": 10.0, "beta": 0.5, "E": 0.2}}
NOISE = {0: 0.0, 1: 0.01, 2: -0.01}  # relative, per seed


def law(method: str, d: float) -> float:
    p = LAWS[method]
    return p["A"] * d ** -p["beta"] + p["E"]


def accuracy(loss: float) -> float:
    return 0.5 + 0.45 / (1 + math.exp((loss - 0.7) / 0.1))


def crossing() -> float:
    lo, hi = 100.0, 5000.0
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if law("lora", mid) < law("full", mid) else (lo, mid)
    return lo


class FakeTrain:
    def __init__(self):
        self.calls = []
        self.executor = SerialExecutor(self.run)  # trains the sweep's runs with the fake, in this process

    def run(self, cfg) -> dict:
        self.calls.append(cfg)
        out = cfg.run_dir()
        loss = law(cfg.method.name, cfg.data.max_train) * (1 + NOISE[cfg.train.seed])
        metrics = {"metrics": {"accuracy": accuracy(loss), "n": 872, "eval_loss": loss},
                   "run": {"method": cfg.method.name, "task": "sentiment", "seed": cfg.train.seed,
                           "trainable_params": 1000, "wall_time_s": 1.0, "steps": 3}}
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics))
        return metrics


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(ra, "N_BOOT", 40)  # enough resamples for the test's loose interval checks
    return FakeTrain()


def write_cfg(tmp_path, **advise):
    cfg = {"model": "smollm2-135m", "method": "lora", "task": {"name": "sentiment"},
           "data": {"train": "train.jsonl", "eval": "dev.jsonl"}, "train": {"epochs": 1, "batch_size": 8},
           "advise": {"methods": ["lora", "full"], "sizes": [125, 250, 500, 1000], "full_size": 4000, **advise}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_advise_predicts_the_known_law_the_winner_and_the_flip(tmp_path, fake):
    out = adv.advise(write_cfg(tmp_path, verify=True), out_dir=tmp_path / "adv", say=lambda m: None,
                     executor=fake.executor)
    names = sorted(c.run_dir().name for c in fake.calls)
    assert len(names) == 2 * 5 * 3 and "full-n4000-s2" in names  # 4 small sizes + the verify size, 3 seeds
    assert {c.data.max_train for c in fake.calls} == {125, 250, 500, 1000, 4000}
    res = json.loads((out / "advise.json").read_text())
    for m in LAWS:
        p = res["methods"][m]
        assert p["loss"] == pytest.approx(law(m, 4000), rel=0.02)  # extrapolated 4x beyond the data
        assert p["fit"]["params"]["beta"] == pytest.approx(LAWS[m]["beta"], abs=0.05)
        assert p["loss_ci"]["lo"] <= p["loss"] <= p["loss_ci"]["hi"]
        assert p["metric"] == pytest.approx(accuracy(law(m, 4000)), abs=0.02)  # through the loss->metric map
        assert p["backtest"]["diagnostics"]["good"], p["backtest"]
        assert res["truth"][m]["loss_rel_error"] < 0.02 and res["truth"][m]["in_loss_ci"]
    assert res["winner"] == "full" == res["true_winner"] and res["methods"]["full"]["p_win"] >= 0.9
    flips = res["crossings"]
    assert len(flips) == 1 and flips[0]["d"] == pytest.approx(crossing(), rel=0.1)
    assert flips[0]["better_below"] == "lora" and flips[0]["better_above"] == "full"
    md = (out / "results.md").read_text()
    assert "**Predicted winner: full**" in md and "prediction correct" in md and "lora is better below" in md
    assert (out / "plots" / "advise.png").read_bytes()[:4] == b"\x89PNG" and "Advice at 4000" in (out / "report.html").read_text()


def test_a_flat_loss_is_flagged_not_trusted(monkeypatch):
    monkeypatch.setattr(ra, "N_BOOT", 10)
    """All losses at chance (the issue's failure): the backtest must not call the law good."""
    rows, runs = [], []
    for size in (125, 250, 500, 1000):
        for seed in (0, 1, 2):
            name = f"m-n{size}-s{seed}"
            runs.append({"run": name, "label": "m", "size": size, "seed": seed})
            rows.append({"run": name, "eval_loss": 0.6931 + 0.002 * ((seed * 7 + size) % 3 - 1), "accuracy": 0.5})
    res = ra.analyse(rows, {"runs": runs, "sizes": [125, 250, 500, 1000], "full_size": 4000}, "accuracy", True)
    # accuracy 0.5 in every run is a degenerate output: no size is fitted and there is no prediction
    assert "m" in res["errors"] and res["verdict"] == "too_little_data"
    # the backtest alone (what the fit would have been judged by) does not call the flat law good either
    pts = [{"d": float(r["size"]), "x": None, "loss": row["eval_loss"]} for r, row in zip(runs, rows, strict=True)]
    diag = ra.backtest(pts)["diagnostics"]
    assert not diag["good"] and diag["warnings"]


@pytest.mark.parametrize("advise, match", [
    ({"full_size": None}, "full data size"),
    ({"full_size": 800}, "must be larger than the largest small size 1000"),
    ({"sizes": [250, 500]}, "at least 3 small data sizes"),
    ({"factor": "rank"}, "go together"),
    ({"factor": "method", "values": ["lora"]}, "must be numeric"),
    ({"budget": "dollars"}, "unknown budget 'dollars'"),
    ({"steps": "most"}, "advise.steps: 'most'"),
])
def test_bad_advise_settings_fail_before_training(tmp_path, fake, advise, match):
    with pytest.raises(ValueError, match=match):
        adv.advise(write_cfg(tmp_path, **advise), out_dir=tmp_path / "adv", say=lambda m: None,
                   executor=fake.executor)
    assert fake.calls == []


def test_output_dir_override_sets_the_directory_or_says_to_use_out(tmp_path, fake):
    cfg = write_cfg(tmp_path, sizes=[125, 250, 500], full_size=1000)
    out = adv.advise(cfg, [f"output_dir={tmp_path / 'here'}"], seeds=[0], say=lambda m: None, executor=fake.executor)
    assert out == tmp_path / "here" and (out / "advise.json").exists()
    with pytest.raises(ValueError, match="pass the sweep's directory once, as --out"):
        adv.advise(cfg, [f"output_dir={tmp_path / 'a'}"], out_dir=tmp_path / "b", seeds=[0], say=lambda m: None,
                   executor=fake.executor)


def test_steps_full_trains_every_size_at_the_full_budget(tmp_path, fake):
    adv.advise(write_cfg(tmp_path, steps="full", sizes=[125, 250, 500], full_size=1000), seeds=[0],
               out_dir=tmp_path / "adv", say=lambda m: None, executor=fake.executor)
    assert {c.train.max_steps for c in fake.calls} == {125}  # ceil(1000 rows / batch 8), one epoch of the full set


def test_verify_with_some_seeds_only(tmp_path, fake):
    adv.advise(write_cfg(tmp_path, sizes=[125, 250, 500], full_size=1000, verify=[1]), seeds=[0, 1],
               out_dir=tmp_path / "adv", say=lambda m: None, executor=fake.executor)
    full = sorted(c.run_dir().name for c in fake.calls if c.data.max_train == 1000)
    assert full == ["full-n1000-s1", "lora-n1000-s1"]
    res = json.loads((tmp_path / "adv" / "advise.json").read_text())
    assert res["truth"]["lora"]["seeds"] == 1


def test_cli_advise_bad_input_is_one_clear_line(tmp_path, fake):
    from typer.testing import CliRunner

    from tunelab.cli import app

    res = CliRunner().invoke(app, ["advise", str(write_cfg(tmp_path)), "--full-size", "500"])
    assert res.exit_code == 2 and "full_size 500 must be larger than the largest small size 1000" in res.output
    assert "Traceback" not in res.output and fake.calls == []
    res = CliRunner().invoke(app, ["compare", str(write_cfg(tmp_path)), "--methods", "lora", "--budget", "joules"])
    assert res.exit_code == 2 and "unknown budget 'joules'" in res.output


def _rows(losses: dict[str, dict[int, float]], seeds=(0, 1, 2)):
    """Report rows and the manifest's plan for synthetic losses label -> size -> loss (seed noise added)."""
    rows, runs = [], []
    for label, by_size in losses.items():
        for size, loss in by_size.items():
            for seed in seeds:
                name = f"{label}-n{size}-s{seed}"
                runs.append({"run": name, "label": label, "size": size, "seed": seed})
                value = loss * (1 + NOISE[seed])
                rows.append({"run": name, "eval_loss": value, "accuracy": accuracy(value)})
    return rows, runs


def test_sizes_at_chance_are_left_out_and_the_law_above_them_is_recovered(monkeypatch):
    """One-epoch runs on few rows never leave ln 2; the law holds once learning starts. With
    chance_loss the plateau is dropped and the rest extrapolates; without it the fit is flagged."""
    monkeypatch.setattr(ra, "N_BOOT", 10)
    chance, sizes = math.log(2), [125, 250, 500, 1000, 2000, 4000]
    true = {"A": 15.0, "beta": 0.6, "E": 0.25}

    def loss(d):
        return min(chance, true["A"] * d ** -true["beta"] + true["E"])

    assert loss(250) == chance and loss(500) < chance * 0.97  # two sizes on the plateau
    rows, runs = _rows({"m": {d: loss(d) for d in sizes}})
    manifest = {"runs": runs, "sizes": sizes, "full_size": 16000, "chance_loss": chance}
    res = ra.analyse(rows, manifest, "accuracy", True)
    p = res["methods"]["m"]
    assert [c["d"] for c in p["plateau"]["at_chance"]] == [125, 250] and p["points"] == 4 * 3
    assert p["loss"] == pytest.approx(true["A"] * 16000 ** -true["beta"] + true["E"], rel=0.03)
    assert "sit at chance" in ra.markdown(res) and not p["plateau"]["concave"]
    # Without the chance level the plateau-then-drop shape itself is caught and the fit is not trusted.
    res = ra.analyse(rows, {**manifest, "chance_loss": None}, "accuracy", True)
    p = res["methods"]["m"]
    assert p["plateau"]["concave"] and not p["good"]
    assert "falls faster at the large sizes" in ra.markdown(res)


def test_a_method_with_too_few_sizes_above_chance_is_refused(monkeypatch):
    monkeypatch.setattr(ra, "N_BOOT", 10)
    chance = math.log(2)
    rows, runs = _rows({"flat": {125: 0.693, 250: 0.69, 500: 0.686, 1000: 0.60},
                        "good": {d: 3.0 * d ** -0.5 + 0.2 for d in (125, 250, 500, 1000)}})
    res = ra.analyse(rows, {"runs": runs, "sizes": [125, 250, 500, 1000], "full_size": 4000, "chance_loss": chance},
                     "accuracy", True)
    assert "flat" not in res["methods"] and "refused: 1 data size(s) above chance" in res["errors"]["flat"]
    assert res["winner"] == "good" and not res["plateau"]["good"]["warnings"] and res["methods"]["good"]["good"]
    assert "among the fitted methods (flat not fitted)" in ra.markdown(res)


def test_a_real_law_is_not_called_a_plateau():
    for m in LAWS:
        pts = [{"d": float(d), "x": None, "loss": law(m, d) * (1 + NOISE[s]), "seed": s}
               for d in (125, 250, 500, 1000) for s in NOISE]
        assert ra.plateau(pts, math.log(4)) == {"at_chance": [], "concave": [], "warnings": []}  # 4 classes


def test_per_size_steps_warn_when_the_small_runs_are_short(tmp_path, fake):
    said = []
    adv.advise(write_cfg(tmp_path, sizes=[125, 250, 500], full_size=2000), seeds=[0], out_dir=tmp_path / "a",
               say=said.append, executor=fake.executor)
    assert any("trains 16 steps, the full size 250" in m and "advise.steps: full" in m for m in said)
    said.clear()
    adv.advise(write_cfg(tmp_path, sizes=[125, 250, 500], full_size=1000), seeds=[0], out_dir=tmp_path / "b",
               say=said.append, executor=fake.executor)
    assert not any("warning" in m for m in said)


@pytest.mark.parametrize("bad", [0, -1, "ln2", True])
def test_bad_chance_loss_fails_before_training(tmp_path, fake, bad):
    with pytest.raises(ValueError, match="advise.chance_loss: .* is not a positive number"):
        adv.advise(write_cfg(tmp_path, chance_loss=bad), out_dir=tmp_path / "adv", say=lambda m: None,
                   executor=fake.executor)
    assert fake.calls == []


def test_target_accuracy_fits_the_error_and_predicts_the_metric_directly(monkeypatch):
    """advise.target: accuracy: the law is fitted to 1 - accuracy (a known law here) and the metric is
    1 - the prediction, not a loss->metric map (eval loss can rise with overconfidence while accuracy improves)."""
    monkeypatch.setattr(ra, "N_BOOT", 10)
    rows, runs = [], []
    for m in LAWS:
        for d in (125, 250, 500, 1000, 4000):
            for s in NOISE:
                name = f"{m}-n{d}-s{s}"
                runs.append({"run": name, "label": m, "size": d, "seed": s})
                err = law(m, d) / 4 * (1 + NOISE[s])
                rows.append({"run": name, "eval_loss": 5.0 - d / 1000, "accuracy": 1 - err})
    res = ra.analyse(rows, {"runs": runs, "sizes": [125, 250, 500, 1000], "full_size": 4000, "target": "accuracy"},
                     "accuracy", True)
    assert res["target"] == "1 - accuracy" and res["metric_map"] == {"kind": "error", "top": 1.0}
    for m in LAWS:
        p = res["methods"][m]
        assert p["metric"] == pytest.approx(1 - law(m, 4000) / 4, abs=0.003) and p["good"]
        assert p["fit"]["params"]["beta"] == pytest.approx(LAWS[m]["beta"], abs=0.05)
        assert res["truth"][m]["loss_rel_error"] < 0.03
    assert res["winner"] == "full" == res["true_winner"]
    md = ra.markdown(res)
    assert "predicted 1 - accuracy @ 4000" in md and "accuracy = 1 - prediction" in md


def test_bad_target_fails_before_training(tmp_path, fake):
    with pytest.raises(ValueError, match="advise.target: 3 is not a metric name"):
        adv.advise(write_cfg(tmp_path, target=3), out_dir=tmp_path / "adv", say=lambda m: None,
                   executor=fake.executor)


def test_losses_above_chance_are_not_a_plateau_but_are_warned_about():
    pts = [{"d": float(d), "x": None, "loss": loss, "seed": 0} for d, loss in ((125, 1.9), (250, 1.8), (500, 1.2), (1000, 0.7))]
    pl = ra.plateau(pts, math.log(2))
    assert pl["at_chance"] == [] and "overconfident" in " ".join(pl["warnings"])  # 0.7 at 1,000 is on the way down


def test_form_band_scales_the_backtest_error_by_the_extrapolation_distance():
    bt = {"errors": {"mean_rel_error": 0.05}, "d": 1000.0, "sizes": [125.0, 250.0, 500.0]}
    band = ra.form_band(bt, 0.4, 4000.0)  # 1000 -> 4000 is two doublings, the backtest was one
    assert band["rel"] == pytest.approx(0.10) and band["lo"] == pytest.approx(0.36) and band["hi"] == pytest.approx(0.44)
    assert ra.form_band({**bt, "errors": {"mean_rel_error": 0.6}}, 0.4, 4000.0)["lo"] == 0.0  # never below 0
    assert ra.form_band({"error": "needs at least 3 data sizes"}, 0.4, 4000.0)["lo"] is None


def test_sizes_above_the_training_rows_are_refused_before_training(tmp_path, fake):
    rows = [{"sentence": f"w{i} yes" if i % 2 else f"w{i} no", "label": i % 2} for i in range(48)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    with pytest.raises(ValueError) as e:
        adv.advise(write_cfg(tmp_path, sizes=[8, 16, 1000], full_size=4000), seeds=[0], out_dir=tmp_path / "adv",
                   say=lambda m: None, executor=fake.executor)
    assert str(e.value).startswith("advise: size(s) 1000 exceed the 48 training rows of ")
    assert "use sizes up to 48" in str(e.value)
    assert fake.calls == []
