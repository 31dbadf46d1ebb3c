"""``tunelab advise``: which method will win at the full data size, predicted from small runs.

Per method, the eval loss of its runs at a few small data sizes D (and, optionally, factor values X
such as LoRA ranks) is fitted with the scaling paper's law, ``L = A·D^-beta + E`` (data only) or
``L = A·X^-alpha·D^-beta + E`` (with X), by ``report.fit.fit_law`` over every run (each seed is a
point). The fit is then evaluated at the full size (and the chosen X):

- uncertainty: a bootstrap over seeds (``N_BOOT`` resamples; at every (D, X) cell the seeds are
  drawn with replacement, the law refitted from the point estimate, and the full-size loss
  predicted); the interval is the 2.5-97.5 percentile range, and ``p_win`` the share of resamples in
  which the method has the lowest predicted loss;
- the task metric: one monotone map from eval loss to the metric fitted over all runs of every method,
  ``m = lo + (hi - lo) / (1 + exp((L - c) / s))`` (a logistic in the loss; ``s > 0`` keeps it
  decreasing), applied to every bootstrap loss;
- critical points: the data sizes at which two methods' fitted curves cross (the ranking flips),
  searched between a tenth of the smallest size and ten times the full size;
- backtest: the same fit without the largest small size, predicting it, beside a constant baseline
  (``fit.diagnose`` warns when the law is no better); its error, scaled by the extrapolation distance,
  gives a second, form-aware range beside the seed bootstrap (``form_band``);
- plateaus: sizes at the chance loss (``advise.chance_loss``) are left out of the fit, a method with
  fewer than 3 sizes above it is refused, and a curve that is flat then falls (concave in log-log,
  which A·D^-beta + E cannot be) is flagged (``plateau``);
- target: the eval loss by default; ``advise.target: accuracy`` fits 1 - accuracy (``target_of``);
- never a confident answer from too little (``advise_checks``): a law needs more (size, X) cells
  than parameters; cells whose metric is stuck at its floor (F1 0; every seed at the sweep's one
  worst value, as one class predicted for every row) are left out without ``chance_loss``; the
  stated range (``metric_range``) joins the seed bootstrap with the backtest-scaled band and stays
  inside the metric's range; a prediction below the steepest measured fall continued in log D is
  flagged and its range reaches back to the largest size's value; ``verdict_of`` gives the call:
  ``predicted``, ``too_close`` (ranges overlap the winner's: the tied group) or ``too_little_data``
  (nothing fitted, or an unfitted method measured better: "run sizes X");
- limits (``--time``/``--memory``, sweeps.advise.apply_limits): methods left out are listed with the
  reason, and the report says which limit bound the answer;
- verification (``--verify``): runs at the full size itself; prediction, truth (mean and 95% t-interval
  over seeds) and error per method.
"""

from __future__ import annotations

import math

import numpy as np

from tunelab.report import advise_checks as checks
from tunelab.report import fit as fitmod
from tunelab.report.advise_checks import MIN_SIZES, form_band, plateau, target_of  # noqa: F401 (API)
from tunelab.report.stats import t_interval
from tunelab.report.tables import md_cell

N_BOOT = 200


def _points(rows: list[dict], plan: dict, key: str, target: tuple | None = None) -> dict[str, list[dict]]:
    """label -> [{"d", "x", "loss", "metric", "seed"}] of the finished runs in the manifest's plan
    ("loss" is the fitted target, by default the eval loss)."""
    tkey, to_loss = (target or ("eval_loss", float))[:2]
    out: dict[str, list[dict]] = {}
    for r in rows:
        info = plan.get(r["run"])
        if info is None or not isinstance(r.get(tkey), int | float):
            continue
        out.setdefault(info["label"], []).append({
            "d": float(info["size"]), "x": None if info.get("x") is None else float(info["x"]),
            "loss": float(to_loss(r[tkey])), "metric": r.get(key), "seed": info["seed"],
        })
    return out


def points_for(rows: list[dict], manifest: dict, metric: str) -> dict[str, list[dict]]:
    return _points(rows, {r["run"]: r for r in manifest.get("runs", [])}, metric, target_of(rows, manifest))


