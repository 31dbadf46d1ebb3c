"""GRPO: group relative policy optimisation with verifiable rewards (the ``rl`` task's objective).

Each training step, for every prompt of the step's batches (``rollout``, called by the loop through
the objective's ``step_batches`` hook before the forward passes):

1. sample G completions per prompt with tunelab's batched decoding (``tunelab.evaluation.decoding``:
   KV cache, rows leave as they finish) in eval mode without autograd, at ``temperature`` /
   ``top_p`` / ``top_k`` from torch's global RNG (which checkpoints save per rank: a resumed run
   samples what the uninterrupted one would). A completion that ended with EOS keeps the EOS token
   (the model learns to stop); one that hit ``max_new_tokens`` is cut there.
2. score each completion: r_i = sum_k w_k * reward_k(completion_i, row) (``tunelab.tasks.rewards``).
3. group-relative advantages over the G completions of a prompt (r: its G rewards):
       A_i = r_i - mean(r)                                      scale_rewards "none"
       A_i = (r_i - mean(r)) / (std(r) + 1e-4)                  "group" (TRL's default; std unbiased)
       A_i = (r_i - mean(r)) / (std(all rewards of the batch) + 1e-4)   "batch"
A group's G completions are sampled, scored and normalised on one process (under torchrun each
rank draws its own prompts), so advantages never mix processes.

The loss over completion tokens t of completion i (pi: the policy, pi_old: the policy that
sampled, pi_ref: the base model, via ``tunelab.disabled(model)``; full fine-tuning keeps a frozen
copy as DPO does; all log-probabilities of logits / temperature):

    ratio_it = exp(log pi(y_it) - log pi_old(y_it))     (= 1 with num_iterations 1: pi_old = pi, detached)
    l_it = -min(ratio_it * A_i, clip(ratio_it, 1 - epsilon, 1 + epsilon_high) * A_i)
           + beta * (exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1)      (k3 KL estimate; beta 0 skips)
    grpo     loss = mean_i ( sum_t l_it / |y_i| )                 (sequence mean, then batch mean)
    dapo     loss = sum_it l_it / sum_i |y_i|                     (token mean over the whole step; TRL's default)
    dr_grpo  loss = sum_it l_it / (n_completions * max_new_tokens)

as TRL 1.16.0 computes them (trl/trainer/grpo_trainer.py ``GRPOTrainer._compute_loss``, and the
advantages of ``_generate_and_score_completions``, importance_sampling_level "token"); its defaults:
loss_type dapo, beta 0, epsilon 0.2, scale_rewards group, num_iterations 1, temperature 1.
tests/test_grpo.py calls TRL's ``_compute_loss`` on the same batch for each loss type.
``num_iterations`` mu > 1: each rollout batch is optimised mu times (mu optimizer steps) before
the next prompts are drawn; pi_old is the policy at the rollout.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from tunelab.data.encoding import Collator
from tunelab.runtime import distributed as dist
from tunelab.tasks import rewards as rw
from tunelab.tasks.objectives import IGNORE, _reference, needs_frozen_copy

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, whether each row's group std is zero) of ``rewards`` laid out as consecutive groups of ``group``."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1).repeat_interleave(group)
    if scale in ("group", "none"):
        std = grouped.std(1).repeat_interleave(group) if group > 1 else torch.zeros_like(rewards)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards {scale!r} is unknown; allowed: group, batch, none")
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return adv, torch.isclose(std, torch.zeros_like(std))


def token_logps(model, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each next token, mask of the completion tokens), both (rows, length - 1)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "prompt_mask") if k in batch}
    logits = model(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    picked = logits[mask].float() / temperature  # (completion tokens, vocab): the softmax only where a target is
    lp = torch.gather(F.log_softmax(picked, -1), 1, labels[mask].unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(labels.shape, dtype=lp.dtype, device=lp.device)
    return out.masked_scatter(mask, lp), mask


def policy_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type: str = "dapo", beta: float = 0.0,
                epsilon: float = 0.2, epsilon_high: float | None = None, max_new_tokens: int = 256) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of one batch (formulas in the module docstring) and its statistics (KL, clip fraction)."""
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1).to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    hi = epsilon if epsilon_high is None else epsilon_high
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + hi)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats = {}
    n_tok = mask.sum().clamp(min=1.0)
    if beta:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
        stats["kl"] = float((kl.detach() * mask).sum() / n_tok)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / n_tok
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_new_tokens)
    else:
        raise ValueError(f"loss_type {loss_type!r} is unknown; allowed: {', '.join(LOSS_TYPES)}")
    with torch.no_grad():
        r = ratio.detach()
        region = ((r < 1 - epsilon) & (adv < 0)) | ((r > 1 + hi) & (adv > 0))
        stats["clip_fraction"] = float((region.to(mask.dtype) * mask).sum() / n_tok)
    return loss, stats


