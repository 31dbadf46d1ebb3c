"""LoftQ (Li et al., ICLR 2024): quantization-aware LoRA initialisation.

Given W (d_out x d_in), rank r, LoRA scaling s, an N-bit quantizer q and T steps, with s B0 A0 = 0:
    for t = 1..T:  Q_t = q(W - s B_{t-1} A_{t-1});   U S V^T = svd(W - Q_t)
                   B_t = U_r sqrt(S_r / s)  (d_out x r),   A_t = sqrt(S_r / s) V_r^T  (r x d_in)
so s B_T A_T = U_r S_r V_r^T, the best rank-r fit of W - Q_T, for *any* alpha (PEFT's version stores
the split without 1/s and reconstructs W only when alpha = r). The frozen base is Q_T and LoRA starts
at (A_T, B_T): y = deq(Q_T) x + b + s B A drop(x). T = 0 is QLoRA (Q = q(W), B = 0).

Quantizers: bits=4 -> NF4 (torchao), bits=2 -> NF2 (quant="nf"), uniform 2-bit with the LoftQ
repository's block scale mean + 2.5 std (quant="uniform") or with the block absmax
(quant="uniform_absmax", tunelab <= 0.1's "uniform"), all block 64 (see tunelab.models.quantization); ``mixed_4bit_layers=k`` keeps NF4 on transformer layers 0..k-1 (the paper's mixed
precision). Everything runs on the weight's device (CPU or CUDA), in fp32.

Q_T is a deterministic function of W, so tunelab saves only A, B (+ a checksum of Q_T) and re-attaching
recomputes Q_T; ``model.tunelab_info["loftq"]`` holds ||W - Q_1|| (QLoRA's error) and
||W - (Q_t + s B_t A_t)|| for t = 1..T per matrix, and the mean ratio kept/QLoRA. The iteration is not
monotone at 2 bits, so by default (``keep_best``) the iterate with the lowest error is kept.
Merge folds s B A into a dequantized copy of Q_T: lossy with respect to W by the residual above.
"""

from __future__ import annotations

import re

import torch
from pydantic import Field, field_validator
from torch import nn

from tunelab.methods.base import METHODS, dense_weight
from tunelab.methods.lora import LoRAConfig, inject, merge_model, scaling
from tunelab.methods.qlora import linear_bytes, load_plan, quant_info, quantized
from tunelab.models import quantization
from tunelab.models.quantized_loading import return_large_blocks


class LoftQConfig(LoRAConfig):
    bits: int = 4
    iters: int = Field(5, ge=0)
    keep_best: bool = True
    quant: str = "nf"
    mixed_4bit_layers: int = Field(0, ge=0)

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if v not in (2, 4):
            raise ValueError(f"loftq supports bits=4 (NF4) or bits=2 (NF2 / uniform); got bits={v}")
        return v

    @field_validator("quant")
    @classmethod
    def _quant(cls, v):
        if v not in quantization.KINDS:
            raise ValueError(f"quant={v!r}: allowed 'nf' (NormalFloat), 'uniform' (LoftQ's mean + 2.5 std "
                             "block scale) or 'uniform_absmax'")
        return v


def top_r(R: torch.Tensor, r: int):
    """The top-r singular triplets of R: (U_r, S_r, V_r) with U_r diag(S_r) V_r^T the best rank-r fit.

    Uses the eigenvectors of the small Gram matrix (d x d, d = min side), ~4x faster than a full SVD on
    CPU and accurate for the leading triplets, which are all LoftQ needs.
    """
    tall = R.shape[0] > R.shape[1]
    M = R.T if tall else R  # (small x large)
    k = min(r, M.shape[0])
    ev, vec = torch.linalg.eigh(M @ M.T)
    u, s = vec[:, -k:].flip(1), ev[-k:].flip(0).clamp_min(0).sqrt()
    v = (M.T @ u) / torch.where(s > 0, s, torch.ones_like(s))
    if k < r:  # rank above the smaller side: the extra directions stay zero
        u, s, v = (
            torch.nn.functional.pad(u, (0, r - k)),
            torch.nn.functional.pad(s, (0, r - k)),
            torch.nn.functional.pad(v, (0, r - k)),
        )
    return (v, s, u) if tall else (u, s, v)