def _fit(pts: list[dict], grid: dict | None = None) -> fitmod.Fit:
    d = [p["d"] for p in pts]
    xs = [p["x"] for p in pts]
    form = "data" if any(x is None for x in xs) or len(set(xs)) < 2 else "multiplicative"
    # E is the loss at infinite data: it cannot lie above the lowest loss a cell already reached.
    e_max = min(_cell_means(pts).values())
    return fitmod.fit_law(form, d, [p["loss"] for p in pts], None if form == "data" else xs, grid=grid, refine=1,
                          e_max=e_max)


def _cell_means(pts: list[dict]) -> dict[tuple, float]:
    cells: dict[tuple, list[float]] = {}
    for p in pts:
        cells.setdefault((p["d"], p["x"]), []).append(p["loss"])
    return {k: float(np.mean(v)) for k, v in cells.items()}


def _start(f: fitmod.Fit, pts: list[dict]) -> dict:
    """A one-point initialisation grid at fit ``f`` (in fit_law's normalised units)."""
    d0 = float(np.exp(np.mean(np.log([p["d"] for p in pts]))))
    p = f.params
    g = {"beta": (p["beta"],), "e": (math.log(max(p["E"], 1e-12)),)}
    a = p["A"] * d0 ** -p["beta"]
    if f.form == "multiplicative":
        x0 = float(np.exp(np.mean(np.log([q["x"] for q in pts]))))
        a *= x0 ** -p["alpha"]
        g["alpha"] = (p["alpha"],)
    g["a"] = (math.log(max(a, 1e-12)),)
    return g


def _predict(f: fitmod.Fit, d, x) -> np.ndarray:
    return f.predict(d, None if f.form == "data" else np.full_like(np.asarray(d, dtype=float), x))


def bootstrap(pts: list[dict], f: fitmod.Fit, d_full: float, x_full, n_boot: int | None = None, seed: int = 0) -> np.ndarray:
    """Predicted full-size losses under resampling of the seeds within each (d, x) cell."""
    n_boot = N_BOOT if n_boot is None else n_boot
    rng = np.random.default_rng(seed)
    cells: dict[tuple, list[dict]] = {}
    # in a fixed order (size, X, seed), so that the same runs give the same resamples however they were listed
    for p in sorted(pts, key=lambda q: (q["d"], q["x"] if q["x"] is not None else -1.0, str(q.get("seed")))):
        cells.setdefault((p["d"], p["x"]), []).append(p)
    grid = _start(f, pts)
    out = []
    for _ in range(n_boot):
        sample = [c[i] for c in cells.values() for i in rng.integers(0, len(c), len(c))]
        try:
            out.append(float(_predict(_fit(sample, grid), [d_full], x_full)[0]))
        except ValueError:
            continue
    return np.asarray(out)


def metric_map(losses, metrics) -> dict | None:
    """The logistic loss -> metric map fitted to all runs (None with too few or constant points)."""
    from scipy.optimize import curve_fit

    loss, m = np.asarray(losses, dtype=float), np.asarray(metrics, dtype=float)
    if len(loss) < 5 or np.ptp(m) == 0 or np.ptp(loss) == 0:
        return None
    top = 100.0 if m.max() > 1.0 else 1.0

    def f(x, lo, hi, c, s):
        return lo + (hi - lo) / (1.0 + np.exp((x - c) / s))

    p0 = [max(0.0, m.min() - 0.05 * top), min(top, m.max() + 0.05 * top), float(np.median(loss)), float(np.std(loss)) or 0.1]
    try:
        p, _ = curve_fit(f, loss, m, p0=p0, bounds=([0, 0, -np.inf, 1e-6], [top, top, np.inf, np.inf]), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    resid = m - f(loss, *p)
    return {"lo": float(p[0]), "hi": float(p[1]), "c": float(p[2]), "s": float(p[3]),
            "rmse": float(np.sqrt(np.mean(resid**2))), "n": int(len(loss))}


def apply_map(mp: dict | None, loss):
    if mp is None:
        return None
    if mp.get("kind") == "error":  # the law was fitted to the metric's own error: exact inverse
        return mp["top"] - np.asarray(loss, dtype=float)
    if mp.get("kind") == "identity":
        return np.asarray(loss, dtype=float)
    return mp["lo"] + (mp["hi"] - mp["lo"]) / (1.0 + np.exp((np.asarray(loss, dtype=float) - mp["c"]) / mp["s"]))


def crossings(fits: dict[str, fitmod.Fit], x_full, lo: float, hi: float) -> list[dict]:
    """Data sizes in [lo, hi] where two methods' predicted losses cross (the ranking flips)."""
    dd = np.geomspace(lo, hi, 400)
    curves = {k: _predict(f, dd, x_full) for k, f in fits.items()}
    out = []
    names = list(curves)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff = curves[a] - curves[b]
            for j in np.nonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0)[0]:
                # log-linear interpolation of the zero between grid points j and j+1
                t = diff[j] / (diff[j] - diff[j + 1])
                d = float(np.exp(np.log(dd[j]) + t * (np.log(dd[j + 1]) - np.log(dd[j]))))
                below = a if diff[j] < 0 else b
                out.append({"between": [a, b], "d": d, "better_below": below,
                            "better_above": b if below == a else a})
    return sorted(out, key=lambda c: c["d"])


