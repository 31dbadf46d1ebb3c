"""Eager attention for short CPU training rows, where it is faster than SDPA and exact.

torch's CPU flash-attention backward is slow for short rows: per layer, 8 rows x 9 heads (3 KV) x 55
tokens, forward + backward take 9.7 ms with flash, 4.3 ms with SDPA's math kernel (which also upcasts
to fp32 and keeps fp32 maps) and 1.9 ms with the model's eager attention (bf16 matmuls, fp32
softmax); at 192 tokens 30, 37 and 17 ms. ``attention_for`` switches the model to its eager attention
for a training forward on CPU while the attention maps that eager keeps for backward stay small
(``EAGER_MAX_BYTES``), and back afterwards.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tunelab.models.lm_loss import checkpointing

EAGER_MAX_BYTES = 256 * 2**20  # the extra activation memory eager attention may cost per step


@contextlib.contextmanager
def attention_for(model: nn.Module, batch: dict, device: torch.device):
    """Run a training forward of ``batch`` with the model's eager attention on CPU while the
    attention maps it keeps for backward (~6 bytes x B x heads x L^2 per layer) fit in
    ``EAGER_MAX_BYTES``; otherwise (CUDA, long rows, gradient checkpointing) change nothing."""
    inner = getattr(model, "module", model)
    cfg = getattr(inner, "config", None)
    ids = batch["input_ids"]
    heads, layers = getattr(cfg, "num_attention_heads", 0) or 0, getattr(cfg, "num_hidden_layers", 0) or 0
    extra = 6 * ids.shape[0] * heads * ids.shape[-1] ** 2 * layers
    if (device.type != "cpu" or getattr(cfg, "_attn_implementation", None) != "sdpa" or not heads
            or extra > EAGER_MAX_BYTES or checkpointing(inner)):
        yield
        return
    cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        cfg._attn_implementation = "sdpa"
