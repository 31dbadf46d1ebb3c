"""LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024) on linear layers.

LoRA:  y = W0 x + b + s * B A drop(x),   A (r x d_in) ~ kaiming-uniform(a=sqrt 5), B (d_out x r) = 0,
       s = alpha / r  (rsLoRA: alpha / sqrt r).  W0 (d_out x d_in) and b stay frozen.
DoRA:  y = g * (W0 x + s B A x) + b,  g = m / ||W0 + s B A||_row  (d_out),  m (d_out) trains and starts
       at ||W0||_row; the norm is treated as a constant (detached), as in the paper (sec. 4.3) and PEFT.
       With dropout the PEFT form is kept: y = W0 x + b + (g - 1) * W0 drop(x) + g * s B A drop(x).
Merge: W = W0 + s B A (DoRA: W = g * (W0 + s B A)); unmerge restores W0 to rounding.

``LoRALinear`` wraps a frozen ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored d_in x d_out: W0 is its
transpose, as PEFT's fan_in_fan_out) or a ``tunelab.models.quantization.QuantLinear`` (QLoRA, LoftQ).
``LoRAEmbedding`` wraps an ``nn.Embedding`` named explicitly in target_modules (never by "all-linear"),
as PEFT does: y = E[x] + s * (A^T[x]) B^T, A (r x vocab) = 0, B (dim x r) ~ N(0, 1), no dropout;
W0 is E^T (dim x vocab), so merge folds E += s (B A)^T.
Adapter weights are fp32 when the base is fp16/bf16 (cast to the input dtype in the forward).

Initialisations (``init``; PEFT's ``init_lora_weights``):
- ``default``: A kaiming-uniform, B = 0 (Hu et al.; PEFT's True).
- ``gaussian``: A ~ N(0, 1/r^2), B = 0 (PEFT's "gaussian").
- ``pissa`` / ``pissa_niter_K`` (Meng et al., 2024, arXiv:2404.02948; PEFT's pissa_init): W0 = U S V^T,
  A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s) (exact SVD, or torch.svd_lowrank with K subspace
  iterations, seeded so that a reload recomputes the same start); the base keeps the residual
  W_res = W0 - s B A, so the model starts exactly at W0 (to rounding).
- ``olora`` (Büyükakyüz, 2024, arXiv:2406.01775; PEFT's olora_init): W0 = Q R, B = Q[:, :r], A = R[:r],
  W_res = W0 - s B A.
PiSSA/OLoRA change the base weights; the start (A0, B0) is kept (not saved: recomputed from the base on
load), so ``tunelab.disabled`` computes W_res x + s B0 A0 x = W0 x (the original base, to float rounding),
merge gives W_res + s B A, and the PEFT export is PEFT's conversion to a plain rank-2r LoRA over the
original base: A' = [A; A0], B' = [B, -B0], alpha' = 2 alpha (rsLoRA: sqrt 2 alpha).

LoRA+ (Hayou et al., 2024, arXiv:2402.12354): ``loraplus_lr_ratio`` gives B (and 1-D tensors) the learning
rate lr x ratio, embeddings' adapters ``loraplus_lr_embedding``; the groups are PEFT's
``create_loraplus_optimizer``'s, handed to the optimizer through the method hook ``param_groups``.
The hot path is three matmuls: base, x A^T, and one fused ``addmm`` that adds s * (x A^T) B^T.
"""

from __future__ import annotations

import copy
import math
import re

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from tunelab.errors import suggest
from tunelab.methods.base import (
    METHODS,
    MethodConfig,
    conv1d_class,
    dense_weight,
    find_linears,
    freeze,
    is_transposed,
    linear_dims,
    linear_types,
    replace_module,
)

INITS = ("default", "gaussian", "pissa", "pissa_niter_K", "olora")
BASE_CHANGING = ("pissa", "olora")  # inits that move part of W0 into the adapter (prefix match)


class LoRAConfig(MethodConfig):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"
    rslora: bool = False
    init: str = "default"
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    loraplus_lr_embedding: float = Field(1e-6, gt=0)

    @field_validator("init")
    @classmethod
    def _init(cls, v):
        if v in ("default", "gaussian", "pissa", "olora") or re.fullmatch(r"pissa_niter_[1-9]\d*", v):
            return v
        raise ValueError(f"init={v!r} is unknown{suggest(v, INITS)}; allowed: {', '.join(INITS)} (K a whole number >= 1)")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        if isinstance(v, str) and v != "all-linear":  # "q_proj,v_proj" from a command line
            v = [t.strip() for t in v.split(",") if t.strip()]
        if not v:
            raise ValueError("target_modules must be 'all-linear' or a non-empty list of module-name suffixes")
        return v