def _summary(v) -> dict:
    v = np.asarray(v, dtype=float)
    if len(v) == 0:
        return {"lo": None, "hi": None}
    lo, hi = np.quantile(v, [0.025, 0.975])
    return {"lo": float(lo), "hi": float(hi)}


def analyse(rows: list[dict], manifest: dict, metric: str, higher: bool) -> dict:
    """The whole advice (JSON-able): per-method fits, predictions with intervals, winner, crossings,
    backtest on the largest small size and, when present, the full-size truth."""
    plan = {r["run"]: r for r in manifest.get("runs", [])}
    d_full = float(manifest["full_size"])
    x_full = manifest.get("x_full")
    small = {s for s in manifest.get("sizes", [])}
    tkey, to_loss, shown = target = target_of(rows, manifest)
    pts = _points(rows, plan, metric, target)
    fit_pts = {k: [p for p in v if p["d"] in small] for k, v in pts.items()}
    all_small = [p for v in fit_pts.values() for p in v if isinstance(p["metric"], int | float)]
    if tkey == metric and higher:  # fitted to the metric's error: the metric is top - prediction
        mp = {"kind": "error", "top": float(to_loss(0.0))}
    elif tkey == metric:
        mp = {"kind": "identity"}
    else:
        mp = metric_map([p["loss"] for p in all_small], [p["metric"] for p in all_small])
    methods, fits, boots, errors, plateaus = {}, {}, {}, {}, {}
    chance = manifest.get("chance_loss")
    floors = _floors(fit_pts, higher)
    for label, ps in fit_pts.items():
        plateaus[label] = pl = plateau(ps, chance)
        pl["at_floor"] = floors.get(label, [])
        for c in pl["at_floor"]:
            where = "" if c["x"] is None else f" (X = {c['x']:g})"
            pl["warnings"].append(f"{c['d']:g} rows{where}: {metric} {c['metric']:.4g} in every seed, "
                                  f"{c['why']}; left out of the fit")
        out = pl["at_chance"] + [{"d": c["d"], "x": c["x"]} for c in pl["at_floor"]]
        ps = [p for p in ps if {"d": p["d"], "x": p["x"]} not in out]
        form = "data" if any(p["x"] is None for p in ps) or len({p["x"] for p in ps}) < 2 else "multiplicative"
        k = checks.law_params(form)
        left = len({(p["d"], p["x"]) for p in ps})
        if left <= k:
            why = "above chance or the metric's floor" if out else "measured"
            errors[label] = (f"refused: {left} data size(s) {why}, and the law {fitmod.FORMULAS[form]} has {k} "
                             f"parameters: it needs at least {k + 1} sizes to be fitted, not solved exactly")
            continue
        try:
            f = _fit(ps)
        except ValueError as e:
            errors[label] = str(e)
            continue
        fits[label] = f
        boots[label] = bootstrap(ps, f, d_full, x_full)
        loss = float(_predict(f, [d_full], x_full)[0])
        m = apply_map(mp, loss)
        methods[label] = {
            "fit": f.to_dict(), "points": len(ps), "sizes_fitted": left, "loss": loss,
            "loss_ci": _summary(boots[label]),
            "metric": None if m is None else float(m),
            "metric_ci": _summary(apply_map(mp, boots[label])) if mp else {"lo": None, "hi": None},
            "backtest": backtest(ps), "plateau": pl,
        }
        bt = methods[label]["backtest"]
        methods[label]["good"] = bool((bt.get("diagnostics") or {}).get("good")) and not pl["concave"]
        methods[label]["form_band"] = form_band(bt, loss, d_full)
        _ranges(methods[label], ps, d_full, mp, metric)
        _no_gain(methods[label], ps, mp, metric)
    if fits:
        n = min(len(b) for b in boots.values())
        names = list(boots)
        stack = np.stack([boots[k][:n] for k in names]) if n else np.zeros((len(names), 0))
        wins = np.bincount(stack.argmin(axis=0), minlength=len(names)) if n else np.zeros(len(names))
        for k, w in zip(names, wins, strict=True):
            methods[k]["p_win"] = float(w / n) if n else None
    limits = manifest.get("limits")
    for label, why in ((limits or {}).get("left_out") or {}).items():
        errors[label] = why  # never trained: the pick is among the methods that fit
    winner = min(methods, key=lambda k: methods[k]["loss"]) if methods else None
    sizes = sorted(small)
    call = verdict_of(methods, errors, winner, pts, sizes, d_full, higher)
    result = {**call,
        "metric": metric, "higher_is_better": higher, "full_size": d_full, "x_full": x_full, "sizes": sizes,
        "methods": methods, "errors": errors, "winner": winner, "metric_map": mp, "chance_loss": chance,
        "target": shown, "target_key": tkey, "limits": limits,
        "plateau": plateaus,
        "crossings": crossings(fits, x_full, sizes[0] / 10, d_full * 10) if len(fits) > 1 and sizes else [],
        "n_boot": min((len(b) for b in boots.values()), default=0),
    }
    truth = verify(pts, d_full, x_full)
    if truth:
        for label, t in truth.items():
            if label in methods:
                p = methods[label]
                t["loss_error"] = p["loss"] - t["loss"]["mean"]
                t["loss_rel_error"] = abs(t["loss_error"]) / t["loss"]["mean"]
                if p["metric"] is not None and t["metric"]["mean"] is not None:
                    t["metric_error"] = p["metric"] - t["metric"]["mean"]
                t["in_loss_ci"] = p["loss_ci"]["lo"] is not None and p["loss_ci"]["lo"] <= t["loss"]["mean"] <= p["loss_ci"]["hi"]
                band = p.get("form_band") or {}
                t["in_form_band"] = band.get("lo") is not None and band["lo"] <= t["loss"]["mean"] <= band["hi"]
        result["truth"] = truth
        best = min(truth, key=lambda k: truth[k]["loss"]["mean"])
        by_metric = [k for k in truth if truth[k]["metric"]["mean"] is not None]
        result["true_winner"] = best
        if by_metric:
            sign = -1 if higher else 1
            result["true_winner_by_metric"] = min(by_metric, key=lambda k: sign * truth[k]["metric"]["mean"])
    return result


