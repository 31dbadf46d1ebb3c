"""Devices and precision: the autocast dtype a run computes in, and weights held in it.

Device and dtype. ``pick_device`` turns ``train.device`` into a device (one GPU per local rank under
torchrun); ``autocast_dtype`` chooses bf16 where the hardware runs it natively (CUDA with bf16, a CPU
with AVX-512 BF16 or AMX) unless ``train.precision`` says otherwise; ``autocast`` enters it.

Weights held in the autocast dtype for as long as nothing updates them (``cast_weights``).

Under autocast every ``F.linear`` casts its fp32 weight to bf16 again on each call: autocast caches
casts only of leaf tensors that require grad, so a frozen base weight (LoRA, adapters, ReFT, every
evaluation and every decoding step) is re-cast in every forward. For a 135M model that is ~800 MB of
memory traffic per forward, which dominates a decoding step at batch 8. ``cast_weights`` swaps each
such weight for its cast copy once; autocast would have produced the very same tensor, so the
results are bit-identical, only the repeated casts go.

Only weights that nothing but a matmul reads are swapped: ``nn.Linear`` and GPT-2's ``Conv1D``
(exact types, so a subclass with its own forward is left alone), not embeddings (their output dtype
would change the residual stream's) and not layers under DoRA (it reads the base weight's norm in
fp32). A weight tied to an embedding is swapped in the linear only: the embedding keeps the fp32
original.

Held weights while training (``held_weights``, configured by ``train.shadow_mb``). Two kinds of frozen weight are re-made in every forward (and backward) of a training step:
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
import resource
import sys
from pathlib import Path

import torch
from torch import nn

from tunelab.runtime import distributed as dist


def _plain() -> tuple[type, ...]:
    # GPT-2's Conv1D, looked up only if transformers is loaded (a model built from it means it is):
    # importing it here would make `tunelab methods` import transformers
    utils = sys.modules.get("transformers.pytorch_utils")
    conv = getattr(utils, "Conv1D", None)
    return (nn.Linear,) if conv is None else (nn.Linear, conv)


def _dora_bases(model: nn.Module) -> set[int]:
    return {id(m.base_layer) for m in model.modules()
            if getattr(m, "lora_magnitude", None) is not None and hasattr(m, "base_layer")}


def _castable(p, dtype: torch.dtype, frozen_only: bool) -> bool:
    return (
        type(p) is nn.Parameter
        and type(p.data) is torch.Tensor  # not NF4, DTensor (FSDP2) or other tensor subclasses
        and p.is_floating_point()
        and p.dtype != dtype
        and not (frozen_only and p.requires_grad)
    )


def _held(model: nn.Module, dtype: torch.dtype, frozen_only: bool):
    """(module, name, parameter) for every weight ``cast_weights`` swaps: one rule for it and the budget."""
    skip, plain = _dora_bases(model), _plain()
    for mod in model.modules():
        if type(mod) in plain and id(mod) not in skip:
            for name in ("weight", "bias"):
                p = mod._parameters.get(name)
                if p is not None and _castable(p, dtype, frozen_only):
                    yield mod, name, p


@contextlib.contextmanager
def cast_weights(model: nn.Module, dtype: torch.dtype | None, *, frozen_only: bool = True):
    """Within the block, matmul-only weights of ``model`` are held in ``dtype`` (the autocast dtype).

    ``frozen_only`` (the default, for training) leaves weights that require grad alone: the optimizer
    updates them. Pass ``False`` for inference under ``torch.no_grad()``. Restored on exit, the same
    Parameter objects as before. ``dtype`` None or fp32 is a no-op (no autocast, nothing to save).
    """
    if dtype is None or dtype == torch.float32:
        yield model
        return
    copies: dict[int, nn.Parameter] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for mod, name, p in list(_held(model, dtype, frozen_only)):
            if id(p) not in copies:
                copies[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            swapped.append((mod, name, p))
            mod._parameters[name] = copies[id(p)]
        yield model
    finally:
        for mod, name, p in reversed(swapped):
            mod._parameters[name] = p


def saved_bytes(model: nn.Module, dtype: torch.dtype, *, frozen_only: bool = True) -> int:
    """Extra memory ``cast_weights`` holds while active (its copies), for a memory budget."""
    unique = {id(p): p for _, _, p in _held(model, dtype, frozen_only)}
    return sum(p.numel() for p in unique.values()) * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------- held weights while training
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
    p_bytes = saved_bytes(model, dtype)
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
        with cast_weights(model, dtype) if p["plain"] else contextlib.nullcontext():
            yield facts
    finally:
        for m in p["quantized"]:
            m.hold(None)


# ---------------------------------------------------------------- device and dtype
def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device=cuda but CUDA is not available here (torch {torch.__version__}); "
                             "use train.device=auto or train.device=cpu")
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run natively (and about 4x faster than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
