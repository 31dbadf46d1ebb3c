"""Reports over a directory of finished runs: ``build_report(DIR)`` is ``tunelab report DIR``.

It writes, beside the runs:

    results.csv    one row per finished run (task metrics, params, time, speed, memory, loss)
    summary.csv    one row per label (method or variant): mean, 95% interval, sample std over seeds,
                   the paired test against the best (raw and Holm-corrected p, tied_with_best)
    results.md     a one-line verdict, then the summary as a Markdown table, best first
    plots/*.png    metric vs trainable params (log x), metric vs wall time, loss curves
    scaling.json   (scale sweeps) fitted laws, held-out predictions; plots/scaling.png
    report.html    all of the above in one self-contained file

DIR is what ``tunelab compare`` / ``tunelab scale`` made (with ``manifest.json`` and ``runs/``), or
any directory of run directories.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
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
    interval: str = "bootstrap",
) -> Path:
    """(Re)build every report file under ``out_dir`` from its finished runs; returns report.html's path.

    ``metric`` ranks the comparison (default: the manifest's, else the first of accuracy/f1/rougeL/
    exact_match/... that the runs have). ``target`` and ``holdout`` apply to scale sweeps. ``interval``:
    "bootstrap" (the two-level bootstrap over seeds and examples where the runs saved predictions) or
    "t" (the Student-t interval over seeds for every row, as before; the paired tests are unchanged).

    Every report has the summary table, the runs, the loss curves, the budget and the environment;
    ``SECTIONS[sweep_kind(...)]`` adds what its kind of sweep needs (plots, a fit, the advice)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    rows, unfinished = _finished_runs(out_dir, manifest)
    sweep = sweep_kind(manifest, rows)
    target = target or manifest.get("target")
    holdout = holdout or manifest.get("holdout", 1)
    metric = _ranking_metric(rows, manifest, sweep, metric, target)
    if interval not in ("bootstrap", "t"):
        raise ValueError(f"interval={interval!r}: use 'bootstrap' (seeds x examples) or 't' (Student-t over seeds)")
    summary, lead, notes = _summary(rows, metric, vs_best=sweep == "compare", t_only=interval == "t")
    _add_manifest_facts(summary, manifest)
    columns = tables.results_columns(rows, metric)
    atomic_write_text(out_dir / "results.csv", tables.to_csv(rows, columns))
    atomic_write_text(out_dir / "summary.csv", tables.to_csv(summary))
    env = manifest.get("environment") or {"(report machine)": "", **stats.environment()}
    facts = budget_facts(manifest)
    loss_curves = (plots.loss_curves(rows), "training loss per run (log.jsonl)", "loss_curves")
    section = SECTIONS[sweep](Runs(out_dir, manifest, rows, summary, metric, target, holdout))
    md = section.markdown_before + _summary_markdown(summary, metric, lead, notes, facts, env) + section.markdown_after
    atomic_write_text(out_dir / "results.md", md)
    figures = [*section.figures, loss_curves]
    for png, _, name in figures:
        _write_png(out_dir / "plots" / f"{name}.png", png)
    page = html.render(
        title=title or f"tunelab {manifest.get('kind', 'report')}: {out_dir.name}",
        metric=metric,
        summary=summary,
        rows=rows,
        columns=columns,
        plots=[(png, caption) for png, caption, _ in figures],
        meta=_meta(rows, manifest),
        unfinished=unfinished,
        failed=manifest.get("failed"),
        extra_html=section.html + html.kv_table("Budget", facts) + html.kv_table("Environment", env),
        notes=notes,
        lead=lead,
    )
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path


def sweep_kind(manifest: dict, rows: list[dict]) -> str:
    """What made the runs: "advise", "scale" or "compare" (also a tuning sweep or any directory of
    runs). The manifest says; without one, runs all named VALUE-nSIZE-sSEED are a scale sweep."""
    kind = manifest.get("kind")
    if kind in ("scale", "advise"):
        return kind
    if kind is None and all(_SCALE_NAME.match(r["run"]) for r in rows):
        return "scale"
    return "compare"


