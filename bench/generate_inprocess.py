"""bench/run.py's generate row in one process, for a machine too loaded for wall-clock figures.

    python bench/generate_inprocess.py [--precision bf16|fp32] [--repeats 2] [--threads 1]

The same 32 Alpaca prompts (embedded SmolLM2-135M, 32 new tokens greedy, batch 8) through
``model.generate`` in file order (left padding) and through ``tunelab.evaluation.scoring.generate``,
alternating; prints CPU seconds (``time.process_time``: what the process got, whatever the load)
and wall seconds of each call, and how many prompts' texts differ from the reference's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import run as bench_run

    import tunelab
    from tunelab.config import load_config
    from tunelab.data.encoding import tokenize_prompt
    from tunelab.evaluation.scoring import _pad_left, generate
    from tunelab.runtime.precision import autocast
    from tunelab.training.loop import Run

    conf = bench_run.CONFIGS["generate"]
    cfg = load_config(None, bench_run.BASE + conf["tunelab"] + [f"train.threads={a.threads}", "train.device=cpu",
                                                                 f"train.precision={a.precision}"])
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": None, "max_eval": 32})})
    r = Run(cfg)
    tunelab.attach(r.model, cfg.method.name)
    tok, bs, n = r.tok, cfg.eval.batch_size, cfg.eval.max_new_tokens
    prompts = [r.task.prompt(ex, tok, r.tcfg) for ex in r.eval_ex]

    def reference() -> list[str]:
        out = []
        for s in range(0, len(prompts), bs):
            ids, mask = _pad_left([tokenize_prompt(tok, p) for p in prompts[s : s + bs]], tok.pad_token_id, "cpu")
            gen = r.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out += [tok.decode(g[ids.shape[1]:], skip_special_tokens=True).strip() for g in gen]
        return out

    sides = {"hf-generate": reference, "tunelab": lambda: generate(r.model, tok, prompts, max_new_tokens=n, batch_size=bs)}
    want = None
    with torch.no_grad(), autocast(r.device, r.amp):
        for rep in range(a.repeats):
            for name, fn in sides.items():
                cpu, wall = time.process_time(), time.perf_counter()
                texts = fn()
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                want = texts if name == "hf-generate" else want
                diff = sum(x != y for x, y in zip(texts, want, strict=True))
                print(f"[{rep + 1}] {name:12s} {a.precision}: cpu {cpu:6.1f} s ({len(texts) / cpu:.2f} ex/cpu-s), "
                      f"wall {wall:6.1f} s, differing from hf-generate: {diff}/{len(texts)}", flush=True)


if __name__ == "__main__":
    main()
