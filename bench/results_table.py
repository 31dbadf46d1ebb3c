"""Print a Markdown before/after table from run directories (each trained with eval.before=true).

    python bench/results_table.py runs/families/*
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def row(run: Path) -> str | None:
    mfile = run / "metrics.json"
    if not mfile.exists():
        return None
    m = json.loads(mfile.read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    before = m.get("before", {})
    keys = [k for k in m if k in before and k not in ("n", "eval_loss") and isinstance(m[k], float)][:3]
    cells = ", ".join(f"{k} {before[k]:.3f} → {m[k]:.3f}" for k in keys)
    data = cfg["data"]
    n_train = m.get("steps", 0) * cfg["train"]["batch_size"]
    return (f"| {run.name} | {m['task']} ({cfg['task'].get('formulation', 'lm')}) | {m['model']} | {m['method']} | "
            f"{data.get('max_train') or 'all'} rows, {m.get('steps', 0)} steps ({n_train} examples seen) | "
            f"{m['n']} | {m['wall_time_s'] / 60:.1f} | {cells} |")


def main(paths: list[str]) -> None:
    print("| run | task (formulation) | model | method | training budget | eval n | minutes | metric before → after |")
    print("|---|---|---|---|---|---|---|---|")
    for p in paths:
        r = row(Path(p))
        if r:
            print(r)


if __name__ == "__main__":
    main(sys.argv[1:])
