"""Score ``tunelab advise``: how often its pick is right, against the rules of thumb users follow.

    python bench/advise_score.py --runs /tmp/advise-score --jobs 2            # every case, resumable
    python bench/advise_score.py --runs /tmp/advise-score --cases sst2,mrpc   # some cases
    python bench/advise_score.py --rescore      # re-score from the committed files only (no training)
    python bench/advise_score.py --table        # print the score table from the committed score files
    python bench/advise_score.py --write        # rebuild the table in docs/results.md (--check: exit 1 if stale)

Each case (``CASES``) is an advise config in examples/ (task + formulation, model, >= 3 methods of
different character, small sizes, full size, budget rule). For each case, in this order:

1. advise runs the small sizes through the sweep runner (``--jobs`` local processes) and its
   prediction (pick, the tied group, predicted metric and range per method) is written to
   ``docs/results/advise/<case>.prediction.json`` with the small runs' metrics in
   ``<case>.points.csv`` BEFORE any full-size run. An existing prediction file is never redone.
2. the truth: every method at the full size with 3 seeds (``TRUTH_SEEDS``) (the same advise directory, ``--verify``;
   finished runs are reused) -> ``<case>.truth.csv``.
3. the score -> ``<case>.score.json``: for advise and each baseline, the pick, whether it is right
   (the true winner, or inside the truth's tied group: methods within 2 standard errors of the
   difference from the best, over seeds), regret (true best metric - true metric of the pick),
   and, where the strategy predicts a metric, the mean absolute error and the coverage of its ranges.

Baselines: ``largest_small`` (the best mean at the largest small size; it predicts that mean for
the full size), ``always_lora`` (LoRA by the rules of thumb: all linears, rank from the data size,
lr 10x full fine-tuning's; each case's ``lora`` entry is checked to follow them), ``always_full``
and ``most_params`` (the method with the most trainable parameters).

``--commit`` commits ``docs/results/advise/`` after each step (only those files), so a long scoring
survives an interruption; ``--rescore`` recomputes advise's prediction from the committed small-size
points with the current code (``<case>.score.json`` keeps the registered prediction's score beside it).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "advise"
CASES = {  # name -> advise config; LoRA's label is "lora", full fine-tuning's "full" (when a candidate)
    "sst2": "examples/advise_sst2.yaml",
    "mrpc": "examples/advise_mrpc.yaml",
    "ner": "examples/advise_ner.yaml",
    "squad": "examples/advise_squad.yaml",
    "boolq": "examples/advise_boolq.yaml",
}
STRATEGIES = ("advise", "largest_small", "always_lora", "always_full", "most_params")
TRUTH_SEEDS = [0, 1, 2]  # the truth at the full size (the small sizes use each case's advise.seeds)
TIE_SE = 2.0  # methods within this many standard errors of the difference from the true best are tied


def lora_rank_of_thumb(rows: int) -> int:
    """Rank from the data size (the rule users quote: small data, small rank): 8 up to 2k rows, then
    doubling per 4x more rows, at most 64."""
    r = 8
    while rows > 2000 * 4 ** (int(math.log2(r)) - 3) and r < 64:
        r *= 2
    return r


def check_rules_of_thumb(section: dict, full_lr: float | None, path: str) -> None:
    """The case's ``lora`` entry must be the rules-of-thumb LoRA the ``always_lora`` baseline stands for."""
    lora = next((m for m in section["methods"] if isinstance(m, dict) and m.get("label") == "lora"), None)
    if lora is None:
        raise SystemExit(f"{path}: advise.methods has no entry labelled 'lora' (the always-LoRA baseline)")
    want_r = lora_rank_of_thumb(int(section["full_size"]))
    lr = float((lora.get("train") or {}).get("lr", 0))
    problems = []
    if lora.get("target_modules") != "all-linear":
        problems.append("target_modules must be all-linear")
    if int(lora.get("r", 0)) != want_r:
        problems.append(f"r must be {want_r} for {section['full_size']} rows")
    if full_lr and not math.isclose(lr, 10 * full_lr, rel_tol=1e-6):
        problems.append(f"train.lr must be 10x full's ({10 * full_lr:g})")
    if problems:
        raise SystemExit(f"{path}: the 'lora' entry is not the rules-of-thumb LoRA: {'; '.join(problems)}")


