"""Markdown tables for the docs, rebuilt from result files.

    python bench/results_table.py --write      # rebuild every generated table in README.md and docs/results.md
    python bench/results_table.py --check      # exit 1 when a committed table differs from its rebuild
    python bench/results_table.py runs/families/*   # a before/after table from run directories (eval.before=true)

A generated table sits between ``<!-- results-table: DIR [STYLE] -->`` and ``<!-- /results-table -->`` (``DIR``
a comparison's committed result files: ``summary.csv``, ``results.md``, ``manifest.json``, under
``docs/results/``; ``STYLE``: ``full`` (default), ``short``, or ``costs``: full plus each method's mean
training tokens/s and peak memory; ``scaling``: comma-joined ``tunelab scale`` sweeps; ``runs``: single
``tunelab train`` runs with ``eval.before=true``, one sub-directory per run holding its ``metrics.json`` and
``config.yaml``, and ``commands.txt`` beside them, the command(s) that made them; ``grpo``: comma-joined
``bench/grpo_measure.py`` result files, through that script's own table); what is between the markers is rebuilt from those files only, with the exact command
that made them in the table's heading. ``tests/test_results_tables.py`` checks that the committed tables
equal their rebuild.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/results.md")
BLOCK = re.compile(r"(<!-- results-table: (?P<dir>[^ ]+?)(?: (?P<style>\w+))? -->\n)(?P<body>.*?)(<!-- /results-table -->)", re.S)


def _f(v: str, digits: int = 3) -> str:
    return "–" if v in ("", None) else f"{float(v):.{digits}f}"


def _count(v: str) -> str:
    if v in ("", None):
        return "–"
    n = float(v)
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def comparison_table(result_dir: str | Path, style: str = "full") -> str:
    """The Markdown for one comparison from its committed summary.csv / results.md / manifest.json."""
    d = ROOT / result_dir
    manifest = json.loads((d / "manifest.json").read_text())
    rows = list(csv.DictReader((d / "summary.csv").open()))
    metric = manifest.get("metric") or next(k[: -len("_mean")] for k in rows[0] if k.endswith("_mean"))
    verdict = next((ln for ln in (d / "results.md").read_text().splitlines() if ln.startswith("**Verdict")), "")
    warning = next((ln for ln in (d / "results.md").read_text().splitlines() if ln.startswith("Warning:")), "")
    mode = (manifest.get("budget") or {}).get("mode")
    cmd = " ".join(["tunelab compare", manifest["config"], *manifest.get("overrides", []),
                    *(["--tune lr"] if manifest.get("tuning") else []),
                    *([f"--budget {mode}"] if mode and mode != "steps" else [])])
    seeds = ", ".join(str(s) for s in manifest.get("seeds", []))
    out = [f"Command: `{cmd}` (seeds {seeds}); result files: `{result_dir}/`; this table: "
           "`python bench/results_table.py --write`.", ""]
    if verdict:
        out += [verdict, ""]
    budget = manifest.get("budget") or {}
    if budget.get("per_label"):  # compare.budget flops|time: the probe's cost per step and the steps it gave
        unit = "flops_per_step" if budget.get("mode") == "flops" else "s_per_step"
        shown = "FLOPs" if unit == "flops_per_step" else "s"
        cells = ", ".join(f"{label} {b['steps']} steps ({b[unit]:.3g} {shown}/step)" for label, b in budget["per_label"].items())
        out += [f"Budget: {budget['note']}: {cells}.", ""]
    tuning = manifest.get("tuning") or {}
    if tuning:  # --tune lr: each method's trials, from the manifest
        split = next(iter(tuning.values())).get("split", "")
        out += [f"Learning-rate search (`--tune lr`, scored on {split}):", "",
                "| method | trial lr | " + next(iter(tuning.values())).get("metric", "score") + " | picked |",
                "|---|---:|---:|---|"]
        for label, t in tuning.items():
            out += [f"| {label} | {lr:.3g} | {score:.3f} | {'yes' if lr == t.get('best_lr') else ''} |"
                    for lr, score in t.get("scores", [])]
        out += ["", "At the picked rates, on the eval set:", ""]
    if warning:
        out += [warning, ""]
    if style == "short":
        out += [f"| method | {metric} (mean) | 95% CI | vs best: Δ, Holm p |", "|---|---:|---:|---|"]
    else:
        costs = style == "costs"
        out += [f"| method | {metric} (mean) | 95% CI (seeds × examples) | seed sd | per seed | "
                "vs best: Δ [95% CI] | p | Holm p | tied with best | trainable | % of model |"
                + (" train tokens/s | peak memory MB |" if costs else ""),
                "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|" + ("---:|---:|" if costs else "")]
    for r in rows:
        ci = "–" if r.get(f"{metric}_lo") in ("", None) else f"[{_f(r[f'{metric}_lo'])}, {_f(r[f'{metric}_hi'])}]"
        best = r.get("is_best") == "True"
        if r.get("vs_best_diff") not in ("", None):
            delta = f"{float(r['vs_best_diff']):+.3f}"
            dci = f"{delta} [{float(r['vs_best_lo']):+.3f}, {float(r['vs_best_hi']):+.3f}]"
            p, ph = f"{float(r['vs_best_p']):.2g}", f"{float(r['vs_best_p_holm']):.2g}"
        else:
            delta = dci = "best" if best else "–"
            p = ph = ""
        tied = "yes" if r.get("tied_with_best") == "True" else ("no" if r.get("tied_with_best") == "False" else "–")
        if style == "short":
            out.append(f"| {r['label']} | {_f(r[f'{metric}_mean'])} | {ci} | {delta}{f', {ph}' if ph else ''} |")
        else:
            pct = r.get("trainable_percent_mean")
            out.append(f"| {r['label']} | {_f(r[f'{metric}_mean'])} | {ci} | {_f(r.get(f'{metric}_std'))} | "
                       f"{r.get(f'{metric}_per_seed') or '–'} | {dci} | {p} | {ph} | {tied} | "
                       f"{_count(r.get('trainable_params_mean'))} | {'–' if not pct else f'{float(pct):.3g}%'} |"
                       + (f" {_f(r.get('train_tokens_per_s_mean'), 0)} | {_f(r.get('peak_memory_mb_mean'), 0)} |"
                          if style == "costs" else ""))
    return "\n".join(out) + "\n"


def scaling_table(result_dirs: str) -> str:
    """The Markdown for one or more ``tunelab scale`` sweeps (comma-separated dirs, one per seed) from their
    committed manifest.json / scaling.json: each seed's multiplicative fit, and with several seeds the
    mean and 95% t-interval of the exponents over the seeds."""
    import math
    from statistics import mean, stdev

    from scipy import stats

    dirs = result_dirs.split(",")
    rows, cmds = [], []
    for d in dirs:
        manifest = json.loads((ROOT / d / "manifest.json").read_text())
        result = json.loads((ROOT / d / "scaling.json").read_text())
        fit = next(f for f in result["fits"] if f.get("form") == "multiplicative" and "params" in f)
        seeds = manifest.get("seeds") or [0]
        cmds.append(" ".join(["tunelab scale", manifest["config"], *manifest.get("overrides", [])]))
        rows.append((seeds[0], fit, result))
    target = rows[0][2].get("target", "eval loss")
    out = [f"Command{'s' if len(cmds) > 1 else ''}: " + "; ".join(f"`{c}`" for c in cmds)
           + f"; result files: {', '.join(f'`{d}/`' for d in dirs)}; this table: `python bench/results_table.py --write`.",
           "", f"Target: {target}. Fit: L = A·X^-alpha·D^-beta + E, the largest size held out.", "",
           "| seed | A | alpha (factor) | beta (data) | E | held-out mean rel. error | constant baseline's error | verdict |",
           "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for seed, fit, _ in rows:
        p, diag = fit["params"], fit.get("diagnostics") or {}
        base = fit.get("baseline_errors", {}).get("mean_rel_error")
        out.append(f"| {seed} | {p['A']:.3f} | {p['alpha']:.4f} | {p['beta']:.3f} | {p['E']:.3f} | "
                   f"{100 * fit['errors']['mean_rel_error']:.1f}% | {'–' if base is None else f'{100 * base:.1f}%'} | "
                   f"{'good' if diag.get('good') else 'NOT a good fit'} |")
    if len(rows) > 1:
        def ci(vals):
            m, n = mean(vals), len(vals)
            h = stats.t.ppf(0.975, n - 1) * stdev(vals) / math.sqrt(n)
            return f"{m:.3f} [{m - h:.3f}, {m + h:.3f}]"
        out.append(f"| **mean [95% t-interval]** | | {ci([f['params']['alpha'] for _, f, _ in rows])} | "
                   f"{ci([f['params']['beta'] for _, f, _ in rows])} | | "
                   f"{100 * mean(f['errors']['mean_rel_error'] for _, f, _ in rows):.1f}% | | |")
    return "\n".join(out) + "\n"


def grpo_table(result_files: str) -> str:
    """The GRPO/SFT/DPO table of ``bench/grpo_measure.py`` from its committed result files (comma-joined)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpo_measure", ROOT / "bench" / "grpo_measure.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    files = result_files.split(",")
    return (f"Command: `python bench/grpo_measure.py --table {' '.join(files)}`; this table: "
            "`python bench/results_table.py --write`.\n\n" + mod.table([ROOT / f for f in files]) + "\n")


