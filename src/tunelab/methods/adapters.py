"""LLM-Adapters' bottleneck adapters (Hu et al., EMNLP 2023): "series_adapter" and "parallel_adapter".

One bottleneck module, a(z) = s * U(act(D(drop(z)))), D: d_a -> b (b x d_a), U: b -> d_out (d_out x b),
no biases (as the reference code), attached to a named module f with a placement:

    series   (after f):  y = f(x) + a(f(x))      d_a = d_out = f's output width
    parallel (beside f): y = f(x) + a(x)         d_a = f's input width, d_out = f's output width

Trainable parameters per target: b * (d_a + d_out). Defaults: b = 256, act = tanh, s = 1.0, on the MLP
hosts from ``tunelab.arch``: LLaMA-style models take LLM-Adapters' recipe (series after gate_proj and
up_proj, parallel beside up_proj and down_proj), OPT/BART/T5/GPT-2/GPT-NeoX their MLP linears, BERT-style
encoders the FFN's output linear "layer.N.output.dense". Any module can be named in ``target_modules``
(suffix match); a non-linear module is assumed to map hidden -> hidden. Init "zero_up" (default): D kaiming-uniform,
U = 0, so training starts exactly at the base model; "bert" (the reference default): D, U ~ N(0, 0.02).

Merge: with act = identity on a linear f (W, b), a is the linear map M = s U D and folds exactly:
parallel W' = W + M; series W' = (I + M) W, b' = (I + M) b. With a nonlinearity (tanh, the default) or
on a non-linear module neither placement can be folded into the weights, and merge says so.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tunelab import arch
from tunelab.methods.base import METHODS, MethodConfig, find_linears, freeze, linear_dims, linear_types

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity}


class AdapterConfig(MethodConfig):
    bottleneck: int = Field(256, ge=1)
    activation: Literal["tanh", "relu", "gelu", "silu", "identity"] = "tanh"
    scaling: float = 1.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None  # None: the MLP block of each layer
    init: Literal["zero_up", "bert"] = "zero_up"
    seed: int = 0


class Bottleneck(nn.Module):
    """a(z) = scaling * up(act(down(dropout(z)))), placed "series" (after) or "parallel" (beside) its host."""

    tunelab_active = True  # False: the host computes alone (tunelab.disabled)

    def __init__(self, d_in: int, d_out: int, cfg: AdapterConfig, placement: str, gen: torch.Generator, device=None):
        super().__init__()
        self.placement, self.scaling, self.activation = placement, cfg.scaling, cfg.activation
        self.down = nn.Linear(d_in, cfg.bottleneck, bias=False, device=device)
        self.up = nn.Linear(cfg.bottleneck, d_out, bias=False, device=device)
        self.act = ACTIVATIONS[cfg.activation]()
        self.drop = nn.Dropout(cfg.dropout)
        with torch.no_grad():
            if cfg.init == "zero_up":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=gen)
                self.up.weight.zero_()
            else:
                self.down.weight.normal_(0.0, 0.02, generator=gen)
                self.up.weight.normal_(0.0, 0.02, generator=gen)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dtype = z.dtype  # the adapter keeps fp32 weights; compute in them, hand back the host's dtype
        return (self.scaling * self.up(self.act(self.down(self.drop(z.to(self.down.weight.dtype)))))).to(dtype)

    def linear_map(self) -> torch.Tensor:
        """M = s U D (d_out x d_in), valid only for the identity activation."""
        return self.scaling * self.up.weight.double() @ self.down.weight.double()

    def extra_repr(self) -> str:
        return f"placement={self.placement}, activation={self.activation}, scaling={self.scaling}"


def _adapter_hook(module: nn.Module, args, kwargs, output):
    # A forward hook keeps the host module (and its state-dict names) unchanged.
    adapter = module.adapter
    if not adapter.tunelab_active:  # switched off: the host's own output (tunelab.disabled)
        return output
    y = output[0] if isinstance(output, tuple) else output
    if adapter.placement == "series":
        y = y + adapter(y)
    else:
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        y = y + adapter(x)
    return (y, *output[1:]) if isinstance(output, tuple) else y


def _default_targets(model: nn.Module, placement: str = "series") -> list[str]:
    """The family's adapter hosts for ``placement`` (the table in tunelab.arch)."""
    return arch.default_targets(model, placement)


def _dims(model: nn.Module, mod: nn.Module) -> tuple[int, int]:
    if isinstance(mod, linear_types()):
        return linear_dims(mod)
    return arch.hidden_size(model), arch.hidden_size(model)


def adapted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "adapter", None), Bottleneck)]


class _Adapter:
    Config = AdapterConfig
    placement = ""
    merge_refusal = (
        "an adapter with a nonlinearity (the default tanh) is not a linear map, so it cannot be folded into the "
        "weights; only activation='identity' on a linear target merges"
    )

    recommended_lr = 3e-4  # LLM-Adapters' setting for both placements (AdamW, 3 epochs)

    def attach(self, model: nn.Module, cfg: AdapterConfig) -> nn.Module:
        targets = find_linears(model, cfg.target_modules or _default_targets(model, self.placement), types=(nn.Module,))
        freeze(model)
        gen = torch.Generator().manual_seed(cfg.seed)
        for _name, mod in targets:
            d_in, d_out = _dims(model, mod)
            device = next(mod.parameters(), torch.empty(0)).device
            mod.adapter = Bottleneck(
                d_out if self.placement == "series" else d_in, d_out, cfg, self.placement, gen, device
            )
            mod.register_forward_hook(_adapter_hook, with_kwargs=True)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold identity-activation adapters on linears into W (and b); refuse, touching nothing, otherwise."""
        targets = adapted(model)
        bad = [n for n, m in targets if not isinstance(m, nn.Linear) or m.adapter.activation != "identity"]
        if bad:
            raise ValueError(f"cannot merge {self.name} at {bad[:3]}: {self.merge_refusal}")
        with torch.no_grad():
            for _name, lin in targets:
                m, w = lin.adapter.linear_map(), lin.weight.double()
                if self.placement == "parallel":
                    lin.weight.copy_(w + m)
                else:
                    eye_m = torch.eye(m.shape[0], dtype=m.dtype, device=m.device) + m
                    lin.weight.copy_(eye_m @ w)
                    if lin.bias is not None:
                        lin.bias.copy_(eye_m @ lin.bias.double())
                for key in [k for k, f in lin._forward_hooks.items() if f is _adapter_hook]:
                    del lin._forward_hooks[key]
                    lin._forward_hooks_with_kwargs.pop(key, None)
                del lin.adapter
        return model


class SeriesAdapter(_Adapter):
    name = "series_adapter"
    placement = "series"


class ParallelAdapter(_Adapter):
    name = "parallel_adapter"
    placement = "parallel"


METHODS.register(SeriesAdapter.name, SeriesAdapter())
METHODS.register(ParallelAdapter.name, ParallelAdapter())
