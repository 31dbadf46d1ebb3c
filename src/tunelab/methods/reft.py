"""ReFT (Wu et al., 2024): low-rank interventions on the residual stream; the model stays frozen.

    LoReFT  Phi(h) = h + R^T (W h + b - R h)    R (r x d) with orthonormal rows, W (r x d), b (r)
    DiReFT  Phi(h) = h + W2^T (W1 h + b)         W1, W2 (r x d), b (r), no orthogonality

h (d) is the output of a chosen block (the residual stream) at one token; the edit is applied only
at the first p and last s tokens of each prompt ("f7+l7"). A prompt of n < p+s tokens uses
p = min(p, n//2), s = min(s, ceil(n/2)) (the paper's rule; with one side only, it is cut to n).
Tied: one intervention per layer for both sides; untied: one for the prefix, one for the suffix.
Trainable parameters per intervention: 2 r d + r (the rows of R hold r d raw numbers).

Positions. The prompt is the ``prompt_mask`` of the batch ((B, P) bool, columns aligned with the
first forward's input columns; a kwarg, moved to ``model.tunelab_context`` by the context hook, or
set there directly by tunelab.evaluate), so training, scoring and generation share one rule with
left or right padding. Without one, every attended token of the first forward is the prompt (all
tokens when the attention mask is 4D). attention_mask, the input shape and the cache are not in the
context, so our own pre-hook on the top model (run before the context hook, which lets it tell a
fresh kwarg from one left over by an earlier forward) reads them and turns the prompt into flat
row indices for the current window of columns [past, past + T), past = cache.get_seq_length() (or
attention_mask width - T). Decode steps with a KV cache lie beyond the prompt and are never edited;
without a cache each step re-runs the whole sequence and the prompt columns get the same edit
(without a prompt_mask, a no_grad step whose first P ids equal the last prompt continues it). A
prompt_mask with fewer rows than the input (beams, several returns) is repeated per prompt. Each
block ``blocks[i].reft[key]`` (key "both" when tied, else "prefix"/"suffix") edits only those rows:
index_select, the formula, index_copy.

R is kept orthonormal by a Householder parametrization of our own (state key
``...rotate.parametrizations.weight.original``, r x d). torch's ``orthogonal`` is not used: its
householder map multiplies by ``diagonal().int()``, so weight decay on those zero-gradient entries
zeroes rows of R after one AdamW step, and its default trivialization keeps a d x d ``base``
buffer that is not a parameter (lost on save). Dropout acts on the edit, not on h (pyreft applies
it to the whole output). ReFT cannot be merged into the weights.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.nn.utils import parametrize

from tunelab import arch
from tunelab.methods.base import METHODS, MethodConfig, context, freeze


class ReftConfig(MethodConfig):
    layers: Literal["all"] | list[int] = "all"
    rank: int = Field(8, ge=1)
    positions: str = "f7+l7"
    tied: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, str) and v != "all":  # the paper's "3;9;18;24"
            v = [int(x) for x in re.split(r"[;,\s]+", v.strip()) if x]
        return v

    @field_validator("positions")
    @classmethod
    def _positions(cls, v):
        parse_positions(v)
        return v


def parse_positions(spec: str) -> tuple[int, int]:
    """ "f7+l7" -> (7, 7); "f5" -> (5, 0); "l3" -> (0, 3)."""
    m = re.fullmatch(r"\s*(?:f(\d+))?\s*\+?\s*(?:l(\d+))?\s*", spec)
    if not m or not (m.group(1) or m.group(2)):
        raise ValueError(f"positions={spec!r}: expected 'fP+lS', 'fP' or 'lS' (e.g. 'f7+l7')")
    return int(m.group(1) or 0), int(m.group(2) or 0)


def prompt_sites(prompt_mask: torch.Tensor, p: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix, suffix) bool masks of prompt_mask's shape: the first p / last s tokens of every run
    of True (one run per prompt, several when packed), with the short-prompt rule."""
    m = prompt_mask.bool()
    B, L = m.shape
    ar = torch.arange(L, device=m.device).expand(B, L)
    start = m & ~F.pad(m, (1, 0))[:, :-1]
    end = m & ~F.pad(m, (0, 1))[:, 1:]
    first = torch.where(start, ar, 0).cummax(1).values  # start column of the run holding t
    last = torch.where(end, ar, L).flip(1).cummin(1).values.flip(1)
    idx, n = ar - first, last - first + 1
    pp, ss = torch.full_like(n, p), torch.full_like(n, s)
    if p and s:
        short = n < p + s
        pp = torch.where(short, pp.minimum(n // 2), pp)
        ss = torch.where(short, ss.minimum((n + 1) // 2), ss)
    prefix = m & (idx < pp)
    return prefix, m & (n - 1 - idx < ss) & ~prefix


class _Householder(nn.Module):
    """X (r x d) -> r orthonormal rows: the product of r Householder reflections whose vectors
    are the strictly lower part of X^T. X's diagonal and upper part are unused."""

    def forward(self, X):
        A = X.float().mT.tril(-1)
        tau = 2.0 / (1.0 + (A * A).sum(-2))
        return torch.linalg.householder_product(A, tau).mT.to(X.dtype)


class LoReFT(nn.Module):
    tunelab_active = True  # False: h passes unchanged (tunelab.disabled)

    def __init__(self, d: int, r: int, dropout: float = 0.0):
        super().__init__()
        if r > d:
            raise ValueError(f"rank={r} exceeds the hidden size {d}")
        self.rotate = nn.Linear(d, r, bias=False)
        with torch.no_grad():  # start from a random orthonormal R (the reference's init)
            self.rotate.weight.copy_(torch.geqrf(nn.init.orthogonal_(torch.empty(d, r)))[0].mT)
        parametrize.register_parametrization(self.rotate, "weight", _Householder())
        self.learned_source = nn.Linear(d, r)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h):  # h (K, d) -> (K, d)
        R = self.rotate.weight
        x = h.to(R.dtype)
        return h + self.dropout((self.learned_source(x) - x @ R.T) @ R).to(h.dtype)


class DiReFT(nn.Module):
    tunelab_active = True

    def __init__(self, d: int, r: int, dropout: float = 0.0):
        super().__init__()
        self.learned_source = nn.Linear(d, r)  # W1, b
        self.proj = nn.Linear(d, r, bias=False)  # W2
        self.dropout = nn.Dropout(dropout)

    def forward(self, h):
        x = h.to(self.proj.weight.dtype)
        return h + self.dropout(self.learned_source(x) @ self.proj.weight).to(h.dtype)


def _blocks(model: nn.Module, stack: str | None = None) -> nn.ModuleList:
    """The blocks of ``stack`` (default: the family's, from tunelab.arch: the encoder of T5/BART)."""
    return arch.blocks(model, stack)


class _Sites:
    """Per-forward state: which flat rows (b * T + t) each intervention edits."""

    def __init__(self, p: int, s: int, keys: list[str]):
        self.p, self.s, self.keys = p, s, keys
        self.shape, self.rows = None, {}
        self.last_kwarg = None  # a prompt_mask passed as a kwarg goes stale after its forward
        self.prompt = self.prompt_ids = self.device = None  # the prompt of the last first forward

    def _prompt(self, ctx_mask, kw_mask, ids, am, past, B, T):
        if kw_mask is not None:
            self.last_kwarg = kw_mask
            return kw_mask
        if ctx_mask is not None and ctx_mask is not self.last_kwarg:
            return ctx_mask  # set directly in the context (evaluate / generate)
        if self.prompt is not None and self.prompt.shape[0] == B:
            P, old = self.prompt.shape[1], self.prompt_ids
            cont = ids is not None and old is not None and T > P and torch.equal(ids[:, :P], old)
            if past > 0 or (cont and not torch.is_grad_enabled()):  # a decode step, or a no-cache one
                return self.prompt
        if past > 0:
            return torch.zeros(B, 0, dtype=torch.bool, device=self.device)
        if am is not None and am.dim() == 2 and am.shape[1] == T:
            return am.bool()
        return torch.ones(B, T, dtype=torch.bool, device=self.device)  # no (or a 4D) mask: all is prompt

    def pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs["inputs_embeds"]
        B, T = x.shape[:2]
        self.device = x.device
        am = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        else:
            past = am.shape[1] - T if am is not None and am.dim() == 2 else 0
        pm = self._prompt(context(module).get("prompt_mask"), kwargs.get("prompt_mask"), ids, am, past, B, T)
        pm = pm.to(x.device).bool()
        if past == 0:
            self.prompt, self.prompt_ids = pm, (ids[:, : pm.shape[1]] if ids is not None else None)
        if pm.shape[0] != B:
            if pm.shape[0] == 0 or B % pm.shape[0]:
                raise ValueError(f"prompt_mask has {pm.shape[0]} rows but the input has {B}")
            pm = pm.repeat_interleave(B // pm.shape[0], 0)  # beams / several returns per prompt
        pre, suf = prompt_sites(pm, self.p, self.s)
        sides = {"both": pre | suf, "prefix": pre, "suffix": suf}
        self.shape, self.rows = (B, T), {}
        for key in self.keys:
            w = sides[key][:, past : past + T]
            w = F.pad(w, (0, T - w.shape[1]))
            self.rows[key] = w.reshape(-1).nonzero().squeeze(1)

    def edit(self, block, args, output):
        h = output if isinstance(output, torch.Tensor) else output[0]
        B, T, d = h.shape
        if (B, T) != self.shape:
            raise RuntimeError(
                f"ReFT: a block saw input {(B, T)} but the top model's forward had {self.shape}; "
                "call the model that tunelab.attach returned, not an inner module"
            )
        if all(r.numel() == 0 for r in self.rows.values()):
            return None
        flat = h.reshape(B * T, d)
        for key, rows in self.rows.items():
            if rows.numel() and block.reft[key].tunelab_active:
                flat = flat.index_copy(0, rows, block.reft[key](flat.index_select(0, rows)))
        h = flat.view(B, T, d)
        return h if isinstance(output, torch.Tensor) else (h, *output[1:])


class _Reft:
    Config = ReftConfig
    merge_refusal = (
        "ReFT edits hidden states at chosen prompt positions, not weights; no weight "
        "change reproduces it, so keep the interventions attached (they only touch the prompt)"
    )

    def __init__(self, name: str, module: type[nn.Module]):
        self.name, self.module = name, module

    def attach(self, model: nn.Module, cfg: ReftConfig) -> nn.Module:
        freeze(model)
        blocks = _blocks(model)
        n, d = len(blocks), arch.hidden_size(model)
        layers = list(range(n)) if cfg.layers == "all" else cfg.layers
        bad = [i for i in layers if not -n <= i < n]
        if bad or not layers or len({i % n for i in layers}) != len(layers):
            raise ValueError(f"layers={cfg.layers}: need distinct block indices in [0, {n}) (or -{n}..-1), or 'all'")
        p, s = parse_positions(cfg.positions)
        keys = ["both"] if cfg.tied else [k for k, c in (("prefix", p), ("suffix", s)) if c]
        sites = _Sites(p, s, keys)
        for i in sorted(i % n for i in layers):
            block = blocks[i]
            ref = next(block.parameters())
            block.reft = nn.ModuleDict({k: self.module(d, cfg.rank, cfg.dropout) for k in keys})
            block.reft.to(ref.device)
            block.register_forward_hook(sites.edit)
        model.register_forward_pre_hook(sites.pre_hook, with_kwargs=True, prepend=True)
        model.tunelab_reft = sites
        return model


METHODS.register("loreft", _Reft("loreft", LoReFT))
METHODS.register("direft", _Reft("direft", DiReFT))