def _finished_runs(out_dir: Path, manifest: dict) -> tuple[list[dict], list[str]]:
    """The finished runs' rows and the unfinished runs' names; the manifest's plan, when it has one,
    says which runs the report is made of."""
    rows, unfinished = tables.collect_runs(out_dir)
    planned = [r["run"] for r in manifest.get("runs", [])]
    if planned:
        rows = [r for r in rows if r["run"] in planned]
        done = {r["run"] for r in rows}
        unfinished = [n for n in planned if n not in done]
    if not rows:
        raise ValueError(f"{out_dir}: no finished runs (no runs/*/metrics.json) to report on")
    return rows, unfinished


def _ranking_metric(rows: list[dict], manifest: dict, sweep: str, metric: str | None, target: str | None) -> str:
    """The metric the summary is ranked by: ``metric``, else the manifest's, else the first the runs have.
    A sweep's table is ranked by its fitted target (e.g. eval_loss) unless told otherwise."""
    if sweep != "compare":
        metric = metric or scale_target(rows, target)[0]
    return tables.primary_metric(rows, metric or manifest.get("metric"))


def _summary(rows: list[dict], metric: str, *, vs_best: bool, t_only: bool = False) -> tuple[list[dict], list[str], list[str]]:
    """One row per label, best first, the lines shown above it (the verdict, warnings) and the notes
    under it. With ``vs_best`` (a comparison of several labels) each label gets a two-level bootstrap
    interval and a paired test against the best, Holm-corrected (``stats.analyse``)."""
    summary = tables.summarize(rows, metric)
    result = stats.analyse(rows, summary, metric, intervals=not t_only) if vs_best else None
    stats.bounded_t_rows(summary, metric)
    lead, notes = [], []
    if vs_best:
        lead.append("Verdict: " + stats.verdict(summary, metric, result if len(summary) > 1 else None))
    if warning := stats.seed_warning(summary):
        lead.append(warning)
    kinds = {s.get(f"{metric}_interval") for s in summary} - {None, ""}
    if any(k.startswith("bootstrap") for k in kinds):
        notes.append(stats.BOOTSTRAP_NOTE)
    if any(k.startswith("t over seeds") for k in kinds) or not kinds:
        cut = " (cut to the metric's range)" if any("cut" in k for k in kinds) else ""
        notes.append(stats.INTERVAL_NOTE + f"{cut}, for rows without per-example predictions or a loss-like "
                     "metric; with one seed there is no interval.")
    if result is not None and len(summary) > 1:
        score = result["how"] if result["exact"] else (
            f"{result['how']}; NOTE: {metric} has no per-example form here, so the test compares "
            f"{result['score_metric']}, not {metric}")
        notes.append(
            f"vs best: paired two-level bootstrap against {summary[0]['label']} over the same "
            f"{result['n_examples']} eval examples and each method's seeds (per-example score: {score}; "
            f"{result['n_boot']:,} resamples; Δ = difference in mean {metric}, percentile 95% CI, two-sided p). "
            f"\"Best\" was chosen from these same data, so the {_n_comparisons(len(summary) - 1)} against it "
            f"{'is' if len(summary) == 2 else 'are'} corrected together (Holm-Bonferroni, family-wise "
            f"{result['alpha']:g}); \"tied\" = not "
            f"distinguishable from the best at that level: {', '.join([str(summary[0]['label']), *map(str, result['tied'])])}."
        )
    return summary, lead, notes


def _n_comparisons(n: int) -> str:
    return "1 comparison" if n == 1 else f"{n} comparisons"


def _summary_markdown(summary: list[dict], metric: str, lead: list[str], notes: list[str], facts: dict, env: dict) -> str:
    """results.md's common part: the verdict, the summary table, its notes, the budget and the environment."""
    md = "".join(f"**{x}**\n\n" if x.startswith("Verdict") else f"{x}\n\n" for x in lead)
    md += tables.markdown_table(summary, metric) + "\n" + "\n".join(notes) + "\n"
    if facts:
        md += "\n## Budget\n\n" + "\n".join(f"- {k}: {v}" for k, v in facts.items()) + "\n"
    return md + "\n## Environment\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n"


