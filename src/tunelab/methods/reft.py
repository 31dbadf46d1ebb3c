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
set there directly by tunelab.evaluation.scoring), so training, scoring and generation share one rule with
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

R's parametrization (trivialized at its identity point, as torch's ``orthogonal()`` that pyreft uses):

    R^T = B Q(X)        B (d x d) a fixed orthogonal base, Q(X) (d x r) = -H_1 ... H_r [:, :r]
    H_i = I - tau_i v_i v_i^T,  v_i = e_i + (strictly lower part of column i of X^T),  tau_i = 2/(1+|v_i - e_i|^2)

X (r x d, state key ``...rotate.parametrizations.weight.original``) starts at 0, where Q = I and
R = the first r columns of B transposed, a random orthonormal R. This is torch's householder map
with its column signs fixed to the identity point's (-1) instead of ``X.diagonal().int()``, so
one AdamW step on X moves R exactly as pyreft's does (the map and its derivative are the same),
but weight decay on X pulls R toward B's rows instead of zeroing them (pyreft's diagonal entries
get no gradient, decay below 1 in magnitude and ``int()`` then zeroes those rows of R). B is not
stored as d x d: it is the Q factor of ``geqrf`` of the initial R^T, kept as its d x r reflectors
and r scales (persistent buffers ``...weight.0.base_v``, ``...weight.0.base_tau``, saved with the
run), and applied with ``ormqr``. Runs saved by tunelab <= 0.1 (raw Householder vectors, no base)
are converted exactly on load (``upgrade_state``): B from the old R, X = 0, and the signs that
geqrf gives the old rows are folded into W and b (R^T (W h + b - R h) is unchanged by R -> D R,
W -> D W, b -> D b for a diagonal sign matrix D).

Options (the paper's rule is the default; pyreft's behaviour is one setting away):
- ``dropout_on``: "edit" (default) drops the edit R^T(...); "output" is pyreft's
  ``dropout(h + edit)`` (it also drops entries of h at the edited positions).
