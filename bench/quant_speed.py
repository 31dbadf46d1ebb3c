"""Seconds per matrix of the 4-bit load: NF4 quantize, the QuantLinear build, LoftQ's init (not run in CI).

    python bench/quant_speed.py                       # 1B Llama MLP shapes (2048 x 5632, 5632 x 2048)
    python bench/quant_speed.py --torchao             # + torchao's NF4Tensor.from_tensor, codes compared
    python bench/quant_speed.py --peft                # + PEFT's loftq_init (needs bitsandbytes), on the CPU

One random fp32 matrix per shape (std 0.02, as bench/memory_1b.py's model), --threads torch threads,
the best of --repeats of CPU seconds (``time.process_time``: what the process got, whatever the
machine's load; with 1 thread it is the compute time). Rows: ``quantization.quantize`` (NF4 codes + double-
quantized scales), ``quantization.nf4_linear`` (that + the checksum dequantize: what QLoRA's load does per
linear), ``loftq_init`` with r 16, alpha 32 and --iters (what LoftQ's load does per linear); --peft:
PEFT's own ``loftq_init`` (bitsandbytes NF4 + a full SVD) run on the CPU as bench/memory_1b.py runs it.
"""

from __future__ import annotations

import argparse
import time

import torch


def cpu_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="2048x5632,5632x2048")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=1, help="LoftQ iterations (memory_1b.py runs 1)")
    ap.add_argument("--torchao", action="store_true", help="also time torchao's from_tensor and compare codes")
    ap.add_argument("--peft", action="store_true", help="also time PEFT's loftq_init (bitsandbytes) on the CPU")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from tunelab.methods.loftq import loftq_init
    from tunelab.models import quantization

    quantization.quantize(torch.randn(256, 256))  # imports torchao, builds the tables
    for spec in a.shapes.split(","):
        rows, cols = map(int, spec.split("x"))
        w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
        times = {
            "quantize": cpu_seconds(lambda w=w: quantization.quantize(w), a.repeats),
            "nf4_linear": cpu_seconds(lambda w=w: quantization.nf4_linear(w, None), a.repeats),
            f"loftq_init iters={a.iters}": cpu_seconds(lambda w=w: loftq_init(w, 16, 2.0, 4, "nf", a.iters), a.repeats),
        }
        extra = ""
        if a.torchao:
            times["torchao from_tensor"] = cpu_seconds(lambda w=w: quantization.NF4Tensor.from_tensor(w, 64, 256), 1)
            ours, ref = quantization.quantize(w), quantization.NF4Tensor.from_tensor(w, 64, 256)
            same = torch.equal(ours.quantized_data, ref.quantized_data) and torch.equal(
                ours.quantized_scalers, ref.quantized_scalers
            )
            extra = f", codes and scales equal torchao's: {same}"
        if a.peft:
            import sys
            from pathlib import Path

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from memory_1b import peft_loftq_on_cpu
            from peft.tuners.lora import layer

            peft_loftq_on_cpu()
            times[f"PEFT loftq_init iters={a.iters}"] = cpu_seconds(
                lambda w=w: layer.loftq_init(w, num_bits=4, reduced_rank=16, num_iter=a.iters), 1
            )
        print(f"{rows} x {cols} fp32, {a.threads} thread(s){extra}")
        for name, t in times.items():
            print(f"  {name:24s} {t:7.3f} CPU s per matrix")


if __name__ == "__main__":
    main()
