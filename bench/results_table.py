"""Print a Markdown before/after table from run directories (each trained with eval.before=true).

    python bench/results_table.py runs/families/*
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from tunelab.results import read_metrics


def row(run: Path) -> str | None:
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


def main(paths: list[str]) -> None:
    print("| run | task (formulation) | model | method | training budget | eval n | minutes | metric before → after |")
    print("|---|---|---|---|---|---|---|---|")
    for p in paths:
        r = row(Path(p))
        if r:
            print(r)


if __name__ == "__main__":
    main(sys.argv[1:])
