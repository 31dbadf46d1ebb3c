"""A prompt prefix every row shares, run once: its KV cache is repeated for the rows' own tokens.

Templated prompts start with the same tokens (SmolLM2's chat system prompt + the SST-2 instruction:
41 of ~70 tokens). ``PrefixForward`` runs that prefix once, keeps its KV cache, and feeds each batch
only the rows' remaining tokens against the cache repeated per row (left-padded; positions continue
after the prefix). It is used only for models without forward hooks (besides the context hook),
whose outputs at a position depend on the tokens up to it and nothing else; a method with hooks
(ReFT, prompt tuning, adapters) runs the usual way. Scoring, decoding and the training loss
(``tunelab.models.lm_loss``) share it.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def takes_logits_to_keep(model: nn.Module) -> bool:
    fwd = getattr(model, "forward", None)
    try:
        return fwd is not None and "logits_to_keep" in inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False


MIN_PREFIX = 8


def hook_free(model: nn.Module) -> bool:
    """No forward hooks anywhere except the context pre-hook on the top model."""
    for mod in model.modules():
        hooks = list(mod._forward_hooks.values()) + list(mod._forward_pre_hooks.values())
        if mod is model:
            hooks = [h for h in hooks if getattr(h, "__name__", "") != "_pop_context"]
        if hooks:
            return False
    return True


def shared_prefix(rows: list[list[int]], keep_last: int = 1) -> int:
    """Length of the prefix every row shares, leaving each row its last ``keep_last`` tokens."""
    if len(rows) < 2:
        return 0
    n = max(min(len(r) for r in rows) - keep_last, 0)
    first = rows[0]
    for i in range(n):
        t = first[i]
        if any(r[i] != t for r in rows):
            return i
    return n


class PrefixForward:
    """Forward batches of rows that start with ``prefix`` while computing the prefix once."""

    def __init__(self, model: nn.Module, prefix: list[int], device):
        self.model, self.p, self.device = model, len(prefix), device
        params = inspect.signature(model.forward).parameters
        self.cache_key = "cache" if "cache" in params else "past_key_values"
        ids = torch.tensor([prefix], device=device)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        self.cache = getattr(out, self.cache_key, None) or getattr(out, "past_key_values", None)
        if self.cache is None:
            raise ValueError("the model returned no KV cache")

    def __call__(self, suffixes: list[list[int]], pad_id: int, logits_to_keep: int) -> torch.Tensor:
        """Logits (B, logits_to_keep, V) at the last positions of prefix + suffix, suffixes left-padded."""
        import copy

        width = max(len(s) for s in suffixes)
        ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(suffixes):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(len(suffixes))
        full = torch.cat([mask.new_ones(len(suffixes), self.p), mask], 1)
        pos = self.p + (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=full, position_ids=pos, use_cache=True,
                         logits_to_keep=logits_to_keep, **{self.cache_key: cache})
        return out.logits


def prefix_forward(model: nn.Module, rows: list[list[int]], device, keep_last: int = 1) -> tuple[PrefixForward | None, int]:
    """(a PrefixForward for the prefix ``rows`` share, its length), or (None, 0) where it does not
    apply: a short prefix, a model with hooks, or one without a KV cache or ``logits_to_keep``.
    Every row keeps at least its last ``keep_last`` tokens out of the prefix."""
    p = shared_prefix(rows, keep_last)
    if p < MIN_PREFIX or not hook_free(model) or not takes_logits_to_keep(model):
        return None, 0
    try:
        return PrefixForward(model, rows[0][:p], device), p
    except (TypeError, ValueError, AttributeError):
        return None, 0


def cache_of(out):
    for key in ("cache", "past_key_values"):
        c = getattr(out, key, None)
        if c is not None:
            return c
    raise ValueError("the model returned no KV cache")
