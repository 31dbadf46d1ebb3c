"""``--tune lr``: a small learning-rate search per method, on a split of the training data only.

For each method the search tries ``FACTORS`` x its base rate (the entry's ``train.lr``, else the
config's ``train.lr``, else the method's recommended rate): 1/3, 1 and 3 times. The comparison's
training rows (the first ``data.max_train`` of ``data.train``) are split in file order: the first
80% train, the last 20% validate; the eval set is never read. Each trial uses the comparison's budget
and the first seed; the rate with the best primary task metric on the validation split wins and the
comparison then runs at it. Splits are written as files of the same format as the training file
(JSONL, JSON arrays, CSV, TSV), so every task family's reader reads them as it reads the original.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

from tunelab.sweeps.runner import Executor, PlannedRun, first_configs, run_plan, to_stderr
from tunelab.sweeps.spec import variant

FACTORS = (1 / 3, 1.0, 3.0)
VALID_FRACTION = 0.2
SPLITS = ("tune_train", "tune_valid")


def search(plan: list[PlannedRun], out_dir: Path, raw: dict, metric: str | None = None, *, keep_going: bool = True,
           executor: Executor | None = None, say: Callable[[str], None] = to_stderr) -> dict:
    """The search of ``--tune lr`` for the sweep in ``out_dir`` (trials in ``out_dir/tune``, trained by
    ``executor``); sets each method's best lr in ``plan`` and returns label -> best_lr, scores, metric, split."""
    from tunelab.report.tables import higher_is_better
    from tunelab.training.optimizer import default_lr

    data = raw.get("data") or {}
    if not data.get("train"):
        raise ValueError("--tune lr needs data.train to split into a tuning train and validation part")
    tdir = out_dir / "tune"
    tr, va, n_tr, n_va = split_file(data["train"], tdir / "data", data.get("max_train"))
    split = f"a split of the training rows ({n_tr} train / {n_va} validation; the eval set is never read)"
    cfgs = first_configs(plan)
    trials, grids = [], {}
    for label, cfg in cfgs.items():
        if cfg.train.max_steps == 0:
            continue
        base = cfg.train.lr or default_lr(cfg.method.name, cfg.method.params())
        grids[label] = grid(base)
        first = next(r.raw for r in plan if r.label == label)
        for lr in grids[label]:
            name = f"{label}-lr{lr:g}"
            t = variant(first, tdir / "runs" / name, cfg.train.seed, {"train": {"lr": lr}})
            t["data"] = {**t.get("data", {}), "train": str(tr), "eval": str(va), "max_train": None, "max_eval": None}
            trials.append(PlannedRun({"run": name, "label": label, "lr": lr, "seed": cfg.train.seed}, t))
    say(f"--tune lr: {len(trials)} trial runs on {split}")
    run_plan(tdir, {"kind": "tune", "runs": [t.info for t in trials]}, trials, executor=executor,
             keep_going=keep_going, say=say)
    result = {}
    for label, lrs in grids.items():
        scores, name = [], metric
        for lr in lrs:
            value, name = trial_score(tdir / "runs" / f"{label}-lr{lr:g}", name)
            scores.append((lr, value))
        best = best_lr(scores, higher_is_better(name or "accuracy"))
        result[label] = {"best_lr": best, "scores": scores, "metric": name, "split": split}
        for run in plan:
            if run.label == label:
                run.raw["train"] = {**(run.raw.get("train") or {}), "lr": best}
        say(f"  {label}: lr {best:g} (" + ", ".join(f"{lr:g}: {v}" for lr, v in scores) + ")")
    return result


def grid(base: float) -> list[float]:
    return [float(f"{base * f:.3g}") for f in FACTORS]


def split_file(path: str | Path, out_dir: Path, limit: int | None = None, fraction: float = VALID_FRACTION) -> tuple[Path, Path, int, int]:
    """Write the first ``limit`` records of ``path`` as a train and a validation file in ``out_dir``;
    returns (train path, valid path, train rows, valid rows)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: training file not found (needed to split it for --tune lr)")
    suffix = path.suffix.lower()
    out_dir.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        head, rows = [], [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    elif suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: --tune lr splits JSON arrays of records; this file is not one")
        head = None
    elif suffix in (".csv", ".tsv", ".txt"):
        delim = "," if suffix == ".csv" else "\t"
        quoting = csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
        with open(path, encoding="utf-8-sig", newline="") as f:
            table = list(csv.reader(f, delimiter=delim, quoting=quoting))
        head, rows = table[:1], table[1:]
    else:
        raise ValueError(
            f"{path}: --tune lr can split .jsonl, .json, .csv and .tsv training files, not '{suffix or path.name}'"
        )
    rows = rows[:limit] if limit else rows
    n_valid = max(1, round(len(rows) * fraction))
    if len(rows) - n_valid < 1:
        raise ValueError(f"{path}: {len(rows)} training rows are too few to split for --tune lr")
    parts = (rows[:-n_valid], rows[-n_valid:])
    outs = []
    for name, part in zip(SPLITS, parts, strict=True):
        out = out_dir / f"{name}{suffix}"
        if suffix == ".jsonl":
            out.write_text("".join(ln + "\n" for ln in part), encoding="utf-8")
        elif suffix == ".json":
            out.write_text(json.dumps(part, ensure_ascii=False), encoding="utf-8")
        elif suffix == ".csv":
            with open(out, "w", encoding="utf-8", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(head + part)
        else:  # TSV has no quoting: write the fields back exactly as they were read
            out.write_text("".join("\t".join(r) + "\n" for r in head + part), encoding="utf-8")
        outs.append(out)
    return outs[0], outs[1], len(parts[0]), len(parts[1])


def best_lr(scores: list[tuple[float, float | None]], higher_is_better: bool) -> float:
    """The rate with the best validation score (ties: the one nearest the base rate, listed second)."""
    ok = [(lr, s) for lr, s in scores if s is not None]
    if not ok:
        raise ValueError("every learning-rate trial failed; see the tune/ runs' train.out")
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(ok)), key=lambda i: (-sign * ok[i][1], abs(i - len(ok) // 2)))
    return ok[order[0]][0]


def trial_score(run_dir: Path, metric: str | None) -> tuple[float | None, str | None]:
    """(the run's metric value, the metric's name): ``metric`` or the task's primary (first) metric."""
    from tunelab.results import read_metrics

    data = read_metrics(run_dir)
    if data is None:
        return None, metric
    m = data.get("metrics") or {}
    name = metric or next((k for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)), None)
    value = m.get(name)
    return (float(value) if isinstance(value, int | float) else None), name
