"""Reports over a directory of finished runs: ``build_report(DIR)`` is ``tunelab report DIR``.

It writes, beside the runs:

    results.csv    one row per finished run (task metrics, params, time, speed, memory, loss)
    summary.csv    one row per label (method or variant): mean and sample std over seeds
    results.md     the summary as a Markdown table, best first
    plots/*.png    metric vs trainable params (log x), metric vs wall time, loss curves
    scaling.json   (scale sweeps) fitted laws, held-out predictions; plots/scaling.png
    report.html    all of the above in one self-contained file

DIR is what ``tunelab compare`` / ``tunelab scale`` made (with ``manifest.json`` and ``runs/``), or
any directory of run directories.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tunelab.checkpoint import atomic_write_text
from tunelab.report import html, plots, tables
from tunelab.report.fit import fit_sweep

MANIFEST = "manifest.json"
_SCALE_NAME = re.compile(r"^(?P<value>.+)-n(?P<size>\d+)-s(?P<seed>\d+)$")


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def scale_target(rows: list[dict], target: str | None) -> tuple[str, callable, str]:
    """(metric key, value -> loss-like number, note). Default: eval_loss when every run has it, else
    the task metric, turned into an error (1 - m, or 100 - m for percentages) when higher is better.
    Training loss is never the default: with few examples it falls as the model memorises them."""
    key = target or (
        "eval_loss" if all(tables._number(r.get("eval_loss")) for r in rows) else tables.primary_metric(rows)
    )
    key = tables.primary_metric(rows, key)
    if not tables.higher_is_better(key):
        return key, float, ""
    top = 100.0 if max(float(r[key]) for r in rows if tables._number(r.get(key))) > 1.0 else 1.0
    return key, (lambda v: top - float(v)), f"{top:g} - {key}"


def scaling_points(rows: list[dict], manifest: dict, target: str | None) -> tuple[list[dict], str, str]:
    """Mean target over seeds per (factor value, data size) -> points for ``fit_sweep``."""
    plan = {r["run"]: r for r in manifest.get("runs", [])}
    key, to_loss, shown = scale_target(rows, target)
    use_params = manifest.get("x_from") == "total_params"
    cells: dict[tuple, list] = {}
    for r in rows:
        info = plan.get(r["run"])
        if info is None:
            m = _SCALE_NAME.match(r["run"])
            if not m:
                continue
            info = {"value": m["value"], "size": int(m["size"])}
        if not tables._number(r.get(key)):
            continue
        value = info["value"]
        if use_params:
            x = r.get("total_params")
        else:
            try:
                x = float(value)
            except (TypeError, ValueError):
                x = None
        cell = cells.setdefault((str(value), int(info["size"])), [x, []])
        cell[1].append(to_loss(r[key]))
    points = [
        {"group": g, "x": x, "d": d, "loss": sum(v) / len(v), "seeds": len(v)} for (g, d), (x, v) in cells.items()
    ]
    return points, key, shown or key


def build_report(
    out_dir: str | Path,
    metric: str | None = None,
    *,
    target: str | None = None,
    holdout: int | None = None,
    title: str | None = None,
) -> Path:
    """(Re)build every report file under ``out_dir`` from its finished runs; returns report.html's path.

    ``metric`` ranks the comparison (default: the manifest's, else the first of accuracy/f1/rougeL/
    exact_match/... that the runs have). ``target`` and ``holdout`` apply to scale sweeps."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    rows, unfinished = tables.collect_runs(out_dir)
    planned = [r["run"] for r in manifest.get("runs", [])]
    if planned:  # the manifest says which runs this comparison is made of
        rows = [r for r in rows if r["run"] in planned]
        done = {r["run"] for r in rows}
        unfinished = [n for n in planned if n not in done]
    if not rows:
        raise ValueError(f"{out_dir}: no finished runs (no runs/*/metrics.json) to report on")
    kind = manifest.get("kind")
    is_scale = kind == "scale" or (kind is None and all(_SCALE_NAME.match(r["run"]) for r in rows))
    if is_scale:  # a sweep's table is ranked by the fitted target (e.g. eval_loss) unless told otherwise
        metric = metric or scale_target(rows, target or manifest.get("target"))[0]
    metric = tables.primary_metric(rows, metric or manifest.get("metric"))
    summary = tables.summarize(rows, metric)
    columns = tables.results_columns(rows, metric)
    atomic_write_text(out_dir / "results.csv", tables.to_csv(rows, columns))
    atomic_write_text(out_dir / "summary.csv", tables.to_csv(summary))
    md = tables.markdown_table(summary, metric)
    figs = [(plots.loss_curves(rows), "training loss per run (log.jsonl)")]
    if not is_scale:  # one point per method; a sweep's many points are plotted by the scaling fit
        figs = [
            (plots.metric_vs_params(summary, metric), f"{metric} vs trainable parameters (log scale)"),
            (plots.metric_vs_time(summary, metric), f"{metric} vs wall time"),
            *figs,
        ]
    extra = ""
    if is_scale:
        points, key, shown = scaling_points(rows, manifest, target or manifest.get("target"))
        categorical = bool(manifest.get("categorical")) or any(p["x"] is None for p in points)
        result = fit_sweep(points, categorical=categorical, holdout=holdout or manifest.get("holdout", 1))
        result.update(target=shown, metric=key, factor=manifest.get("factor", "factor"))
        atomic_write_text(out_dir / "scaling.json", json.dumps(result, indent=2))
        png = plots.scaling_plot(result)
        extra = html.scaling_section(result, png)
        md += "\n" + scaling_markdown(result)
        _write_png(out_dir / "plots" / "scaling.png", png)
    atomic_write_text(out_dir / "results.md", md)
    names = ("loss_curves",) if is_scale else ("metric_vs_params", "metric_vs_time", "loss_curves")
    for (png, _), name in zip(figs, names, strict=True):
        _write_png(out_dir / "plots" / f"{name}.png", png)
    meta = {
        "task": rows[0].get("task"),
        "config": manifest.get("config"),
        "runs": len(rows),
        "seeds": ", ".join(str(s) for s in manifest.get("seeds", [])) or None,
    }
    page = html.render(
        title=title or f"tunelab {manifest.get('kind', 'report')}: {out_dir.name}",
        metric=metric,
        summary=summary,
        rows=rows,
        columns=columns,
        plots=figs,
        meta=meta,
        unfinished=unfinished,
        failed=manifest.get("failed"),
        extra_html=extra,
    )
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path


def scaling_markdown(result: dict) -> str:
    lines = [
        f"## Scaling law ({result['target']})",
        "",
        result["note"],
        "",
        "| group | form | A | alpha | beta | B | E | held-out mean rel. error |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in result["fits"]:
        if "params" not in f:
            lines.append(f"| {f.get('group', 'all')} | {f['form']} | {f['error']} ||||||")
            continue
        p = f["params"]
        cells = [tables.fmt_num(p.get(k)) for k in ("A", "alpha", "beta", "B", "E")]
        lines.append(
            f"| {f.get('group', 'all')} | {f['form']} | "
            + " | ".join(cells)
            + f" | {100 * f['errors']['mean_rel_error']:.2f}% |"
        )
    return "\n".join(lines) + "\n"


def _write_png(path: Path, png: bytes | None) -> None:
    if png:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".png.tmp")
        tmp.write_bytes(png)
        tmp.replace(path)


__all__ = ["build_report", "read_manifest", "scaling_points", "scale_target"]
