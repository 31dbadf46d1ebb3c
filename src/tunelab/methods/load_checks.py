"""Loading trusts nothing: checks for method directories (``tunelab.load``) and PEFT adapters.

A method file may hold only the tensors the attached method owns (``method_state_dict``): a foreign
tensor (say ``model.embed_tokens.weight``) would silently replace base weights, and ``tunelab merge``
would persist it. Every tensor must match the model's shape, be floating point like its slot, and be
finite. A PEFT config is checked before anything is allocated. Every error names the file.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from tunelab.methods.base import HEAD_NAMES

log = logging.getLogger(__name__)


def read_json_object(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got {type(obj).__name__}")
    return obj


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors file -> tensors on CPU, with an error naming the file when it is unreadable."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except Exception as e:  # safetensors' own errors for truncated / garbled files
        raise ValueError(f"{path}: unreadable safetensors ({type(e).__name__}: {e})") from None


def check_state(state: dict[str, torch.Tensor], owned: dict[str, torch.Tensor], path: Path, method: str) -> None:
    """``state`` must be exactly the ``owned`` tensors, shape for shape, floating, finite."""
    foreign = sorted(k for k in state if k not in owned)
    if foreign:
        raise ValueError(f"{path}: holds {len(foreign)} tensor(s) that method '{method}' does not own, e.g. "
                         f"{foreign[:3]}; a method file may only carry the method's own tensors (refusing to "
                         "overwrite base weights)")
    missing = sorted(k for k in owned if k not in state)
    if missing:
        raise ValueError(f"{path}: lacks {len(missing)} tensor(s) of method '{method}', e.g. {missing[:3]}")
    for k, v in state.items():
        want = owned[k]
        if tuple(v.shape) != tuple(want.shape):
            raise ValueError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(want.shape)}")
        if v.is_floating_point() != want.is_floating_point():
            raise ValueError(f"{path}: tensor {k!r} has dtype {v.dtype}, the model expects {want.dtype}")
    cast = sorted(k for k, v in state.items() if v.is_floating_point() and v.dtype != owned[k].dtype)
    if cast:  # load_state_dict copies into the model's tensors: said, not done silently
        k = cast[0]
        log.warning("%s: %d tensor(s) stored as %s (e.g. %r) are cast to the model's %s on load", path, len(cast),
                    str(state[k].dtype).removeprefix("torch."), k, str(owned[k].dtype).removeprefix("torch."))
    check_tensors(state, str(path))


def check_method_meta(meta: dict, path: Path) -> None:
    if not isinstance(meta.get("name"), str):
        raise ValueError(f"{path}: 'name' must be the method's name (a string), got {meta.get('name')!r}")
    if not isinstance(meta.get("params", {}), dict):
        raise ValueError(f"{path}: 'params' must be a mapping, got {type(meta['params']).__name__}")
    heads = meta.get("heads", [])
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise ValueError(f"{path}: 'heads' must be a list of module names, got {heads!r}")
    labels = meta.get("head_labels", [])
    if not isinstance(labels, list) or not all(isinstance(lab, str) for lab in labels):
        raise ValueError(f"{path}: 'head_labels' must be a list of label names, got {labels!r}")


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# A BERT base without a pooler gets a fresh one with its head; PEFT >= 0.22 adds "pre_classifier" (DistilBERT's
# head layer, absent elsewhere) to every SEQ_CLS adapter's modules_to_save.
HEAD_PARTS = (*HEAD_NAMES, "pooler", "pre_classifier")


def check_peft_config(cfg: dict, path: Path, new_heads=()) -> None:
    """r, lora_alpha, lora_dropout, target_modules, modules_to_save: checked before attaching.
    ``modules_to_save`` may name only task heads (or the heads this model was given fresh)."""
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{path}: r must be a whole number >= 1, got {r!r}")
    alpha = cfg.get("lora_alpha")
    if not _number(alpha) or alpha <= 0:
        raise ValueError(f"{path}: lora_alpha must be a finite number > 0, got {alpha!r}")
    dropout = cfg.get("lora_dropout", 0.0)
    if dropout is not None and (not _number(dropout) or not 0 <= dropout < 1):
        raise ValueError(f"{path}: lora_dropout must lie in [0, 1), got {dropout!r}")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) and targets) and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    ):
        raise ValueError(f"{path}: target_modules must be a non-empty list of module names (or a regex), got {targets!r}")
    heads = cfg.get("modules_to_save") or []
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise ValueError(f"{path}: modules_to_save must be a list of module names, got {heads!r}")
    bad = [h for h in heads if h not in new_heads and not set(h.split(".")) & set(HEAD_PARTS)]
    if bad:
        raise ValueError(f"{path}: modules_to_save may only name task heads ({', '.join(HEAD_PARTS)}), got {bad}")


def check_tensors(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise ValueError naming ``where`` and the first tensor with NaN/inf values."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: tensor {name!r} holds {n} non-finite (NaN/inf) values; refusing to load it")
