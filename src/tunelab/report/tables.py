"""Finished runs -> rows -> CSV and Markdown tables, with mean ± std over seeds.

A run directory is finished when its ``metrics.json`` exists. Its row is that JSON's scalar values plus
``run`` (the directory name) and ``label`` (the name less a trailing ``-s<seed>``), so runs of one
method (or one method variant) with several seeds share a label and are averaged together. The std is
the sample standard deviation (ddof = 1); with one seed it is left empty.
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

from tunelab.results import read_metrics

# Task metrics in the order a default is picked, when the caller names none.
PRIMARY_METRICS = (
    "accuracy",
    "f1",
    "macro_f1",
    "micro_f1",
    "rougeL",
    "rougeLsum",
    "exact_match",
    "em",
    "bleu",
    "chrf",
    "matthews",
    "pearson",
    "spearman",
    "rouge1",
    "rouge2",
    "eval_loss",
)
LOWER_IS_BETTER = {"eval_loss", "loss", "final_loss", "perplexity", "ppl", "wer", "cer", "ter"}
# Bookkeeping keys every run has; never picked as the task metric.
RUN_KEYS = (
    "trainable_params",
    "total_params",
    "trainable_percent",
    "wall_time_s",
    "train_tokens_per_s",
    "peak_memory_mb",
    "final_loss",
)
_NOT_METRICS = set(RUN_KEYS) | {
    "seed",
    "n",
    "n_eval",
    "n_train",
    "steps",
    "step",
    "epoch",
    "epochs",
    "train_examples",
    "eval_examples",
    "train_tokens",
    "max_train",
    "lr",
    "grad_norm",
    "train_time_s",
    "world_size",
}
_SEED_SUFFIX = re.compile(r"-s(\d+)$")


def label_of(run_name: str) -> str:
    return _SEED_SUFFIX.sub("", run_name)


def _scalar(v) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def read_run(run_dir: str | Path) -> dict | None:
    """The row for one run directory, or None when it has not finished (no metrics.json)."""
    run_dir = Path(run_dir)
    record = read_metrics(run_dir)
    if record is None:
        return None
    # Task metrics win the plain names; a run fact of the same name (a NER run's "precision") is "run.<key>".
    facts, task = record["run"], record["metrics"]
    metrics = {**{(f"run.{k}" if k in task else k): v for k, v in facts.items()}, **task}
    metrics.update({k: v for k, v in record.items() if k not in ("metrics", "run")})
    row = {k: v for k, v in metrics.items() if _scalar(v)}
    # Nested metric groups ({"eval": {"accuracy": ..}}) are flattened with a dot.
    for k, v in metrics.items():
        if isinstance(v, dict):
            row.update(
                {f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, int | float) and not isinstance(vv, bool)}
            )
    row = {"run": run_dir.name, "label": label_of(run_dir.name), **row, "run_dir": str(run_dir)}
    if "seed" not in row and (m := _SEED_SUFFIX.search(run_dir.name)):
        row["seed"] = int(m.group(1))
    return row


def run_dirs(root: str | Path) -> list[Path]:
    """The run directories under ``root`` (``root/runs/*`` when it has one, else ``root/*``)."""
    root = Path(root)
    base = root / "runs" if (root / "runs").is_dir() else root
    if not base.is_dir():
        raise FileNotFoundError(f"{root}: no such directory of runs")
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def collect_runs(root: str | Path) -> tuple[list[dict], list[str]]:
    """(rows of the finished runs, names of the unfinished ones) under ``root``."""
    rows, unfinished = [], []
    for d in run_dirs(root):
        row = read_run(d)
        if row is None:
            unfinished.append(d.name)
        else:
            rows.append(row)
    return rows, unfinished


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def primary_metric(rows: list[dict], metric: str | None = None) -> str:
    """``metric`` when given (checked to be present), else the first of PRIMARY_METRICS all rows have,
    else the first numeric non-bookkeeping key, else final_loss."""
    if not rows:
        raise ValueError("no finished runs to report on")
    if metric is not None:
        if not any(_number(r.get(metric)) for r in rows):
            have = sorted({k for r in rows for k, v in r.items() if _number(v)})
            raise ValueError(f"metric '{metric}' is in no run's metrics.json; numeric keys: {', '.join(have)}")
        return metric
    for name in PRIMARY_METRICS:
        if all(_number(r.get(name)) for r in rows):
            return name
    for k, v in rows[0].items():
        if _number(v) and k not in _NOT_METRICS and all(_number(r.get(k)) for r in rows):
            return k
    return "final_loss"


def higher_is_better(metric: str) -> bool:
    return metric.split(".")[-1] not in LOWER_IS_BETTER


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if _number(v)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def summarize(rows: list[dict], metric: str, by: str = "label") -> list[dict]:
    """One row per ``by`` value: mean/std of the metric and of each run key over its seeds, best first."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(by)), []).append(r)
    out = []
    for name, rs in groups.items():
        s = {
            by: name,
            "method": rs[0].get("method", name),
            "seeds": len(rs),
            "seed_list": " ".join(str(r.get("seed", "")) for r in rs),
        }
        for key in (metric, *RUN_KEYS):
            if key in s:
                continue
            s[f"{key}_mean"], s[f"{key}_std"] = mean_std([r.get(key) for r in rs])
        out.append(s)
    sign = -1.0 if higher_is_better(metric) else 1.0
    out.sort(key=lambda s: (s[f"{metric}_mean"] is None, sign * (s[f"{metric}_mean"] or 0.0)))
    return out


def to_csv(rows: list[dict], columns: list[str] | None = None) -> str:
    """CSV text; columns default to the union of keys in first-seen order."""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def results_columns(rows: list[dict], metric: str) -> list[str]:
    """The per-run CSV columns: identity, the task metrics, then the run keys."""
    first = ["run", "label", "method", "task", "seed"]
    metrics = [metric] + sorted(
        {k for r in rows for k, v in r.items() if _number(v)} - set(first) - _NOT_METRICS - {metric} - set(RUN_KEYS)
    )
    rest = sorted({k for r in rows for k in r} - set(first) - set(metrics) - set(RUN_KEYS) - {"run_dir"})
    return [c for c in first if any(c in r for r in rows)] + metrics + list(RUN_KEYS) + rest + ["run_dir"]


def fmt_num(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:.{digits}g}"


def fmt_count(n) -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "–"
    n = float(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def fmt_pm(mean, std, digits: int = 4) -> str:
    if mean is None:
        return "–"
    return fmt_num(mean, digits) if std is None else f"{fmt_num(mean, digits)} ± {fmt_num(std, 2)}"


def summary_cells(s: dict, metric: str, by: str = "label") -> list[str]:
    """The display cells of one summary row (shared by the Markdown and HTML tables)."""
    pct = s.get("trainable_percent_mean")
    return [
        str(s[by]),
        str(s["method"]),
        fmt_pm(s[f"{metric}_mean"], s[f"{metric}_std"]),
        fmt_count(s.get("trainable_params_mean")),
        "–" if pct is None else f"{pct:.3g}%",
        fmt_pm(s.get("wall_time_s_mean"), s.get("wall_time_s_std"), 3),
        fmt_pm(s.get("train_tokens_per_s_mean"), s.get("train_tokens_per_s_std"), 3),
        fmt_num(s.get("peak_memory_mb_mean"), 4),
        fmt_pm(s.get("final_loss_mean"), s.get("final_loss_std")),
        str(s["seeds"]),
    ]


def summary_headers(metric: str, by: str = "label") -> list[str]:
    arrow = "↑" if higher_is_better(metric) else "↓"
    return [
        by,
        "method",
        f"{metric} {arrow}",
        "trainable params",
        "trainable %",
        "wall time (s)",
        "train tokens/s",
        "peak memory (MB)",
        "final loss",
        "seeds",
    ]


def markdown_table(summary: list[dict], metric: str, by: str = "label") -> str:
    """A GitHub-flavoured Markdown table of ``summarize`` rows (mean ± sample std over seeds)."""

    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    head = summary_headers(metric, by)
    out = [line(head), "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    out += [line(summary_cells(s, metric, by)) for s in summary]
    return "\n".join(out) + "\n"
