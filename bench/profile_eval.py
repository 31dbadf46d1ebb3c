"""Where an evaluation's time goes: torch.profiler over one task evaluation, grouped like profile_step.

    python bench/profile_eval.py --config score-lora                  # SST-2 dev label words, LoRA attached
    python bench/profile_eval.py --config ner-head --top 30 --set data.max_eval=300

It builds the run bench/run.py builds for the row, evaluates once unprofiled (oneDNN builds its kernels
per shape on the first pass), then evaluates again under the profiler and prints the wall time, the
self-CPU time per group, and with --top the heaviest ops with their input shapes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import group_of, print_groups  # noqa: E402
from run import BASE, CONFIGS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="score-lora", help="an evaluation row of bench/run.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], dest="extra")
    ap.add_argument("--top", type=int, default=0, help="also print the N ops with the most self time")
    ap.add_argument("--attn", default=None, help="set the model's attention implementation (eager, sdpa)")
    ap.add_argument("--no-profile", action="store_true", help="only time the second pass")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import tunelab
    from tunelab.config import load_config
    from tunelab.training.loop import Run, seed_all

    conf = CONFIGS[a.config]
    if not conf.get("eval"):
        raise SystemExit(f"{a.config} is not an evaluation row")
    cfg = load_config(None, [*BASE, *conf["tunelab"], f"train.threads={a.threads}", *a.extra])
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": None})})
    seed_all(cfg.train.seed)
    r = Run(cfg)
    tunelab.attach(r.model, cfg.method.name, **cfg.method.params())
    if a.attn:
        r.model.config._attn_implementation = a.attn
    t = time.perf_counter()
    metrics, _ = r.evaluate()
    print(f"first pass {time.perf_counter() - t:.2f} s  {metrics}")
    t = time.perf_counter()
    if a.no_profile:
        r.evaluate()
        print(f"second pass {time.perf_counter() - t:.2f} s, {len(r.eval_ex)} examples")
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=a.top > 0) as prof:
        r.evaluate()
    wall = time.perf_counter() - t
    events = prof.key_averages(group_by_input_shape=a.top > 0)
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += e.self_cpu_time_total / 1e6
    print(f"profiled pass {wall:.2f} s wall, {len(r.eval_ex)} examples, {sum(groups.values()):.2f} s self CPU in ops")
    print_groups(groups)
    if a.top:
        rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[: a.top]
        for e in rows:
            shapes = str(e.input_shapes)[:90]
            print(f"{e.self_cpu_time_total / 1e3:9.1f} ms {e.count:6d}x  {e.key[:34]:34s} {shapes}")


if __name__ == "__main__":
    main()
