"""The causal LM loss, computed only where it is needed, with the same value and gradients.

The training loop and the text families' perplexity call ``loss``; each lever is checked on the
first batch and used only where it is exact.

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

Shared prompt prefix (training). When every row of a batch starts with the same tokens (a prompt
template) and no loss position lies among them, ``loss`` runs that prefix once (batch 1, KV
cache), repeats its keys and values per row, and runs only the rest of each row against them. The
loss and the gradients are the same (the repeat sums the rows' gradients into the one prefix);
on SST-2 with SmolLM2's chat template 41 of ~60 tokens per row are shared. Used where it is exact:
hook-free models (LoRA family, full, random masking), no dropout (checked by running the first
batch twice under different seeds), no gradient checkpointing, a 2D attention mask, one process
(DDP expects one forward per backward); ``supports_shared_prefix`` checks it on the first batch.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.models import chunked_loss, prefix_cache

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


def first_rows(batch: dict, rows: int = 2) -> dict:
    """The first ``rows`` rows of every per-row tensor of ``batch`` (what the probes below run on)."""
    n = batch["input_ids"].shape[0]
    return {k: (v[:rows] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v) for k, v in batch.items()}


def loss_levers(model: nn.Module, batch: dict, amp: contextlib.AbstractContextManager | None = None,
                distributed: bool = False) -> dict:
    """``fast.loss``'s keyword levers for ``model``, each probed once on ``batch``."""
    trim = supports_loss_inputs(model, batch, amp)
    return {"trim": trim, "prefix": trim and supports_shared_prefix(model, batch, distributed=distributed),
            "chunked": trim and supports_chunked_loss(model, batch, amp, distributed=distributed)}


@torch.no_grad()
def supports_loss_inputs(model: nn.Module, batch: dict, amp: contextlib.AbstractContextManager | None = None,
                         rows: int = 2) -> bool:
    """Whether ``model(**loss_inputs(batch))`` gives the full forward's loss and logits at the kept
    positions (checked on the first ``rows`` rows, in eval mode so dropout is off)."""
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2 or labels.dtype.is_floating_point or not prefix_cache.takes_logits_to_keep(model):
        return False
    small = first_rows(batch, rows)
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


