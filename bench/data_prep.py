"""Data preparation speed and memory: tunelab's pipeline vs the per-row loop it replaces vs a plain
``datasets.map`` of the same tokenizer, on SST-2 train (67k rows) and a synthetic 1,000,000-row chat set.

    python bench/data_prep.py                        # SST-2 and the 1M chat set, automatic num_proc
    python bench/data_prep.py --num-proc 2           # two tokenizing workers on both sides
    python bench/data_prep.py --chat-rows 100000     # a smaller chat set
    python bench/data_prep.py --skip-chat            # SST-2 only

Every case runs in its own process (so peak RSS is that case's alone) against a fresh feature cache
for the first run, then the same cache for the cached run. Peak RSS is reported above the process's RSS
once the tokenizer is loaded (no model is loaded here: "above the model"), for the main process and its
largest worker. Prints one table and writes the raw numbers as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
WORDS = ("the a cat dog city river model data train test answer question light music story night morning "
         "small large quick slow red blue green happy calm loud bright dark open close read write").split()


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its peak so far (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def write_chat(path: Path, rows: int, seed: int = 0) -> None:
    """Multi-turn OpenAI-style conversations (1-3 exchanges, some with a system turn), composed from a word list."""
    rng = random.Random(seed)

    def sentence(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    with path.open("w") as f:
        for i in range(rows):
            msgs = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
            for _ in range(1 + i % 3):
                msgs += [{"role": "user", "content": sentence(rng.randint(5, 15))},
                         {"role": "assistant", "content": sentence(rng.randint(8, 25))}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def case(name: str, data: str, model: str, num_proc: int) -> dict:
    """One measurement (runs in a child process). ``num_proc`` 0: tunelab's automatic choice, for both sides."""
    if num_proc:
        os.environ["TUNELAB_NUM_PROC"] = str(num_proc)
    import datasets
    from transformers import AutoTokenizer

    from tunelab.config import task_config
    from tunelab.data import feature_cache
    from tunelab.tasks import TASKS

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(model)
    procs = num_proc or feature_cache.num_proc(200_000 if "chat" in name else 67_349)
    base = rss_mb()
    t0 = time.perf_counter()
    label, name = name, name.removesuffix("-cached") if name.startswith("sst2") else name
    if name.startswith("sst2"):
        task = TASKS.get("sentiment")
        cfg = task_config("sentiment", {})
        if name == "sst2-plain-map":
            ds = datasets.load_dataset("csv", data_files=data, delimiter="\t", split="train")
            out = ds.map(lambda b: tok(b["sentence"]), batched=True, num_proc=procs if procs > 1 else None,
                         load_from_cache_file=False)  # a rerun must not read the last run's result
            rows = len(out)
        else:
            ex = task.read(data, cfg, limit=None, skip_bad=False)
            cfg = task.fit(cfg, ex)
            if name == "sst2-per-row":  # the loop before this pipeline, on the first 5000 rows
                ex = ex[:5000]
                t0 = time.perf_counter()
                feats = [task.encode(e, tok, cfg, 256) for e in ex]
                rows = len(feats)
            else:
                feats = feature_cache.features(task, ex, tok, cfg, 256, cache=True)
                rows = feats.stats["rows"]
                lengths_sum = int(feats.lengths.sum())
    else:
        task = TASKS.get("chat")
        tmpl = name.removesuffix("-cached").split(":")[1] if ":" in name else None
        cfg = task_config("chat", {"template": tmpl})
        if name.startswith("chat-plain-map"):
            ds = datasets.load_dataset("json", data_files=data, split="train")

            def fn(b):
                return tok([tok.apply_chat_template(m, tokenize=False) for m in b["messages"]])
            out = ds.map(fn, batched=True, num_proc=procs if procs > 1 else None, remove_columns=["messages"],
                         load_from_cache_file=False)
            rows = len(out)
        else:
            ex = task.read(data, cfg)
            feats = feature_cache.features(task, ex, tok, cfg, 512, cache=True)
            rows = feats.stats["rows"]
            lengths_sum = int(feats.lengths.sum())
    seconds = time.perf_counter() - t0
    own = rss_mb("VmHWM")  # not ru_maxrss: Linux carries that across exec from the parent
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    res = {"case": label, "rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
           "peak_rss_above_tokenizer_mb": round(own - base), "worker_peak_rss_mb": round(kids), "num_proc": procs,
           "load_avg_1m": round(os.getloadavg()[0], 1)}
    if "lengths_sum" in locals():
        res["tokens"] = lengths_sum
    return res


def run_case(name: str, data: str, args, cache: str, results: list | None = None) -> dict:
    env = dict(os.environ, TUNELAB_CACHE=cache, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    cmd = [sys.executable, __file__, "--case", name, "--data", data, "--model", args.model, "--num-proc", str(args.num_proc)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {res['case']:<28} {res['rows']:>9,} rows {res['seconds']:>8.1f} s {res['rows_per_s']:>9,} rows/s "
          f"peak RSS +{res['peak_rss_above_tokenizer_mb']:,} MB (worker {res['worker_peak_rss_mb']:,} MB)", flush=True)
    if results is not None:  # written after every case: a long run keeps what it measured
        results.append(res)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case")
    ap.add_argument("--data")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-proc", type=int, default=0, help="0: tunelab's automatic choice (data.num_proc unset)")
    ap.add_argument("--chat-rows", type=int, default=1_000_000)
    ap.add_argument("--chat-template", default="auto", help="auto (the model's own) or a named one, e.g. chatml")
    ap.add_argument("--skip-chat", action="store_true")
    ap.add_argument("--skip-sst2", action="store_true")
    ap.add_argument("--out", default="bench/results/data_prep.json")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.data, args.model, args.num_proc)))
        return
    from tunelab.models.loading import resolve

    args.model = str(resolve(args.model))  # here, in the default cache: the cases' fresh caches hold features only
    results = []
    with tempfile.TemporaryDirectory(prefix="tunelab-dataprep-") as tmp:
        if not args.skip_sst2:
            if not SST2.exists():
                raise SystemExit(f"{SST2} is absent (the shared benchmark data)")
            print(f"SST-2 train ({SST2})")
            cache = str(Path(tmp) / "cache-sst2")
            for name in ("sst2-per-row", "sst2-tunelab", "sst2-tunelab-cached", "sst2-plain-map"):
                run_case(name, str(SST2), args, cache, results)
        if not args.skip_chat:
            path = Path(tmp) / "chat.jsonl"
            t0 = time.perf_counter()
            write_chat(path, args.chat_rows)
            print(f"chat: {args.chat_rows:,} rows written in {time.perf_counter() - t0:.0f} s ({path.stat().st_size / 2**20:.0f} MB)")
            cache = str(Path(tmp) / "cache-chat")
            name = "chat-tunelab" + (f":{args.chat_template}" if args.chat_template != "auto" else "")
            for n in (name, name + "-cached", "chat-plain-map"):
                run_case(n, str(path), args, cache, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