def load_case(name: str) -> dict:
    path = ROOT / CASES[name]
    raw = yaml.safe_load(path.read_text())
    sec = raw["advise"]
    full = next((m for m in sec["methods"] if isinstance(m, dict) and m.get("label") == "full"), None)
    full_lr = float(full["train"]["lr"]) if full else 1e-4  # without a full candidate: the usual 1e-4
    check_rules_of_thumb(sec, full_lr, CASES[name])
    return {"name": name, "config": CASES[name], "path": path, "metric": sec["metric"],
            "labels": [m["label"] for m in sec["methods"]], "sizes": sec["sizes"], "full_size": sec["full_size"]}


# ----------------------------------------------------------------------------------- files

def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    tmp.replace(path)


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def commit(message: str, enabled: bool) -> None:
    if not enabled:
        return
    rel = str(RESULTS.relative_to(ROOT))
    import time

    for _ in range(10):  # another git command in this checkout may hold the index lock for a moment
        subprocess.run(["git", "add", rel], cwd=ROOT, check=False, capture_output=True)
        r = subprocess.run(["git", "commit", "-q", "-m", message, "--", rel], cwd=ROOT, capture_output=True, text=True)
        if "index.lock" not in r.stderr:
            break
        time.sleep(3)
    if r.returncode and "nothing to commit" not in r.stdout + r.stderr and "no changes added" not in r.stdout:
        print(f"warning: git commit failed ({r.stderr.strip() or r.stdout.strip()}); the files are written", file=sys.stderr)


# ----------------------------------------------------------------------------------- running

POINT_FIELDS = ["run", "label", "size", "seed", "x", "metric", "eval_loss", "trainable_params", "steps", "wall_time_s"]


def run_rows(out_dir: Path, metric: str) -> list[dict]:
    """The finished runs of an advise directory as compact rows (the metric, eval loss, cost)."""
    from tunelab.report import tables

    manifest = json.loads((out_dir / "manifest.json").read_text())
    plan = {r["run"]: r for r in manifest["runs"]}
    rows, _ = tables.collect_runs(out_dir)
    out = []
    for r in rows:
        info = plan.get(r["run"])
        if info is None:
            continue
        out.append({"run": r["run"], "label": info["label"], "size": info["size"], "seed": info["seed"],
                    "x": info.get("x"), "metric": r.get(metric), "eval_loss": r.get("eval_loss"),
                    "trainable_params": r.get("trainable_params"), "steps": r.get("steps"),
                    "wall_time_s": r.get("wall_time_s")})
    return sorted(out, key=lambda p: (p["label"], int(p["size"]), int(p["seed"])))


def advise_inputs(out_dir: Path) -> dict:
    """What analyse needs from the manifest besides the runs (kept in the prediction file, so the
    prediction can be recomputed from the committed points alone)."""
    m = json.loads((out_dir / "manifest.json").read_text())
    keep = ("methods", "sizes", "full_size", "factor", "x_full", "seeds", "metric", "steps", "chance_loss",
            "target", "budget", "limits")
    return {k: m.get(k) for k in keep}


def run_advise(case: dict, out_dir: Path, jobs: int, verify: bool) -> None:
    from tunelab.sweeps.advise import advise

    advise(case["path"], [], out_dir=out_dir, verify=verify, verify_seeds=TRUTH_SEEDS if verify else None,
           executor="local", executor_options={"jobs": jobs},
           say=lambda m: print(f"[{case['name']}] {m}", file=sys.stderr, flush=True))


# ----------------------------------------------------------------------------------- prediction

def analyse_points(points: list[dict], inputs: dict) -> dict:
    """advise's analysis (tunelab.report.advise.analyse) of the small-size points alone."""
    from tunelab.report import advise as ra
    from tunelab.report import tables

    metric = inputs["metric"]
    small = {int(s) for s in inputs["sizes"]}
    rows, runs = [], []
    for p in points:
        if int(p["size"]) not in small or p.get("metric") in ("", None):
            continue
        row = {"run": p["run"], metric: float(p["metric"])}
        if p.get("eval_loss") not in ("", None):
            row["eval_loss"] = float(p["eval_loss"])
        rows.append(row)
        runs.append({"run": p["run"], "label": p["label"], "size": int(p["size"]), "seed": int(p["seed"]),
                     "x": None if p.get("x") in ("", None) else float(p["x"])})
    manifest = {**inputs, "runs": runs}
    return ra.analyse(rows, manifest, metric, tables.higher_is_better(metric))


