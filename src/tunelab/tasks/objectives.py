"""Training objectives beyond token cross-entropy: preference tuning (DPO, SimPO, ORPO, KTO).

The loop asks the task for an objective (``task.objective(cfg)``); without one it trains the token
cross-entropy ``model(**batch).loss``. A preference batch holds 2B rows: B chosen sequences, then
the B rejected ones of the same pairs (prompt + response, labels -100 on the prompt and pads). With
log pi(y|x) = sum over the response tokens of log p, and |y| the response length:

    DPO    z = beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)))
           loss = -log sigmoid(z)                                  (label_smoothing eps = 0: TRL "sigmoid")
           loss = (-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)) / (1 - 2 eps)
                                                  (eps > 0: robust DPO, Chowdhury et al. 2024; TRL "robust")
    SimPO  z = beta * (log pi(y_w|x) / |y_w| - log pi(y_l|x) / |y_l|) - gamma
           loss = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)  (conservative smoothing; no reference model)
    ORPO   a = mean-token log p of the response, log odds(y) = a - log(1 - exp(a))
           loss = NLL - lam * log sigmoid(log odds(y_w) - log odds(y_l))    (no reference model)
           NLL (orpo_nll "trl", the default): the token-mean cross-entropy over the prompt AND response
               tokens of all the batch's chosen rows (every real token but each row's first), one number
               per batch, as TRL computes it; in a pair's loss each pair carries B * its share of that sum
           NLL (orpo_nll "response", the ORPO paper's): each pair's chosen response token-mean NLL, -a(y_w)
    KTO    (unpaired rows: prompt x, completion y, label desirable or not; tunelab.tasks.unpaired)
           r = log pi(y|x) - log pi_ref(y|x)
           z0 = max(0, mean over the batch of (log pi(y'|x) - log pi_ref(y'|x)))   (detached; y' is the
                completion of the batch's previous row: mismatched pairs estimate the KL)
           loss = desirable_weight * (1 - sigmoid(beta * (r - z0)))        for a desirable row
           loss = undesirable_weight * (1 - sigmoid(beta * (z0 - r)))      for an undesirable row
           the batch's loss is the mean over its rows

as TRL 1.16.0 computes them (KTO: trl/trainer/kto_trainer.py `KTOTrainer._compute_loss`, loss_type "kto"); trl/trainer/dpo_trainer.py `DPOTrainer._compute_loss` (loss_type "sigmoid",
or "robust" when label_smoothing > 0: TRL 1.16's "sigmoid" ignores label_smoothing, so the conservative
DPO of earlier TRL releases is not available there); trl/experimental/cpo/cpo_trainer.py
`CPOTrainer.cpo_loss` (loss_type "simpo"); trl/experimental/orpo/orpo_trainer.py
`ORPOTrainer.get_batch_loss_metrics` (`concatenated_forward`'s chosen NLL + `odds_ratio_loss`).
tests/test_preference.py calls those TRL functions on the same log-probabilities.

The reference of DPO is the frozen base: the same model under ``tunelab.disabled(model)`` (the
method's update switched off, exact, no second copy). A method without an off switch (full
fine-tuning) gets a frozen copy made before its first step (twice the weights in memory).
Implicit rewards r = beta * (log pi - log pi_ref) give the metrics: reward accuracy (share of pairs
with r_w > r_l, a tie counting one half, so an untouched model reads 0.5), reward margin, and the
mean log-probabilities of chosen and rejected responses.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from tunelab.methods.base import has_switch, switched_off

IGNORE = -100


def sequence_logps(model, batch: dict, whole: bool = False):
    """(sum of log p over each row's target tokens, number of target tokens) for a causal LM batch.

    With ``whole``, also (sum of log p over every real token of each row but its first, their number):
    prompt and response, as TRL's ORPO NLL counts them (``attention_mask`` marks the real tokens).
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logp_all = F.log_softmax(model(**inputs).logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logp = torch.gather(logp_all, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    out = ((logp * mask).sum(-1), mask.sum(-1))
    if not whole:
        return out
    ids = batch["input_ids"]
    attn = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn.bool()
    every = real[:, 1:] & real[:, :-1]  # a token predicted from a real token of its own row
    tok = torch.gather(logp_all, 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (*out, (tok * every).sum(-1), every.sum(-1))


def kto_loss(pol: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-example KTO loss from summed completion log-probabilities of the policy (``pol``) and the
    reference (``ref``), the examples' labels (``desirable``, bool) and the batch's KL estimate ``kl``
    (detached, >= 0): desirable rows first, then undesirable ones, as TRL orders them."""
    ratio = pol - ref
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio[desirable] - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio[~desirable])))
    return torch.cat([good, bad])


def smoothed_sigmoid_loss(z: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss from policy (pc, pr) and reference (rc, rr) summed log-probabilities.

    ``label_smoothing`` eps > 0 gives robust DPO (TRL 1.16 loss_type "robust", eps in [0, 0.5)): the
    unbiased loss under labels flipped with probability eps; eps = 0 is TRL's "sigmoid"."""
    z = beta * ((pc - rc) - (pr - rr))
    if not label_smoothing:
        return -F.logsigmoid(z)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def simpo_loss(avg_c, avg_r, beta: float, gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair SimPO loss from length-normalised policy log-probabilities."""
    return smoothed_sigmoid_loss(beta * (avg_c - avg_r) - gamma, label_smoothing)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, stable near 0 and for very negative a."""
    return torch.where(a > -0.6931, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def orpo_loss(avg_c, avg_r, lam: float, nll: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair ORPO loss: NLL minus lam * log sigmoid(log odds ratio). ``nll`` is each pair's NLL term
    (default: the chosen response's token-mean NLL, -avg_c, the paper's form)."""
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    return (-avg_c if nll is None else nll) - lam * F.logsigmoid(log_odds)


def trl_orpo_nll(whole_c: torch.Tensor, n_whole_c: torch.Tensor) -> torch.Tensor:
    """TRL's ORPO NLL spread over the B pairs: each pair's -B * (its summed log p / the batch's token count),
    so their mean is the batch's token-mean cross-entropy over the chosen rows' prompt and response tokens."""
    return -whole_c * whole_c.shape[0] / n_whole_c.sum().clamp(min=1)


def _reference(model):
    """A context in which ``model`` computes as the reference: its update switched off, or its frozen copy."""
    frozen = model.__dict__.get("tunelab_reference")
    if frozen is not None:
        return frozen[0], contextlib.nullcontext()
    if has_switch(model):
        return model, switched_off(model)
    if getattr(model, "tunelab_method", None):
        raise ValueError(
            f"method '{model.tunelab_method['name']}' has no off switch and no frozen reference copy: preference "
            "metrics need the base model (train the run with tunelab, which keeps a copy, or use a PEFT method)"
        )
    return model, contextlib.nullcontext()  # nothing attached: the model is its own reference


def needs_frozen_copy(model) -> None:
    """Before the first step of an objective with a reference: a method without an off switch (full
    fine-tuning) gets a frozen copy of the model as it is now (``_reference`` then uses it)."""
    if not has_switch(model) and "tunelab_reference" not in model.__dict__:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        model.__dict__["tunelab_reference"] = (frozen,)  # a tuple: not registered as a submodule


class Preference:
    """A preference objective (``kind``: dpo | simpo | orpo) over chosen-then-rejected batches."""

    def __init__(self, kind: str = "dpo", beta: float = 0.1, gamma: float = 0.5, lam: float = 0.1,
                 label_smoothing: float = 0.0, orpo_nll: str = "trl"):
        if kind not in ("dpo", "simpo", "orpo"):
            raise ValueError(f"preference objective {kind!r} is unknown; allowed: dpo, simpo, orpo")
        if orpo_nll not in ("trl", "response"):
            raise ValueError(f"orpo_nll {orpo_nll!r} is unknown; allowed: trl, response")
        self.kind, self.beta, self.gamma, self.lam, self.eps = kind, beta, gamma, lam, label_smoothing
        self.orpo_nll = orpo_nll
        self.last: dict = {}

    def prepare(self, model) -> None:
        """Before the first step: keep a frozen copy for a method without an off switch (DPO only)."""
        if self.kind == "dpo":
            needs_frozen_copy(model)

    def units(self, batch: dict) -> int:
        """What the batch's loss is a mean over: pairs."""
        return batch["input_ids"].shape[0] // 2

    def loss(self, model, batch: dict, base=None) -> torch.Tensor:
        """Mean loss over the batch's pairs; ``base`` is the unwrapped model (DDP) for the reference."""
        stats = pair_stats(model, batch, self.kind == "dpo", base, whole=self.needs_whole)
        self.last = summary(stats, self.beta)
        return self.pair_losses(stats).mean()

    @property
    def needs_whole(self) -> bool:
        """Whether the loss needs the chosen rows' prompt+response log-probabilities (TRL's ORPO NLL)."""
        return self.kind == "orpo" and self.orpo_nll == "trl"

    def pair_losses(self, stats: dict) -> torch.Tensor:
        """Per-pair loss from ``pair_stats`` (DPO needs its "reference")."""
        c, r = stats["policy"]
        nc, nr = stats["tokens"]
        if self.kind == "dpo":
            return dpo_loss(c, r, *stats["reference"], self.beta, self.eps)
        if self.kind == "simpo":
            return simpo_loss(c / nc, r / nr, self.beta, self.gamma, self.eps)
        nll = trl_orpo_nll(*stats["whole"]) if self.needs_whole else None
        return orpo_loss(c / nc, r / nr, self.lam, nll)


def pair_stats(model, batch: dict, with_reference: bool = True, base=None, whole: bool = False) -> dict:
    """Policy (and reference) summed log-probabilities of the chosen and rejected halves of ``batch``;
    with ``whole``, also "whole": the chosen rows' (summed log p, count) over prompt and response tokens."""
    logps, tokens, *rest = sequence_logps(model, batch, whole=whole)
    half = logps.shape[0] // 2
    out = {"policy": (logps[:half], logps[half:]), "tokens": (tokens[:half].clamp(min=1), tokens[half:].clamp(min=1))}
    if whole:
        out["whole"] = (rest[0][:half], rest[1][:half])
    if with_reference:
        top = base if base is not None else model
        ref_model, ctx = _reference(top)
        if ref_model is top and isinstance(ctx, contextlib.nullcontext):  # nothing attached: its own reference
            ref = logps.detach()
        else:
            with torch.no_grad(), ctx:
                ref, _ = sequence_logps(ref_model, batch)
        out["reference"] = (ref[:half], ref[half:])
    return out


def summary(stats: dict, beta: float) -> dict:
    """Reward accuracy (ties = 1/2), margin and mean log-probabilities of one batch, as floats."""
    c, r = (t.detach().float() for t in stats["policy"])
    out = {"chosen_logp": c.mean().item(), "rejected_logp": r.mean().item()}
    if "reference" in stats:
        rc, rr = (t.float() for t in stats["reference"])
        wc, wr = beta * (c - rc), beta * (r - rr)
        out.update(reward_accuracy=((wc > wr).float() + 0.5 * (wc == wr).float()).mean().item(),
                   reward_margin=(wc - wr).mean().item())
    return out
