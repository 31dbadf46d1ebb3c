"""Speed levers for the training loop that leave the loss and the gradients unchanged.

Loss positions only. A causal LM's loss reads the logits only where the next token is a target, yet
the model projects every position onto the vocabulary (SmolLM2: 49k x 576, a fifth of the forward's
FLOPs) and the loss upcasts all of them to fp32 (8 x 128 x 49k floats = 200 MB, plus its gradient).
transformers 5 takes a boolean ``logits_to_keep`` of shape (B, L) and projects only the True rows,
and its causal loss takes the targets already shifted (``shift_labels``). ``loss_inputs`` builds
both from the batch's labels, so only the N positions that carry loss reach the head:

    keep[b, t] = labels[b, t + 1] != -100        targets = labels[:, 1:][keep[:, :-1]]   (N,)

The mean cross-entropy is over the same N targets as before, so the loss is the same number; it
works with right or left padding and with packed rows (each row keeps its own positions).
A model that cannot take it (an older forward, or a method whose hooks change the sequence length,
such as prompt tuning) is caught once by ``supports_loss_inputs``, which compares the kept logits
with the full ones on two rows of the first batch; the loop then calls the model as before.

Frozen weights in the autocast dtype. Under bf16 autocast every frozen ``nn.Linear`` weight is
re-cast from fp32 on every forward (autocast caches casts only of leaves that require grad), and
kept in both precisions meanwhile. ``lower_frozen_linears`` stores those weights in bf16 once:
autocast would have fed the matmul exactly these bf16 values, so results are unchanged, while
memory and the per-step casts go. Weights that train (fp32 masters), embeddings, norms and weights
shared with an embedding (tied LM heads) are left alone.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def loss_inputs(batch: dict) -> dict:
    """The batch with ``logits_to_keep`` (B, L) bool and the shifted targets (N,) as ``shift_labels``.

    ``labels`` is set to the same targets: the model computes a loss only when labels is not None,
    and with ``shift_labels`` given it does not shift again."""
    labels = batch["labels"]
    nxt = labels[:, 1:]
    keep = F.pad(nxt != IGNORE, (0, 1), value=False)
    targets = nxt[keep[:, :-1]]
    return {**batch, "logits_to_keep": keep, "labels": targets, "shift_labels": targets}


def _takes_logits_to_keep(model: nn.Module) -> bool:
    fwd = getattr(model, "forward", None)
    try:
        return fwd is not None and "logits_to_keep" in inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def supports_loss_inputs(model: nn.Module, batch: dict, amp: contextlib.AbstractContextManager | None = None,
                         rows: int = 2) -> bool:
    """Whether ``model(**loss_inputs(batch))`` gives the full forward's loss and logits at the kept
    positions (checked on the first ``rows`` rows, in eval mode so dropout is off)."""
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2 or labels.dtype.is_floating_point or not _takes_logits_to_keep(model):
        return False
    small = {k: (v[:rows] if torch.is_tensor(v) and v.dim() and v.shape[0] == labels.shape[0] else v)
             for k, v in batch.items()}
    trimmed_in = loss_inputs(small)
    if trimmed_in["labels"].numel() == 0:
        return False
    was_training = model.training
    model.eval()
    try:
        with amp or contextlib.nullcontext():
            full = model(**small)
            trimmed = model(**trimmed_in)
    except (TypeError, ValueError, IndexError, RuntimeError):
        return False
    finally:
        model.train(was_training)
    want = full.logits[trimmed_in["logits_to_keep"]].float()
    got = getattr(trimmed, "logits", None)
    if got is None or got.shape != want.shape or trimmed.loss is None:
        return False
    tol = 1e-2 * float(want.abs().max()) + 1e-4  # bf16 rounding of a product, not a different position
    return bool((got.float() - want).abs().max() <= tol and torch.isclose(trimmed.loss.float(), full.loss.float(), rtol=1e-2))


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def lower_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen ``nn.Linear`` weight (and bias) in ``dtype``; returns how many linears.

    Only valid while the model runs under autocast to ``dtype`` (the training loop's and the
    evaluation's case): there the matmul sees the same ``dtype`` values either way."""
    tied = _embedding_weights(model)
    n = 0
    for mod in model.modules():
        if type(mod) is not nn.Linear or mod.weight.requires_grad or id(mod.weight) in tied:
            continue
        if mod.bias is not None and mod.bias.requires_grad:
            continue
        if mod.weight.dtype == dtype or not mod.weight.dtype.is_floating_point:
            continue
        mod.weight.data = mod.weight.data.to(dtype)
        if mod.bias is not None:
            mod.bias.data = mod.bias.data.to(dtype)
        n += 1
    return n