class GRPO:
    """The GRPO objective: ``step_batches`` samples and scores, ``loss`` is the clipped surrogate."""

    scores_held_out = False  # no eval_loss: the held-out score is the task's own (greedy rewards)

    def __init__(self, cfg, reward_fns: list[tuple[str, object, float, dict]], rows_of):
        self.cfg, self.rows_of = cfg, rows_of  # rows_of: a batch's "row_bytes" -> the rows the rewards see
        self.rewards = reward_fns  # (name, function, weight, params)
        self.reuse = cfg.num_iterations  # optimizer steps per rollout batch (the loop's reuse)
        self.reuse_key = "task.num_iterations"
        self.last: dict = {}
        self.bar_keys = ("reward",)

    # -------------------------------------------------------- the loop's hooks
    def prepare(self, model) -> None:
        """With a KL term and a method without an off switch: a frozen copy as the reference."""
        if self.cfg.beta:
            needs_frozen_copy(model)

    def units(self, batch: dict) -> int:
        """What the batch's loss is a mean over: completion tokens (dapo) or completions (grpo, dr_grpo)."""
        if self.cfg.loss_type == "dapo":
            return int((batch["labels"][:, 1:] != IGNORE).sum())
        return batch["input_ids"].shape[0]

    def step_batches(self, model, tokenizer, micro: list[dict]) -> list[dict]:
        """The step's prompt batches -> training batches of prompt + sampled completion rows, with their
        advantages (and pi_old / pi_ref log-probabilities where the loss needs them)."""
        out, facts = [], []
        for b in micro:
            batch, f = self.rollout(model, tokenizer, b)
            out.append(batch)
            facts.append(f)
        rewards = torch.cat([f["rewards"] for f in facts])
        g = self.cfg.num_generations
        spread = rewards.view(-1, g).std(1) if g > 1 else torch.zeros(rewards.numel())
        lengths = torch.cat([f["lengths"] for f in facts]).float()
        seconds, generated = sum(f["seconds"] for f in facts), int(lengths.sum())
        self.last = {"reward": rewards.mean().item(), "reward_std_in_group": spread.mean().item(),
                     "zero_std_groups": float(torch.cat([f["zero"] for f in facts]).float().view(-1, g)[:, 0].mean()),
                     "completion_length": lengths.mean().item(), "rollout_s": seconds,
                     "rollout_tokens_per_s": generated / seconds if seconds else 0.0,
                     **{f"reward_{name}": torch.cat([f["parts"][name] for f in facts]).mean().item()
                        for name, *_ in self.rewards}}
        return out

    @torch.no_grad()
    def rollout(self, model, tokenizer, b: dict) -> tuple[dict, dict]:
        from tunelab.evaluation import decoding, inference

        cfg, g = self.cfg, self.cfg.num_generations
        device = b["input_ids"].device
        prompts = [row[m.bool()].tolist() for row, m in zip(b["input_ids"], b["attention_mask"], strict=True)]
        examples = self.rows_of(b["row_bytes"])
        rows = [p for p in prompts for _ in range(g)]
        eos = tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        t0 = time.perf_counter()
        was = model.training
        # a seed drawn from torch's global RNG (saved in checkpoints), offset by the rank: ranks sample apart
        seed = int(torch.randint(0, 2**62, (1,)).item()) + 1_000_003 * dist.rank()
        gen = torch.Generator(device=device).manual_seed(seed)
        with inference.inference(model, shared=False):
            toks = decoding.complete(model, tokenizer, rows, max_new_tokens=cfg.max_new_tokens, batch_size=len(rows),
                                     eos=eos_ids, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                                     top_k=cfg.top_k, generator=gen)
        model.train(was)
        seconds = time.perf_counter() - t0
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in toks]
        parts = {}
        total = torch.zeros(len(rows), dtype=torch.float32)
        for name, fn, weight, params in self.rewards:
            vals = []
            for i, text in enumerate(texts):
                ex = examples[i // g]
                try:
                    v = fn(text, ex, **params)
                except Exception as e:
                    raise ValueError(f"task.reward: reward {name!r} raised {type(e).__name__}: {e} on a sampled "
                                     f"completion {text[:80]!r}") from None
                if not rw.is_score(v):
                    raise ValueError(f"task.reward: reward {name!r} returned {v!r} on a sampled completion; "
                                     "a reward must return a finite number")
                vals.append(float(v))
            parts[name] = torch.tensor(vals)
            total += weight * parts[name]
        adv, zero = group_advantages(total, g, cfg.scale_rewards)
        feats = []
        for p, t in zip(rows, toks, strict=True):
            comp = list(t) + ([min(eos_ids)] if eos_ids and len(t) < cfg.max_new_tokens else [])
            feats.append({"input_ids": p + comp, "labels": [IGNORE] * len(p) + comp, "prompt_len": len(p)})
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids or {0})
        batch = {k: v.to(device) for k, v in Collator(pad)(feats).items()}
        batch["advantages"] = adv.to(device)
        if self.reuse > 1:  # pi_old: the policy that sampled (with mu = 1 it is the policy itself, detached)
            batch["old_logps"] = token_logps(model, batch, cfg.temperature)[0].detach()
        if cfg.beta:
            ref_model, ctx = _reference(model)
            with ctx:
                batch["ref_logps"] = token_logps(ref_model, batch, cfg.temperature)[0].detach()
        lengths = torch.tensor([len(t) for t in toks])
        return batch, {"rewards": total, "parts": parts, "zero": zero, "lengths": lengths, "seconds": seconds}

    def loss(self, model, batch: dict, base=None) -> torch.Tensor:
        if "advantages" not in batch:
            raise ValueError("the GRPO objective trains on rollouts: this batch holds prompts only")
        cfg = self.cfg
        logps, mask = token_logps(model, batch, cfg.temperature)
        old = batch.get("old_logps", logps.detach())
        loss, stats = policy_loss(logps, old, batch.get("ref_logps"), batch["advantages"], mask, loss_type=cfg.loss_type,
                                  beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                                  max_new_tokens=cfg.max_new_tokens)
        self.last.update(stats)
        return loss