def prediction_of(result: dict) -> dict:
    """The compact prediction: pick, tied group, verdict, predicted metric and range per method."""
    methods = {}
    for label, p in result["methods"].items():
        rng = p.get("metric_range") or p.get("metric_ci") or {}
        methods[label] = {"metric": p.get("metric"), "lo": rng.get("lo"), "hi": rng.get("hi"),
                          "p_win": p.get("p_win"), "refused": p.get("refused")}
    for label, why in (result.get("errors") or {}).items():
        methods.setdefault(label, {"metric": None, "lo": None, "hi": None, "p_win": None, "refused": why})
    return {"pick": result.get("pick") or result.get("winner"), "tied": result.get("tied") or [],
            "verdict": result.get("verdict", "predicted"), "say": result.get("verdict_text"),
            "metric": result["metric"], "methods": methods}


def git_head() -> str | None:
    """The commit of the advise code that made a prediction (ADVISE_CODE_COMMIT when the scoring runs
    from a snapshot of the source while the checkout moves on)."""
    import os

    if os.environ.get("ADVISE_CODE_COMMIT"):
        return os.environ["ADVISE_CODE_COMMIT"]
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or None


# ----------------------------------------------------------------------------------- score

def truth_of(truth_rows: list[dict]) -> dict:
    from tunelab.report.stats import t_interval

    out = {}
    for label in dict.fromkeys(r["label"] for r in truth_rows):
        vals = [float(r["metric"]) for r in truth_rows if r["label"] == label and r["metric"] not in ("", None)]
        out[label] = t_interval(vals)
    return out


def tied_with_best(truth: dict, higher: bool) -> tuple[str, list[str]]:
    sign = 1 if higher else -1
    best = max(truth, key=lambda k: sign * truth[k]["mean"])
    tb = truth[best]
    tied = []
    for k, t in truth.items():
        se = math.sqrt(sum((x["std"] or 0.0) ** 2 / max(x["n"], 1) for x in (t, tb)))
        if sign * (tb["mean"] - t["mean"]) <= TIE_SE * se:
            tied.append(k)
    return best, tied


def baseline_picks(points: list[dict], case: dict, higher: bool) -> dict:
    """Each baseline's pick and, where it has one, its predicted full-size metric per method."""
    sign = 1 if higher else -1
    top = max(int(s) for s in case["sizes"])
    at_top: dict[str, list[float]] = {}
    params: dict[str, float] = {}
    for p in points:
        if p.get("trainable_params") not in ("", None):
            params[p["label"]] = float(p["trainable_params"])
        if int(p["size"]) == top and p.get("metric") not in ("", None):
            at_top.setdefault(p["label"], []).append(float(p["metric"]))
    means = {k: sum(v) / len(v) for k, v in at_top.items()}
    labels = case["labels"]
    return {
        "largest_small": {"pick": max(means, key=lambda k: sign * means[k]) if means else None,
                          "predicted": means},
        "always_lora": {"pick": "lora" if "lora" in labels else None},
        "always_full": {"pick": "full" if "full" in labels else None},
        "most_params": {"pick": max(params, key=params.get) if params else None},
    }


def score_strategy(pick: str | None, predicted: dict | None, truth: dict, best: str, tied: list[str],
                   higher: bool) -> dict:
    sign = 1 if higher else -1
    out: dict = {"pick": pick}
    if pick is None or pick not in truth:
        out.update(right=None, regret=None)
    else:
        out["right"] = pick == best or pick in tied
        out["regret"] = sign * (truth[best]["mean"] - truth[pick]["mean"])
    errs, inside = [], []
    for label, t in truth.items():
        pr = (predicted or {}).get(label)
        if pr is None:
            continue
        value = pr["metric"] if isinstance(pr, dict) else pr
        if value is None:
            continue
        errs.append(abs(float(value) - t["mean"]))
        if isinstance(pr, dict) and pr.get("lo") is not None:
            inside.append(pr["lo"] <= t["mean"] <= pr["hi"])
    out["mae"] = sum(errs) / len(errs) if errs else None
    out["coverage"] = sum(inside) / len(inside) if inside else None
    out["n_ranges"] = len(inside)
    out["n_inside"] = int(sum(inside))
    return out


