"""Finished runs -> rows -> CSV and Markdown tables, with mean, 95% CI and std over seeds.

A run directory is finished when its ``metrics.json`` exists. Its row is that file's run facts and
task metrics (read by ``tunelab.results.read_metrics``) plus ``run`` (the directory name), ``label``
(the name less a trailing ``-s<seed>``) and ``hyperparameters`` (from its config.yaml), so runs of one
method (or one method variant) with several seeds share a label and are averaged together. The
interval ``summarize`` gives is the Student-t 95% CI of the mean over seeds (``stats.t_interval``), the
std the sample standard deviation (ddof = 1); with one seed both are left empty. The report then replaces
the ranking metric's interval by the two-level bootstrap (``stats.analyse``) when the runs saved their
predictions, and cuts a t-interval to the metric's range otherwise (``stats.bounded_t_rows``).
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
from pathlib import Path

# the one direction table (LOWER_IS_BETTER, higher_is_better), shared with the training loop's best checkpoint
from tunelab.evaluation.metrics import LOWER_IS_BETTER, higher_is_better  # noqa: F401
from tunelab.report.stats import t_interval
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
    """The row for one run directory, or None when it has not finished (no metrics.json).

    Read through ``tunelab.results.read_metrics``; its config.yaml adds ``hyperparameters``."""
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
    hp = hyperparameters(run_dir, row)
    if hp:
        row["hyperparameters"] = hp
    return row


# Train settings shown beside a method's own parameters (the rest are shared by every run).
_HP_TRAIN = ("lr", "batch_size", "grad_accum", "max_steps", "epochs", "weight_decay", "schedule", "warmup")


def hyperparameters(run_dir: Path, row: dict) -> str:
    """'r=8 alpha=16 · lr=0.001 steps=63 batch=16' from the run's saved config.yaml and its facts."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text()) if path.exists() else None
    except yaml.YAMLError:
        cfg = None
    if not isinstance(cfg, dict):
        return ""
    method = cfg.get("method") if isinstance(cfg.get("method"), dict) else {}
    own = " ".join(f"{k}={v}" for k, v in method.items() if k != "name" and v is not None)
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    lr = row.get("lr") if _number(row.get("lr")) else train.get("lr")
    bits = [f"lr={fmt_num(lr, 3)}" if lr is not None else ""]
    bits.append(f"steps={row['steps']}" if _number(row.get("steps")) else "")
    bits.append(f"batch={train['batch_size']}" if train.get("batch_size") else "")
    return " · ".join(b for b in (own, " ".join(b for b in bits if b)) if b)


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
            ci = t_interval([r.get(key) for r in rs if _number(r.get(key))])
            s[f"{key}_ci"], s[f"{key}_lo"], s[f"{key}_hi"] = ci["half"], ci["lo"], ci["hi"]
        s[f"{metric}_per_seed"] = " ".join(fmt_num(r.get(metric), 3) for r in rs if _number(r.get(metric)))
        hps = list(dict.fromkeys(str(r["hyperparameters"]) for r in rs if r.get("hyperparameters")))
        s["hyperparameters"] = " | ".join(hps)
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


def fmt_ci(lo, hi, digits: int = 3) -> str:
    return "–" if lo is None or hi is None else f"[{fmt_num(lo, digits)}, {fmt_num(hi, digits)}]"


def fmt_test(s: dict) -> str:
    """'-0.021 [-0.034, -0.008] p=0.002, Holm p=0.004' for a row's paired test against the best, with
    "(tied)" when the Holm-corrected p does not reject; '–' if none."""
    if s.get("vs_best_diff") is None:
        return "best" if s.get("is_best") else "–"
    p = s["vs_best_p"]
    out = f"{s['vs_best_diff']:+.3g} {fmt_ci(s['vs_best_lo'], s['vs_best_hi'])} p={p:.2g}"
    if s.get("vs_best_p_holm") is not None:
        out += f", Holm p={s['vs_best_p_holm']:.2g}" + (" (tied)" if s.get("tied_with_best") else "")
    return out


def summary_cells(s: dict, metric: str, by: str = "label") -> list[str]:
    """The display cells of one summary row (shared by the Markdown and HTML tables).

    The metric is shown as its mean over seeds, then its 95% interval (the two-level bootstrap when the
    report computed one, which is not symmetric, so no "±"), the seed-to-seed spread (sample std and the
    per-seed values), and the paired test against the best method."""
    pct = s.get("trainable_percent_mean")
    return [
        str(s[by]),
        str(s["method"]),
        fmt_num(s[f"{metric}_mean"], 4),
        fmt_ci(s.get(f"{metric}_lo"), s.get(f"{metric}_hi")),
        fmt_num(s.get(f"{metric}_std"), 2),
        str(s.get(f"{metric}_per_seed") or "–"),
        fmt_test(s),
        fmt_count(s.get("trainable_params_mean")),
        "–" if pct is None else f"{pct:.3g}%",
        fmt_pm(s.get("wall_time_s_mean"), s.get("wall_time_s_ci"), 3),
        fmt_pm(s.get("train_tokens_per_s_mean"), s.get("train_tokens_per_s_ci"), 3),
        fmt_num(s.get("peak_memory_mb_mean"), 4),
        fmt_pm(s.get("final_loss_mean"), s.get("final_loss_ci")),
        str(s["seeds"]),
        str(s.get("hyperparameters") or "–"),
    ]


def summary_headers(metric: str, by: str = "label") -> list[str]:
    arrow = "↑" if higher_is_better(metric) else "↓"
    return [
        by,
        "method",
        f"{metric} {arrow} (mean)",
        "95% CI",
        "seed sd",
        "per seed",
        "vs best: Δ [95% CI] p, Holm p",
        "trainable params",
        "trainable %",
        "wall time (s)",
        "train tokens/s",
        "peak memory (MB)",
        "final loss",
        "seeds",
        "hyperparameters",
    ]


def md_cell(text: str) -> str:
    """A Markdown table cell: ``|`` escaped, and ``&``, ``<``, ``>`` as entities, so a value (a method
    parameter, a label) shows as text where the Markdown is rendered as HTML, never as markup."""
    return html.escape(str(text), quote=False).replace("|", "\\|")


def markdown_table(summary: list[dict], metric: str, by: str = "label") -> str:
    """A GitHub-flavoured Markdown table of ``summarize`` rows (mean, 95% interval, seed spread, test)."""

    def line(cells):
        return "| " + " | ".join(md_cell(c) for c in cells) + " |"

    head = summary_headers(metric, by)
    out = [line(head), "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 3) + ["---"]) + "|"]
    out += [line(summary_cells(s, metric, by)) for s in summary]
    return "\n".join(out) + "\n"


def scale_target(rows: list[dict], target: str | None) -> tuple[str, callable, str]:
    """(metric key, value -> loss-like number, note). Default: eval_loss when every run has it, else
    the task metric, turned into an error (1 - m, or 100 - m for percentages) when higher is better.
    Training loss is never the default: with few examples it falls as the model memorises them."""
    key = target or (
        "eval_loss" if all(_number(r.get("eval_loss")) for r in rows) else primary_metric(rows)
    )
    key = primary_metric(rows, key)
    if not higher_is_better(key):
        return key, float, ""
    top = 100.0 if max(float(r[key]) for r in rows if _number(r.get(key))) > 1.0 else 1.0
    return key, (lambda v: top - float(v)), f"{top:g} - {key}"