def scaling(cfg: LoRAConfig) -> float:
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)


class LoRALinear(nn.Module):
    tunelab_active = True  # False: the base layer alone (tunelab.disabled)

    def __init__(
        self,
        base: nn.Module,
        r: int,
        scale: float,
        dropout: float = 0.0,
        dora: bool = False,
        A: torch.Tensor | None = None,
        B: torch.Tensor | None = None,
    ):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = linear_dims(base)
        self.transposed = is_transposed(base)  # weight stored d_in x d_out (Conv1D, Embedding)
        self.r, self.scaling, self.dropout, self.merged = r, scale, dropout, False
        base_dtype, device = self.base_meta()
        dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        if A is None:
            A = torch.empty(r, self.in_features, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if B is None:
            B = torch.zeros(self.out_features, r, device=device, dtype=dtype)
        self.lora_A = nn.Parameter(A.to(device, dtype).contiguous())
        self.lora_B = nn.Parameter(B.to(device, dtype).contiguous())
        if dora:  # only DoRA needs W0 itself here (its row norms)
            self.lora_magnitude = nn.Parameter(self.weight_norm(self.base_weight(dtype)))
        else:
            self.lora_magnitude = None
        # PiSSA/OLoRA: the adapter's start (A0, B0), whose s B0 A0 was taken out of the base; the off
        # switch adds it back. Not saved (recomputed from the base when the method is attached again).
        self.register_buffer("init_A", None, persistent=False)
        self.register_buffer("init_B", None, persistent=False)

    def keep_start(self) -> None:
        """Remember the current A, B as the start whose s B A the base no longer holds (PiSSA/OLoRA)."""
        self.init_A = self.lora_A.detach().clone()
        self.init_B = self.lora_B.detach().clone()

    @property
    def weight(self):  # some model code reads module.weight (dtype, device)
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def base_meta(self) -> tuple[torch.dtype, torch.device]:
        """W0's dtype and device without building W0: a quantized base says them (``dense_meta``)
        instead of dequantizing the whole matrix (QLoRA's attach did that once per linear)."""
        meta = getattr(self.base_layer, "dense_meta", None)
        if meta is not None:
            return meta()
        w = self.base_weight()
        return w.dtype, w.device

    def base_weight(self, dtype=None) -> torch.Tensor:
        """Dense W0 (dequantized for a quantized base)."""
        base = self.base_layer
        w = base.dequantized() if hasattr(base, "dequantized") else dense_weight(base)
        return w if dtype is None else w.to(dtype)

    def delta(self) -> torch.Tensor:
        """s * B A, detached, in the adapter dtype."""
        return self.scaling * (self.lora_B.detach() @ self.lora_A.detach())

    @torch.no_grad()
    def weight_norm(self, w0: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(w0 + self.delta().to(w0.dtype), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.tunelab_active:
            y = self.base_layer(x)
            if self.init_A is None or self.merged:
                return y
            # off, over a residual base (PiSSA/OLoRA): W_res x + s B0 A0 x is the original W0 x
            return y + (F.linear(F.linear(x, self.init_A.to(x.dtype)), self.init_B.to(x.dtype)) * self.scaling).to(y.dtype)
        A, B = self.lora_A, self.lora_B
        if A.dtype != x.dtype:
            A, B = A.to(x.dtype), B.to(x.dtype)
        xd = F.dropout(x, self.dropout, True) if self.dropout and self.training else x
        if self.lora_magnitude is not None:
            return self._dora(x, xd, A, B)
        base = self.base_layer
        y = F.linear(x, base.weight, base.bias) if type(base) is nn.Linear else base(x)
        h = F.linear(xd, A)
        if h.dtype == y.dtype and (type(base) is nn.Linear or not torch.is_grad_enabled()):
            # in place: y is this call's own temporary and F.linear's backward does not read it, while an
            # out-of-place addmm first copies all of y (1 ms a call for SmolLM2's MLP at 1,664 rows); the
            # same kernel with beta = 1, bit-identical
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, self.r), B.t().to(y.dtype), alpha=self.scaling)
            return y
        out = torch.addmm(y.view(-1, y.shape[-1]), h.view(-1, self.r), B.t(), alpha=self.scaling)
        return out.view(y.shape)

    def _dora(self, x, xd, A, B):
        w0 = self.base_weight(x.dtype)
        g = (self.lora_magnitude / self.weight_norm(w0).to(self.lora_magnitude)).to(x.dtype)
        lora = F.linear(F.linear(xd, A), B) * self.scaling
        if xd is x:
            y = (F.linear(x, w0) + lora) * g
        else:
            y = F.linear(x, w0) + (g - 1) * F.linear(xd, w0) + g * lora
        bias = self.base_layer.bias
        return y if bias is None else y + bias.to(y.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + s B A (DoRA: g * (W0 + s B A)), in the base dtype."""
        w0 = self.base_weight()
        w = w0.float() + self.delta().float()
        if self.lora_magnitude is not None:
            w = w * (self.lora_magnitude.float() / torch.linalg.norm(w, dim=1)).unsqueeze(1)
        return w.to(w0.dtype)

    def to_plain(self) -> nn.Module:
        """A plain module with the update folded in: a copy of a Linear/Conv1D/Embedding base, or an
        nn.Linear holding the dequantized weight for a quantized base."""
        w = self.merged_weight()
        if self.transposed or type(self.base_layer) is nn.Linear:
            plain = copy.deepcopy(self.base_layer)
            plain.weight.data = (w.T if self.transposed else w).contiguous()
            return plain.requires_grad_(False)
        bias = self.base_layer.bias
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.data.copy_(w)
        if bias is not None:
            lin.bias.data.copy_(bias.detach())
        return lin.requires_grad_(False)

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold in place into a plain base (kept so ``unmerge_`` can restore W0)."""
        if self.merged:
            return
        if not isinstance(self.base_layer, (nn.Linear, nn.Embedding)) and not self.transposed:
            raise ValueError("in-place merge needs a plain (unquantized) base; use merge() for a quantized one")
        w = self.base_layer.weight
        self._w0_norm = self.weight_norm(self.base_weight().float()) if self.lora_magnitude is not None else None
        merged = self.merged_weight()
        w.copy_(merged.T if self.transposed else merged)
        self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        full = self.base_weight().float()
        if self._w0_norm is not None:  # W = g (W0 + dW) with g = m / norm: undo the row scaling first
            full = full * (self._w0_norm / self.lora_magnitude.float()).unsqueeze(1)
        w0 = full - self.delta().float()
        w.copy_(w0.T if self.transposed else w0)
        self.merged = False

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude is not None else ""
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout}{dora}"


class LoRAEmbedding(LoRALinear):
    """LoRA on a frozen nn.Embedding (see the module docstring): PEFT's init and forward."""

    def __init__(self, base: nn.Embedding, r: int, scale: float, A=None, B=None):
        w = base.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        A = torch.zeros(r, base.num_embeddings, device=w.device, dtype=dtype) if A is None else A
        B = torch.randn(base.embedding_dim, r, device=w.device, dtype=dtype) if B is None else B
        super().__init__(base, r, scale, 0.0, False, A, B)

    @property
    def bias(self):
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or not self.tunelab_active:
            return y
        e = self.base_layer
        a = F.embedding(x, self.lora_A.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
        return y + (a @ self.lora_B.T).to(y.dtype) * self.scaling


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def base_changing(cfg: LoRAConfig) -> bool:
    """Whether ``cfg.init`` moves part of W0 into the adapter (PiSSA, OLoRA)."""
    return cfg.init.startswith(BASE_CHANGING)


@torch.no_grad()
def principal_start(lin: nn.Module, cfg: LoRAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's or OLoRA's (A, B) for ``lin`` (as PEFT's pissa_init / olora_init, in fp32); the caller
    leaves W0 - s B A in the base."""
    w = dense_weight(lin).float()
    s, r = scaling(cfg), cfg.r
    if cfg.init == "olora":
        Q, R = torch.linalg.qr(w)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    if cfg.init == "pissa":
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r] / s, Uh[:r]
    else:  # pissa_niter_K: randomized SVD, seeded so that attaching again gives the same start
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            torch.manual_seed(0)
            Vr, Sr, Ur = torch.svd_lowrank(w, r, niter=int(cfg.init.rsplit("_", 1)[1]))
        Sr, Uhr = Sr / s, Ur.t()
    return torch.diag(Sr.sqrt()) @ Uhr, Vr @ torch.diag(Sr.sqrt())


def gaussian_start(lin: nn.Module, cfg: LoRAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "gaussian": A ~ N(0, (1/r)^2), B = 0."""
    d_in, d_out = linear_dims(lin)
    w = lin.weight
    dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
    return (torch.randn(cfg.r, d_in, device=w.device, dtype=dtype) / cfg.r,
            torch.zeros(d_out, cfg.r, device=w.device, dtype=dtype))


def inject(model: nn.Module, cfg: LoRAConfig, make_base=None, dora: bool = False, init=None) -> nn.Module:
    """Freeze ``model`` and wrap every target linear; ``make_base(name, linear)`` may swap the base
    (quantize it) and ``init(name, linear, base) -> (A, B)`` may set the adapter's start (else
    ``cfg.init`` does)."""
    moves_base = base_changing(cfg)
    if cfg.init != "default" and init is not None:
        raise ValueError(f"init={cfg.init!r}: this method sets the adapter's start itself; leave init at 'default'")
    if moves_base and (make_base is not None or dora):
        raise ValueError(f"init={cfg.init!r} needs a plain, full-precision base and plain LoRA (method 'lora'); "
                         "it is not supported with a quantized base or DoRA")
    freeze(model)
    types = linear_types() if cfg.target_modules == "all-linear" else (*linear_types(), nn.Embedding)
    for name, lin in find_linears(model, cfg.target_modules, types):
        if isinstance(lin, nn.Embedding):  # never quantized (QLoRA quantizes linears only), PEFT's init
            if dora:
                raise ValueError(f"{name}: DoRA on an embedding is not supported; use method 'lora' for it")
            if moves_base:
                raise ValueError(f"{name}: init={cfg.init!r} on an embedding is not supported; target linears only")
            replace_module(model, name, LoRAEmbedding(lin, cfg.r, scaling(cfg)))
            continue
        if moves_base and not isinstance(lin, (nn.Linear, conv1d_class())):
            raise ValueError(f"{name}: init={cfg.init!r} needs a plain linear base, got {type(lin).__name__}")
        base = make_base(name, lin) if make_base else lin
        if init:
            A, B = init(name, lin, base)
        elif moves_base:
            A, B = principal_start(lin, cfg)
        elif cfg.init == "gaussian":
            A, B = gaussian_start(lin, cfg)
        else:
            A, B = None, None
        mod = LoRALinear(base, cfg.r, scaling(cfg), cfg.dropout, dora, A, B)
        if moves_base:
            with torch.no_grad():
                w = dense_weight(lin)
                res = (w.float() - scaling(cfg) * (B.float() @ A.float())).to(w.dtype)
                lin.weight.data = (res.T if is_transposed(lin) else res).contiguous()
            mod.keep_start()
        replace_module(model, name, mod)
    return model


def merge_model(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W0 + s B A; returns the plain model."""
    for name, mod in lora_modules(model):
        replace_module(model, name, mod.to_plain())
    return model


def merge_in_place(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base but keep the modules, so ``unmerge_model`` can undo it."""
    for _, mod in lora_modules(model):
        mod.merge_()
    return model


def unmerge_model(model: nn.Module) -> nn.Module:
    for _, mod in lora_modules(model):
        mod.unmerge_()
    return model


def loraplus_groups(model: nn.Module, cfg: LoRAConfig, lr: float, weight_decay: float) -> list[dict] | None:
    """LoRA+'s optimizer parameter groups (None without ``loraplus_lr_ratio``), as PEFT's
    ``create_loraplus_optimizer`` builds them: A and other matrices at lr; an embedding's adapter at
    ``loraplus_lr_embedding``; B and every 1-D tensor at lr x ratio, without weight decay for biases
    and LayerNorm weights."""
    if cfg.loraplus_lr_ratio is None:
        return None
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    groups: dict[str, list] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if isinstance(model.get_submodule(owner), LoRAEmbedding):
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            groups["B" if "bias" not in name and owner not in norms else "B_no_decay"].append(p)
        else:
            groups["A"].append(p)
    fast = lr * cfg.loraplus_lr_ratio
    return [
        {"params": groups["A"], "weight_decay": weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": weight_decay, "lr": cfg.loraplus_lr_embedding},
        {"params": groups["B"], "weight_decay": weight_decay, "lr": fast},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": fast},
    ]


class LoRA:
    name = "lora"
    Config = LoRAConfig
    dora = False
    recommended_lr = 3e-4  # AdamW, r 8 on all linears (tunelab's SST-2 runs; the LoRA paper's GLUE range 2e-4..5e-4)
    about_defaults = ("init: default|gaussian|pissa|pissa_niter_K|olora (PiSSA/OLoRA keep the residual in the base); "
                      "loraplus_lr_ratio: LoRA+ (B at lr x ratio; the paper suggests 16 with a lr about half LoRA's)")

    def attach(self, model: nn.Module, cfg: LoRAConfig) -> nn.Module:
        return inject(model, cfg, dora=self.dora)

    param_groups = staticmethod(loraplus_groups)  # the optimizer asks (tunelab.training.optimizer.build)

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_model(model)

    def unmerge(self, model: nn.Module) -> nn.Module:
        return unmerge_model(model)


class DoRA(LoRA):
    name = "dora"
    dora = True


METHODS.register(LoRA.name, LoRA())
METHODS.register(DoRA.name, DoRA())
