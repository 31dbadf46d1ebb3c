"""Divergence guard: a non-finite loss or gradient never becomes an optimizer step or a saved result.

The loop calls ``check_step`` after the backward pass and BEFORE ``optimizer.step()``, so the weights
(and the last checkpoint) are still the last good ones when it raises. A checkpoint or method file
that holds NaN/inf is refused on loading (``tunelab.methods.load_checks.check_tensors``).
"""

from __future__ import annotations

import math


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


