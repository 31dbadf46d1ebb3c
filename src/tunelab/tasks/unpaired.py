"""Unpaired good/bad examples with KTO, with any method: no pairs needed.

Data: JSON/JSONL/CSV records with ``prompt``, ``completion`` and ``label`` (``true`` = desirable,
``false`` = undesirable; JSON booleans, or the text true/false/1/0 as CSV has them); ``task.fields``
maps other column names; ``file.jsonl#rows=0:800`` selects rows. A row whose prompt or completion
is missing, empty or not text, or whose label is none of those, is an error naming file, line and field.

Training: each row becomes prompt + completion (loss positions on the completion only). A batch
also carries, for the KL estimate, each prompt followed by the previous row's completion (the
batch's completions shifted by one, as TRL does). The objective is ``kto`` (formula in
``tunelab.tasks.objectives``); the reference is the base model via the method's off switch (full
fine-tuning keeps a frozen copy). ``desirable_weight`` / ``undesirable_weight`` weigh the two kinds
of rows (TRL 1.16's defaults 1.0 / 1.0; its advice: weight so that desirable_weight x desirable rows
is 1 to 4/3 times undesirable_weight x undesirable rows).

Metrics on held-out rows: accuracy (first: the share of rows whose implicit reward
beta * (log pi - log pi_ref) has the label's sign, a zero counting one half, so an untrained model
reads 0.5), desirable_reward and undesirable_reward (their mean implicit rewards), kl (the batch KL
estimate, averaged) and eval_loss (the KTO loss).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tunelab.data.encoding import Collator, encode_lm
from tunelab.data.readers import read_records
from tunelab.errors import DataError
from tunelab.tasks.base import TASKS, TaskConfig, field_name, render_prompt
from tunelab.tasks.objectives import _reference, kto_loss, needs_frozen_copy, sequence_logps
from tunelab.tasks.shared import split_source

_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


class UnpairedConfig(TaskConfig):
    objective: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0)
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)
    system: str | None = None
    max_length: int = Field(512, ge=8)  # for evaluation (training uses data.max_length)


def _label(value, where: str, col: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(f"{where}: field {col!r} is {value!r}; a label is true (desirable) or false (undesirable)")


class KTO:
    """The KTO objective over batches of B rows + their B mismatched KL rows (``UnpairedCollator``)."""

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        self.beta, self.dw, self.uw = beta, desirable_weight, undesirable_weight
        self.last: dict = {}

    def prepare(self, model) -> None:
        needs_frozen_copy(model)

    def units(self, batch: dict) -> int:
        return batch["desirable"].shape[0]

    def stats(self, model, batch: dict, base=None) -> dict:
        rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "prompt_mask") if k in batch}
        kl_rows = {k[3:]: batch[k] for k in ("kl_input_ids", "kl_attention_mask", "kl_labels", "kl_prompt_mask") if k in batch}
        pol, _ = sequence_logps(model, rows)
        ref_model, ctx = _reference(base if base is not None else model)
        with torch.no_grad():
            pol_kl, _ = sequence_logps(model, kl_rows)
            with ctx:
                ref, _ = sequence_logps(ref_model, rows)
                ref_kl, _ = sequence_logps(ref_model, kl_rows)
        kl = (pol_kl - ref_kl).mean().clamp(min=0)
        return {"policy": pol, "reference": ref, "kl": kl, "desirable": batch["desirable"].bool()}

    def losses(self, st: dict) -> torch.Tensor:
        return kto_loss(st["policy"], st["reference"], st["desirable"], st["kl"], self.beta, self.dw, self.uw)

    def loss(self, model, batch: dict, base=None) -> torch.Tensor:
        st = self.stats(model, batch, base)
        reward = self.beta * (st["policy"].detach() - st["reference"])
        d = st["desirable"]
        self.last = {"kl": float(st["kl"]),
                     **({"desirable_reward": reward[d].mean().item()} if d.any() else {}),
                     **({"undesirable_reward": reward[~d].mean().item()} if (~d).any() else {})}
        return self.losses(st).mean()


class UnpairedCollator:
    """B rows, padded, with ``desirable`` (B,) and the B KL rows (prompt i + completion i-1) under ``kl_*``."""

    def __init__(self, pad_id: int):
        self.inner = Collator(pad_id)

    def __call__(self, features):
        if any("desirable" not in f for f in features):
            raise ValueError("unpaired rows cannot be packed (data.pack=true): each row needs its own KL row")
        rows = [{k: f[k] for k in ("input_ids", "labels", "prompt_len")} for f in features]
        shifted = []
        for i, f in enumerate(features):
            other = features[i - 1]
            p, c = f["input_ids"][: f["prompt_len"]], other["input_ids"][other["prompt_len"]:]
            shifted.append({"input_ids": p + c, "labels": [-100] * len(p) + c, "prompt_len": len(p)})
        batch = self.inner(rows)
        batch.update({f"kl_{k}": v for k, v in self.inner(shifted).items()})
        batch["desirable"] = torch.tensor([bool(f["desirable"]) for f in features])
        return batch


class UnpairedTask:
    name = "unpaired"
    selectors = ("rows",)  # data path selectors it applies itself (tunelab.tasks.splits)
    # The metric names evaluate() may report (a trailing * matches a prefix): compare checks --metric before training.
    metrics = ("accuracy", "desirable_reward", "undesirable_reward", "kl", "eval_loss")
    Config = UnpairedConfig

    def read(self, source, cfg, *, limit=None, skip_bad=False) -> list[dict]:
        pcol, ccol, lcol = (field_name(cfg, k) for k in ("prompt", "completion", "label"))
        path, rows = split_source(source, "rows")
        records = read_records(path, skip_bad=skip_bad, required=[pcol, ccol], text=[pcol, ccol])
        out = []
        for r in records[rows] if rows is not None else records:
            try:
                if lcol not in r:
                    raise DataError(f"{r['_where']}: field {lcol!r} is missing (present: "
                                    f"{sorted(k for k in r if k != '_where')}; map your columns with task.fields)")
                good = _label(r[lcol], r["_where"], lcol)
            except DataError:
                if skip_bad:
                    continue
                raise
            out.append({"prompt": str(r[pcol]).strip(), "completion": str(r[ccol]).strip(), "desirable": good,
                        "_where": r["_where"]})
            if limit is not None and len(out) >= limit:
                break
        if not out:
            raise DataError(f"{source}: no valid rows with {pcol!r}, {ccol!r} and {lcol!r}")
        return out

    def head(self, cfg, examples):
        if cfg.formulation != "lm":
            raise ValueError("task 'unpaired' has only the 'lm' formulation")
        return None

    def encode(self, ex, tokenizer, cfg, max_length) -> dict:
        prompt = render_prompt(tokenizer, ex["prompt"], cfg.chat, system=cfg.system)
        return {**encode_lm(tokenizer, prompt, ex["completion"], max_length), "desirable": int(ex["desirable"])}

    def collator(self, tokenizer):
        return UnpairedCollator(tokenizer.pad_token_id)

    def objective(self, cfg):
        return KTO(cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)

    @torch.no_grad()
    def evaluate(self, model, tokenizer, examples, cfg, *, batch_size=16, gen=None, split=False):
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        collate, objective = self.collator(tokenizer), self.objective(cfg)
        feats = [self.encode(ex, tokenizer, cfg, cfg.max_length) for ex in examples]
        rewards, labels, losses, kls = [], [], [], []
        for s in range(0, len(feats), batch_size):
            batch = {k: v.to(device) for k, v in collate(feats[s: s + batch_size]).items()}
            st = objective.stats(model, batch)
            rewards.append((cfg.beta * (st["policy"] - st["reference"])).float().cpu())
            labels.append(st["desirable"].cpu())
            losses.append(objective.losses(st).float().cpu())
            kls.append(float(st["kl"]))
        model.train(was_training)
        r, d = torch.cat(rewards), torch.cat(labels)
        sign = torch.where(d, r, -r)
        metrics = {"accuracy": ((sign > 0).float() + 0.5 * (sign == 0).float()).mean().item(),
                   "desirable_reward": r[d].mean().item() if d.any() else float("nan"),
                   "undesirable_reward": r[~d].mean().item() if (~d).any() else float("nan"),
                   "kl": sum(kls) / len(kls), "eval_loss": torch.cat(losses).mean().item(), "n": len(examples)}
        preds = [{"where": ex["_where"], "reward": float(x), "reference": "desirable" if ex["desirable"] else "undesirable",
                  "prediction": "desirable" if x > 0 else "undesirable"} for ex, x in zip(examples, r.tolist(), strict=True)]
        return metrics, preds


TASKS.register(UnpairedTask.name, UnpairedTask())