def _top(pts: dict[str, list[dict]]) -> float:
    vals = [p["metric"] for ps in pts.values() for p in ps if isinstance(p["metric"], int | float)]
    return 100.0 if vals and max(vals) > 1.0 else 1.0


def _floors(fit_pts: dict[str, list[dict]], higher: bool) -> dict[str, list[dict]]:
    """Per method, the cells whose task metric is stuck at its floor (checks.floor_cells), found from
    the metric itself whatever the law is fitted to: no advise.chance_loss needed."""
    top = _top(fit_pts)
    as_loss = {k: [{"d": p["d"], "x": p["x"], "loss": (top - p["metric"]) if higher else p["metric"]}
                   for p in ps if isinstance(p["metric"], int | float)] for k, ps in fit_pts.items()}
    checks.mark_worst(as_loss)
    out = {}
    for k, ps in as_loss.items():
        cells = checks.floor_cells(ps, top if higher else None)["at_floor"]
        out[k] = [{**c, "metric": (top - c["value"]) if higher else c["value"]} for c in cells]
    return out


def _ranges(p: dict, ps: list[dict], d_full: float, mp: dict | None, metric: str) -> None:
    """The stated ranges: the seed bootstrap joined with the backtest-scaled band (the law's form),
    widened down to the measured best when the law falls faster than the data make plausible, mapped
    to the metric and kept inside the metric's range."""

    rng = checks.widened(p["loss_ci"], p.get("form_band") or {})
    p["law_range"] = dict(rng)  # the law's own uncertainty: what the tie between methods is judged on
    p["run_noise"] = noise = checks.run_noise(ps)
    if rng["lo"] is not None:
        rng = {"lo": max(0.0, rng["lo"] - noise["half"]), "hi": rng["hi"] + noise["half"]}
    pl = checks.plausible_range(ps, p["loss"], d_full)
    p["plausibility"] = pl
    if not pl["plausible"] and rng["lo"] is not None:  # the law is not believed: the range runs up to
        largest = max(q["d"] for q in ps)  # what the largest small size measured
        rng["hi"] = max(rng["hi"], float(np.mean([q["loss"] for q in ps if q["d"] == largest])))
    p["loss_range"] = rng
    p["metric_range"] = _metric_range(rng, mp, metric, p["metric"])


