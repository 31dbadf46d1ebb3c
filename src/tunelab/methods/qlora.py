"""QLoRA (Dettmers et al., 2023): LoRA over a 4-bit NormalFloat base.

    y = deq(Q) x + b + s * B A drop(x),   Q = NF4(W0) with block 64 (torchao NF4Tensor, its block
    scales 8-bit quantized in groups of 256), dequantized on the fly in forward and backward.
A (r x d_in), B (d_out x r), s as in LoRA; only the target linears are quantized, and only A, B
(and a new head) train. The base bytes before and after quantization land in ``model.tunelab_info``.

Merge folds s B A into a dequantized copy of Q: it is lossy with respect to W0 (the base the user
loaded) by exactly the quantization error, and there is no unmerge (re-quantizing would not be exact).
Backends (``backend``): "torchao" (NF4Tensor, CPU and CUDA), "bitsandbytes" (QLoRA's own kernel,
``quantization.BnbLinear4``), "auto" = bitsandbytes on CUDA when installed, else torchao. The adapter (A, B)
is the same either way, so the PEFT export does not depend on the backend.

Loading in 4 bits: ``quantize_on_load(cfg)`` gives tunelab.models.loading a plan that quantizes each target
linear as its weights are read (tunelab.models.quantized_loading), so the full-precision model never sits on the
device; ``attach`` then keeps those bases as they are.
"""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator
from torch import nn

from tunelab.methods.base import METHODS, dense_weight, find_linears, linear_types
from tunelab.methods.lora import LoRAConfig, inject, lora_modules, merge_model
from tunelab.models import quantization
from tunelab.models.quantized_loading import return_large_blocks


class QLoRAConfig(LoRAConfig):
    bits: int = 4
    backend: Literal["auto", "torchao", "bitsandbytes"] = "auto"

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if v != 4:
            raise ValueError(f"qlora stores the base in 4-bit NF4 only (got bits={v}); for 2-bit use method 'loftq'")
        return v


def quant_info(model: nn.Module, before_model: int, before_linears: int) -> dict:
    """Bytes of the base model (every tensor but the adapters) and of the target linears, before and
    after quantization."""
    mods = lora_modules(model)
    adapters = sum(quantization.tensor_bytes(p) for _, m in mods for n, p in m.named_parameters() if n.startswith("lora_"))
    return {
        "quantized_linears": len(mods),
        "linear_bytes_before": before_linears,
        "linear_bytes_after": sum(m.base_layer.nbytes() for _, m in mods),
        "base_bytes_before": before_model,
        "base_bytes_after": quantization.model_bytes(model) - adapters,
    }


def linear_bytes(lin: nn.Module) -> int:
    """Full-precision bytes of a linear (for a base quantized while loading: what it was read as)."""
    if hasattr(lin, "tunelab_source_bytes"):
        return lin.tunelab_source_bytes
    return sum(quantization.tensor_bytes(p) for p in lin.parameters())


def quantized(lin: nn.Module) -> bool:
    return isinstance(lin, (quantization.QuantLinear, quantization.BnbLinear4))


def load_plan(cfg, build):
    """A tunelab.models.quantized_loading.LoadPlan over ``cfg.target_modules``: ``build(name, w, bias)`` makes each
    quantized base; it records the bytes read so ``quant_info`` reports before/after as usual."""
    from tunelab.models.quantized_loading import LoadPlan

    def select(model):
        return [n for n, _ in find_linears(model, cfg.target_modules, linear_types())]

    def make(name, w, bias):
        mod = build(name, w, bias)
        mod.tunelab_source_bytes = quantization.tensor_bytes(w) + (0 if bias is None else quantization.tensor_bytes(bias))
        return mod

    return LoadPlan(select, make)


class QLoRA:
    name = "qlora"
    Config = QLoRAConfig
    merge_refusal = None
    recommended_lr = 3e-4  # as LoRA: the frozen base is quantized, the adapter trains the same way

    def quantize_on_load(self, cfg: QLoRAConfig):
        return load_plan(cfg, lambda name, w, bias: quantization.nf4_linear(w, bias, cfg.backend))

    def attach(self, model: nn.Module, cfg: QLoRAConfig) -> nn.Module:
        return_large_blocks()  # every forward dequantizes into 1-32 MB temporaries (see quant_load)
        before_model, before_linears = quantization.model_bytes(model), 0

        def make_base(name, lin):
            nonlocal before_linears, before_model
            before_linears += linear_bytes(lin)
            if quantized(lin):  # quantized while loading (quantize_on_load)
                before_model += linear_bytes(lin) - quantization.model_bytes(lin)
                return lin
            return quantization.nf4_linear(dense_weight(lin), lin.bias, cfg.backend)

        inject(model, cfg, make_base=make_base)
        model.tunelab_info = quant_info(model, before_model, before_linears)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Lossy: returns plain linears holding deq(Q) + s B A (see the module docstring)."""
        return merge_model(model)


METHODS.register(QLoRA.name, QLoRA())
