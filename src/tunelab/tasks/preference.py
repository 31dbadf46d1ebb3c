"""Preference tuning on pairs of responses (DPO, SimPO, ORPO), with any method.

Data: JSON/JSONL/CSV records with ``prompt``, ``chosen`` and ``rejected`` (task.fields maps other
column names), read and validated by ``tunelab.data.readers.read_preferences``: chat form too, ``prompt``
a list of turns (OpenAI or ShareGPT) and ``chosen``/``rejected`` turn lists ending in the assistant's
answer (as in Anthropic-HH-style dumps, where both repeat the prompt: the shared leading turns become
the prompt). ``file.jsonl#rows=0:800`` selects rows. A row whose fields are missing, empty or not
text, whose two responses are identical, or whose answer spans several turns, is an error naming
file, line and field.

Training: each pair becomes prompt+chosen and prompt+rejected (loss positions on the response only);
a batch holds the chosen rows, then the rejected rows, so one forward scores both. The objective is
``objective``: dpo (reference = the base model, via the method's off switch), simpo or orpo
(reference-free); formulas in ``tunelab.tasks.objectives``.

Metrics on held-out pairs: reward_accuracy (first), reward_margin, chosen_logp, rejected_logp (mean
summed log-probability of each response), logp_accuracy (the model itself prefers the chosen one),
and eval_loss (the training objective's loss on the pairs); implicit rewards are beta * (log pi - log pi_base), so they
are measured against the base model whatever the training objective.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tunelab.data.encoding import Collator, encode_lm
from tunelab.data.readers import read_preferences
from tunelab.errors import DataError
from tunelab.tasks.base import TASKS, TaskConfig, render_prompt
from tunelab.tasks.objectives import Preference, pair_stats
from tunelab.tasks.shared import split_source


class PreferenceConfig(TaskConfig):
    objective: Literal["dpo", "simpo", "orpo"] = "dpo"
    beta: float = Field(0.1, gt=0)  # DPO/SimPO temperature; also scales the reported implicit rewards
    gamma: float = Field(0.5, ge=0)  # SimPO's target margin
    lam: float = Field(0.1, ge=0)  # ORPO's weight of the odds-ratio term
    # DPO: robust DPO's label-flip rate (TRL "robust"); SimPO: conservative smoothing (TRL CPO "simpo")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    # ORPO's NLL term: "trl" = token mean over the batch's chosen prompt+response tokens (TRL 1.16),
    # "response" = each pair's chosen response token mean (the ORPO paper)
    orpo_nll: Literal["trl", "response"] = "trl"
    system: str | None = None
    max_length: int = Field(512, ge=8)  # for evaluation (training uses data.max_length)


def _answer(side, where: str, key: str) -> str:
    """The response text of one side: a text, or a chat side that is one assistant turn."""
    if isinstance(side, str):
        return side.strip()
    if len(side) != 1:
        raise DataError(f"{where}: field {key!r}: the answer spans {len(side)} turns after the shared prompt; "
                        "preference pairs need one assistant answer")
    return side[0]["content"].strip()


class PairCollator:
    """Chosen rows first, then the rejected rows of the same pairs, padded together (2B rows)."""

    def __init__(self, pad_id: int):
        self.inner = Collator(pad_id)

    def __call__(self, features):
        if any("rejected_input_ids" not in f for f in features):
            raise ValueError("preference pairs cannot be packed (data.pack=true): each pair is two sequences")
        rejected = [{"input_ids": f["rejected_input_ids"], "labels": f["rejected_labels"],
                     "prompt_len": f["rejected_prompt_len"]} for f in features]
        chosen = [{k: f[k] for k in ("input_ids", "labels", "prompt_len")} for f in features]
        return self.inner(chosen + rejected)


class PreferenceTask:
    name = "preference"
    # The metric names evaluate() may report (a trailing * matches a prefix): compare checks --metric before training.
    metrics = ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "logp_accuracy", "eval_loss")
    selectors = ("rows",)  # data path selectors it applies itself (tunelab.tasks.splits)
    Config = PreferenceConfig

    def read(self, source, cfg, *, limit=None, skip_bad=False) -> list[dict]:
        path, rows = split_source(source, "rows")
        pairs = read_preferences(path, fields=cfg.fields, skip_bad=skip_bad)  # validated: see tunelab.data.readers
        out = []
        for ex in pairs[rows] if rows is not None else pairs:
            where = ex["_where"]
            chosen, rejected = _answer(ex["chosen"], where, "chosen"), _answer(ex["rejected"], where, "rejected")
            out.append({"prompt": ex["prompt"], "chosen": chosen, "rejected": rejected, "_where": where})
            if limit is not None and len(out) >= limit:
                break
        if not out:
            raise DataError(f"{source}: no valid preference pairs")
        return out

    def head(self, cfg, examples):
        if cfg.formulation != "lm":
            raise ValueError("task 'preference' has only the 'lm' formulation")
        return None

    def prompt(self, ex, tokenizer, cfg) -> str:
        if isinstance(ex["prompt"], str):
            return render_prompt(tokenizer, ex["prompt"], cfg.chat, system=cfg.system)
        msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + ex["prompt"]
        if cfg.chat and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant: "

    def encode(self, ex, tokenizer, cfg, max_length) -> dict:
        prompt = self.prompt(ex, tokenizer, cfg)
        c = encode_lm(tokenizer, prompt, ex["chosen"], max_length)
        r = encode_lm(tokenizer, prompt, ex["rejected"], max_length)
        return {**c, "rejected_input_ids": r["input_ids"], "rejected_labels": r["labels"],
                "rejected_prompt_len": r["prompt_len"]}

    def collator(self, tokenizer):
        return PairCollator(tokenizer.pad_token_id)

    def objective(self, cfg):
        return Preference(cfg.objective, cfg.beta, cfg.gamma, cfg.lam, cfg.label_smoothing, cfg.orpo_nll)

    @torch.no_grad()
    def evaluate(self, model, tokenizer, examples, cfg, *, batch_size=16, gen=None, split=False):
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        collate = self.collator(tokenizer)
        feats = [self.encode(ex, tokenizer, cfg, cfg.max_length) for ex in examples]
        objective = self.objective(cfg)
        pc, pr, rc, rr, losses = [], [], [], [], []
        step = max(1, batch_size // 2)  # each pair is two rows
        for s in range(0, len(feats), step):
            batch = {k: v.to(device) for k, v in collate(feats[s : s + step]).items()}
            st = pair_stats(model, batch, whole=objective.needs_whole)
            for acc, t in zip((pc, pr, rc, rr, losses), (*st["policy"], *st["reference"], objective.pair_losses(st)), strict=True):
                acc.append(t.float().cpu())
        model.train(was_training)
        pc, pr, rc, rr, losses = (torch.cat(t) for t in (pc, pr, rc, rr, losses))
        wc, wr = cfg.beta * (pc - rc), cfg.beta * (pr - rr)
        half = lambda a, b: ((a > b).float() + 0.5 * (a == b).float())  # noqa: E731  (a tie counts 1/2)
        correct = half(wc, wr)
        metrics = {"reward_accuracy": correct.mean().item(), "reward_margin": (wc - wr).mean().item(),
                   "chosen_logp": pc.mean().item(), "rejected_logp": pr.mean().item(),
                   "logp_accuracy": half(pc, pr).mean().item(), "eval_loss": losses.mean().item(), "n": len(examples)}
        preds = [{"where": ex["_where"], "chosen_reward": float(a), "rejected_reward": float(b),
                  "prediction": "chosen" if a > b else "rejected", "reference": "chosen"}
                 for ex, a, b in zip(examples, wc.tolist(), wr.tolist(), strict=True)]
        return metrics, preds


TASKS.register(PreferenceTask.name, PreferenceTask())