def _metric_range(rng: dict, mp: dict | None, metric: str, point) -> dict:
    """A range of the fitted target mapped to the metric, inside the metric's own range."""
    from tunelab.report.stats import metric_range

    if mp is None or rng["lo"] is None:
        return {"lo": None, "hi": None}
    a, b = (float(apply_map(mp, v)) for v in (rng["lo"], rng["hi"]))
    lo, hi = min(a, b), max(a, b)
    bounds = metric_range(metric) or (None, None)
    if bounds[0] is not None:
        top = 100.0 if max(abs(lo), abs(hi), abs(point or 0)) > 1.0 and bounds[1] == 1.0 else bounds[1]
        lo, hi = max(bounds[0], lo), min(top, hi)
    return {"lo": lo, "hi": hi}


def _no_gain(p: dict, ps: list[dict], mp: dict | None, metric: str) -> None:
    """The law describes a target that falls as data grows. Where the small sizes show no such fall
    (the largest size's mean not below the smallest's by more than the seeds' noise: e.g. at a fixed
    step budget, more rows seen fewer times), it has nothing to extrapolate: the prediction becomes
    the largest size's mean, its range that mean ± the seeds' noise joined with the law's, and the
    method says so (``no_gain``)."""
    by: dict[float, list[float]] = {}
    for q in ps:
        by.setdefault(q["d"], []).append(q["loss"])
    sizes = sorted(by)
    first, last = float(np.mean(by[sizes[0]])), float(np.mean(by[sizes[-1]]))
    half = (p.get("run_noise") or {}).get("half", 0.0)
    if last < first - half:
        return
    p["law_prediction"] = {"loss": p["loss"], "metric": p["metric"]}
    p["loss"] = last
    m = apply_map(mp, last)
    p["metric"] = None if m is None else float(m)
    p["law_range"] = {"lo": max(0.0, last - half), "hi": last + half}
    rng = p.get("loss_range") or {}
    if rng.get("lo") is not None:
        p["loss_range"] = {"lo": min(rng["lo"], p["law_range"]["lo"]), "hi": max(rng["hi"], p["law_range"]["hi"])}
    else:
        p["loss_range"] = dict(p["law_range"])
    p["metric_range"] = _metric_range(p["loss_range"], mp, metric, p["metric"])
    p["no_gain"] = (f"no gain with data at the small sizes ({first:.4g} at {sizes[0]:g} rows, {last:.4g} at "
                    f"{sizes[-1]:g}): predicted as the largest size's value, not extrapolated by the law")


def _measured_at(pts: dict[str, list[dict]], size: float) -> dict[str, float]:
    out = {}
    for k, ps in pts.items():
        v = [p["metric"] for p in ps if p["d"] == size and isinstance(p["metric"], int | float)]
        if v:
            out[k] = float(np.mean(v))
    return out


