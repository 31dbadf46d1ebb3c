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


# ---------------------------------------------------------------- never a confident answer from too little

FLOOR_TOL = 1e-9
REPEATS = 4  # runs (in at least 2 cells) sharing one exact metric value: a degenerate output


def law_params(form: str) -> int:
    """Free parameters of the law advise fits: A, beta, E (+ alpha with a factor X)."""
    return 3 if form == "data" else 4


def floor_cells(pts: list[dict], floor_loss: float | None) -> dict:
    """Cells (size, X) whose metric is stuck at its floor, found without ``chance_loss``: every seed at
    the metric's worst value (``floor_loss``: the fitted error of F1 0 or accuracy 0, e.g. 1.0), or
    every seed (two or more) at one identical value that is also the worst any cell of the sweep
    reached while some other cell did better (a model predicting the majority class for every row:
    its accuracy is the class share, whatever the seed). ``pts`` are one method's points ("loss" is
    the fitted target, lower is better); ``floor_loss`` None skips the first test. The sweep-wide
    worst value comes in as ``worst`` on each point (set by ``mark_worst``)."""
    cells: dict[tuple, list[float]] = {}
    degen: dict[tuple, list[bool]] = {}
    worst = None
    for p in pts:
        cells.setdefault((p["d"], p["x"]), []).append(p["loss"])
        degen.setdefault((p["d"], p["x"]), []).append(bool(p.get("degenerate")))
        worst = p.get("worst", worst)
    out = []
    for (d, x), vals in sorted(cells.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        lo, hi = min(vals), max(vals)
        at_top = floor_loss is not None and lo >= floor_loss - FLOOR_TOL * max(1.0, abs(floor_loss))
        same_worst = (len(vals) >= 2 and hi - lo <= FLOOR_TOL * max(1.0, abs(hi)) and worst is not None
                      and abs(hi - worst["loss"]) <= FLOOR_TOL * max(1.0, abs(hi)) and worst["spread"])
        degenerate = len(vals) >= 2 and all(degen[(d, x)])
        if at_top or same_worst or degenerate:
            why = ("metric at its floor" if at_top else
                   "every seed at the same worst value of the sweep (one class predicted for every row?)" if same_worst
                   else "every seed at a value that recurs exactly across runs (one class predicted for every row?)")
            out.append({"d": d, "x": x, "value": float(np.mean(vals)), "why": why})
    return {"at_floor": out}


def mark_worst(all_pts: dict[str, list[dict]]) -> None:
    """Give every point the sweep's worst cell mean (``worst``: {"loss", "spread"}; spread is False
    when every cell has that value, i.e. nothing in the sweep learned more than any other)."""
    means = []
    for ps in all_pts.values():
        cells: dict[tuple, list[float]] = {}
        for p in ps:
            cells.setdefault((p["d"], p["x"]), []).append(p["loss"])
        means += [float(np.mean(v)) for v in cells.values()]
    if not means:
        return
    w = {"loss": max(means), "spread": max(means) - min(means) > FLOOR_TOL * max(1.0, abs(max(means)))}
    # A value that recurs exactly in several runs of different cells is a degenerate output (one class
    # for every row scores that class's share of the eval set, whatever the method, size and seed).
    seen: dict[float, set] = {}
    for label, ps in all_pts.items():
        for i, p in enumerate(ps):
            seen.setdefault(round(p["loss"], 9), set()).add((label, p["d"], p["x"], i))
    repeated = {v for v, runs in seen.items() if len(runs) >= REPEATS and len({r[:3] for r in runs}) >= 2}
    for ps in all_pts.values():
        for p in ps:
            p["worst"] = w
            p["degenerate"] = round(p["loss"], 9) in repeated


def plausible_range(ps: list[dict], loss: float, d_full: float) -> dict:
    """How low the target can plausibly go at ``d_full`` from what was measured: a power law with
    E >= 0 falls ever more slowly per doubling of D, so from the largest size it cannot fall faster
    than the steepest measured step between sizes, continued in log D (less two standard errors of
    the cell means, so noise does not make a law implausible). Returns {"floor", "plausible", "why"}."""
    cells: dict[float, list[float]] = {}
    for p in ps:
        cells.setdefault(p["d"], []).append(p["loss"])
    sizes = sorted(cells)
    means = [float(np.mean(cells[d])) for d in sizes]
    ses = [float(np.std(cells[d], ddof=1) / math.sqrt(len(cells[d]))) if len(cells[d]) > 1 else 0.0 for d in sizes]
    if len(sizes) < 2:
        return {"floor": None, "plausible": True, "why": None}
    ld = np.log(sizes)
    steep = max(0.0, max(-(means[i + 1] - means[i]) / (ld[i + 1] - ld[i]) for i in range(len(sizes) - 1)))
    floor = means[-1] - steep * math.log(d_full / sizes[-1]) - 2 * max(ses)
    ok = loss >= floor
    why = None if ok else (f"the law predicts {loss:.4g} at {d_full:g} rows, below {floor:.4g}: the steepest "
                           "measured fall continued in log D (a power law flattens, never steepens)")
    return {"floor": float(floor), "plausible": bool(ok), "why": why}


def suggest_sizes(sizes: list[float], d_full: float, n_needed: int) -> list[int]:
    """Sizes to run next: doubling from the largest small size, below the full size (at least one)."""
    out, d = [], max(sizes)
    while len(out) < max(1, n_needed):
        d *= 2
        if d >= d_full:
            break
        out.append(int(d))
    return out or [int(math.sqrt(max(sizes) * d_full))]


def widened(boot: dict, band: dict, lo_bound: float = 0.0) -> dict:
    """The prediction's range in the fitted target: the seed bootstrap's interval joined with the
    backtest-scaled band (the law's own form error), floored at ``lo_bound``."""
    los = [v for v in (boot.get("lo"), band.get("lo")) if v is not None]
    his = [v for v in (boot.get("hi"), band.get("hi")) if v is not None]
    if not los or not his:
        return {"lo": None, "hi": None}
    return {"lo": max(lo_bound, min(los)), "hi": max(his)}


def run_noise(ps: list[dict]) -> dict:
    """How far the mean of one new set of seeds may land from the law's mean: the pooled spread of the
    seeds within each (size, X) cell (sd) and the seeds per cell (n). The stated range is for what a
    user will measure (a mean over n seeds), so it is widened by 2·sd/√n on each side. The spread is
    taken at the two largest sizes (seeds disagree more on fewer rows)."""
    top = sorted({p["d"] for p in ps})[-2:]
    cells: dict[tuple, list[float]] = {}
    for p in ps:
        if p["d"] in top:
            cells.setdefault((p["d"], p["x"]), []).append(p["loss"])
    ss = sum(float(np.sum((np.asarray(v) - np.mean(v)) ** 2)) for v in cells.values())
    dof = sum(len(v) - 1 for v in cells.values())
    n = int(np.median([len(v) for v in cells.values()])) if cells else 0
    sd = math.sqrt(ss / dof) if dof > 0 else 0.0
    return {"sd": sd, "n": n, "half": 2 * sd / math.sqrt(n) if n else 0.0}
