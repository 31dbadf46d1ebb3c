"""Where a training step's time goes: torch.profiler over one tunelab step, grouped by kind of op.

    python bench/profile_step.py --method lora --threads 2      # SmolLM2, SST-2 batch 8 x <=128
    python bench/profile_step.py --method qlora --set train.shadow_mb=0   # without held bf16 copies

It builds the loop's batches for the config, runs the step the loop runs (autocast, LM head on loss
positions, shared prompt prefix, eager attention for short rows, held frozen weights as
train.shadow_mb says, fused AdamW) a few times, then profiles one and prints the self-CPU time per
group: matmuls (mm/addmm/bmm/linear), dtype casts (copy/_to_copy), attention (softmax, SDPA),
elementwise, optimizer, everything else; and, inclusive, the time spent dequantizing quantized bases.
Run against an older tree (PYTHONPATH=OLD/src) for a before/after: the newer levers are skipped there.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict
from pathlib import Path

import torch

GROUPS = [
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("casts", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("attention", ("softmax", "scaled_dot_product", "flash_attention")),
    ("optimizer", ("adam", "Optimizer", "_foreach", "_fused")),
    ("elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::rsqrt", "aten::mean", "aten::neg",
                     "aten::cat", "aten::sum", "aten::div", "aten::where", "aten::masked_fill", "aten::sub",
                     "aten::fill_", "aten::zero_", "aten::embedding", "aten::index", "aten::gather", "aten::cos",
                     "aten::sin", "aten::log_softmax", "aten::nll_loss", "backward")),
]


def group_of(name: str) -> str:
    for group, keys in GROUPS:
        if any(k.lower() in name.lower() for k in keys):
            return group
    return "other"


def print_groups(totals: dict[str, float]) -> float:
    """Print self time per group, largest first; returns the total."""
    total = sum(totals.values())
    for g, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {g:12s} {v:7.3f} s  {100 * v / total:5.1f}%")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], dest="extra")
    ap.add_argument("--top", type=int, default=0, help="also print the N ops with the most self time")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import tunelab
    from tunelab.config import load_config
    from tunelab.models import lm_loss
    from tunelab.runtime.precision import autocast
    from tunelab.training import cpu_attention, optimizer
    from tunelab.training.loop import Run
    from tunelab.training.sizing import loop_batches

    sst2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
    cfg = load_config(None, ["model.name=smollm2-135m", "task.name=sentiment", f"data.train={sst2}",
                             "data.max_train=64", "data.max_length=128", "train.batch_size=8",
                             f"method.name={a.method}", *a.extra])
    r = Run(cfg)
    model = tunelab.attach(r.model, cfg.method.name, **cfg.method.params()).train()
    batches = loop_batches(r, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer.adamw(params, lr=1e-4)
    probe = {k: v[:2] for k, v in batches[0].items()}
    trim = lm_loss.supports_loss_inputs(model, probe, autocast(r.device, r.amp))
    shared = trim and lm_loss.supports_shared_prefix(model, probe)
    try:  # frozen weights kept in the autocast dtype ; absent in older trees
        from tunelab.runtime.precision import held_weights

        held = held_weights(model, r.amp, cfg.train.shadow_mb, r.device)
    except ImportError:
        held = contextlib.nullcontext({"held_mb": "n/a"})
    facts = held.__enter__()
    _label_dequantize()

    def step(b):
        with autocast(r.device, r.amp), cpu_attention.attention_for(model, b, r.device):
            loss = lm_loss.loss(model, b, trim, shared)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for b in batches:  # every shape once: kernels built
        step(b)
    b = batches[len(batches) // 2]
    t = time.perf_counter()
    step(b)
    wall = time.perf_counter() - t
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=bool(a.top)) as prof:
        step(b)
    totals: dict[str, float] = defaultdict(float)
    deq = 0.0
    for ev in prof.key_averages():
        if ev.key == "tunelab::dequantize":
            deq += ev.cpu_time_total / 1e6
            continue
        totals[group_of(ev.key)] += ev.self_cpu_time_total / 1e6
    total = sum(totals.values())
    print(f"{cfg.method.name} step on batch {tuple(b['input_ids'].shape)}, {a.threads} threads: {wall:.3f} s wall "
          f"(profiled self time {total:.3f} s; loss positions {trim}, shared prefix {shared}, "
          f"held weights {facts['held_mb']} MB)")
    print_groups(totals)
    print(f"  of which dequantizing quantized bases (inclusive): {deq:.3f} s  {100 * deq / total:5.1f}%")
    if a.top:
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=a.top))


def _label_dequantize() -> None:
    """Name every dequantize of a quantized base in the profile (tunelab.models.quantization, old or new tree)."""
    from tunelab.models import quantization

    for cls, name in ((quantization.QuantLinear, "dense_for"), (quantization.QuantLinear, "dequantized")):
        fn = getattr(cls, name, None)
        if fn is None or getattr(fn, "_labelled", False):
            continue

        def wrapped(self, *args, _fn=fn, **kw):
            if getattr(self, "_in_label", False):
                return _fn(self, *args, **kw)
            self._in_label = True
            try:
                with torch.profiler.record_function("tunelab::dequantize"):
                    return _fn(self, *args, **kw)
            finally:
                self._in_label = False

        wrapped._labelled = True
        setattr(cls, name, wrapped)


if __name__ == "__main__":
    main()
