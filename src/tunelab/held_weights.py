"""Frozen weights kept ready in the autocast dtype while training, under a memory budget.

Two kinds of frozen weight are re-made in every forward (and backward) of a training step:
- a plain frozen linear's fp32 weight is cast to bf16 by autocast on every call (autocast caches
  casts only of weights that train): ``tunelab.runtime.precision.cast_weights`` holds the cast copies instead;
- a quantized base (QLoRA, LoftQ: ``quant.QuantLinear``) is dequantized in every forward and again in
  every backward (with the shared-prompt-prefix lever: four times per step): ``QuantLinear.hold``
  keeps the dequantized copy instead.
Both copies are exactly what the per-call work produces, so the loss and the gradients are
bit-identical; only the repeated work goes. They cost memory: 2 bytes per weight in bf16, which for
a quantized base is 4x its NF4 storage. Holding them for the whole run costs the same peak as
caching them for one optimizer step (the copies of a step are all alive at the end of its
forward, where activation memory peaks too), so they are held for the whole run.

The budget (``train.shadow_mb``): a number of MB (0: nothing held), or null for the automatic rule:
hold everything when it all fits in ``AUTO_MB`` and in a quarter of the memory free at the start;
otherwise hold nothing. So a small model gets the speed, and a large QLoRA model keeps the memory it
was quantized to save: a ~1B model's bf16 copies (~2 GB) never appear unless the budget asks for
them. An explicit budget is spent on quantized bases first (a dequantize costs ~10x a cast), in
module order, then on the plain linears (all or none).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from tunelab.runtime import precision

AUTO_MB = 512


def free_bytes(device: torch.device) -> int | None:
    """Memory free on ``device`` now (CUDA: free device memory, CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except RuntimeError:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def fits_free(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` of held copies fit in a quarter of the memory free on ``device`` now
    (unknown free memory: yes). The one rule for training's held weights and evaluation's copies."""
    free = free_bytes(device)
    return free is None or nbytes <= free // 4


def _holders(model: nn.Module) -> list[nn.Module]:
    """Frozen quantized bases that can hold a dense copy (``hold``), each once."""
    return [m for m in model.modules() if callable(getattr(m, "hold", None)) and callable(getattr(m, "dense_for", None))]


def _dense_bytes(mod: nn.Module, dtype: torch.dtype) -> int:
    return mod.out_features * mod.in_features * torch.empty((), dtype=dtype).element_size()


def plan(model: nn.Module, dtype: torch.dtype | None, budget_mb: float | None, device: torch.device) -> dict:
    """What ``held_weights`` would hold: {"quantized": [modules], "plain": bool, "bytes": int, "rule": str}."""
    none = {"quantized": [], "plain": False, "bytes": 0, "rule": "off"}
    if dtype is None or dtype == torch.float32 or budget_mb == 0:
        return none | {"rule": "off" if budget_mb == 0 else "no autocast"}
    holders = _holders(model)
    q_bytes = [_dense_bytes(m, dtype) for m in holders]
    p_bytes = precision.saved_bytes(model, dtype)
    if budget_mb is None:  # automatic: everything or nothing
        total = sum(q_bytes) + p_bytes
        if total and total <= AUTO_MB * 2**20 and fits_free(total, device):
            return {"quantized": holders, "plain": p_bytes > 0, "bytes": total, "rule": "auto"}
        return none | {"rule": f"auto: {total / 2**20:.0f} MB > {AUTO_MB} MB or a quarter of free memory"}
    left, chosen = int(budget_mb * 2**20), []
    for m, b in zip(holders, q_bytes, strict=True):
        if b <= left:
            chosen.append(m)
            left -= b
    plain = 0 < p_bytes <= left
    used = int(budget_mb * 2**20) - left + (p_bytes if plain else 0)
    return {"quantized": chosen, "plain": plain, "bytes": used, "rule": f"budget {budget_mb:g} MB"}


@contextlib.contextmanager
def held_weights(model: nn.Module, dtype: torch.dtype | None, budget_mb: float | None, device: torch.device):
    """Within the block, frozen weights are kept in ``dtype`` as ``plan`` chooses; yields the plan's
    facts ({"held_mb", "held_quantized", "held_plain", "rule"}). Released on exit."""
    p = plan(model, dtype, budget_mb, device)
    facts = {"held_mb": round(p["bytes"] / 2**20, 1), "held_quantized": len(p["quantized"]),
             "held_plain": p["plain"], "rule": p["rule"]}
    try:
        for m in p["quantized"]:
            m.hold(dtype)
        with precision.cast_weights(model, dtype) if p["plain"] else contextlib.nullcontext():
            yield facts
    finally:
        for m in p["quantized"]:
            m.hold(None)
