"""The public Python API: attach a method, count, save, load and merge.

    model = tunelab.attach(model, "lora", r=8, alpha=16)
    tunelab.save(model, "out/")            # method.json + method.safetensors
    model = tunelab.load(fresh_base, "out/")
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from tunelab.methods import method_config
from tunelab.methods.base import (
    HEAD_NAMES,
    METHODS,
    count_parameters,
    install_context,
    method_state_dict,
    switched_off,
)
from tunelab.runtime.atomic_files import atomic_dir

METHOD_JSON = "method.json"
METHOD_WEIGHTS = "method.safetensors"


def attach(model: nn.Module, method_name: str, **params) -> nn.Module:
    """Inject ``method_name`` into ``model``, freeze what it does not train, return the model."""
    if getattr(model, "tunelab_method", None):
        raise ValueError(f"a method ({model.tunelab_method['name']}) is already attached to this model")
    method = METHODS.get(method_name)
    cfg = method_config(method_name, params)
    install_context(model)
    model = method.attach(model, cfg)
    # A head created for this run (tunelab.models.loading marks it) trains with any method.
    for name in getattr(model, "tunelab_new_head", []):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.tunelab_method = {"name": method_name, "params": cfg.model_dump(mode="json")}
    return model


def trainable_parameters(model: nn.Module) -> dict[str, float]:
    """``{"trainable": int, "total": int, "percent": float}``."""
    return count_parameters(model)


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write the method's tensors (safetensors) and its name + params (JSON), atomically. The JSON also
    names the heads created for the run and, for a classification / token head, its labels in order
    (``head_labels``: what rebuilds the head without the data that gave them)."""
    info = getattr(model, "tunelab_method", None)
    if not info:
        raise ValueError("no tunelab method is attached to this model; call tunelab.attach first")
    directory = Path(directory)
    state = {k: v.contiguous() for k, v in method_state_dict(model).items()}
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / METHOD_WEIGHTS))
        meta = dict(info, heads=list(getattr(model, "tunelab_new_head", [])))
        if getattr(model, "tunelab_head_labels", None):  # set by tunelab.models.loading
            meta["head_labels"] = list(model.tunelab_head_labels)
        (tmp / METHOD_JSON).write_text(json.dumps(meta, indent=2))
    return directory


def read_method(directory: str | Path) -> dict:
    from tunelab.methods.load_checks import check_method_meta, read_json_object

    path = Path(directory) / METHOD_JSON
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (is this a tunelab method directory?)")
    meta = read_json_object(path, "a tunelab method description")
    check_method_meta(meta, path)
    return meta


def load(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attach the saved method to ``model`` (a fresh base) and load its tensors."""
    from tunelab.methods.load_checks import check_state, load_tensors

    directory = Path(directory)
    meta = read_method(directory)
    weights = directory / METHOD_WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: not found (is this a tunelab method directory?)")
    if not getattr(model, "tunelab_method", None):
        if meta["name"] not in METHODS.names():
            raise ValueError(f"{directory / METHOD_JSON}: unknown method {meta['name']!r}; known: {', '.join(METHODS.names())}")
        try:
            model = attach(model, meta["name"], **meta.get("params", {}))
        except ValueError as e:
            raise ValueError(f"{directory / METHOD_JSON}: {e}") from None
    elif model.tunelab_method["name"] != meta["name"]:
        raise ValueError(f"{directory}: holds method '{meta['name']}' but the model has '{model.tunelab_method['name']}'")
    state = load_tensors(weights)
    upgrade = getattr(METHODS.get(meta["name"]), "upgrade_state", None)
    state = upgrade(model, state, weights) if upgrade else state  # a method's older format, converted
    # Only what the method owns, shape for shape, finite: a foreign tensor (embed_tokens) is refused.
    check_state(state, method_state_dict(model), weights, meta["name"])
    model.load_state_dict(state, strict=False)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the attached method into the base weights and return a plain model."""
    info = getattr(model, "tunelab_method", None)
    if not info:
        raise ValueError("no tunelab method is attached to this model")
    method = METHODS.get(info["name"])
    if not hasattr(method, "merge"):
        reason = getattr(method, "merge_refusal", "this method has no merge")
        raise ValueError(f"cannot merge '{info['name']}': {reason}")
    model = method.merge(model)
    model.tunelab_method = None
    return model


def disabled(model: nn.Module):
    """``with tunelab.disabled(model):`` the attached method is switched off and the model computes
    exactly as its base (logits equal the base model's); on leaving, the method is back. Full
    fine-tuning has no off switch (it changes the weights themselves): a clear error."""
    return switched_off(model)


def unmerge(model: nn.Module) -> nn.Module:
    info = getattr(model, "tunelab_method", None) or {}
    method = METHODS.get(info.get("name", "")) if info else None
    if method is None or not hasattr(method, "unmerge"):
        raise ValueError("unmerge needs an attached method that supports it")
    return method.unmerge(model)


__all__ = ["attach", "trainable_parameters", "save", "load", "merge", "unmerge", "disabled", "HEAD_NAMES"]