- ``short_prompt``: "paper" (above) or "pyreft": p = min(p, n//2), s = min(s, n//2) for every
  prompt (pyreft's ``get_intervention_locations``), not only short ones.
DiReFT is the paper's formula h + W2^T (W1 h + b) with a plain (not orthonormal) W2, which is
pyreft's ``NodireftIntervention`` (with ``add_bias=False`` on W2); pyreft's class named
``DireftIntervention`` keeps an orthonormal R in W2's place. ReFT cannot be merged into the weights.

Encoder-decoder models (T5, BART). ``stack`` picks the layers' stack: "encoder" (the default there),
"decoder" or "both"; ``layers`` indexes blocks within each chosen stack. The prompt is the encoder's
input, so encoder interventions act at the source's positions (first p / last s real source tokens;
the source is the whole prompt, its padding excluded). The decoder's only prompt position is its start
token (column 0 of the first decoder forward: in training, where the labels are shifted in behind it,
and at generation's first step, whose KV entries every later step then reads); target and generated
tokens are never edited, as the paper keeps interventions off generated tokens. ``stack`` on a
decoder-only or encoder-only model is an error.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.nn.utils import parametrize

from tunelab.methods.base import METHODS, MethodConfig, context, freeze
from tunelab.models import arch


class ReftConfig(MethodConfig):
    layers: Literal["all"] | list[int] = "all"
    rank: int = Field(8, ge=1)
    positions: str = "f7+l7"
    tied: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dropout_on: Literal["edit", "output"] = "edit"  # "output": pyreft's dropout(h + edit)
    short_prompt: Literal["paper", "pyreft"] = "paper"  # "pyreft": p, s = min(p, n//2), min(s, n//2)
    stack: Literal["encoder", "decoder", "both"] | None = None  # encoder-decoder models only (default encoder)

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


def prompt_sites(
    prompt_mask: torch.Tensor, p: int, s: int, rule: str = "paper"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix, suffix) bool masks of prompt_mask's shape: the first p / last s tokens of every run
    of True (one run per prompt, several when packed), with the short-prompt ``rule``."""
    m = prompt_mask.bool()
    B, L = m.shape
    ar = torch.arange(L, device=m.device).expand(B, L)
    start = m & ~F.pad(m, (1, 0))[:, :-1]
    end = m & ~F.pad(m, (0, 1))[:, 1:]
    first = torch.where(start, ar, 0).cummax(1).values  # start column of the run holding t
    last = torch.where(end, ar, L).flip(1).cummin(1).values.flip(1)
    idx, n = ar - first, last - first + 1
    pp, ss = torch.full_like(n, p), torch.full_like(n, s)
    if rule == "pyreft":
        pp, ss = pp.minimum(n // 2), ss.minimum(n // 2)
    elif p and s:
        short = n < p + s
        pp = torch.where(short, pp.minimum(n // 2), pp)
        ss = torch.where(short, ss.minimum((n + 1) // 2), ss)
    prefix = m & (idx < pp)
    return prefix, m & (n - 1 - idx < ss) & ~prefix


def householder_q(X: torch.Tensor) -> torch.Tensor:
    """X (r x d) -> Q (d x r) = -H_1 ... H_r [:, :r], the vectors the strictly lower part of X^T;
    Q(0) = I[:, :r]. X's diagonal and upper part are unused."""
    A = X.float().mT.tril(-1)
    tau = 2.0 / (1.0 + (A * A).sum(-2))
    return -torch.linalg.householder_product(A, tau)


class _Rotation(nn.Module):
    """X (r x d) -> R (r x d), R^T = B Q(X): orthonormal rows for any X (see the module docstring)."""

    tunelab_state = True  # the base B (its reflectors) is saved with the run

    def __init__(self, R0: torch.Tensor):
        super().__init__()
        v, tau = torch.geqrf(R0.detach().float().mT)
        self.register_buffer("base_v", v)
        self.register_buffer("base_tau", tau)

    def base(self) -> torch.Tensor:
        """B (d x d), for tests and for handing the same start to a reference."""
        d = self.base_v.shape[0]
        return torch.ormqr(self.base_v, self.base_tau, torch.eye(d, device=self.base_v.device))

    def forward(self, X):
        return torch.ormqr(self.base_v, self.base_tau, householder_q(X)).mT.to(X.dtype)


class LoReFT(nn.Module):
    tunelab_active = True  # False: h passes unchanged (tunelab.disabled)

    def __init__(self, d: int, r: int, dropout: float = 0.0, dropout_on: str = "edit"):
        super().__init__()
        if r > d:
            raise ValueError(f"rank={r} exceeds the hidden size {d}")
        self.rotate = nn.Linear(d, r, bias=False)
        R0 = nn.init.orthogonal_(torch.empty(d, r)).mT  # a random orthonormal start (the reference's)
        parametrize.register_parametrization(self.rotate, "weight", _Rotation(R0))
        with torch.no_grad():
            self.rotate.parametrizations.weight.original.zero_()  # the identity point: R = B[:, :r]^T
        self.learned_source = nn.Linear(d, r)
        self.dropout = nn.Dropout(dropout)
        self.dropout_on = dropout_on
        self._register_load_state_dict_pre_hook(self._upgrade)

    @staticmethod
    def _upgrade(state_dict, prefix, *args):
        # any load path (tunelab.load, resuming a checkpoint) converts a tunelab 0.1 state in place
        if prefix + "rotate.parametrizations.weight.original" in state_dict:
            state_dict.update(upgrade_state({k: v for k, v in state_dict.items() if k.startswith(prefix)}))

    def forward(self, h):  # h (K, d) -> (K, d)
        R = self.rotate.weight
        x = h.to(R.dtype)
        edit = (self.learned_source(x) - x @ R.T) @ R
        if self.dropout_on == "output":
            return self.dropout(x + edit).to(h.dtype)
        return h + self.dropout(edit).to(h.dtype)


def upgrade_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a LoReFT state saved by tunelab <= 0.1 (raw Householder vectors X_old, R = the
    product of their reflections, no base) into today's: the same R as B's first rows at X = 0,
    with geqrf's column signs folded into W and b (the edit does not change). Other states pass."""
    out = dict(state)
    suffix = "rotate.parametrizations.weight.original"
    for key in [k for k in state if k.endswith(suffix)]:
        pre = key[: -len(suffix)]
        if pre + "rotate.parametrizations.weight.0.base_v" in state:
            continue  # already today's format
        A = state[key].float().mT.tril(-1)
        R_old = torch.linalg.householder_product(A, 2.0 / (1.0 + (A * A).sum(-2))).mT  # r x d
        v, tau = torch.geqrf(R_old.mT)
        sign = torch.ormqr(v, tau, torch.eye(*R_old.mT.shape)).mT.mul(R_old).sum(1).sign()  # D
        for name in ("learned_source.weight", "learned_source.bias"):
            t = state[pre + name]
            out[pre + name] = (t.float() * (sign[:, None] if t.dim() == 2 else sign)).to(t.dtype)
        out[key] = torch.zeros_like(state[key])
        out[pre + "rotate.parametrizations.weight.0.base_v"] = v
        out[pre + "rotate.parametrizations.weight.0.base_tau"] = tau
    return out


class DiReFT(nn.Module):
    tunelab_active = True

    def __init__(self, d: int, r: int, dropout: float = 0.0, dropout_on: str = "edit"):
        super().__init__()
        self.learned_source = nn.Linear(d, r)  # W1, b
        self.proj = nn.Linear(d, r, bias=False)  # W2
        self.dropout = nn.Dropout(dropout)
        self.dropout_on = dropout_on

    def forward(self, h):
        x = h.to(self.proj.weight.dtype)
        edit = self.learned_source(x) @ self.proj.weight
        if self.dropout_on == "output":
            return self.dropout(x + edit).to(h.dtype)
        return h + self.dropout(edit).to(h.dtype)


def _blocks(model: nn.Module, stack: str | None = None) -> nn.ModuleList:
    """The blocks of ``stack`` (default: the family's, from tunelab.models.arch: the encoder of T5/BART)."""
    return arch.blocks(model, stack)


class _Sites:
    """Per-forward state: which flat rows (b * T + t) each intervention edits."""

    def __init__(self, p: int, s: int, keys: list[str], rule: str = "paper"):
        self.p, self.s, self.keys, self.rule = p, s, keys, rule
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
        pre, suf = prompt_sites(pm, self.p, self.s, self.rule)
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
    recommended_lr = 2e-3  # AdamW, constant lr as in tunelab's SST-2 runs; pyreft's GLUE recipes use 1e-3..4e-2
    about_defaults = (
        "the paper's short-prompt rule and dropout on the edit (pyreft's: short_prompt=pyreft, dropout_on=output); "
        "R trivialized at torch orthogonal()'s identity point like pyreft, so one step moves R as pyreft's does"
    )
    merge_refusal = (
        "ReFT edits hidden states at chosen prompt positions, not weights; no weight "
        "change reproduces it, so keep the interventions attached (they only touch the prompt)"
    )

    def __init__(self, name: str, module: type[nn.Module]):
        self.name, self.module = name, module
        if name == "direft":
            self.about_defaults = (
                "the paper's DiReFT h + W2^T (W1 h + b), W2 not orthonormal (= pyreft's NodireftIntervention); "
                "the paper's short-prompt rule and dropout on the edit (pyreft's: short_prompt=pyreft, dropout_on=output)"
            )

    def upgrade_state(self, model: nn.Module, state: dict, where) -> dict:
        """Saved states of older tunelab versions, in today's format (called by tunelab.load)."""
        return upgrade_state(state) if self.name == "loreft" else state

    def attach(self, model: nn.Module, cfg: ReftConfig) -> nn.Module:
        if getattr(model.config, "is_encoder_decoder", False):
            return attach_stacks(self.module, model, cfg)
        if cfg.stack is not None:
            raise ValueError(f"stack={cfg.stack!r} applies to encoder-decoder models (T5, BART) only; "
                             f"{type(model).__name__} has one stack: leave stack unset")
        freeze(model)
        blocks = _blocks(model)
        n, d = len(blocks), arch.hidden_size(model)
        layers = list(range(n)) if cfg.layers == "all" else cfg.layers
        bad = [i for i in layers if not -n <= i < n]
        if bad or not layers or len({i % n for i in layers}) != len(layers):
            raise ValueError(f"layers={cfg.layers}: need distinct block indices in [0, {n}) (or -{n}..-1), or 'all'")
        p, s = parse_positions(cfg.positions)
        keys = ["both"] if cfg.tied else [k for k, c in (("prefix", p), ("suffix", s)) if c]
        sites = _Sites(p, s, keys, cfg.short_prompt)
        for i in sorted(i % n for i in layers):
            block = blocks[i]
            ref = next(block.parameters())
            block.reft = nn.ModuleDict({k: self.module(d, cfg.rank, cfg.dropout, cfg.dropout_on) for k in keys})
            block.reft.to(ref.device)
            block.register_forward_hook(sites.edit)
        model.register_forward_pre_hook(sites.pre_hook, with_kwargs=True, prepend=True)
        model.tunelab_reft = sites
        return model


# ---------------------------------------------------------------- encoder-decoder stacks
class _StackSites(_Sites):
    """Sites for one stack of an encoder-decoder, found from that stack's own inputs (generation calls
    the encoder directly, not through the top model): the encoder's prompt is its attended tokens, the
    decoder's is column 0 of its first (cache-free) forward."""

    def __init__(self, p: int, s: int, keys: list[str], decoder: bool, rule: str = "paper"):
        super().__init__(p, s, keys, rule)
        self.decoder = decoder

    def pre_hook(self, stack, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs["inputs_embeds"]
        B, T = x.shape[:2]
        pm = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        if self.decoder:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if not (cache is not None and hasattr(cache, "get_seq_length") and int(cache.get_seq_length()) > 0):
                pm[:, 0] = True
        else:
            am = kwargs.get("attention_mask")
            pm = am.bool() if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[1] == T else ~pm
        pre, suf = prompt_sites(pm, self.p, self.s, self.rule)
        sides = {"both": pre | suf, "prefix": pre, "suffix": suf}
        self.shape = (B, T)
        self.rows = {key: sides[key].reshape(-1).nonzero().squeeze(1) for key in self.keys}


def attach_stacks(module: type[nn.Module], model: nn.Module, cfg: ReftConfig) -> nn.Module:
    freeze(model)
    d = model.config.hidden_size
    p, s = parse_positions(cfg.positions)
    keys = ["both"] if cfg.tied else [k for k, c in (("prefix", p), ("suffix", s)) if c]
    names = ["encoder", "decoder"] if cfg.stack == "both" else [cfg.stack or "encoder"]
    model.tunelab_reft = {}
    for name in names:
        stack = model.get_encoder() if name == "encoder" else model.get_decoder()
        blocks = arch.blocks(model, name)
        n = len(blocks)
        layers = list(range(n)) if cfg.layers == "all" else cfg.layers
        if any(not -n <= i < n for i in layers) or not layers or len({i % n for i in layers}) != len(layers):
            raise ValueError(f"layers={cfg.layers}: the {name} has {n} blocks; need distinct indices in [0, {n}) "
                             f"(or -{n}..-1), or 'all'")
        sites = _StackSites(p, s, keys, decoder=name == "decoder", rule=cfg.short_prompt)
        for i in sorted(i % n for i in layers):
            block = blocks[i]
            block.reft = nn.ModuleDict({k: module(d, cfg.rank, cfg.dropout, cfg.dropout_on) for k in keys})
            block.reft.to(next(block.parameters()).device)
            block.register_forward_hook(sites.edit)
        stack.register_forward_pre_hook(sites.pre_hook, with_kwargs=True, prepend=True)
        model.tunelab_reft[name] = sites
    return model


METHODS.register("loreft", _Reft("loreft", LoReFT))
METHODS.register("direft", _Reft("direft", DiReFT))