def verdict_of(methods: dict, errors: dict, winner: str | None, pts: dict, sizes: list, d_full: float,
               higher: bool) -> dict:
    """The call advise makes: ``pick`` (the method to use), ``tied`` (the methods whose stated ranges
    overlap the pick's: too close to call), ``verdict`` (predicted | too_close | too_little_data) and
    its sentence. With no method fitted, or a method left unfitted that measured better at the
    largest small size than the predicted winner, the truth is "too little data to predict"; the
    pick is then the best measured at the largest small size, said to be no prediction."""
    sign = 1 if higher else -1
    measured = _measured_at(pts, max(sizes)) if sizes else {}
    best_measured = max(measured, key=lambda k: sign * measured[k]) if measured else None
    more = checks.suggest_sizes(sizes, d_full, 2) if sizes else []
    run = ", ".join(str(s) for s in more)
    unfitted_better = [k for k in errors if k in measured and winner in measured
                       and sign * (measured[k] - measured[winner]) > 0]
    if winner is None or unfitted_better:
        why = ("no method could be fitted" if winner is None else
               f"{', '.join(unfitted_better)} could not be fitted and measured better than {winner} at {max(sizes):g} rows")
        return {"pick": best_measured, "tied": [], "verdict": "too_little_data", "suggest_sizes": more,
                "verdict_text": (f"Too little data to predict ({why}); run sizes {run} (advise --sizes). "
                                 f"Best measured at {max(sizes):g} rows: {best_measured} (a measurement, not a prediction).")}
    w = methods[winner].get("law_range") or {}
    tied = [winner]
    for k, p in methods.items():
        r = p.get("law_range") or {}
        if k != winner and None not in (w.get("lo"), r.get("lo")) and r["lo"] <= w["hi"]:
            tied.append(k)
    flagged = [k for k in tied if not (methods[k].get("plausibility") or {}).get("plausible", True)]
    note = (f" The law of {', '.join(flagged)} falls faster than the measured points make plausible; its "
            "range runs up to its largest measured value.") if flagged else ""
    if len(tied) > 1:
        # The laws cannot separate them: the measurement nearest the full size decides the pick.
        near = [k for k in tied if k in measured]
        pick = max(near, key=lambda k: sign * measured[k]) if near else winner
        why = (f"{winner} is ahead on the point prediction" if pick == winner else
               f"{winner} is ahead on the point prediction, {pick} measured best at {max(sizes):g} rows and is the pick")
        return {"pick": pick, "tied": tied, "verdict": "too_close", "suggest_sizes": more, "law_winner": winner,
                "verdict_text": (f"Too close to call: {', '.join(tied)} have overlapping predicted ranges; "
                                 f"{why}. Larger small sizes ({run}) would narrow the ranges." + note)}
    return {"pick": winner, "tied": tied, "verdict": "predicted", "suggest_sizes": more,
            "verdict_text": f"Predicted winner: {winner}; no other method's range reaches it." + note}


def backtest(ps: list[dict]) -> dict:
    """Fit without the largest size, predict it: the fit's error next to a constant baseline's."""
    sizes = sorted({p["d"] for p in ps})
    if len(sizes) < 3:
        return {"error": "needs at least 3 data sizes"}
    held = [p for p in ps if p["d"] == sizes[-1]]
    rest = [p for p in ps if p["d"] != sizes[-1]]
    try:
        f = _fit(rest)
    except ValueError as e:
        return {"error": str(e)}
    actual = float(np.mean([p["loss"] for p in held]))
    x = held[0]["x"]
    pred = float(_predict(f, [sizes[-1]], x)[0])
    res = {"params": f.params, "at_bounds": f.extra.get("at_bounds", []), "d": sizes[-1], "sizes": sizes[:-1],
           "actual": actual,
           "predicted": pred, "errors": fitmod.errors([actual], [pred]),
           "baseline_errors": fitmod.errors([actual], [float(np.mean([p["loss"] for p in rest]))])}
    res["diagnostics"] = fitmod.diagnose(res)
    return res


def verify(pts: dict[str, list[dict]], d_full: float, x_full) -> dict:
    out = {}
    for label, ps in pts.items():
        full = [p for p in ps if p["d"] == d_full and (x_full is None or p["x"] == x_full)]
        if full:
            metrics = [p["metric"] for p in full if isinstance(p["metric"], int | float)]
            out[label] = {"loss": t_interval([p["loss"] for p in full]), "metric": t_interval(metrics), "seeds": len(full)}
    return out


def _f(v, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}g}"


