"""Weights held in the autocast dtype for as long as nothing updates them.

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
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn


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
