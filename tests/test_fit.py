"""Scaling-law fitter: exact recovery on noiseless synthetic data, extrapolation on noisy data."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.report.fit import errors, fit_and_check, fit_law, fit_sweep, heldout_mask, huber, predict

RANKS = np.array([4.0, 8.0, 16.0, 32.0, 64.0])
SIZES = np.array([250.0, 500.0, 1000.0, 2000.0, 4000.0])


def grid(xs=RANKS, ds=SIZES):
    x, d = np.meshgrid(xs, ds)
    return x.ravel(), d.ravel()


def assert_params(got: dict, want: dict, rtol: float):
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=rtol), (k, got, want)


def test_huber_is_quadratic_inside_delta_and_linear_outside():
    r = np.array([0.0, 5e-4, -5e-4, 0.1])
    assert huber(r, 1e-3).tolist() == pytest.approx([0.0, 1.25e-7, 1.25e-7, 1e-3 * (0.1 - 5e-4)])


@pytest.mark.parametrize(
    "true",
    [
        {"A": 50.0, "alpha": 0.2, "beta": 0.4, "E": 0.8},
        {"A": 3.0, "alpha": 0.005, "beta": 0.3, "E": 1.5},  # PET-like: X barely matters (|alpha| < 0.01)
    ],
)
def test_multiplicative_recovers_known_parameters(true):
    x, d = grid()
    loss = predict("multiplicative", true, d, x)
    fit = fit_law("multiplicative", d, loss, x)
    # Stated tolerance: 1% relative on A and E, 1e-3 absolute on the exponents.
    assert_params(fit.params, {"A": true["A"], "E": true["E"]}, 1e-2)
    assert fit.params["alpha"] == pytest.approx(true["alpha"], abs=1e-3)
    assert fit.params["beta"] == pytest.approx(true["beta"], abs=1e-3)
    assert fit.objective < 1e-12


def test_multiplicative_handles_model_sizes_in_raw_units():
    x, d = grid(np.array([1.35e8, 3.6e8, 1.7e9]))
    true = {"A": 2e3, "alpha": 0.3, "beta": 0.25, "E": 1.1}
    fit = fit_law("multiplicative", d, predict("multiplicative", true, d, x), x)
    assert_params(fit.params, true, 1e-2)


def test_additive_recovers_known_parameters():
    x, d = grid()
    true = {"A": 2.0, "alpha": 0.5, "B": 20.0, "beta": 0.6, "E": 0.7}
    fit = fit_law("additive", d, predict("additive", true, d, x), x)
    assert_params(fit.params, true, 1e-2)


def test_data_law_recovers_known_parameters():
    true = {"A": 12.0, "beta": 0.35, "E": 0.4}
    fit = fit_law("data", SIZES, predict("data", true, SIZES))
    assert_params(fit.params, true, 1e-2)


def test_noisy_data_extrapolates_to_held_out_sizes():
    rng = np.random.default_rng(0)
    x, d = grid()
    true = {"A": 50.0, "alpha": 0.2, "beta": 0.4, "E": 0.8}
    clean = predict("multiplicative", true, d, x)
    noisy = clean * np.exp(rng.normal(0.0, 0.01, clean.shape))  # 1% noise
    res = fit_and_check("multiplicative", d, noisy, x, holdout=1)
    assert res["n_points"] == 20 and res["errors"]["n"] == 5
    assert all(h["d"] == 4000.0 for h in res["heldout"])
    # Held-out points are predicted within 3% (the noise alone is 1%).
    assert res["errors"]["mean_rel_error"] < 0.03
    # ...and against the noiseless truth, closer still.
    assert np.max(np.abs(np.array([h["predicted"] for h in res["heldout"]]) / clean[d == 4000] - 1)) < 0.03


def test_noisy_fit_is_worse_for_a_wrong_form_than_the_right_one():
    rng = np.random.default_rng(1)
    x, d = grid()
    loss = predict("multiplicative", {"A": 200.0, "alpha": 0.5, "beta": 0.5, "E": 0.5}, d, x)
    loss = loss * np.exp(rng.normal(0.0, 0.005, loss.shape))
    right = fit_and_check("multiplicative", d, loss, x)
    wrong = fit_and_check("data", d, loss)  # ignores X: cannot explain the spread across ranks
    assert right["errors"]["mean_rel_error"] < 0.02 < wrong["errors"]["mean_rel_error"]


def test_heldout_mask_and_errors():
    d = np.array([1, 2, 3, 3, 2, 1.0])
    assert heldout_mask(d, 1).tolist() == [False, False, True, True, False, False]
    assert heldout_mask(d, 2).tolist() == [False, True, True, True, True, False]
    with pytest.raises(ValueError, match="at least one size must remain"):
        heldout_mask(d, 3)
    e = errors([1.0, 2.0], [1.1, 1.8])
    assert e["mae"] == pytest.approx(0.15) and e["max_rel_error"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("multiplicative", [1, 2, 3], [1, 1, 1], [1, 2, 3]), "4 parameters but only 3 points"),
        (("data", [1, 2, 3], [1, -1, 1]), "L must be finite and > 0"),
        (("data", [5, 5, 5], [1, 2, 3]), "two distinct values"),
        (("multiplicative", [1, 2, 3, 4], [1, 1, 1, 1]), "needs X values"),
        (("nope", [1, 2, 3, 4], [1, 1, 1, 1], [1, 2, 3, 4]), "unknown scaling-law form"),
    ],
)
def test_bad_inputs_say_what_is_wrong(args, match):
    with pytest.raises(ValueError, match=match):
        fit_law(*args)


def test_fit_sweep_numeric_and_categorical():
    x, d = grid(np.array([4.0, 16.0, 64.0]))
    true = {"A": 50.0, "alpha": 0.2, "beta": 0.4, "E": 0.8}
    loss = predict("multiplicative", true, d, x)
    pts = [{"group": str(int(a)), "x": a, "d": b, "loss": c} for a, b, c in zip(x, d, loss, strict=True)]
    res = fit_sweep(pts, categorical=False)
    assert [f["form"] for f in res["fits"]] == ["multiplicative", "additive"]
    assert res["fits"][0]["params"]["beta"] == pytest.approx(0.4, abs=1e-3)
    assert sum(p["heldout"] for p in res["points"]) == 3

    pts = [
        {"group": g, "x": None, "d": s, "loss": float(predict("data", {"A": A, "beta": b, "E": 0.5}, s))}
        for g, A, b in (("lora", 5.0, 0.3), ("full", 20.0, 0.5))
        for s in SIZES
    ]
    pts += [{"group": "tiny", "x": None, "d": 250.0, "loss": 2.0}]  # too few points: reported, not raised
    res = fit_sweep(pts, categorical=True)
    assert "D alone" in res["note"]
    by = {f["group"]: f for f in res["fits"]}
    assert by["lora"]["form"] == "data" and by["lora"]["params"]["beta"] == pytest.approx(0.3, abs=1e-3)
    assert by["full"]["params"]["beta"] == pytest.approx(0.5, abs=1e-3)
    assert "error" in by["tiny"]


def test_diagnostics_accept_a_real_law_and_reject_chance_level_losses():
    d = np.array([250.0, 500.0, 1000.0, 2000.0, 4000.0])
    good = fit_and_check("data", d, predict("data", {"A": 5.0, "beta": 0.4, "E": 0.3}, d))
    assert good["diagnostics"]["good"] and good["diagnostics"]["warnings"] == []
    assert good["errors"]["mean_rel_error"] < good["baseline_errors"]["mean_rel_error"]
    # The case: every loss at chance (ln 2) up to noise -> the fit must not be called good.
    flat = np.log(2) * (1 + np.array([0.002, -0.001, 0.001, -0.002, 0.0015]))
    bad = fit_and_check("data", d, flat)
    diag = bad["diagnostics"]
    assert not diag["good"]
    assert any("no better than predicting the mean" in w or "at its bound" in w or "< 0" in w for w in diag["warnings"])
    assert bad["baseline_errors"]["n"] == 1


def test_parameters_at_their_bounds_are_named():
    d = np.array([100.0, 200.0, 400.0, 800.0])
    rising = 0.2 + 1e-3 * d  # loss grows with data: beta pinned at its lower bound or negative
    res = fit_and_check("data", np.append(d, 1600.0), np.append(rising, 0.2 + 1.6))
    warns = " ".join(res["diagnostics"]["warnings"])
    assert not res["diagnostics"]["good"] and ("beta" in warns)


def test_e_max_caps_the_irreducible_loss_and_names_the_cap_when_it_binds():
    d = np.array([250.0, 500.0, 1000.0, 2000.0])
    true = {"A": 5.0, "beta": 0.4, "E": 0.3}
    loss = predict("data", true, d)
    free = fit_law("data", d, loss, e_max=float(loss.min()))  # a cap above the true E changes nothing
    assert_params(free.params, true, 1e-3)
    assert free.extra["at_bounds"] == []
    capped = fit_law("data", d, loss, e_max=0.1)  # a cap below it binds and is reported
    assert capped.params["E"] == pytest.approx(0.1, rel=1e-3)
    assert capped.extra["at_bounds"] == ["E (at its cap e_max = 0.1)"]
    with pytest.raises(ValueError, match="e_max must be finite and > 0"):
        fit_law("data", d, loss, e_max=0.0)