def score_case(case: dict, prediction: dict, points: list[dict], truth_rows: list[dict], now: dict | None) -> dict:
    from tunelab.report import tables

    higher = tables.higher_is_better(case["metric"])
    truth = truth_of(truth_rows)
    best, tied = tied_with_best(truth, higher)
    base = baseline_picks(points, case, higher)
    scores = {"advise": score_strategy(prediction["pick"], prediction["methods"], truth, best, tied, higher)}
    scores["advise"]["verdict"] = prediction.get("verdict")
    if now is not None:
        scores["advise_now"] = score_strategy(now["pick"], now["methods"], truth, best, tied, higher)
        scores["advise_now"]["verdict"] = now.get("verdict")
    scores["largest_small"] = score_strategy(base["largest_small"]["pick"], base["largest_small"]["predicted"],
                                             truth, best, tied, higher)
    for k in ("always_lora", "always_full", "most_params"):
        scores[k] = score_strategy(base[k]["pick"], None, truth, best, tied, higher)
    return {"case": case["name"], "metric": case["metric"], "true_best": best, "true_tied": tied,
            "truth": {k: {"mean": v["mean"], "half": v["half"], "n": v["n"]} for k, v in truth.items()},
            "scores": scores}


def overall(case_scores: list[dict]) -> dict:
    out = {}
    names = [s for s in ("advise", "advise_now", *STRATEGIES[1:]) if any(s in c["scores"] for c in case_scores)]
    for s in names:
        rows = [c["scores"][s] for c in case_scores if s in c["scores"]]
        picked = [r for r in rows if r["right"] is not None]
        errs = [r["mae"] for r in rows if r["mae"] is not None]
        n_in = sum(r["n_inside"] for r in rows)
        n_rng = sum(r["n_ranges"] for r in rows)
        out[s] = {"cases": len(picked), "right": sum(r["right"] for r in picked),
                  "pick_accuracy": sum(r["right"] for r in picked) / len(picked) if picked else None,
                  "mean_regret": sum(r["regret"] for r in picked) / len(picked) if picked else None,
                  "mae": sum(errs) / len(errs) if errs else None,
                  "coverage": n_in / n_rng if n_rng else None, "n_ranges": n_rng}
    return out


# ----------------------------------------------------------------------------------- the table

NAMES = {"advise": "advise (registered)", "advise_now": "advise (current code)", "largest_small": "largest-small winner",
         "always_lora": "always LoRA (rules of thumb)", "always_full": "always full", "most_params": "most trainable params"}


