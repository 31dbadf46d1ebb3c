"""Resident memory of one bench/memory_1b.py run, phase by phase (where a method's peak comes from).

    python bench/memory_phases.py tunelab:qlora [--model-dir DIR] [--dtype float32] [--seq 64]

Prints, after each phase (imports, load + attach, forward, backward, optimizer step, a second step),
the resident size now and the peak within that phase (Linux: VmHWM, reset between phases through
/proc/self/clear_refs), in MB. Same model and runs as memory_1b.py; not run in CI.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def status() -> dict[str, float]:
    with open("/proc/self/status") as f:
        info = {line.split(":")[0]: line.split()[1] for line in f if line.startswith(("VmRSS", "VmHWM"))}
    return {k: int(v) / 1024 for k, v in info.items()}


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="impl:method, as in memory_1b.py")
    ap.add_argument("--model-dir", default="/tmp/tunelab-llama-1b")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rows = []

    def phase(name: str, t0: float) -> None:
        s = status()
        rows.append(s)
        print(f"{name:<12} now {s['VmRSS']:8.0f} MB   peak in phase {s['VmHWM']:8.0f} MB   {time.perf_counter() - t0:7.1f} s",
              flush=True)
        reset_peak()

    t0 = time.perf_counter()
    import memory_1b
    import torch

    import tunelab  # noqa: F401  (imports count in every run's resident size)
    torch.set_num_threads(a.threads)
    phase("imports", t0)
    impl, method = a.run.split(":")
    t0 = time.perf_counter()
    model = (memory_1b._tunelab if impl == "tunelab" else memory_1b._peft)(method, a.model_dir, a.dtype)
    model.train()
    phase("load+attach", t0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(3, memory_1b.SHAPE["vocab_size"], (1, a.seq), generator=torch.Generator().manual_seed(0))
    for step in (1, 2):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        phase(f"forward {step}", t0)
        t0 = time.perf_counter()
        loss.backward()
        phase(f"backward {step}", t0)
        t0 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        phase(f"optimizer {step}", t0)
    print(f"max {max(r['VmHWM'] for r in rows):.0f} MB, loss {float(loss):.4f}", flush=True)


if __name__ == "__main__":
    main()
