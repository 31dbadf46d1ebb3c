"""A 6-run comparison (3 methods x 2 seeds) on a tiny model, through each sweep executor (not run in CI).

    python bench/sweep.py                                   # serial, --jobs 2, --executor ray; 1 round
    python bench/sweep.py --rounds 2 --steps 60 --out bench/results/sweep-cpu-2core.json

Each mode is the real command line (``tunelab compare ... --out DIR``), in a fresh output directory,
and the modes are interleaved round by round so that a change in the machine's load hits them alike:

    serial   --jobs 1            one run after another (each run: torch's default threads, all cores)
    jobs2    --jobs 2            two runs at once, the cores split between them (1 thread each on 2 cores)
    ray      --executor ray      a local Ray cluster the command starts itself (ray.init(); 1 CPU per run)

It prints and writes the wall time of each sweep, runs/hour, the ratios to serial, and the largest
difference of any run's metrics (task metrics, final and mean train loss) from the serial sweep's.
The tiny model is a random Llama (hidden 128, 4 layers) with the tests' word tokenizer: the figures
measure the executors (process start, scheduling, parallelism), not a model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny tokenizer the tests build in code

MODES = {
    "serial": ["--jobs", "1"],
    "jobs2": ["--jobs", "2"],
    "ray": ["--executor", "ray"],
}
METHODS = ["full", "lora:r=4", "loreft:rank=2"]


def setup(root: Path, steps: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_train import WORDS

    from conftest import tiny_tokenizer_obj

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True))
    model.save_pretrained(root / "tiny")
    tiny_tokenizer_obj().save_pretrained(root / "tiny")
    rows = [{"sentence": " ".join(WORDS[i % 11 : i % 11 + 6]), "label": i % 2} for i in range(64)]
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": str(root / "tiny"), "method": {"name": "full"},
        "task": {"name": "sentiment", "chat": False, "labels": ["no", "yes"], "template": "{text} ?"},
        "data": {"train": str(root / "d.jsonl"), "eval": str(root / "d.jsonl")},
        "train": {"max_steps": steps, "batch_size": 8, "progress": False, "precision": "fp32", "log_every": 10},
        "eval": {"loss": False},
    }
    path = root / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_mode(mode: str, cfg: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "tunelab", "compare", str(cfg), "--methods", ",".join(METHODS), "--seeds", "0,1",
           "--out", str(out), *MODES[mode]]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"mode": mode, "wall_s": round(wall, 2), "runs": len(manifest["state"]),
            "runs_per_hour": round(len(manifest["state"]) * 3600 / wall, 1), "load_before": round(load, 2),
            "run_wall_s": {n: e.get("wall_s") for n, e in manifest["state"].items()},
            "where": sorted({e.get("where", "") for e in manifest["state"].values()})}


def metrics(out: Path) -> dict[str, dict[str, float]]:
    found = {}
    for m in sorted((out / "runs").glob("*/metrics.json")):
        rec = json.loads(m.read_text())
        vals = {k: v for k, v in rec["metrics"].items() if isinstance(v, int | float)}
        vals.update({k: rec["run"][k] for k in ("final_loss", "mean_train_loss")})
        found[m.parent.name] = vals
    return found


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    return max(abs(a[r][k] - b[r][k]) for r in a for k in a[r])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    modes = args.modes.split(",")
    root = Path(tempfile.mkdtemp(prefix="tunelab-sweep-bench-"))
    cfg = setup(root, args.steps)
    rows, diffs = [], {}
    for r in range(args.rounds):
        outs = {}
        for mode in modes:
            outs[mode] = root / f"r{r}-{mode}"
            row = run_mode(mode, cfg, outs[mode])
            row["round"] = r
            rows.append(row)
            print(f"round {r} {mode:7s} {row['wall_s']:7.1f} s  {row['runs_per_hour']:7.1f} runs/h  "
                  f"(load {row['load_before']})", flush=True)
        ref = metrics(outs[modes[0]])
        for mode in modes[1:]:
            d = largest_difference(ref, metrics(outs[mode]))
            diffs[mode] = max(diffs.get(mode, 0.0), d)
    summary = {}
    for mode in modes:
        walls = [row["wall_s"] for row in rows if row["mode"] == mode]
        summary[mode] = {"wall_s": walls, "mean_wall_s": round(sum(walls) / len(walls), 2),
                         "runs_per_hour": round(6 * 3600 / (sum(walls) / len(walls)), 1)}
    base = summary[modes[0]]["mean_wall_s"]
    for mode in modes:
        summary[mode]["speedup_vs_" + modes[0]] = round(base / summary[mode]["mean_wall_s"], 2)
        if mode != modes[0]:
            summary[mode]["largest_metric_difference_vs_" + modes[0]] = diffs[mode]
    result = {
        "what": f"tunelab compare, {len(METHODS)} methods ({', '.join(METHODS)}) x 2 seeds = 6 runs, tiny Llama "
                f"(hidden 128, 4 layers), {args.steps} steps of batch 8, fp32, CPU",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "summary": summary, "rows": rows,
    }
    for mode, s in summary.items():
        extra = "" if mode == modes[0] else f", largest metric difference {s['largest_metric_difference_vs_' + modes[0]]:g}"
        print(f"{mode:7s} mean {s['mean_wall_s']:.1f} s, {s['runs_per_hour']} runs/h, "
              f"x{s['speedup_vs_' + modes[0]]} vs {modes[0]}{extra}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