def _v(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table(results: Path | None = None) -> str:
    """The score table (cases x strategies) from the committed score files, as Markdown."""
    results = results or RESULTS
    cases = [json.loads(p.read_text()) for p in sorted(results.glob("*.score.json"))]
    if not cases:
        return "No case scored yet (no docs/results/advise/*.score.json).\n"
    strategies = [s for s in NAMES if any(s in c["scores"] for c in cases)]
    lines = ["| case (metric) | true best (tied) | " + " | ".join(NAMES[s] for s in strategies) + " |",
             "|---|---|" + "---|" * len(strategies)]
    for c in cases:
        cells = []
        for s in strategies:
            r = c["scores"].get(s)
            if r is None or r["right"] is None:
                cells.append("–")
                continue
            mark = "right" if r["right"] else "WRONG"
            extra = f", MAE {_v(r['mae'])}" if r["mae"] is not None else ""
            extra += f", cov {r['n_inside']}/{r['n_ranges']}" if r["n_ranges"] else ""
            verdict = f" ({r['verdict']})" if r.get("verdict") not in (None, "predicted") else ""
            cells.append(f"{r['pick']}{verdict}: {mark}, regret {_v(r['regret'])}{extra}")
        truth = ", ".join(f"{k} {v['mean']:.3f}" for k, v in c["truth"].items())
        lines.append(f"| {c['case']} ({c['metric']}) | {c['true_best']} ({', '.join(c['true_tied'])}); {truth} | "
                     + " | ".join(cells) + " |")
    ov = overall(cases)
    cells = []
    for s in strategies:
        o = ov[s]
        cov = f", coverage {_v(o['coverage'], 2)} ({o['n_ranges']} ranges)" if o["coverage"] is not None else ""
        mae = f", MAE {_v(o['mae'])}" if o["mae"] is not None else ""
        cells.append(f"**{o['right']}/{o['cases']} right**, mean regret {_v(o['mean_regret'])}{mae}{cov}")
    lines.append(f"| **overall** ({len(cases)} cases) | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


DOC = ROOT / "docs" / "results.md"
MARK = ("<!-- advise-score-table -->\n", "<!-- /advise-score-table -->")


def doc_table(write: bool, doc: Path | None = None) -> bool:
    """Rebuild the score table between the markers in docs/results.md; True when it was stale."""
    doc = doc or DOC
    text = doc.read_text()
    start, end = text.index(MARK[0]) + len(MARK[0]), text.index(MARK[1])
    fresh = table()
    if text[start:end] == fresh:
        return False
    if write:
        doc.write_text(text[:start] + fresh + text[end:])
    return True


# ----------------------------------------------------------------------------------- main

def do_case(name: str, runs: Path | None, jobs: int, do_commit: bool, rescore: bool) -> dict | None:
    case = load_case(name)
    pred_path, points_path = RESULTS / f"{name}.prediction.json", RESULTS / f"{name}.points.csv"
    truth_path, score_path = RESULTS / f"{name}.truth.csv", RESULTS / f"{name}.score.json"
    out_dir = None if runs is None else runs / name
    if not pred_path.exists():
        if rescore or out_dir is None:
            print(f"[{name}] no committed prediction: skipped (run without --rescore to make it)", file=sys.stderr)
            return None
        run_advise(case, out_dir, jobs, verify=False)
        points = run_rows(out_dir, case["metric"])
        write_csv(points_path, points, POINT_FIELDS)
        inputs = advise_inputs(out_dir)
        pred = prediction_of(analyse_points(read_csv(points_path), inputs))
        write_json(pred_path, {"case": name, "config": case["config"], "code": git_head(), "inputs": inputs, **pred})
        commit(f"advise score, {name}: prediction from the small sizes, before any full-size run", do_commit)
    registered = json.loads(pred_path.read_text())
    if not truth_path.exists():
        if rescore or out_dir is None:
            print(f"[{name}] no committed truth: skipped", file=sys.stderr)
            return None
        run_advise(case, out_dir, jobs, verify=True)
        full = int(case["full_size"])
        rows = [r for r in run_rows(out_dir, case["metric"]) if int(r["size"]) == full]
        write_csv(truth_path, rows, POINT_FIELDS)
        commit(f"advise score, {name}: the truth at {full} rows, 3 seeds", do_commit)
    points = read_csv(points_path)
    now = prediction_of(analyse_points(points, registered["inputs"]))
    sc = score_case(case, registered, points, read_csv(truth_path), now)
    sc["advise_now_prediction"] = now
    write_json(score_path, sc)
    commit(f"advise score, {name}: scored", do_commit)
    return sc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=None, help="scratch directory for the advise runs (one folder per case)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of cases (default: all: {','.join(CASES)})")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (local executor)")
    ap.add_argument("--commit", action="store_true", help="git-commit docs/results/advise/ after each step")
    ap.add_argument("--rescore", action="store_true", help="no training: re-score from the committed files")
    ap.add_argument("--table", action="store_true", help="print the score table from the committed score files")
    ap.add_argument("--write", action="store_true", help="rebuild the score table in docs/results.md")
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/results.md's score table is stale")
    args = ap.parse_args(argv)
    if args.table:
        print(table(), end="")
        return 0
    if args.write or args.check:
        stale = doc_table(write=args.write)
        print(f"{DOC.relative_to(ROOT)}: score table {'rebuilt' if stale and args.write else 'stale' if stale else 'up to date'}")
        return 1 if stale and args.check else 0
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    if not args.rescore and args.runs is None:
        ap.error("--runs DIR is needed to train (or pass --rescore to score the committed files)")
    done = []
    for name in names:
        sc = do_case(name, args.runs, args.jobs, args.commit, args.rescore)
        if sc:
            done.append(sc)
            s = sc["scores"]["advise"]
            print(f"[{name}] advise picked {s['pick']} ({'right' if s['right'] else 'WRONG'}, regret {_v(s['regret'])}); "
                  f"true best {sc['true_best']}", file=sys.stderr)
    write_json(RESULTS / "overall.json", overall([json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.score.json"))]))
    commit("advise score: overall", args.commit)
    print(table(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