def _meta(rows: list[dict], manifest: dict) -> dict:
    """The facts in the line under report.html's title."""
    return {
        "task": rows[0].get("task"),
        "config": manifest.get("config"),
        "runs": len(rows),
        "seeds": ", ".join(str(s) for s in manifest.get("seeds", [])) or None,
    }


# ---- what each kind of report adds --------------------------------------------------------------------


@dataclass
class Runs:
    """What a section builder gets: the finished runs and how the report ranks and fits them."""

    out_dir: Path
    manifest: dict
    rows: list[dict]
    summary: list[dict]
    metric: str  # the summary's ranking metric
    target: str | None  # a sweep's fitted target (argument, else the manifest's)
    holdout: int  # a scale sweep's held-out data sizes (argument, else the manifest's, else 1)


@dataclass
class Section:
    """What one kind of report adds to the parts every report has."""

    # (png, caption, NAME): shown before the loss curves, written to plots/NAME.png
    figures: list[tuple[bytes | None, str, str]] = field(default_factory=list)
    markdown_before: str = ""  # results.md above the summary table
    markdown_after: str = ""  # results.md below the environment
    html: str = ""  # report.html between the plots and the budget


def _compare_section(r: Runs) -> Section:
    """A comparison has one point per label: the metric against trainable parameters and wall time.
    (A sweep's many points are plotted by its fit instead.)"""
    return Section(figures=[
        (plots.metric_vs_params(r.summary, r.metric), f"{r.metric} vs trainable parameters (log scale)",
         "metric_vs_params"),
        (plots.metric_vs_time(r.summary, r.metric), f"{r.metric} vs wall time", "metric_vs_time"),
    ])


def _scale_section(r: Runs) -> Section:
    """A scale sweep: the scaling law fitted over (factor value, data size), with held-out sizes
    predicted; writes scaling.json and plots/scaling.png."""
    points, key, shown = scaling_points(r.rows, r.manifest, r.target)
    categorical = bool(r.manifest.get("categorical")) or any(p["x"] is None for p in points)
    result = fit_sweep(points, categorical=categorical, holdout=r.holdout)
    result.update(target=shown, metric=key, factor=r.manifest.get("factor", "factor"))
    atomic_write_text(r.out_dir / "scaling.json", json.dumps(result, indent=2))
    png = plots.scaling_plot(result)
    _write_png(r.out_dir / "plots" / "scaling.png", png)
    return Section(markdown_after="\n" + scaling_markdown(result), html=html.scaling_section(result, png))


def _advise_section(r: Runs) -> Section:
    """``tunelab advise``: which method wins at the full data size, predicted from the small runs;
    writes advise.json and plots/advise.png. The advice comes first in results.md."""
    from tunelab.report import advise

    task_metric = tables.primary_metric(r.rows, r.manifest.get("metric") or _task_metric(r.rows))
    result = advise.analyse(r.rows, r.manifest, task_metric, tables.higher_is_better(task_metric))
    atomic_write_text(r.out_dir / "advise.json", json.dumps(result, indent=2, default=float))
    png = advise.plot(result, advise.points_for(r.rows, r.manifest, task_metric))
    _write_png(r.out_dir / "plots" / "advise.png", png)
    md = advise.markdown(result)
    heads, cells = advise.table_rows(result)
    page = (f"<h2>Advice at {result['full_size']:g} rows</h2>"
            + "".join(f'<p class="note">{html.inline_markdown(x)}</p>' for x in md.splitlines()[2:4] if x)
            + html.text_table(heads, cells)
            + f'<div class="plots">{html.figure(png, "eval loss vs data size: fits, predictions, truth")}</div>')
    return Section(markdown_before=md + "\n## All data sizes\n\n", html=page)


SECTIONS: dict[str, Callable[[Runs], Section]] = {
    "compare": _compare_section,
    "scale": _scale_section,
    "advise": _advise_section,
}


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
