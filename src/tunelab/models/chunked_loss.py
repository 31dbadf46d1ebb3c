"""The causal LM loss over the vocabulary in row chunks, so the logits never exist all at once.

With the LM head only at loss positions (``tunelab.models.lm_loss``), a chat or text batch still has most
positions carrying loss: 8 rows x 512 tokens of SmolLM2 (49k vocabulary) make 4,096 x 49,152
logits, held in bf16, upcast to fp32 for the loss, kept for its backward and joined by their
gradient: ~2.4 GB, more than the model, its adapters and every activation together (Llama 3's 128k
vocabulary makes it 6 GB). Here the head's input rows are taken as the model's forward hands them
to the head (a pre-hook lets the head run on zero rows instead), and the loss is computed ``rows``
positions at a time: each chunk's logits, its fp32 cross-entropy and, at once, its gradients with
respect to the head's input and the head's trainable parameters. Only those gradients outlive the
chunk, so the peak is one chunk's logits (``CHUNK_BYTES``) instead of all of them.

Each chunk runs the same ops as the model's own loss (the head module itself, autocast as around
it, Gemma's logit soft-capping, ``.float()``, ``F.cross_entropy``); per position the losses and
gradients are those of the whole-batch path up to the blocking of the bf16 matmul (CPU kernels
round a row's product a little differently for a different number of rows; ~1e-7 relative in the
tests). ``fast.supports_chunked_loss`` compares it with the model's own loss on the first batch,
so a head that post-processes its logits some other way keeps the model's path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk (SmolLM2: 341 positions)


def chunk_rows(model: nn.Module) -> int:
    """Positions per chunk for ``model``'s vocabulary."""
    model = getattr(model, "module", model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    return max(1, CHUNK_BYTES // (4 * vocab))


def _logits_fn(model: nn.Module, head: nn.Module):
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def fn(h: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if cap:  # as Gemma 2/3's forward does after its head
            logits = torch.tanh(logits / cap) * cap
        return logits

    return fn


class _ChunkedCE(torch.autograd.Function):
    """Mean cross-entropy of ``fn(h)`` against ``targets``; gradients computed chunk by chunk in
    the forward (nothing but them is kept) and scaled by the incoming gradient in the backward."""

    @staticmethod
    def forward(ctx, h, targets, fn, rows, grad, *params):
        n = targets.numel()
        want_h = grad and h.requires_grad
        wrt_params = [p for p in params if grad and p.requires_grad]
        grad_h = torch.empty_like(h) if want_h else None
        grads = [torch.zeros_like(p) for p in wrt_params]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, rows):
            with torch.set_grad_enabled(grad):
                hc = h[s:s + rows].detach().requires_grad_(want_h)
                part = F.cross_entropy(fn(hc).float(), targets[s:s + rows], reduction="sum") / n
            wrt = ([hc] if want_h else []) + wrt_params
            if wrt and part.requires_grad:
                got = torch.autograd.grad(part, wrt)
                if want_h:
                    grad_h[s:s + rows] = got[0]
                    got = got[1:]
                for acc, g in zip(grads, got, strict=True):
                    acc += g
            total += part.detach()
        ctx.want_h, ctx.mask = want_h, [grad and p.requires_grad for p in params]
        ctx.save_for_backward(*([grad_h] if want_h else []), *grads)
        return total

    @staticmethod
    def backward(ctx, go):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) * go if ctx.want_h else None
        per_param = [saved.pop(0) * go if m else None for m in ctx.mask]
        return (grad_h, None, None, None, None, *per_param)


def _head_inputs(model: nn.Module, inputs: dict) -> tuple[nn.Module, object, torch.Tensor]:
    """(the head, its logits function, the rows the model's forward hands it) for
    ``fast.loss_inputs``-style inputs; the head itself runs on no row."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    targets = inputs["labels"]
    seen: list[torch.Tensor] = []

    def grab(mod, args):
        seen.append(args[0])
        return (args[0][:0], *args[1:])  # the head runs on no row; the chunks below do its work

    handle = head.register_forward_pre_hook(grab)
    try:
        model(**{k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")})
    finally:
        handle.remove()
    if len(seen) != 1 or seen[0].shape[:-1] != targets.shape:
        raise ValueError(f"the head saw {[tuple(h.shape) for h in seen]} for {targets.numel()} targets")
    return head, _logits_fn(inner, head), seen[0]


def chunked_loss(model: nn.Module, inputs: dict, rows: int | None = None) -> torch.Tensor:
    """``model(**inputs).loss`` for inputs from ``fast.loss_inputs`` (``logits_to_keep`` mask and
    the kept positions' targets as ``labels``), the head applied ``rows`` positions at a time."""
    head, fn, h = _head_inputs(model, inputs)
    # grad mode is off inside a Function's forward: whether the caller wants gradients is read here
    return _ChunkedCE.apply(h, inputs["labels"], fn, rows or chunk_rows(model), torch.is_grad_enabled(),
                            *head.parameters())


@torch.no_grad()
def token_stats(model: nn.Module, inputs: dict, rows: int | None = None) -> tuple[float, int, int]:
    """(summed NLL, positions, positions whose argmax is the target) over the kept positions of
    ``fast.loss_inputs``-style inputs, a chunk of logits at a time (perplexity and token accuracy)."""
    _, fn, h = _head_inputs(model, inputs)
    targets = inputs["labels"]
    rows = rows or chunk_rows(model)
    total, right = 0.0, 0
    for s in range(0, targets.numel(), rows):
        logits, t = fn(h[s:s + rows]).float(), targets[s:s + rows]
        total += float(F.cross_entropy(logits, t, reduction="sum"))
        right += int((logits.argmax(-1) == t).sum())
    return total, targets.numel(), right