@torch.no_grad()
def loftq_init(
    w: torch.Tensor, r: int, scale: float, bits: int = 4, kind: str = "nf", iters: int = 5, keep_best: bool = True
):
    """LoftQ for one matrix: returns (Q, A, B, errors); A, B fp32 (None when iters = 0) and
    errors = [||W - q(W)||_F, ||W - (Q_1 + s B_1 A_1)||_F, ..., ||W - (Q_T + s B_T A_T)||_F].

    The iteration is not monotone (the block scales move with W - s B A; at 2 bits the error can rise
    after a few steps), so ``keep_best`` returns the iterate with the lowest error, which makes the
    result never worse as T grows; ``keep_best=False`` returns the T-th, as in the paper."""
    w32 = w.detach().float()
    low = None  # s B A of the previous step (none before the first: Q_1 = q(W), no zeros to subtract)
    errors, best = [], (None, None, None)
    for _ in range(iters):
        q = quantization.quantize(w if low is None else (w32 - low).to(w.dtype), bits, kind)
        res = w32 - quantization.dequantize(q, torch.float32)
        if not errors:
            errors.append(res.norm().item())  # Q_1 = q(W): the plain quantization error
        U, S, V = top_r(res, r)
        root = (S / scale).sqrt()
        low = (U * S) @ V.T
        errors.append((res - low).norm().item())  # what the rank-r fit leaves
        if not keep_best or errors[-1] <= min(errors[1:]):
            best = (q, root.unsqueeze(1) * V.T, U * root)
    if not iters:
        q = quantization.quantize(w, bits, kind)
        errors.append((w32 - quantization.dequantize(q, torch.float32)).norm().item())
        best = (q, None, None)
    return (*best, errors)


def layer_index(name: str) -> int | None:
    """The transformer layer a module belongs to: the first integer in its dotted name."""
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


class LoftQ:
    name = "loftq"
    Config = LoftQConfig
    recommended_lr = 3e-4  # as LoRA (the LoftQ paper fine-tunes with LoRA's usual 1e-4..3e-4)
    about_defaults = (
        "bits=4: NF4; bits=2: quant=nf (NF2) or uniform (the LoftQ repository's mean + 2.5 std block scale; "
        "uniform_absmax is tunelab 0.1's); keep_best keeps the lowest-error iterate (keep_best=false: the paper's T-th)"
    )

    @staticmethod
    def _init(name: str, w, bias, cfg: LoftQConfig):
        """Q_T, (A_T, B_T) and the error record of one matrix, as a QuantLinear carrying its start."""
        layer = layer_index(name)
        early = layer is not None and layer < cfg.mixed_4bit_layers
        bits, kind = (4, "nf") if early else (cfg.bits, cfg.quant)
        q, A, B, errs = loftq_init(w, cfg.r, scaling(cfg), bits, kind, cfg.iters, cfg.keep_best)
        kept = min(errs[1:]) if cfg.keep_best and cfg.iters else errs[-1]
        base = quantization.QuantLinear(q, bias)
        base.loftq_start, base.loftq_record = (A, B), {"bits": bits, "errors": errs, "kept": kept}
        return base

    def quantize_on_load(self, cfg: LoftQConfig):
        """Run LoftQ per matrix as its weights are read (see qlora.QLoRA.quantize_on_load)."""
        return load_plan(cfg, lambda name, w, bias: self._init(name, w, bias, cfg))

    def attach(self, model: nn.Module, cfg: LoftQConfig) -> nn.Module:
        return_large_blocks()  # every forward dequantizes into 1-32 MB temporaries (see quant_load)
        before_model, before_linears = quantization.model_bytes(model), 0
        starts, errors = {}, {}

        def make_base(name, lin):
            nonlocal before_linears, before_model
            before_linears += linear_bytes(lin)
            if quantized(lin):  # quantized (and LoftQ-initialised) while loading
                if not hasattr(lin, "loftq_start"):
                    raise ValueError(f"{name}: the base is already quantized without LoftQ; load it in full precision")
                before_model += linear_bytes(lin) - quantization.model_bytes(lin)
                base = lin
            else:
                base = self._init(name, dense_weight(lin), lin.bias, cfg)
            starts[name], errors[name] = base.loftq_start, base.loftq_record
            del base.loftq_start  # the adapter owns A, B from here on
            return base

        inject(model, cfg, make_base=make_base, init=lambda name, lin, base: starts.pop(name))
        info = quant_info(model, before_model, before_linears)
        ratios = [e["kept"] / e["errors"][0] for e in errors.values() if e["errors"][0] > 0]
        info["loftq"] = {"mean_ratio": sum(ratios) / max(len(ratios), 1), "per_matrix": errors}
        model.tunelab_info = info
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Lossy: returns plain linears holding deq(Q_T) + s B A (see the module docstring)."""
        return merge_model(model)


METHODS.register(LoftQ.name, LoftQ())
