"""LLM-Adapters' bottleneck adapters (Hu et al., EMNLP 2023): "series_adapter" and "parallel_adapter".

One bottleneck module, a(z) = s * U(act(D(drop(z)))), D: d_a -> b (b x d_a), U: b -> d_o (d_o x b),
no biases, attached to a named module f (W, b) with a placement, as LLM-Adapters'
``peft/src/peft/tuners/bottleneck.py`` (github.com/AGI-Edgerunners/LLM-Adapters, commit
0059d7ce1a62303570f65e93ff1991a353d3adbc, ``Linear.forward``):

    series, before f ("mh_adapter"):      y = f(x + a(x))          d_a = d_o = f's input width
    series, after f ("output_adapter"):   y = f(x) + a(f(x))       d_a = d_o = f's output width
    parallel ("parallel_adapter"):        y = f(x) + a(x)          d_a = f's input width, d_o = output

Trainable parameters per target: b * (d_a + d_out). Defaults: b = 256, act = tanh, s = 1.0, on the MLP
hosts from ``tunelab.models.arch``: LLaMA-style models take LLM-Adapters' recipe (series after gate_proj and
up_proj, parallel beside up_proj and down_proj), OPT/BART/T5/GPT-2/GPT-NeoX their MLP linears, BERT-style
encoders the FFN's output linear "layer.N.output.dense". Any module can be named in ``target_modules``
(suffix match); a non-linear module is assumed to map hidden -> hidden. Init "zero_up" (default): D kaiming-uniform,
U = 0, so training starts exactly at the base model; "bert" (the reference default): D, U ~ N(0, 0.02).
Series placement by host (``series_placement="auto"``) follows the reference's
TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING: before the input-side MLP projections (gate_proj,
up_proj; GPT-J fc_in, OPT fc1, BLOOM dense_h_to_4h), after the output-side ones (down_proj, fc_out,
fc2, dense_4h_to_h). Any other host (the reference raises a KeyError there) gets "after", the
Houlsby placement after a sublayer; "before"/"after" force one placement everywhere (tunelab <= 0.1
placed every series adapter after its host: ``series_placement: after`` loads those runs).

Trainable parameters per target: b * (d_a + d_o) (+1 with ``scaling: learned``). Defaults: b = 256,
act = tanh, s = 1.0, on the MLP block. ``scaling``: a float, or "learned" (a trainable scalar
starting at 1, the reference's option). ``init``:
- "zero_up" (tunelab's default): D kaiming-uniform(a=sqrt 5), U = 0, which is exactly the
  reference's "mam_adapter" (``init: mam`` is the same thing under the reference's name). Chosen as
  the default because training then starts exactly at the base model (step-0 evaluation = base).
- "bert" (the reference's default ``init_weights``): D, U ~ N(0, 0.02).
The reference recipes (its mapping.py): series on gate_proj, up_proj, down_proj for LLaMA (BLOOM
dense_h_to_4h + dense_4h_to_h, GPT-J fc_in + fc_out, OPT fc1 + fc2), parallel on v_proj + down_proj
(GPT-J v_proj + fc_out, OPT v_proj + fc2, BLOOM query_key_value); pass those names to reproduce them.

Merge: with act = identity on a linear f, a is the linear map M = s U D and folds exactly:
parallel W' = W + M; series after W' = (I + M) W, b' = (I + M) b; series before W' = W (I + M). With
a nonlinearity (tanh, the default) or on a non-linear module no placement folds, and merge says so.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tunelab.methods.base import METHODS, MethodConfig, find_linears, freeze, linear_dims, linear_types
from tunelab.models import arch

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity}


# LLM-Adapters' TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING, by host name (no name is on both sides)
BEFORE_HOSTS = ("gate_proj", "up_proj", "fc_in", "fc1", "dense_h_to_4h")  # "mh_adapter"
AFTER_HOSTS = ("down_proj", "fc_out", "fc2", "dense_4h_to_h")  # "output_adapter"


class AdapterConfig(MethodConfig):
    bottleneck: int = Field(256, ge=1)
    activation: Literal["tanh", "relu", "gelu", "silu", "identity"] = "tanh"
    scaling: float | Literal["learned"] = 1.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None  # None: the MLP block of each layer
    init: Literal["zero_up", "bert", "mam"] = "zero_up"  # "mam" = "zero_up" (the reference's name)
    series_placement: Literal["auto", "before", "after"] = "auto"
    seed: int = 0


def series_side(name: str, cfg: AdapterConfig) -> str:
    """Where a series adapter goes on host ``name``: "before" or "after" (see the module docstring)."""
    if cfg.series_placement != "auto":
        return cfg.series_placement
    return "before" if name.rsplit(".", 1)[-1] in BEFORE_HOSTS else "after"


class Bottleneck(nn.Module):
    """a(z) = scale * up(act(down(dropout(z)))); placement "series_before", "series_after" or "parallel"."""

    tunelab_active = True  # False: the host computes alone (tunelab.disabled)

    def __init__(self, d_in: int, d_out: int, cfg: AdapterConfig, placement: str, gen: torch.Generator, device=None):
        super().__init__()
        self.placement, self.activation = placement, cfg.activation
        if cfg.scaling == "learned":
            self.scale = nn.Parameter(torch.ones(1, device=device))
        else:
            self.scale = float(cfg.scaling)
        self.down = nn.Linear(d_in, cfg.bottleneck, bias=False, device=device)
        self.up = nn.Linear(cfg.bottleneck, d_out, bias=False, device=device)
        self.act = ACTIVATIONS[cfg.activation]()
        self.drop = nn.Dropout(cfg.dropout)
        with torch.no_grad():
            if cfg.init in ("zero_up", "mam"):
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=gen)
                self.up.weight.zero_()
            else:
                self.down.weight.normal_(0.0, 0.02, generator=gen)
                self.up.weight.normal_(0.0, 0.02, generator=gen)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dtype = z.dtype  # the adapter keeps fp32 weights; compute in them, hand back the host's dtype
        return (self.up(self.act(self.down(self.drop(z.to(self.down.weight.dtype))))) * self.scale).to(dtype)

    def linear_map(self) -> torch.Tensor:
        """M = s U D (d_out x d_in), valid only for the identity activation."""
        return float(self.scale) * self.up.weight.double() @ self.down.weight.double()

    def extra_repr(self) -> str:
        s = "learned" if isinstance(self.scale, nn.Parameter) else self.scale
        return f"placement={self.placement}, activation={self.activation}, scaling={s}"


def _adapter_hook(module: nn.Module, args, kwargs, output):
    # A forward hook keeps the host module (and its state-dict names) unchanged.
    adapter = module.adapter
    if not adapter.tunelab_active:  # switched off: the host's own output (tunelab.disabled)
        return output
    if adapter.placement == "series_before":
        return None  # done by _adapter_pre_hook
    y = output[0] if isinstance(output, tuple) else output
    if adapter.placement == "series_after":
        y = y + adapter(y)
    else:
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        y = y + adapter(x)
    return (y, *output[1:]) if isinstance(output, tuple) else y


def _adapter_pre_hook(module: nn.Module, args, kwargs):
    # series before the host: f(x + a(x)), the reference's mh_adapter
    if module.adapter.placement != "series_before" or not module.adapter.tunelab_active:
        return None
    if args:
        return (args[0] + module.adapter(args[0]), *args[1:]), kwargs
    key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return args, {**kwargs, key: kwargs[key] + module.adapter(kwargs[key])}


def _default_targets(model: nn.Module, placement: str = "series") -> list[str]:
    """The family's adapter hosts for ``placement`` (the table in tunelab.models.arch)."""
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
    about_defaults = (
        "init=zero_up (= LLM-Adapters' mam_adapter: kaiming D, U = 0) so training starts exactly at the base model "
        "(the reference defaults to init=bert); hosts from tunelab.models.arch: LLaMA-style series on gate_proj+up_proj, "
        "parallel beside up_proj+down_proj, other families their MLP linears (BERT-style: the FFN output); "
        "series go before gate/up_proj and after down_proj, as the reference"
    )

    def attach(self, model: nn.Module, cfg: AdapterConfig) -> nn.Module:
        targets = find_linears(model, cfg.target_modules or _default_targets(model, self.placement), types=(nn.Module,))
        freeze(model)
        gen = torch.Generator().manual_seed(cfg.seed)
        for name, mod in targets:
            d_in, d_out = _dims(model, mod)
            device = next(mod.parameters(), torch.empty(0)).device
            placement = f"series_{series_side(name, cfg)}" if self.placement == "series" else "parallel"
            dims = {"series_before": (d_in, d_in), "series_after": (d_out, d_out), "parallel": (d_in, d_out)}
            mod.adapter = Bottleneck(*dims[placement], cfg, placement, gen, device)
            mod.register_forward_pre_hook(_adapter_pre_hook, with_kwargs=True)
            mod.register_forward_hook(_adapter_hook, with_kwargs=True)
        return model

    def upgrade_state(self, model: nn.Module, state: dict, where) -> dict:
        """A saved adapter whose shape does not fit the host: most likely a tunelab <= 0.1 series run on
        gate_proj/up_proj (then placed after the host); say how to load it instead of a size error."""
        own = model.state_dict()
        for key, t in state.items():
            if key in own and key.endswith((".adapter.down.weight", ".adapter.up.weight")) and own[key].shape != t.shape:
                raise ValueError(
                    f"{where}: {key} has shape {tuple(t.shape)} but this placement needs {tuple(own[key].shape)}; "
                    "runs saved by tunelab <= 0.1 put series adapters after every host: attach with "
                    "series_placement='after' (method.json params) to load this one"
                )
        return state

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold identity-activation adapters on linears into W (and b); refuse, touching nothing, otherwise."""
        targets = adapted(model)
        bad = [n for n, m in targets if not isinstance(m, nn.Linear) or m.adapter.activation != "identity"]
        if bad:
            raise ValueError(f"cannot merge {self.name} at {bad[:3]}: {self.merge_refusal}")
        with torch.no_grad():
            for _name, lin in targets:
                m, w = lin.adapter.linear_map(), lin.weight.double()
                if lin.adapter.placement == "parallel":
                    lin.weight.copy_(w + m)
                elif lin.adapter.placement == "series_before":  # W (x + M x) + b
                    lin.weight.copy_(w @ (torch.eye(m.shape[0], dtype=m.dtype, device=m.device) + m))
                else:
                    eye_m = torch.eye(m.shape[0], dtype=m.dtype, device=m.device) + m
                    lin.weight.copy_(eye_m @ w)
                    if lin.bias is not None:
                        lin.bias.copy_(eye_m @ lin.bias.double())
                for key in [k for k, f in lin._forward_hooks.items() if f is _adapter_hook]:
                    del lin._forward_hooks[key]
                    lin._forward_hooks_with_kwargs.pop(key, None)
                for key in [k for k, f in lin._forward_pre_hooks.items() if f is _adapter_pre_hook]:
                    del lin._forward_pre_hooks[key]
                    lin._forward_pre_hooks_with_kwargs.pop(key, None)
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
