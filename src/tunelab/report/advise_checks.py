"""Checks that keep ``tunelab advise`` from extrapolating what a law cannot describe.

- ``plateau``: sizes whose runs sit at the chance loss, and curves that are flat then fall;
- ``form_band``: a range from the backtest's error, scaled by the extrapolation distance;
- ``target_of``: what the law is fitted to (eval loss, or a metric's error).
"""

from __future__ import annotations

import math

import numpy as np

CHANCE_TOL = 0.03  # a size whose mean loss is within 3% of chance has not learned (its seeds' spread is ~1%)
MIN_SIZES = 3  # sizes above chance needed to fit A, beta and E


def target_of(rows: list[dict], manifest: dict) -> tuple[str, callable, str]:
    """(key, value -> loss-like, shown name) of what the law is fitted to: advise.target, default the
    eval loss; a higher-is-better metric such as accuracy is fitted as its error (1 - m, 100 - m)."""
    target = manifest.get("target")
    if not target or target == "eval_loss":
        return "eval_loss", float, "eval loss"
    from tunelab.report.tables import scale_target

    key, to_loss, shown = scale_target(rows, target)
    return key, to_loss, shown or key


def plateau(pts: list[dict], chance: float | None) -> dict:
    """Sizes whose runs have not started learning, and whether the curve bends the wrong way.

    ``at_chance``: sizes whose mean loss is within ``CHANCE_TOL`` of the chance loss (e.g. ln 2 for a
    balanced binary head); they are left out of the fit, since A·D^-beta + E describes learning, not
    the plateau before it. ``concave``: in log-log, A·D^-beta + E only flattens as D grows (its slope's
    magnitude falls), so a curve that is flat at the small sizes and steep at the large ones (the loss
    falls faster with more data) is outside the law's family; flagged when the first slope is under
    half the last and the difference exceeds twice the seeds' noise. Per X value for two-factor sweeps."""
    out = {"at_chance": [], "concave": [], "warnings": []}
    groups: dict = {}
    for p in pts:
        groups.setdefault(p["x"], []).append(p)
    for x, ps in groups.items():
        by: dict[float, list[float]] = {}
        for p in ps:
            by.setdefault(p["d"], []).append(float(np.log(p["loss"])))
        sizes = sorted(by)
        means = [float(np.mean(by[d])) for d in sizes]
        tag = "" if x is None else f" (X = {x:g})"
        if chance is not None:
            flat = [d for d, m in zip(sizes, means, strict=True) if abs(math.exp(m) - chance) <= chance * CHANCE_TOL]
            above = [d for d, m in zip(sizes, means, strict=True) if math.exp(m) > chance * (1 + CHANCE_TOL)]
            if above:  # not a plateau: the runs learned but are confidently wrong where they err, and a
                flat = []  # loss passing through the chance value on its way down is no sign of chance
                out["warnings"].append(
                    f"sizes {', '.join(f'{d:g}' for d in above)}{tag} have a mean target above chance ({chance:.4g}): "
                    "overconfident models (e.g. many epochs on few rows); their loss says little about the metric, "
                    "consider advise.target: accuracy")
            out["at_chance"] += [{"d": d, "x": x} for d in flat]
            if flat:
                out["warnings"].append(
                    f"{len(flat)} of {len(sizes)} sizes{tag} sit at chance (mean target within "
                    f"{100 * CHANCE_TOL:g}% of {chance:.4g}): {', '.join(f'{d:g}' for d in flat)} rows; left out "
                    "of the fit (train them longer, e.g. advise.steps: full, or start the sizes higher)")
        sizes = [d for d in sizes if {"d": d, "x": x} not in out["at_chance"]]  # the shape of what is fitted
        means = [float(np.mean(by[d])) for d in sizes]
        if len(sizes) < 3:
            continue
        ld = np.log(sizes)
        slopes = np.diff(means) / np.diff(ld)
        se = [np.std(by[d], ddof=1) / math.sqrt(len(by[d])) if len(by[d]) > 1 else 0.0 for d in sizes]
        noise = 2 * math.sqrt(2) * max(se) / float(np.min(np.diff(ld)))
        first, last = -slopes[0], -slopes[-1]
        if first < 0.5 * last and last - first > noise:
            out["concave"].append({"x": x, "first_slope": float(slopes[0]), "last_slope": float(slopes[-1])})
            out["warnings"].append(
                f"the loss{tag} falls faster at the large sizes (log-log slope {slopes[-1]:.3g}) than at the "
                f"small ones ({slopes[0]:.3g}): a plateau then learning, which A·D^-beta + E cannot follow; "
                "the small sizes have not started learning (train them longer: advise.steps: full)")
    return out


def form_band(bt: dict, loss: float, d_full: float) -> dict:
    """The seed bootstrap says nothing about the law's form; the backtest does. Its relative error over
    one extrapolation step (second-largest -> largest size, in log D) is scaled by how many such steps
    the prediction goes (largest size -> full size): prediction x (1 ± r·k), floored at 0. A heuristic,
    said so in the report."""
    if "errors" not in bt:
        return {"lo": None, "hi": None, "rel": None}
    fitted = sorted({p for p in bt.get("sizes", [])})
    if len(fitted) < 2:
        return {"lo": None, "hi": None, "rel": None}
    step = math.log(bt["d"] / fitted[-1])
    rel = bt["errors"]["mean_rel_error"] * math.log(d_full / bt["d"]) / step
    return {"lo": max(0.0, loss * (1 - rel)), "hi": loss * (1 + rel), "rel": rel}  # losses and errors are >= 0
