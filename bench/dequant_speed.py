"""One dequantize pass over every NF4 base of a QLoRA model: torchao's path against tunelab's.

    python bench/dequant_speed.py --threads 2            # SmolLM2-135M, 210 linears, 106M weights

A QLoRA training step dequantizes each base once per forward and once per backward (twice each
with the shared prompt prefix). This times one such pass, the way the previous QLoRA forward did it
(``NF4Tensor.get_original_weight()`` in fp32, then the bf16 cast autocast applies) and the way
``tunelab.models.quantization.dequantize`` does it now (byte table, straight to bf16), checks that the two give
the same bits, and prints the medians of ``--repeats`` passes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import tunelab
    from tunelab.models import quantization
    from tunelab.models.loading import load

    model, _ = load(a.model)
    tunelab.attach(model, "qlora", r=8)
    weights = [m.weight for m in model.modules() if isinstance(m, quantization.QuantLinear) and m.is_nf4]
    n = sum(w.numel() for w in weights)

    def old():
        return [w.get_original_weight().to(torch.bfloat16) for w in weights]

    def new():
        return [quantization.dequantize(w, torch.bfloat16) for w in weights]

    same = all(torch.equal(x, y) for x, y in zip(old(), new(), strict=True))
    times = {}
    for name, fn in (("torchao get_original_weight + cast", old), ("tunelab byte table", new)):
        ts = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        times[name] = statistics.median(ts)
    print(f"{len(weights)} NF4 bases, {n / 1e6:.0f}M weights, {a.threads} threads, bit-identical: {same}")
    for name, t in times.items():
        print(f"  {name:36s} {t:6.3f} s per pass  ({1e9 * t / n:.2f} ns per weight)")


if __name__ == "__main__":
    main()
