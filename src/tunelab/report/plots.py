"""The report's plots, drawn with matplotlib's Agg canvas and returned as PNG bytes.

Figures are built with ``matplotlib.figure.Figure`` + ``FigureCanvasAgg`` directly rather than pyplot,
so nothing here touches the global backend or leaks figures across calls (safe in servers and tests).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tunelab.report.fit import predict

_DPI = 110


def _figure(w: float = 6.4, h: float = 4.2):
    fig = Figure(figsize=(w, h), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _scatter_summary(summary: list[dict], metric: str, xkey: str, by: str, xlabel: str, logx: bool) -> bytes | None:
    pts = [s for s in summary if s.get(f"{xkey}_mean") is not None and s.get(f"{metric}_mean") is not None]
    if logx:
        pts = [s for s in pts if s[f"{xkey}_mean"] > 0]
    if not pts:
        return None
    fig, ax = _figure()
    for s, c in zip(pts, _colors(len(pts)), strict=True):
        x, y = s[f"{xkey}_mean"], s[f"{metric}_mean"]
        ax.errorbar(
            [x],
            [y],
            yerr=_yerr(s, metric, y),
            xerr=None if s.get(f"{xkey}_ci") is None else [s[f"{xkey}_ci"]],
            fmt="o",
            color=c,
            capsize=3,
            markersize=7,
            label=str(s[by]),
        )
        ax.annotate(str(s[by]), (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title("mean over seeds; error bars: the table's 95% interval (two-level bootstrap)", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    return png_bytes(fig)


def _yerr(s: dict, metric: str, y: float):
    """The table's interval as asymmetric error bars: [[y - lo], [hi - y]] (None without one)."""
    lo, hi = s.get(f"{metric}_lo"), s.get(f"{metric}_hi")
    if lo is None or hi is None:
        return None
    return [[max(0.0, y - lo)], [max(0.0, hi - y)]]


def metric_vs_params(summary: list[dict], metric: str, by: str = "label") -> bytes | None:
    """Metric (mean, error bar = the summary's 95% interval) against trainable parameters on a log axis."""
    return _scatter_summary(summary, metric, "trainable_params", by, "trainable parameters (log scale)", True)


def metric_vs_time(summary: list[dict], metric: str, by: str = "label") -> bytes | None:
    """Metric against wall time of the run (training + evaluation, seconds)."""
    return _scatter_summary(summary, metric, "wall_time_s", by, "wall time (s)", False)


def read_log(run_dir: str | Path) -> list[tuple[float, float]]:
    """(step, loss) pairs from a run's log.jsonl; lines without both, or cut off by a crash, are skipped."""
    path = Path(run_dir) / "log.jsonl"
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            step, loss = rec.get("step"), rec.get("loss")
            if isinstance(step, int | float) and isinstance(loss, int | float) and math.isfinite(loss):
                out.append((float(step), float(loss)))
    return out


def loss_curves(rows: list[dict], by: str = "label") -> bytes | None:
    """Training loss against step, one line per run, one colour per label (seeds share it)."""
    curves = [(r, read_log(r["run_dir"])) for r in rows if r.get("run_dir")]
    curves = [(r, c) for r, c in curves if c]
    if not curves:
        return None
    labels = sorted({str(r[by]) for r, _ in curves})
    color = dict(zip(labels, _colors(len(labels)), strict=True))
    fig, ax = _figure(7.0, 4.4)
    seen = set()
    for r, c in curves:
        lab = str(r[by])
        steps, losses = zip(*sorted(c), strict=True)
        ax.plot(steps, losses, color=color[lab], linewidth=1.3, alpha=0.85, label=None if lab in seen else lab)
        seen.add(lab)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8, loc="best")
    return png_bytes(fig)


def scaling_plot(result: dict) -> bytes | None:
    """Points (filled: fitted, hollow: held out) and the fitted laws against data size D.

    ``result`` is what ``tunelab.sweeps.compare.fit_scaling`` returns: ``points`` (group, x, d, loss, heldout)
    and ``fits`` (per form: params; for a categorical factor one ``data`` fit per group)."""
    pts = result.get("points") or []
    if not pts:
        return None
    # Numeric factor values in numeric order (4, 16, 64), not the string order of run names.
    groups = sorted(
        dict.fromkeys(p["group"] for p in pts),
        key=lambda g: next((p["x"] for p in pts if p["group"] == g and p["x"] is not None), math.inf),
    )
    color = dict(zip(groups, _colors(len(groups)), strict=True))
    fig, ax = _figure(7.0, 4.6)
    dmin, dmax = min(p["d"] for p in pts), max(p["d"] for p in pts)
    dd = np.geomspace(dmin, dmax, 100)
    styles = {"multiplicative": "-", "additive": "--", "data": "-"}
    for g in groups:
        gp = [p for p in pts if p["group"] == g]
        for held in (False, True):
            sel = [p for p in gp if p["heldout"] == held]
            if sel:
                ax.scatter(
                    [p["d"] for p in sel],
                    [p["loss"] for p in sel],
                    s=36,
                    zorder=3,
                    facecolors="none" if held else color[g],
                    edgecolors=color[g],
                    label=f"{g}" if not held else None,
                )
        for fit in result.get("fits", []):
            if fit.get("group") not in (None, g) or "params" not in fit:
                continue
            x = None if fit["form"] == "data" else np.full_like(dd, gp[0]["x"])
            ax.plot(
                dd,
                predict(fit["form"], fit["params"], dd, x),
                styles[fit["form"]],
                color=color[g],
                linewidth=1.2,
                alpha=0.9,
            )
    ax.set_xscale("log")
    ax.set_xlabel("fine-tuning examples D (log scale)")
    ax.set_ylabel(result.get("target", "loss"))
    forms = sorted({f["form"] for f in result.get("fits", []) if "params" in f})
    note = "; ".join(f"{'solid' if styles[f] == '-' else 'dashed'}: {f}" for f in forms)
    ax.set_title(f"hollow = held out; {note}", fontsize=9)
    ax.legend(fontsize=8, loc="best", title=result.get("factor"))
    return png_bytes(fig)
