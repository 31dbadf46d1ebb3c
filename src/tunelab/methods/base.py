"""The method interface and the helpers every method shares.

A method is an object with a ``name``, a pydantic ``Config`` holding its hyperparameters, and
``attach(model, cfg) -> model`` that injects its modules and freezes everything else. It may also
define ``merge(model) -> model`` (fold the update into the base weights) and ``unmerge(model)``;
a method without ``merge`` sets ``merge_refusal`` to a sentence saying why it cannot be merged.

What gets saved is generic (see ``method_state_dict``): every parameter that trains, plus the
persistent buffers of modules that set ``tunelab_state = True`` (e.g. random masking's indices).
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from tunelab.models.arch import HEADS, conv1d_class, is_transposed, linear_dims, replace_module  # noqa: F401  (methods import them from here)
from tunelab.models.context import CONTEXT_KEYS, context, install_context  # noqa: F401
from tunelab.registry import Registry


class MethodConfig(BaseModel):
    """Base for method configs: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class Method(Protocol):
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]

    def attach(self, model: nn.Module, cfg: Any) -> nn.Module: ...


METHODS: Registry[Method] = Registry("method")

# Module names of the output heads that must never be adapted by "all-linear" and that train
# alongside any method when the head is new (set by tunelab.models.loading when it creates one).
HEAD_NAMES = HEADS  # kept here for the public API; the list lives in tunelab.models.arch


def linear_types() -> tuple[type, ...]:
    """What counts as a linear layer: nn.Linear, GPT-2's Conv1D and tunelab's quantized linear."""
    from tunelab.models.quantization import BnbLinear4, QuantLinear

    return (nn.Linear, conv1d_class(), QuantLinear, BnbLinear4)


def dense_weight(mod: nn.Module) -> torch.Tensor:
    """The weight as a (d_out x d_in) view, whatever the storage layout (no copy)."""
    w = mod.weight.detach()
    return w.T if is_transposed(mod) else w


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def find_linears(
    model: nn.Module, target_modules: list[str] | str, types=None
) -> list[tuple[str, nn.Module]]:
    """Modules of ``types`` (default: ``linear_types()``) whose qualified name ends with one of
    ``target_modules``.

    ``"all-linear"`` selects every linear except the output heads. An empty selection is an error
    that lists the linear names the model has, so a typo is easy to fix.
    """
    types = types or linear_types()
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, types):
            continue
        if target_modules == "all-linear":
            if any(part in HEAD_NAMES for part in name.split(".")):
                continue
            found.append((name, mod))
        elif any(name == t or name.endswith("." + t) for t in target_modules):
            found.append((name, mod))
    if not found:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, types)})
        raise ValueError(f"target_modules={target_modules!r} matched no module; the model's linears are named {have}")
    return found


def method_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a method owns: trainable parameters + persistent buffers of tunelab modules."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for mname, mod in model.named_modules():
        if getattr(mod, "tunelab_state", False):
            for bname, buf in mod.named_buffers(recurse=False):
                if bname not in mod._non_persistent_buffers_set:
                    state[f"{mname}.{bname}" if mname else bname] = buf.detach()
    return state


def count_parameters(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameter counts (shared tensors counted once, NF4 bases by element)."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    # frozen weights stored outside parameters (tunelab.models.quantization's packed 2-bit bases) still count
    total += sum(getattr(m, "tunelab_frozen_numel", 0) for m in model.modules())
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


# ---- the off switch: tunelab.disabled(model)
# A method's injected modules (LoRA wrappers, interventions, adapters, sparse deltas, prompt embeddings)
# carry ``tunelab_active``; with it False they compute exactly as the base model. Preference tuning
# uses this as its reference model, so PEFT methods need no second copy of the weights.
def switch_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "tunelab_active")]


def has_switch(model: nn.Module) -> bool:
    return bool(switch_modules(model))


@contextlib.contextmanager
def switched_off(model: nn.Module):
    """Inside, every tunelab module of ``model`` is off (the base model's outputs); restored after."""
    mods = switch_modules(model)
    if not mods:
        name = (getattr(model, "tunelab_method", None) or {}).get("name")
        raise ValueError(f"method '{name}' has no off switch: it changes the base weights themselves"
                         if name else "no tunelab method is attached to this model")
    if any(getattr(m, "merged", False) for m in mods):
        raise ValueError("the method is merged into the weights; unmerge it before switching it off")
    before = [m.tunelab_active for m in mods]
    for m in mods:
        m.tunelab_active = False
    try:
        yield model
    finally:
        for m, was in zip(mods, before, strict=True):
            m.tunelab_active = was