# ---------------------------------------------------------------- checks
def checkpointing(model: nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is on (transformers 5 renamed the property)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


# ---------------------------------------------------------------- shared prompt prefix (training)
def batch_prefix(batch: dict, keep: torch.Tensor | None = None) -> int:
    """Columns every row of ``batch`` shares from the start (real tokens, equal ids), cut before the
    first position whose logits are kept."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or "position_ids" in batch or ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(0) & (mask != 0).all(0)
    cut = int(same.long().cumprod(0).sum())
    if keep is not None and keep.any():
        cut = min(cut, int(keep.any(0).nonzero()[0]))
    return cut


def _head_loss(model: nn.Module, inputs: dict, chunked: bool) -> torch.Tensor:
    """The loss of ``loss_inputs``-style inputs: the model's own, or over the vocabulary in chunks
    (``tunelab.models.chunked_loss``) when ``chunked`` and the kept positions fill more than one chunk."""
    inner = getattr(model, "module", model)
    if chunked and inputs["labels"].numel() > chunked_loss.chunk_rows(inner):
        return chunked_loss.chunked_loss(model, inputs)
    return model(**inputs).loss


def _prefix_loss(model: nn.Module, inputs: dict, cut: int, chunked: bool = False) -> torch.Tensor:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache_key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    # No logits for the prefix (no position of it carries loss). logits_to_keep=1 would still run
    # the head on one row, and with grad on, torch's matmul turns that (1, 1, d) x (d, V) product
    # into a bmm over a contiguous copy of the transposed head weight: 56 MB per step for SmolLM2.
    none = torch.zeros(1, cut, dtype=torch.bool, device=ids.device)
    pre = model(input_ids=ids[:1, :cut], attention_mask=mask[:1, :cut], use_cache=True, logits_to_keep=none)
    cache = prefix_cache.cache_of(pre)
    cache.batch_repeat_interleave(ids.shape[0])  # differentiable: the rows' gradients sum into the prefix
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "prompt_mask", "logits_to_keep")}
    tail = {"input_ids": ids[:, cut:], "logits_to_keep": inputs["logits_to_keep"][:, cut:], "use_cache": True,
            cache_key: cache, **rest}
    return _head_loss(model, tail, chunked)


def loss(model: nn.Module, batch: dict, trim: bool, prefix: bool = False, chunked: bool = False) -> torch.Tensor:
    """The batch's loss as ``model(**batch).loss``, through the levers that ``trim`` (loss positions
    only), ``prefix`` (a shared prefix once) and ``chunked`` (the vocabulary loss in chunks) allow."""
    if not trim:
        return model(**batch).loss
    inputs = loss_inputs(batch)
    cut = batch_prefix(batch, inputs["logits_to_keep"]) if prefix else 0
    if cut < prefix_cache.MIN_PREFIX:
        return _head_loss(model, inputs, chunked)
    return _prefix_loss(model, inputs, cut, chunked)


def _sharded(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor)


@torch.no_grad()
def supports_chunked_loss(model: nn.Module, batch: dict, amp: contextlib.AbstractContextManager | None = None,
                          distributed: bool = False) -> bool:
    """Whether the chunked vocabulary loss (``tunelab.models.chunked_loss``) gives the model's own loss on the
    first rows of ``batch`` (in three chunks there, so the chunking itself is exercised).
    Not across processes: DDP/FSDP reduce gradients in hooks that the chunks' inner backward
    would run outside of."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if distributed or head is None or any(_sharded(p) for p in head.parameters()):
        return False  # FSDP2 may reshard the head after the forward, before the chunks call it
    small = first_rows(batch)
    inputs = loss_inputs(small)
    if inputs["labels"].numel() < 2:
        return False
    was_training = model.training
    model.eval()
    try:
        with amp or contextlib.nullcontext():
            own = model(**inputs).loss
            chunked = chunked_loss.chunked_loss(model, inputs, rows=max(1, inputs["labels"].numel() // 3))
    except (TypeError, ValueError, IndexError, RuntimeError, AttributeError):
        return False
    finally:
        model.train(was_training)
    return bool(torch.isclose(own.float(), chunked.float(), rtol=1e-3, atol=1e-5))


def _deterministic(model: nn.Module, batch: dict) -> bool:
    """Whether a training-mode forward gives the same loss under two seeds (no active dropout)."""
    losses = []
    with torch.random.fork_rng(devices=[]):
        for seed in (1, 2):
            torch.manual_seed(seed)
            losses.append(model(**batch).loss)
    return bool(torch.equal(losses[0], losses[1]))


@torch.no_grad()
def supports_shared_prefix(model: nn.Module, batch: dict, distributed: bool = False) -> bool:
    """Whether ``loss(model, batch, True, prefix=True)`` is exact for this model: hook-free, no
    dropout, no gradient checkpointing, one process, and the same loss on the first rows of ``batch``
    (which must share a prefix) with and without the prefix path."""
    if distributed or checkpointing(model) or not prefix_cache.hook_free(model):
        return False
    small = first_rows(batch)
    inputs = loss_inputs(small)
    cut = batch_prefix(small, inputs["logits_to_keep"])
    if cut < prefix_cache.MIN_PREFIX:
        return False
    # Compared in fp32 (autocast off): in bf16 the two paths round differently (per-token losses
    # move by ~2%), which would hide a wrong position as well as flag a right one.
    device = inputs["input_ids"].device.type
    fp32 = all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())
    with torch.autocast(device, enabled=False):
        try:
            if model.training and not _deterministic(model, small):
                return False
            was_training = model.training
            model.eval()
            try:
                full = model(**inputs).loss
                shared = _prefix_loss(model, inputs, cut)
            finally:
                model.train(was_training)
        except (TypeError, ValueError, IndexError, RuntimeError, AttributeError):
            return False
    tol = 1e-4 if fp32 else 5e-2
    return bool(torch.isclose(full.float(), shared.float(), rtol=tol, atol=tol))
