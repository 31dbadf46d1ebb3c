"""The per-forward context: data a batch carries beyond what the model's forward takes.

The collator emits ``prompt_mask`` (True on prompt tokens); methods such as ReFT need it to find
their positions. A pre-hook on the top model moves it out of the kwargs into
``model.tunelab_context`` so the loop can call ``model(**batch)`` whatever is attached. Every loaded
model gets the hook (``tunelab.models.loading``), and attaching a method installs it too.
"""

from __future__ import annotations

from torch import nn

CONTEXT_KEYS = ("prompt_mask",)


def _pop_context(module, args, kwargs):
    ctx = module.tunelab_context
    for key in CONTEXT_KEYS:
        if key in kwargs:
            ctx[key] = kwargs.pop(key)
    return args, kwargs


def install_context(model: nn.Module) -> nn.Module:
    """Idempotently make ``model`` accept (and stash) the context keys. Returns the model."""
    if not hasattr(model, "tunelab_context"):
        model.tunelab_context = {}
        model.register_forward_pre_hook(_pop_context, with_kwargs=True)
    return model


def context(model: nn.Module) -> dict:
    """The context dict of the top model (``{}`` if none installed)."""
    return getattr(model, "tunelab_context", {})
