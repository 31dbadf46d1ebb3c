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
from html import escape as _esc
from pathlib import Path

from tunelab.report import html, plots, stats, tables
from tunelab.report.fit import fit_sweep
from tunelab.report.tables import scale_target
from tunelab.runtime.atomic_files import atomic_write_text

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
    is_scale = kind in ("scale", "advise") or (kind is None and all(_SCALE_NAME.match(r["run"]) for r in rows))
    if is_scale:  # a sweep's table is ranked by the fitted target (e.g. eval_loss) unless told otherwise
        metric = metric or scale_target(rows, target or manifest.get("target"))[0]
    metric = tables.primary_metric(rows, metric or manifest.get("metric"))
    summary = tables.summarize(rows, metric)
    notes = [stats.INTERVAL_NOTE + "; with one seed there is no interval."]
    if not is_scale and len(summary) > 1:
        kind = stats.compare_to_best(rows, summary)
        if kind:
            notes.append(
                f"vs best: paired bootstrap against {summary[0]['label']} over eval examples (per-example "
                f"score: {SCORE_NAMES.get(kind, kind)}, averaged over each method's seeds per example; "
                "10,000 resamples; Δ = mean score difference, percentile 95% CI, two-sided p)."
            )
    _add_manifest_facts(summary, manifest)
    columns = tables.results_columns(rows, metric)
    atomic_write_text(out_dir / "results.csv", tables.to_csv(rows, columns))
    atomic_write_text(out_dir / "summary.csv", tables.to_csv(summary))
    env = manifest.get("environment") or {"(report machine)": "", **stats.environment()}
    facts = budget_facts(manifest)
    md = tables.markdown_table(summary, metric) + "\n" + "\n".join(notes) + "\n"
    if facts:
        md += "\n## Budget\n\n" + "\n".join(f"- {k}: {v}" for k, v in facts.items()) + "\n"
    md += "\n## Environment\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n"
    figs = [(plots.loss_curves(rows), "training loss per run (log.jsonl)")]
    if not is_scale:  # one point per method; a sweep's many points are plotted by the scaling fit
        figs = [
            (plots.metric_vs_params(summary, metric), f"{metric} vs trainable parameters (log scale)"),
            (plots.metric_vs_time(summary, metric), f"{metric} vs wall time"),
            *figs,
        ]
    extra = ""
    if kind == "advise":
        from tunelab.report import advise

        task_metric = tables.primary_metric(rows, manifest.get("metric") or _task_metric(rows))
        result = advise.analyse(rows, manifest, task_metric, tables.higher_is_better(task_metric))
        atomic_write_text(out_dir / "advise.json", json.dumps(result, indent=2, default=float))
        png = advise.plot(result, advise.points_for(rows, manifest, task_metric))
        _write_png(out_dir / "plots" / "advise.png", png)
        md = advise.markdown(result) + "\n## All data sizes\n\n" + md
        heads, cells = advise.table_rows(result)
        extra = (f"<h2>Advice at {result['full_size']:g} rows</h2>"
                 + "".join(f'<p class="note">{_esc(x)}</p>' for x in advise.markdown(result).splitlines()[2:4] if x)
                 + html._table(heads, [f"<tr>{''.join(html._td(c, cls='t') for c in r)}</tr>" for r in cells])
                 + f'<div class="plots">{html.figure(png, "eval loss vs data size: fits, predictions, truth")}</div>')
    elif is_scale:
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
        extra_html=extra + html.kv_table("Budget", facts) + html.kv_table("Environment", env),
        notes=notes,
    )
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path


SCORE_NAMES = {
    "match": "correct = prediction == reference",
    "correct": "the task's own correctness flag",
    "token_f1": "token F1 against the best-matching reference answer",
    "rougeL": "ROUGE-L F1 against the reference",
}


def _add_manifest_facts(summary: list[dict], manifest: dict) -> None:
    """Per-label budget (steps, FLOPs/step, s/step) and tuned learning rate from the manifest."""
    per = (manifest.get("budget") or {}).get("per_label") or {}
    tuning = manifest.get("tuning") or {}
    for s in summary:
        for k, v in (per.get(str(s["label"])) or {}).items():
            s[f"budget_{k}"] = v
        t = tuning.get(str(s["label"]))
        if t:
            s["tuned_lr"] = t.get("best_lr")
            s["tune_scores"] = " ".join(f"{lr:g}:{v:.4g}" for lr, v in t.get("scores", []) if v is not None)


def budget_facts(manifest: dict) -> dict:
    """The budget matching and lr search of a comparison, as display lines."""
    out = {}
    b = manifest.get("budget") or {}
    if b:
        out["matched by"] = b.get("note") or b.get("mode")
        for label, v in (b.get("per_label") or {}).items():
            out[f"{label}"] = ", ".join(f"{k} {tables.fmt_num(x, 4)}" for k, x in v.items())
    t = manifest.get("tuning") or {}
    for label, v in t.items():
        scores = ", ".join(f"{lr:g} -> {s:.4g}" for lr, s in v.get("scores", []) if s is not None)
        out[f"lr search {label}"] = f"best {v.get('best_lr'):g} ({v.get('metric')} on {v.get('split')}: {scores})"
    return out


def _task_metric(rows: list[dict]) -> str | None:
    """The primary task metric (never eval_loss, the advice's fitted target) when the runs have one."""
    for name in tables.PRIMARY_METRICS:
        if name != "eval_loss" and all(tables._number(r.get(name)) for r in rows):
            return name
    return None


def scaling_markdown(result: dict) -> str:
    lines = [
        f"## Scaling law ({result['target']})",
        "",
        result["note"],
        "",
        "| group | form | A | alpha | beta | B | E | held-out mean rel. error | constant baseline | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    warnings = []
    for f in result["fits"]:
        if "params" not in f:
            lines.append(f"| {f.get('group', 'all')} | {f['form']} | {f['error']} ||||||||")
            continue
        p = f["params"]
        cells = [tables.fmt_num(p.get(k)) for k in ("A", "alpha", "beta", "B", "E")]
        diag = f.get("diagnostics") or {}
        base = f.get("baseline_errors", {}).get("mean_rel_error")
        lines.append(
            f"| {f.get('group', 'all')} | {f['form']} | "
            + " | ".join(cells)
            + f" | {100 * f['errors']['mean_rel_error']:.2f}% | "
            + ("–" if base is None else f"{100 * base:.2f}%")
            + f" | {'good' if diag.get('good') else 'NOT a good fit'} |"
        )
        warnings += [f"- {f.get('group', 'all')} / {f['form']}: {w}" for w in diag.get("warnings", [])]
    if warnings:
        lines += ["", "Warnings:", *warnings]
    return "\n".join(lines) + "\n"


def _write_png(path: Path, png: bytes | None) -> None:
    if png:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".png.tmp")
        tmp.write_bytes(png)
        tmp.replace(path)


__all__ = ["build_report", "read_manifest", "scaling_points", "scale_target"]
