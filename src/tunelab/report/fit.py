"""Scaling-law fits for fine-tuning (Zhang et al., ICLR 2024, "When scaling meets LLM finetuning").

Three forms, all with positive coefficients written in log space (A = exp(a), B = exp(b), E = exp(e)):

    multiplicative  L(X, D) = A * X^-alpha * D^-beta + E        theta = (a, alpha, beta, e)
    additive        L(X, D) = A * X^-alpha + B * D^-beta + E    theta = (a, b, alpha, beta, e)
    data            L(D)    = A * D^-beta + E                   theta = (a, beta, e)

D is the fine-tuning data size, X the second factor (model size, LoRA rank, prompt length, ...); the
``data`` form is for a categorical factor (one fit per method). Every form is a log-sum-exp of terms
that are linear in theta, so log L_hat(i) = LSE_k(G[i, k, :] @ theta), and we minimise
sum_i Huber_delta(log L_hat(i) - log L(i)) with delta = 1e-3 by L-BFGS(-B) from every point of a grid of
initialisations, keeping the best. X and D are divided by their geometric means before fitting (one
initialisation grid then suits ranks of 4 and model sizes of 1e9 alike) and A, B are mapped back to the
original units afterwards. Exponents are boxed to [-3, 5] and log-coefficients to [-30, 30] (in the
normalised units) so that no start overflows.

``fit_and_check`` also reports the held-out error of a constant prediction (the mean of the fitted
losses) and ``diagnose`` refuses to call a fit good unless it has at most half that constant's
held-out error, and when a
parameter sits at its bound (E at its lower bound, i.e. E = 0, is allowed), or when an exponent is
negative.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
GOOD_FRACTION = 0.5  # a fit is "good" only at <= half the held-out error of a constant prediction

FORMS: dict[str, tuple[str, ...]] = {
    "multiplicative": ("a", "alpha", "beta", "e"),
    "additive": ("a", "b", "alpha", "beta", "e"),
    "data": ("a", "beta", "e"),
}
FORMULAS = {
    "multiplicative": "L = A·X^-alpha·D^-beta + E",
    "additive": "L = A·X^-alpha + B·D^-beta + E",
    "data": "L = A·D^-beta + E",
}
# Starting points (normalised units: log-coefficients near log L, exponents from flat to steep).
DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "a": (-3.0, -1.0, 1.0),
    "b": (-3.0, -1.0, 1.0),
    "e": (-3.0, -1.0, 0.5),
    "alpha": (0.0, 0.3, 1.0),
    "beta": (0.0, 0.3, 1.0),
}
_EXPONENT_BOUNDS = (-3.0, 5.0)
_SHOWN = {"a": "A", "b": "B", "e": "E", "alpha": "alpha", "beta": "beta"}
_LOG_BOUNDS = (-30.0, 30.0)


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it the fit is only slower
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _design(form: str, lx: np.ndarray | None, ld: np.ndarray) -> np.ndarray:
    """G with shape (n points, k terms, p params): term_k(i) = G[i, k] @ theta."""
    n, names = len(ld), FORMS[form]
    p = {name: j for j, name in enumerate(names)}
    if form == "multiplicative":
        g = np.zeros((n, 2, len(names)))
        g[:, 0, p["a"]] = 1.0
        g[:, 0, p["alpha"]] = -lx
        g[:, 0, p["beta"]] = -ld
        g[:, 1, p["e"]] = 1.0
    elif form == "additive":
        g = np.zeros((n, 3, len(names)))
        g[:, 0, p["a"]] = 1.0
        g[:, 0, p["alpha"]] = -lx
        g[:, 1, p["b"]] = 1.0
        g[:, 1, p["beta"]] = -ld
        g[:, 2, p["e"]] = 1.0
    elif form == "data":
        g = np.zeros((n, 2, len(names)))
        g[:, 0, p["a"]] = 1.0
        g[:, 0, p["beta"]] = -ld
        g[:, 1, p["e"]] = 1.0
    else:
        raise ValueError(f"unknown scaling-law form '{form}'; allowed: {', '.join(FORMS)}")
    return g


def _objective(theta: np.ndarray, g: np.ndarray, logy: np.ndarray, delta: float, scale: float):
    t = g @ theta  # (n, k)
    m = t.max(axis=1, keepdims=True)
    w = np.exp(t - m)
    s = w.sum(axis=1, keepdims=True)
    pred = (m + np.log(s))[:, 0]
    r = pred - logy
    soft = w / s  # d pred / d term
    dpred = np.einsum("nk,nkp->np", soft, g)
    grad = (np.clip(r, -delta, delta)[:, None] * dpred).sum(axis=0)
    return float(huber(r, delta).sum()) * scale, grad * scale


def predict(form: str, params: dict[str, float], d, x=None) -> np.ndarray:
    """Evaluate a fitted law (``params`` as in :class:`Fit`) at data sizes ``d`` (and factor ``x``)."""
    d = np.asarray(d, dtype=float)
    p = params
    if form == "data":
        return p["A"] * d ** -p["beta"] + p["E"]
    if x is None:
        raise ValueError(f"the {form} law needs X as well as D to predict")
    x = np.asarray(x, dtype=float)
    if form == "multiplicative":
        return p["A"] * x ** -p["alpha"] * d ** -p["beta"] + p["E"]
    return p["A"] * x ** -p["alpha"] + p["B"] * d ** -p["beta"] + p["E"]


@dataclass
class Fit:
    """One fitted law. ``params`` holds A, alpha, beta, E (and B for the additive form) in the
    original units of X and D; ``objective`` is the summed Huber loss on the points it was fitted to."""

    form: str
    params: dict[str, float]
    objective: float
    n_points: int
    converged: bool
    starts: int
    extra: dict = field(default_factory=dict)

    @property
    def formula(self) -> str:
        return FORMULAS[self.form]

    def predict(self, d, x=None) -> np.ndarray:
        return predict(self.form, self.params, d, x)

    def to_dict(self) -> dict:
        return {
            "form": self.form,
            "formula": self.formula,
            "params": dict(self.params),
            "objective": self.objective,
            "n_points": self.n_points,
            "converged": self.converged,
            "starts": self.starts,
            **self.extra,
        }


def _check_inputs(form: str, d, loss, x) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if form not in FORMS:
        raise ValueError(f"unknown scaling-law form '{form}'; allowed: {', '.join(FORMS)}")
    d = np.asarray(d, dtype=float)
    loss = np.asarray(loss, dtype=float)
    if d.shape != loss.shape or d.ndim != 1:
        raise ValueError(f"D and L must be 1-D of equal length (got {d.shape} and {loss.shape})")
    if x is not None:
        x = np.asarray(x, dtype=float)
        if x.shape != d.shape:
            raise ValueError(f"X and D must have equal length (got {x.shape} and {d.shape})")
    elif form != "data":
        raise ValueError(f"the {form} law needs X values")
    for name, v in (("D", d), ("L", loss), ("X", x)):
        if v is not None and (not np.all(np.isfinite(v)) or np.any(v <= 0)):
            raise ValueError(f"{name} must be finite and > 0 for a power law (got {v.tolist()})")
    n_params = len(FORMS[form])
    if len(d) < n_params:
        raise ValueError(f"the {form} law has {n_params} parameters but only {len(d)} points to fit")
    if len(np.unique(d)) < 2:
        raise ValueError("D must take at least two distinct values to fit its exponent")
    if form != "data" and len(np.unique(x)) < 2:
        raise ValueError("X must take at least two distinct values to fit its exponent")
    return d, loss, x


def fit_law(
    form: str, d, loss, x=None, *, delta: float = HUBER_DELTA, grid: dict | None = None, refine: int = 3,
    e_max: float | None = None,
) -> Fit:
    """Fit ``form`` ("multiplicative", "additive" or "data") to points (x, d) -> loss.

    ``grid`` overrides the initial values per parameter name (see DEFAULT_GRID); every combination
    is tried briefly and the ``refine`` best are then run to convergence. ``e_max`` caps the
    irreducible loss E (original units), e.g. at the lowest loss the data reached: E is the loss at
    infinite data, so it cannot lie above a loss already measured."""
    d, loss, x = _check_inputs(form, d, loss, x)
    names = FORMS[form]
    # Normalise by geometric means; the fitted exponents are unchanged, A/B are mapped back below.
    d0 = float(np.exp(np.log(d).mean()))
    x0 = float(np.exp(np.log(x).mean())) if x is not None else 1.0
    lx = np.log(x / x0) if x is not None else None
    g = _design(form, lx, np.log(d / d0))
    logy = np.log(loss)
    grid = {**DEFAULT_GRID, **(grid or {})}
    bounds = [_EXPONENT_BOUNDS if n in ("alpha", "beta") else _LOG_BOUNDS for n in names]
    if e_max is not None:
        if not (math.isfinite(e_max) and e_max > 0):
            raise ValueError(f"e_max must be finite and > 0 (got {e_max})")
        bounds[names.index("e")] = (_LOG_BOUNDS[0], min(_LOG_BOUNDS[1], math.log(e_max)))
    grid_e = tuple(min(v, bounds[names.index("e")][1]) for v in (grid or {}).get("e", DEFAULT_GRID["e"]))
    # Scale the Huber sum so L-BFGS-B's relative stopping test sees O(1) values, not O(delta^2).
    scale = 1.0 / (delta * delta)
    grid["e"] = tuple(dict.fromkeys(grid_e))  # starts inside the box
    starts = list(itertools.product(*(grid[n] for n in names)))

    def run(x0, maxiter, ftol):
        return minimize(
            _objective,
            np.asarray(x0, dtype=float),
            args=(g, logy, delta, scale),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": maxiter, "ftol": ftol, "gtol": 1e-10},
        )

    # Every start briefly, then the few best to full precision (most starts land in the same basin).
    # One BLAS thread: on problems this small, multi-threaded OpenBLAS spins and runs ~100x slower.
    with _one_blas_thread():
        rough = sorted((run(x0, 60, 1e-10) for x0 in starts), key=lambda r: r.fun)
        best = min((run(r.x, 3000, 1e-15) for r in rough[:refine]), key=lambda r: r.fun)
    theta = dict(zip(names, best.x, strict=True))
    params = {"alpha": theta.get("alpha"), "beta": theta["beta"], "E": math.exp(theta["e"])}
    if form == "multiplicative":
        params["A"] = math.exp(theta["a"]) * x0 ** theta["alpha"] * d0 ** theta["beta"]
    elif form == "additive":
        params["A"] = math.exp(theta["a"]) * x0 ** theta["alpha"]
        params["B"] = math.exp(theta["b"]) * d0 ** theta["beta"]
    else:
        params["A"] = math.exp(theta["a"]) * d0 ** theta["beta"]
    params = {k: float(v) for k, v in params.items() if v is not None}
    # A parameter pinned to its box did not find an optimum inside it: the law does not describe the data.
    at_bounds = [
        _SHOWN[n] for n, v, (lo, hi) in zip(names, best.x, bounds, strict=True)
        if min(v - lo, hi - v) < 1e-3 and not (n == "e" and v - lo < 1e-3)  # E -> 0 is a valid answer
    ]
    if e_max is not None and "E" in at_bounds:  # the data want E above the cap (e.g. above a measured loss)
        at_bounds[at_bounds.index("E")] = f"E (at its cap e_max = {e_max:.4g})"
    return Fit(form, params, float(best.fun) / scale, len(d), bool(best.success), len(starts),
               {"at_bounds": at_bounds})


def heldout_mask(d, n_largest: int = 1) -> np.ndarray:
    """True for the points whose D is among the ``n_largest`` distinct largest sizes."""
    d = np.asarray(d, dtype=float)
    sizes = np.unique(d)
    if n_largest < 1 or n_largest >= len(sizes):
        raise ValueError(
            f"cannot hold out the {n_largest} largest of {len(sizes)} data sizes: at least one size must remain to fit"
        )
    return d >= sizes[-n_largest]


def errors(actual, predicted) -> dict[str, float]:
    """Held-out error summary: mean absolute error, RMSE, mean and max absolute relative error."""
    a = np.asarray(actual, dtype=float)
    p = np.asarray(predicted, dtype=float)
    rel = np.abs(p - a) / np.abs(a)
    return {
        "mae": float(np.mean(np.abs(p - a))),
        "rmse": float(np.sqrt(np.mean((p - a) ** 2))),
        "mean_rel_error": float(rel.mean()),
        "max_rel_error": float(rel.max()),
        "n": int(len(a)),
    }


def fit_and_check(
    form: str, d, loss, x=None, *, holdout: int = 1, delta: float = HUBER_DELTA, grid: dict | None = None
) -> dict:
    """Fit on all but the ``holdout`` largest data sizes, predict those, and report both.

    Returns a JSON-able dict: the fit (``to_dict``), ``heldout`` (one row per held-out point with
    d, x, actual, predicted, rel_error) and ``errors`` (see :func:`errors`)."""
    d = np.asarray(d, dtype=float)
    loss = np.asarray(loss, dtype=float)
    xs = None if x is None else np.asarray(x, dtype=float)
    held = heldout_mask(d, holdout)
    fit = fit_law(form, d[~held], loss[~held], None if xs is None else xs[~held], delta=delta, grid=grid)
    pred = fit.predict(d[held], None if xs is None else xs[held])
    rows = [
        {
            "d": float(dd),
            "x": None if xs is None else float(xx),
            "actual": float(a),
            "predicted": float(p),
            "rel_error": float(abs(p - a) / abs(a)),
        }
        for dd, xx, a, p in zip(
            d[held], xs[held] if xs is not None else [None] * int(held.sum()), loss[held], pred, strict=True
        )
    ]
    out = {**fit.to_dict(), "heldout": rows, "errors": errors(loss[held], pred)}
    out["baseline_errors"] = errors(loss[held], np.full(int(held.sum()), loss[~held].mean()))
    out["diagnostics"] = diagnose(out)
    return out


def diagnose(result: dict) -> dict:
    """Is a held-out-checked fit worth believing? ``good`` only when its held-out error is at most
    ``GOOD_FRACTION`` of the constant prediction's (the mean of the fitted losses), no parameter sits
    at its bound, and the exponents are not negative (a negative one says loss grows with data or X)."""
    warnings = []
    p, e, b = result["params"], result["errors"], result["baseline_errors"]
    for name in result.get("at_bounds") or []:
        warnings.append(f"{name} is at its bound: the optimum lies outside the allowed range")
    for name in ("alpha", "beta"):
        if p.get(name) is not None and p[name] < 0:
            warnings.append(f"{name} = {p[name]:.3g} < 0: the fitted loss grows with {'X' if name == 'alpha' else 'D'}")
    if e["mean_rel_error"] >= b["mean_rel_error"]:
        warnings.append(
            f"held-out error {100 * e['mean_rel_error']:.2f}% is no better than predicting the mean of the "
            f"fitted losses ({100 * b['mean_rel_error']:.2f}%): the law explains nothing here"
        )
    elif e["mean_rel_error"] > GOOD_FRACTION * b["mean_rel_error"]:
        warnings.append(
            f"held-out error {100 * e['mean_rel_error']:.2f}% is not clearly better than predicting the mean of "
            f"the fitted losses ({100 * b['mean_rel_error']:.2f}%; a good fit has at most {GOOD_FRACTION:g}x its error)"
        )
    return {"good": not warnings, "warnings": warnings, "baseline": "constant = mean of the fitted points' losses"}


def fit_sweep(
    points: list[dict],
    *,
    categorical: bool,
    holdout: int = 1,
    delta: float = HUBER_DELTA,
    forms: tuple[str, ...] = ("multiplicative", "additive"),
) -> dict:
    """Fit a data-size sweep. ``points``: dicts with ``group`` (factor value), ``x`` (numeric factor,
    ignored when ``categorical``), ``d`` (data size) and ``loss`` (the target, lower is better).

    A numeric factor gets one fit per form in ``forms`` over all points; a categorical one (e.g. the
    method) gets one ``data`` law, L = A·D^-beta + E, per group. Each fit leaves out the ``holdout``
    largest data sizes and predicts them. Returns ``{"points": [... + "heldout"], "fits": [...],
    "note": str}``; a fit that cannot be made (too few points) carries ``"error"`` instead of params.
    """
    pts = [dict(p) for p in points]
    fits = []
    if categorical:
        note = (
            "The factor is categorical, so each group is fitted in D alone: L = A·D^-beta + E "
            "(the two-factor laws need a numeric X)."
        )
        for g in dict.fromkeys(p["group"] for p in pts):
            gp = [p for p in pts if p["group"] == g]
            try:
                mask = heldout_mask([p["d"] for p in gp], holdout)
                for p, h in zip(gp, mask, strict=True):
                    p["heldout"] = bool(h)
                r = fit_and_check("data", [p["d"] for p in gp], [p["loss"] for p in gp], holdout=holdout, delta=delta)
                fits.append({"group": g, **r})
            except ValueError as e:
                for p in gp:
                    p.setdefault("heldout", False)
                fits.append({"group": g, "form": "data", "error": str(e)})
    else:
        note = (
            "Fitted on all factor values at once: L = A·X^-alpha·D^-beta + E, and the additive "
            "form L = A·X^-alpha + B·D^-beta + E for comparison."
        )
        d = [p["d"] for p in pts]
        try:
            mask = heldout_mask(d, holdout)
        except ValueError as e:
            mask = [False] * len(pts)
            fits = [{"form": f, "error": str(e)} for f in forms]
            forms = ()
        for p, h in zip(pts, mask, strict=True):
            p["heldout"] = bool(h)
        for form in forms:
            try:
                fits.append(
                    fit_and_check(
                        form, d, [p["loss"] for p in pts], [p["x"] for p in pts], holdout=holdout, delta=delta
                    )
                )
            except ValueError as e:
                fits.append({"form": form, "error": str(e)})
    return {"points": pts, "fits": fits, "note": note, "holdout_sizes": holdout, "huber_delta": delta}
