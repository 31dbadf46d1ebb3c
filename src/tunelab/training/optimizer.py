"""The optimizer and the learning-rate schedule: fused AdamW, warmup + linear/cosine decay, and each
method's recommended learning rate (used when ``train.lr`` is not set)."""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.methods.base import METHODS


def adamw(params: list, **kwargs) -> torch.optim.AdamW:
    """AdamW (over tensors, or parameter groups: dicts with "params") with torch's fused kernel where it runs (plain CPU/CUDA tensors), else ``foreach``.

    On CPU the fused step is ~7x faster than foreach for a 135M-parameter model (0.07 s against
    0.45 s, one thread) and allocates no temporaries the size of the state."""
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    plain = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in flat)
    if plain:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(params, foreach=True, **kwargs)


DEFAULT_LR = 1e-4


def lr_lambda(schedule: str, warmup_steps: int, total: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1 - progress)

    return f


def default_lr(method_name: str, params: dict | None = None) -> float:
    """The method's own learning rate (``lr_for(cfg)`` when it depends on the settings, e.g. random
    masking's density, else its ``recommended_lr``), or DEFAULT_LR."""
    method = METHODS.get(method_name)
    if hasattr(method, "lr_for"):
        try:
            return method.lr_for(method.Config(**(params or {})))
        except ValueError:  # settings that must be given (method 'peft': peft_type) are not
            pass
    return getattr(method, "recommended_lr", None) or DEFAULT_LR


def build(method_name: str, method_params: dict | None, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters. A method may split them into parameter groups of its
    own (its ``param_groups(model, cfg, lr, weight_decay) -> list[dict] | None``, e.g. LoRA+'s faster B);
    the groups must cover exactly the trainable parameters."""
    method = METHODS.get(method_name)
    params = [p for p in model.parameters() if p.requires_grad]
    hook = getattr(method, "param_groups", None)
    groups = hook(model, method.Config(**(method_params or {})), lr, weight_decay) if hook else None
    if groups is None:
        return adamw(params, lr=lr, weight_decay=weight_decay)
    grouped = [id(p) for g in groups for p in g["params"]]
    if sorted(grouped) != sorted(id(p) for p in params):
        raise ValueError(f"method '{method_name}': its optimizer parameter groups do not hold exactly the trainable parameters")
    return adamw(groups, lr=lr, weight_decay=weight_decay)
