"""Full-model tuning: every parameter trains; nothing is injected.

Memory is weights + grads + 2 AdamW states; learning rates are typically 10-100x below the PEFT
methods' (1e-5 .. 5e-5 with AdamW on small models).
"""

from __future__ import annotations

from torch import nn

from tunelab.methods.base import METHODS, MethodConfig


class FullConfig(MethodConfig):
    pass


class Full:
    name = "full"
    Config = FullConfig
    recommended_lr = 2e-5  # AdamW on small models: 1e-5 .. 5e-5
    merge_refusal = "full fine-tuning changes the weights themselves; there is nothing to merge"

    def attach(self, model: nn.Module, cfg: FullConfig) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model


METHODS.register(Full.name, Full())