def rebuild(text: str) -> str:
    """``text`` with every generated block rebuilt from its result files (style ``scaling``: scale sweeps)."""
    def table(m) -> str:
        if m["style"] == "scaling":
            return scaling_table(m["dir"])
        if m["style"] == "runs":
            return runs_table(m["dir"])
        if m["style"] == "grpo":
            return grpo_table(m["dir"])
        return comparison_table(m["dir"], m["style"] or "full")

    return BLOCK.sub(lambda m: m.group(1) + table(m) + m.group(5), text)


def docs_tables(write: bool = False) -> list[str]:
    """The docs whose generated tables differ from their rebuild (rewritten when ``write``)."""
    stale = []
    for name in DOCS:
        path = ROOT / name
        text = path.read_text()
        new = rebuild(text)
        if new != text:
            stale.append(name)
            if write:
                path.write_text(new)
    return stale


# ---- before/after table from run directories -------------------------------------------------------


def row(run: Path) -> str | None:
    import yaml

    from tunelab.results import read_metrics

    rec = read_metrics(run)
    if rec is None:
        return None
    m, facts = rec["metrics"], rec["run"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    before = rec.get("before", {})
    keys = [k for k in m if k in before and k not in ("n", "eval_loss") and isinstance(m[k], float)][:3]
    cells = ", ".join(f"{k} {before[k]:.3f} → {m[k]:.3f}" for k in keys)
    data = cfg["data"]
    n_train = facts.get("steps", 0) * cfg["train"]["batch_size"]
    return (f"| {run.name} | {facts['task']} ({cfg['task'].get('formulation', 'lm')}) | {facts['model']} | {facts['method']} | "
            f"{data.get('max_train') or 'all'} rows, {facts.get('steps', 0)} steps ({n_train} examples seen) | "
            f"{m['n']} | {facts['wall_time_s'] / 60:.1f} | {cells} |")


HEADER = ("| run | task (formulation) | model | method | training budget | eval n | minutes | metric before → after |\n"
          "|---|---|---|---|---|---|---|---|")


def runs_table(result_dir: str) -> str:
    """The before/after Markdown of committed single runs: ``result_dir/*/metrics.json`` (+ ``config.yaml``),
    in the order of ``commands.txt``'s runs when it names them, else by name; the commands head the table."""
    d = ROOT / result_dir
    commands = [ln.strip() for ln in (d / "commands.txt").read_text().splitlines() if ln.strip()]
    runs = sorted((p for p in d.iterdir() if p.is_dir()),
                  key=lambda p: (next((i for i, c in enumerate(commands) if p.name in c), len(commands)), p.name))
    rows = [r for r in map(row, runs) if r]  # row() skips a run without metrics.json
    out = [f"Command{'s' if len(commands) > 1 else ''}: " + "; ".join(f"`{c}`" for c in commands)
           + f"; result files: `{result_dir}/`; this table: `python bench/results_table.py --write`.", "", HEADER, *rows]
    return "\n".join(out) + "\n"


def main(args: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Markdown tables for the docs, rebuilt from result files.")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rebuild every generated table in README.md and docs/results.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when a committed table differs from its rebuild")
    ap.add_argument("runs", nargs="*", help="run directories: print a before/after table of them")
    opts = ap.parse_args(args)
    if opts.write or opts.check:
        stale = docs_tables(write=opts.write)
        verb = "rewrote" if opts.write else "stale (run with --write)"
        for name in stale:
            print(f"{verb}: {name}")
        return 1 if stale and opts.check else 0
    print(HEADER)
    for p in opts.runs:
        r = row(Path(p))
        if r:
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
