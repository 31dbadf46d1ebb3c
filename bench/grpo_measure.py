"""GRPO against SFT and DPO on the same sums, and a GSM8K row, on SmolLM2-135M (CPU-sized budget).

Every job trains in its own process (so each run's peak memory is its own), then the trained method is
scored on the same held-out sums with the ``rl`` task (greedy, exact match of the answer number), so
GRPO, SFT and DPO are compared on one metric. Results are appended to ``--out`` after every job (an
interrupted measurement keeps the jobs that finished); each GRPO run directory gets
``reward_per_step.png``.

    python examples/write_grpo_sums.py --out runs/grpo-data
    python bench/grpo_measure.py --data runs/grpo-data --runs runs/grpo-bench --out bench/results/cpu-2core-grpo-sums.json
    python bench/grpo_measure.py --table bench/results/cpu-2core-grpo-*.json --plot docs/img/grpo_reward.png
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"

COMMON = ["model.name=smollm2-135m", "train.threads=1", "train.progress=false", "train.log_every=1", "train.seed=0",
          "eval.batch_size=16", "data.max_length=96"]
RL = ["task.name=rl", "task.reward=[numeric]", "task.num_generations=8", "task.max_new_tokens=16",
      "task.temperature=0.7"]


def jobs(data: Path, steps: int, dev: int, gsm_steps: int, gsm_dev: int, seed: int = 0) -> list[dict]:
    """Every job at ``seed`` (a seed other than 0 suffixes the names with -s<seed>)."""
    out = _jobs(data, steps, dev, gsm_steps, gsm_dev)
    if seed:
        for j in out:
            j["name"] += f"-s{seed}"
            j["train"] = j["train"] + [f"train.seed={seed}"]
    return out


def _jobs(data: Path, steps: int, dev: int, gsm_steps: int, gsm_dev: int) -> list[dict]:
    train_rl, dev_rl = data / "grpo_sums_train.jsonl", f"{data / 'grpo_sums_dev.jsonl'}#rows=0:{dev}"
    budget = [f"train.max_steps={steps}", "train.batch_size=2"]
    score = RL + [f"data.eval={dev_rl}"]  # how every sums job is scored
    return [
        {"name": "grpo-lora", "objective": "GRPO", "method": "lora", "data": "sums",
         "train": COMMON + RL + budget + ["method.name=lora", "train.lr=1e-3", f"data.train={train_rl}",
                                          f"data.eval={dev_rl}", "eval.before=true"], "score": None},
        {"name": "sft-lora", "objective": "SFT (right answers)", "method": "lora", "data": "sums",
         "train": COMMON + budget + ["task.name=generation", "method.name=lora", "train.lr=1e-3",
                                     f"data.train={data / 'grpo_sums_sft_train.jsonl'}", "eval.loss=false"], "score": score},
        {"name": "dpo-lora", "objective": "DPO (right vs wrong)", "method": "lora", "data": "sums",
         "train": COMMON + budget + ["task.name=preference", "task.objective=dpo", "method.name=lora", "train.lr=1e-3",
                                     f"data.train={data / 'grpo_sums_pairs_train.jsonl'}", "eval.loss=false"], "score": score},
        {"name": "dpo-lora-lr2e-4", "objective": "DPO (right vs wrong)", "method": "lora", "data": "sums",
         "train": COMMON + budget + ["task.name=preference", "task.objective=dpo", "method.name=lora", "train.lr=2e-4",
                                     f"data.train={data / 'grpo_sums_pairs_train.jsonl'}", "eval.loss=false"], "score": score},
        {"name": "grpo-loreft", "objective": "GRPO", "method": "loreft", "data": "sums",
         "train": COMMON + RL + budget + ["method.name=loreft", "method.rank=4", "method.layers=[3,9,18,24]",
                                          "method.positions=f5+l5", "train.lr=2e-3", f"data.train={train_rl}",
                                          f"data.eval={dev_rl}", "eval.before=true"], "score": None},
        {"name": "gsm8k-grpo-lora", "objective": "GRPO", "method": "lora", "data": "gsm8k",
         "train": COMMON + ["task.name=rl", "task.reward=[numeric]", "task.num_generations=4", "task.max_new_tokens=48",
                            "task.temperature=0.7", "task.fields={prompt: question}", "method.name=lora", "train.lr=1e-3",
                            f"train.max_steps={gsm_steps}", "train.batch_size=2", "data.max_length=256",
                            f"data.train={GSM8K / 'train.jsonl'}#rows=0:400", f"data.eval={GSM8K / 'test.jsonl'}#rows=0:{gsm_dev}",
                            "eval.before=true"], "score": None},
    ]


def curve(run_dir: Path, key: str) -> list[tuple[int, float]]:
    out = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec and "step" in rec:
            out.append((rec["step"], rec[key]))
    return out


def plot_rewards(run_dir: Path) -> None:
    from tunelab.report.plots import _figure, png_bytes

    pts = curve(run_dir, "reward")
    if not pts:
        return
    fig, ax = _figure()
    steps, rewards = zip(*pts, strict=True)
    ax.plot(steps, rewards, linewidth=1.0, alpha=0.5, label="mean reward of the step's completions")
    k = 5
    smooth = [sum(rewards[max(0, i - k + 1): i + 1]) / len(rewards[max(0, i - k + 1): i + 1]) for i in range(len(rewards))]
    ax.plot(steps, smooth, linewidth=2.0, label=f"mean of the last {k} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.legend(fontsize=8)
    (run_dir / "reward_per_step.png").write_bytes(png_bytes(fig))


def run_job(job: dict, runs: Path) -> dict:
    """Train, (score,) and summarise one job: called in a child process."""
    from tunelab.config import load_config
    from tunelab.training.loop import evaluate_run, run

    out = runs / job["name"]
    t0 = time.time()
    m = run(load_config(None, job["train"] + [f"output_dir={out}"]))
    row = {k: job[k] for k in ("name", "objective", "method", "data")}
    facts = m["run"]
    if job["score"] is None:
        before, after = m["before"], m["metrics"]
    else:  # scored with the rl task on the same held-out sums
        scfg = load_config(None, COMMON + job["score"] + [f"method.name={job['method']}", f"output_dir={runs / 'score'}"])
        after, _ = evaluate_run(scfg, out / "method")
        before = None
    row.update(before_accuracy=before["accuracy"] if before else None, after_accuracy=after["accuracy"],
               n_eval=after["n"], steps=facts["steps"], train_time_s=facts["train_time_s"],
               peak_memory_mb=facts["peak_memory_mb"], trainable_params=facts["trainable_params"],
               wall_time_s=time.time() - t0)
    rewards = curve(out, "reward")
    if rewards:
        log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
        steps = [r for r in log if "reward" in r]
        roll_s = sum(r["rollout_s"] for r in steps)
        gen_tok = sum(r["rollout_tokens_per_s"] * r["rollout_s"] for r in steps)
        row.update(reward_first5=sum(v for _, v in rewards[:5]) / 5, reward_last5=sum(v for _, v in rewards[-5:]) / 5,
                   rollout_tokens_per_s=gen_tok / roll_s if roll_s else None, rollout_s=roll_s,
                   train_tokens_per_s=facts["train_tokens"] / (facts["train_time_s"] - roll_s),
                   zero_std_groups=sum(r["zero_std_groups"] for r in steps) / len(steps),
                   reward_per_step=[round(v, 4) for _, v in rewards])
        plot_rewards(out)
    else:
        row.update(train_tokens_per_s=facts["train_tokens_per_s"])
    return row


def reward_plot(paths: list[Path]) -> bytes:
    """Mean reward per step of every GRPO row of the results files (a 5-step running mean)."""
    from tunelab.report.plots import _figure, png_bytes

    fig, ax = _figure()
    for p in paths:
        for r in json.loads(p.read_text())["rows"]:
            ys = r.get("reward_per_step")
            if ys:
                smooth = [sum(ys[max(0, i - 4): i + 1]) / len(ys[max(0, i - 4): i + 1]) for i in range(len(ys))]
                ax.plot(range(1, len(ys) + 1), smooth, linewidth=1.6, label=f"{r['data']}: {r['method']}, seed {seed_of(r['name'])}")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (5-step running mean)")
    ax.legend(fontsize=8)
    return png_bytes(fig)


def seed_of(name: str) -> int:
    m = re.search(r"-s(\d+)$", name)
    return int(m.group(1)) if m else 0


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95% interval of a share p of n (inside [0, 1] whatever p)."""
    if not n:
        return 0.0, 1.0
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def table(paths: list[Path]) -> str:
    res = {"rows": [r for p in paths for r in json.loads(p.read_text())["rows"]]}
    lrs = {j["name"]: next(a.split("=", 1)[1] for a in j["train"] if a.startswith("train.lr="))
           for seed in (0, 1, 2) for j in jobs(Path("."), 0, 0, 0, 0, seed)}
    lines = ["| data | objective | method | lr | seed | held-out exact match before -> after [Wilson 95% of after] | mean reward, first 5 -> last 5 steps "
             "| rollout tok/s | training tok/s | train time s | peak memory MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["data"]: r["before_accuracy"] for r in res["rows"] if r["before_accuracy"] is not None}

    def f(v, d=3):
        return "–" if v is None else f"{v:.{d}f}"

    for r in res["rows"]:
        before = r["before_accuracy"] if r["before_accuracy"] is not None else base.get(r["data"])
        rew = f"{f(r.get('reward_first5'))} -> {f(r.get('reward_last5'))}" if "reward_first5" in r else "–"
        lines.append(f"| {r['data']} (n={r['n_eval']}) | {r['objective']} | {r['method']} | {lrs[r['name']]} | {seed_of(r['name'])} | {f(before)} -> "
                     f"{f(r['after_accuracy'])} [{f(wilson(r['after_accuracy'], r['n_eval'])[0], 2)}, {f(wilson(r['after_accuracy'], r['n_eval'])[1], 2)}] | {rew} | {f(r.get('rollout_tokens_per_s'), 1)} | "
                     f"{f(r.get('train_tokens_per_s'), 1)} | {r['train_time_s']:.0f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="folder written by examples/write_grpo_sums.py")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "grpo-bench", help="where the run directories go")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu-2core-grpo-sums.json",
                    help="results file (appended to after every job)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of every sums job")
    ap.add_argument("--dev", type=int, default=80, help="held-out sums scored")
    ap.add_argument("--gsm-steps", type=int, default=16, help="optimizer steps of the GSM8K job")
    ap.add_argument("--gsm-dev", type=int, default=40, help="GSM8K test questions scored")
    ap.add_argument("--only", help="comma-separated job names to run")
    ap.add_argument("--seed", type=int, default=0, help="training seed of every job (names get -s<seed> unless 0)")
    ap.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process, print its row
    ap.add_argument("--table", type=Path, nargs="+", help="print the markdown table of results files and exit")
    ap.add_argument("--plot", type=Path, help="with --table: also draw every GRPO row's reward per step into this PNG")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        if args.plot:
            args.plot.write_bytes(reward_plot(args.table))
        return
    all_jobs = jobs(args.data.resolve(), args.steps, args.dev, args.gsm_steps, args.gsm_dev, args.seed)
    if args.job:
        row = run_job(next(j for j in all_jobs if j["name"] == args.job), args.runs.resolve())
        print("ROW " + json.dumps(row))
        return
    res = json.loads(args.out.read_text()) if args.out.exists() else {
        "machine": "shared CPU, 2 cores (other jobs running beside it), torch threads 1", "model": "smollm2-135m",
        "seeds": [args.seed], "command": " ".join(["python", "bench/grpo_measure.py", *sys.argv[1:]]), "rows": []}
    done = {r["name"] for r in res["rows"]}
    for job in all_jobs:
        if job["name"] in done or (args.only and job["name"] not in args.only.split(",")):
            continue
        if job["data"] == "gsm8k" and not GSM8K.exists():
            print(f"{job['name']}: skipped, {GSM8K} is absent", flush=True)
            continue
        p = subprocess.run([sys.executable, __file__, "--data", str(args.data), "--runs", str(args.runs), "--steps",
                            str(args.steps), "--dev", str(args.dev), "--gsm-steps", str(args.gsm_steps), "--gsm-dev",
                            str(args.gsm_dev), "--seed", str(args.seed), "--job", job["name"]], capture_output=True, text=True)
        rows = [ln[4:] for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
        if p.returncode or not rows:
            print(f"{job['name']}: failed (exit {p.returncode})\n{p.stderr[-3000:]}", flush=True)
            continue
        res["rows"].append(json.loads(rows[-1]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"{job['name']}: {rows[-1][:300]}", flush=True)


if __name__ == "__main__":
    main()
