"""QLoRA (Dettmers et al., 2023): LoRA over a 4-bit NormalFloat base.

    y = deq(Q) x + b + s * B A drop(x),   Q = NF4(W0) with block 64 (torchao NF4Tensor, its block
    scales 8-bit quantized in groups of 256), dequantized on the fly in forward and backward.
A (r x d_in), B (d_out x r), s as in LoRA; only the target linears are quantized, and only A, B
(and a new head) train. The base bytes before and after quantization land in ``model.tunelab_info``.

Merge folds s B A into a dequantized copy of Q: it is lossy with respect to W0 (the base the user
loaded) by exactly the quantization error, and there is no unmerge (re-quantizing would not be exact).
torchao's NF4 runs on CPU and CUDA; bitsandbytes is not needed.
"""

from __future__ import annotations

from pydantic import field_validator
from torch import nn

from tunelab import quant
from tunelab.methods.base import METHODS
from tunelab.methods.lora import LoRAConfig, inject, lora_modules, merge_model


class QLoRAConfig(LoRAConfig):
    bits: int = 4

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
    adapters = sum(quant.tensor_bytes(p) for _, m in mods for n, p in m.named_parameters() if n.startswith("lora_"))
    return {
        "quantized_linears": len(mods),
        "linear_bytes_before": before_linears,
        "linear_bytes_after": sum(m.base_layer.nbytes() for _, m in mods),
        "base_bytes_before": before_model,
        "base_bytes_after": quant.model_bytes(model) - adapters,
    }


def linear_bytes(lin: nn.Linear) -> int:
    return sum(quant.tensor_bytes(p) for p in lin.parameters())


class QLoRA:
    name = "qlora"
    Config = QLoRAConfig
    merge_refusal = None
    recommended_lr = 3e-4  # as LoRA: the frozen base is quantized, the adapter trains the same way

    def attach(self, model: nn.Module, cfg: QLoRAConfig) -> nn.Module:
        before_model, before_linears = quant.model_bytes(model), 0

        def make_base(name, lin):
            nonlocal before_linears
            before_linears += linear_bytes(lin)
            return quant.QuantLinear(quant.quantize(lin.weight.data, 4, "nf"), lin.bias)

        inject(model, cfg, make_base=make_base)
        model.tunelab_info = quant_info(model, before_model, before_linears)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Lossy: returns plain linears holding deq(Q) + s B A (see the module docstring)."""
        return merge_model(model)


METHODS.register(QLoRA.name, QLoRA())
