"""Divergence guard: a non-finite loss or gradient never becomes an optimizer step or a saved result.

The loop calls ``check_step`` after the backward pass and BEFORE ``optimizer.step()``, so the weights
(and the last checkpoint) are still the last good ones when it raises. ``check_tensors`` refuses a
checkpoint or method file that holds NaN/inf.
"""

from __future__ import annotations

import math

import torch


class Diverged(RuntimeError):
    """Training produced a non-finite loss or gradient norm."""


def check_step(step: int, loss: float, grad_norm, checkpoint: str | None) -> None:
    """Raise ``Diverged`` naming ``step`` when ``loss`` or ``grad_norm`` is not finite."""
    bad = []
    if not math.isfinite(loss):
        bad.append(f"loss is {loss}")
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        bad.append(f"gradient norm is {float(grad_norm)}")
    if not bad:
        return
    kept = (f"the last good checkpoint {checkpoint} is kept (resuming repeats the divergence unless you change "
            "the settings; set train.resume=false to start over)") if checkpoint else "no checkpoint was written"
    raise Diverged(f"training diverged at step {step}: {' and '.join(bad)}; the run stopped before applying "
                   f"that update and wrote no result; {kept}. Try a lower train.lr, train.max_grad_norm=1.0, "
                   "or train.precision=fp32")


def check_tensors(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise ValueError naming ``where`` and the first tensor with NaN/inf values."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: tensor {name!r} holds {n} non-finite (NaN/inf) values; refusing to load it")


def warn_rank(model, params: dict) -> list[str]:
    """Warnings for a low-rank method whose rank ``r`` exceeds a wrapped layer's width (no gain, more cost)."""
    r = params.get("r")
    if not isinstance(r, int):
        return []
    widths = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "base_layer") and hasattr(mod, "in_features") and hasattr(mod, "out_features"):
            widths[name] = min(mod.in_features, mod.out_features)
    narrow = {n: w for n, w in widths.items() if r > w}
    if not narrow:
        return []
    name, w = next(iter(narrow.items()))
    return [f"method rank r={r} is above the width of {len(narrow)} wrapped layer(s) (e.g. {name}: {w}); "
            f"a rank above min(in, out) adds parameters but no capacity"]