def _ci(c: dict, digits: int = 3) -> str:
    return "–" if not c or c.get("lo") is None else f"[{c['lo']:.{digits}g}, {c['hi']:.{digits}g}]"


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the prediction table (shared by Markdown and HTML)."""
    m = result["metric"]
    truth = result.get("truth") or {}
    tn = result.get("target", "eval loss")
    heads = ["method", "law", "beta", "E", f"predicted {tn} @ {result['full_size']:g}", "95% interval",
             "backtest-scaled range", f"predicted {m}", "95% interval", "stated range (seeds + form)", "P(best)", "backtest error (fit / constant)",
             "fit"]
    if truth:
        heads += [f"true {tn} (95% CI)", f"true {m} (95% CI)", f"{tn} error", f"{m} error"]
    rows = []
    for label, p in result["methods"].items():
        bt = p["backtest"]
        if "errors" in bt:
            back = f"{100 * bt['errors']['mean_rel_error']:.1f}% / {100 * bt['baseline_errors']['mean_rel_error']:.1f}%"
            verdict = "good" if p.get("good", bt["diagnostics"]["good"]) else "NOT good"
        else:
            back, verdict = bt.get("error", "–"), "–"
        fp = p["fit"]["params"]
        cells = [label, p["fit"]["formula"], _f(fp.get("beta"), 3), _f(fp.get("E"), 3), _f(p["loss"]), _ci(p["loss_ci"]),
                 _ci(p.get("form_band") or {}), _f(p["metric"]), _ci(p["metric_ci"]),
                 _ci(p.get("metric_range") or {}), _f(p.get("p_win"), 2), back, verdict]
        if truth:
            t = truth.get(label)
            if t:
                tl, tm = t["loss"], t["metric"]
                cells += [f"{_f(tl['mean'])} {_ci(tl)}", f"{_f(tm['mean'])} {_ci(tm)}",
                          f"{t['loss_error']:+.3g} ({100 * t['loss_rel_error']:.1f}%)",
                          "–" if t.get("metric_error") is None else f"{t['metric_error']:+.3g}"]
            else:
                cells += ["not run"] * 4
        rows.append(cells)
    return heads, rows


def markdown(result: dict) -> str:
    heads, rows = table_rows(result)
    lines = [f"## Advice: which method wins at {result['full_size']:g} training rows", ""]
    w = result.get("winner")
    verdict = result.get("verdict", "predicted")
    if verdict == "too_little_data":
        lines.append(f"**Too little data to predict.** {result['verdict_text']}")
    elif w:
        p = result["methods"][w]
        among = f" among the fitted methods ({', '.join(result['errors'])} not fitted)" if result.get("errors") else ""
        head = f"**Predicted winner: {w}**" if verdict == "predicted" else f"**Too close to call: {', '.join(result['tied'])}**"
        lines.append(f"{head}{among} ({result.get('target', 'eval loss')} {p['loss']:.4g} {_ci(p.get('loss_range') or p['loss_ci'])}, "
                     f"{result['metric']} {_f(p['metric'])} {_ci(p.get('metric_range') or p['metric_ci'])}, best in "
                     f"{100 * (p.get('p_win') or 0):.0f}% of {result['n_boot']} seed-bootstrap refits). "
                     f"{result.get('verdict_text', '')}")
    if "true_winner" in result:
        ok = "correct" if result["true_winner"] == w else "WRONG"
        lines.append(f"Verified at the full size: lowest true {result.get('target', 'eval loss')}: {result['true_winner']} (prediction {ok}); "
                     f"best true {result['metric']}: {result.get('true_winner_by_metric', '–')}.")
    lines += ["", "| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    lines.append("")
    if result["crossings"]:
        lines.append("Critical points (the predicted ranking flips):")
        lines += [f"- D ≈ {c['d']:.0f}: {c['better_below']} is better below, {c['better_above']} above" for c in result["crossings"]]
    else:
        lines.append(f"No ranking flip predicted between {result['sizes'][0] / 10:g} and {10 * result['full_size']:g} rows.")
    mp = result.get("metric_map")
    if mp and mp.get("kind") == "error":
        lines.append(f"\nThe law is fitted to {result.get('target')}, so {result['metric']} = {mp['top']:g} - prediction.")
    elif mp and "lo" in mp:
        lines.append(f"\nLoss -> {result['metric']} map (all runs, logistic): {result['metric']} = {mp['lo']:.3g} + "
                     f"({mp['hi']:.3g} - {mp['lo']:.3g}) / (1 + exp((L - {mp['c']:.3g}) / {mp['s']:.3g})), "
                     f"RMSE {mp['rmse']:.3g} over {mp['n']} runs.")
    for label, pl in (result.get("plateau") or {}).items():
        for wn in pl["warnings"]:
            lines.append(f"- warning ({label}): {wn}")
    for label, p in result["methods"].items():
        for wn in (p["backtest"].get("diagnostics") or {}).get("warnings", []):
            lines.append(f"- warning ({label} backtest): {wn}")
    for label, p in result["methods"].items():
        if p.get("no_gain"):
            lines.append(f"- {label}: {p['no_gain']}")
    for label, e in result.get("errors", {}).items():
        lines.append(f"- {label}: not fitted: {e}")
    lines += limits_lines(result.get("limits"))
    lines.append("\nIntervals on predictions: 2.5-97.5 percentiles of refits on seed-bootstrap resamples, so "
                 "they measure seed noise only, not whether the law's form is right: the backtest says that "
                 "(the largest small size held out and predicted, mean relative error, beside predicting it with "
                 "the mean of the other sizes' losses; 'good' needs at most half the constant's error). The "
                 "backtest-scaled range widens the prediction by that error times the number of such extrapolation "
                 "steps (in log D) from the largest size to the full one: a rough allowance for the law's form.")
    return "\n".join(lines) + "\n"


def limits_lines(limits: dict | None) -> list[str]:
    """What the --time / --memory limits did, and which of them bound the answer."""
    if not limits:
        return []
    asked = [f"time {limits['time_s']:g} s" if limits.get("time_s") else None,
             f"memory {limits['memory_mb']:,.0f} MB" if limits.get("memory_mb") else None]
    out = [f"\nLimits: {', '.join(a for a in asked if a)} (each method probed at the full size on this machine: "
           + "; ".join(f"{k} {p['s_per_step']:.3g} s/step, peak {p['peak_memory_mb']:,.0f} MB"
                       for k, p in limits.get("probe", {}).items() if "s_per_step" in p) + ")."]
    for label, why in (limits.get("left_out") or {}).items():
        out.append(f"- {label}: {why}")
    for label, st in (limits.get("steps") or {}).items():
        out.append(f"- {label}: predicted at {st['fit']} steps, what fits the time, not its planned {st['planned']}")
    bound = limits.get("bound") or []
    out.append(f"The limit that bound the answer: {' and '.join(bound)}." if bound else
               "Neither limit bound the answer: every method fits, at its planned steps.")
    return out


def plot(result: dict, pts: dict[str, list[dict]]) -> bytes | None:
    from tunelab.report.plots import _colors, _figure, png_bytes

    if not result["methods"]:
        return None
    fig, ax = _figure(7.0, 4.6)
    lo, hi = result["sizes"][0] / 1.5, result["full_size"] * 1.5
    dd = np.geomspace(lo, hi, 200)
    for (label, p), c in zip(result["methods"].items(), _colors(len(result["methods"])), strict=True):
        f = fitmod.Fit(p["fit"]["form"], p["fit"]["params"], 0.0, 0, True, 0)
        ax.plot(dd, _predict(f, dd, result.get("x_full")), color=c, linewidth=1.3, label=label)
        ps = pts.get(label, [])
        small = [q for q in ps if q["d"] in set(result["sizes"])]
        ax.scatter([q["d"] for q in small], [q["loss"] for q in small], color=c, s=14, alpha=0.7)
        ci = p["loss_ci"]
        if ci["lo"] is not None:
            ax.errorbar([result["full_size"]], [p["loss"]], yerr=[[max(0.0, p["loss"] - ci["lo"])], [max(0.0, ci["hi"] - p["loss"])]],
                        fmt="D", color=c, capsize=4, markersize=6, mfc="none")
        t = (result.get("truth") or {}).get(label)
        if t:
            ax.scatter([result["full_size"] * 1.06], [t["loss"]["mean"]], marker="*", s=90, color=c, zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("training rows D (log scale)")
    ax.set_ylabel(result.get("target", "eval loss"))
    ax.set_title("dots: runs; lines: fitted laws; hollow diamond: prediction (95%); star: truth", fontsize=9)
    ax.legend(fontsize=8)
    return png_bytes(fig)
