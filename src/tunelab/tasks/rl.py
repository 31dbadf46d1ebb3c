"""Reinforcement learning with verifiable rewards: prompts, a reward program, GRPO; with any method.

Data: JSON/JSONL/CSV records with ``prompt`` and ``answer`` (the reference a reward checks against:
a number, a label, or a worked solution ending in ``#### N`` as GSM8K's own files have it; a JSON
number is read as its text). ``task.fields`` maps other columns (GSM8K: ``{prompt: question}``);
``file.jsonl#rows=0:800`` selects rows. A row whose prompt or answer is missing, empty or not text
is an error naming file, line and field.

Training (``objective: grpo``, ``tunelab.tasks.grpo``): a feature is the prompt alone (rendered with
``template`` and the chat template); each step the objective samples ``num_generations``
completions per prompt, scores them with ``reward`` and trains on them.

``reward``: a list of rewards, each a name (``numeric``, ``label``, ``format``, ``length``, or
``module:function``) or ``{name: ..., weight: 1.0, <the function's own parameters>}``; the
completion's reward is the weighted sum (``tunelab.tasks.rewards`` has the parsing rules). Every
reward is loaded and called once on the first training row before training.

Metrics on held-out rows, from one greedy completion each (``max_new_tokens``): ``accuracy``
(first: the mean of the first reward, i.e. the share answered right for ``numeric`` / ``label``),
``reward`` (the mean weighted sum), ``reward_<name>`` per reward, ``completion_words`` and ``n``.
"""

from __future__ import annotations

import json
from typing import Literal

import torch
from pydantic import Field, field_validator

from tunelab.data.encoding import Collator
from tunelab.data.readers import read_records
from tunelab.errors import DataError
from tunelab.evaluation.scoring import generate, tokenize_prompt
from tunelab.tasks import rewards as rw
from tunelab.tasks.base import (
    TASKS,
    TaskConfig,
    field_name,
    gen_args,
    render_prompt,
    targets_are_optional,
    unreferenced,
)
from tunelab.tasks.grpo import GRPO
from tunelab.tasks.shared import split_source


class RLConfig(TaskConfig):
    objective: Literal["grpo"] = "grpo"
    reward: list[str | dict] = ["numeric"]
    num_generations: int = Field(8, ge=2)  # G completions per prompt (TRL 1.16: 8)
    max_new_tokens: int = Field(256, ge=1)  # per completion, in training and evaluation
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: the whole vocabulary (TRL's default)
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "dapo"  # TRL 1.16's default
    beta: float = Field(0.0, ge=0)  # KL weight (TRL 1.16: 0, no reference needed)
    epsilon: float = Field(0.2, gt=0, lt=1)
    epsilon_high: float | None = Field(None, gt=0)  # None: epsilon (symmetric clipping)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = Field(1, ge=1)  # optimizer steps per rollout batch (mu)
    system: str | None = None

    @field_validator("reward")
    @classmethod
    def _rewards_named(cls, v):
        if not v:
            raise ValueError("give at least one reward, e.g. [numeric]")
        for item in v:
            if isinstance(item, dict) and not isinstance(item.get("name"), str):
                raise ValueError(f"reward {item!r} has no 'name' (e.g. {{name: length, limit: 64, weight: 0.1}})")
        return v


def reward_functions(cfg: RLConfig) -> list[tuple[str, object, float, dict]]:
    """(name, function, weight, parameters) of each of ``cfg.reward``, loaded now (user modules imported)."""
    out = []
    for i, item in enumerate(cfg.reward):
        spec = {"name": item} if isinstance(item, str) else dict(item)
        name = spec.pop("name")
        weight = spec.pop("weight", 1.0)
        if not rw.is_score(weight) or isinstance(weight, bool):
            raise ValueError(f"task.reward[{i}]: weight {weight!r} is not a number")
        out.append((name, rw.load(name, f"task.reward[{i}]"), float(weight), spec))
    return out


class RLTask:
    name = "rl"
    selectors = ("rows",)  # data path selectors it applies itself (tunelab.tasks.splits)
    # The metric names evaluate() may report (a trailing * matches a prefix): compare checks --metric before training.
    metrics = ("accuracy", "reward", "reward_*", "completion_words")
    Config = RLConfig

    def read(self, source, cfg, *, limit=None, skip_bad=False) -> list[dict]:
        pcol, acol = field_name(cfg, "prompt"), field_name(cfg, "answer")
        optional = targets_are_optional()
        path, rows = split_source(source, "rows")
        records = read_records(path, skip_bad=skip_bad, required=[pcol] if optional else [pcol, acol], text=[pcol])
        out = []
        for r in records[rows] if rows is not None else records:
            ans = r.get(acol)
            if ans is not None and not isinstance(ans, str | int | float) or isinstance(ans, bool):
                if skip_bad:
                    continue
                raise DataError(f"{r['_where']}: field {acol!r} is {type(ans).__name__}, not text or a number")
            out.append({"prompt": str(r[pcol]).strip(), "answer": "" if ans is None else str(ans).strip(),
                        "_where": r["_where"]})
            if limit is not None and len(out) >= limit:
                break
        if not out:
            raise DataError(f"{source}: no rows with {pcol!r} and {acol!r}")
        return out

    def fit(self, cfg, examples):
        """Load every reward and call it once on the first row: a bad reward fails here, before training."""
        fns = reward_functions(cfg)
        if examples:
            for name, fn, _, params in fns:
                rw.check(fn, name, params, examples[0])
        return cfg

    def head(self, cfg, examples):
        if cfg.formulation != "lm":
            raise ValueError("task 'rl' has only the 'lm' formulation")
        return None

    def prompt(self, ex, tokenizer, cfg) -> str:
        text = (cfg.template or "{prompt}").format(prompt=ex["prompt"])
        return render_prompt(tokenizer, text, cfg.chat, system=cfg.system)

    def encode(self, ex, tokenizer, cfg, max_length) -> dict:
        ids = tokenize_prompt(tokenizer, self.prompt(ex, tokenizer, cfg))
        feat = {"input_ids": ids[-max_length:], "labels": [-100] * min(len(ids), max_length),
                "prompt_len": min(len(ids), max_length), "row_bytes": list(row_bytes(ex))}
        if len(ids) > max_length:
            feat["truncated"] = True
        return feat

    def collator(self, tokenizer):
        return PromptCollator(tokenizer.pad_token_id)

    def objective(self, cfg):
        return GRPO(cfg, reward_functions(cfg), rows_of)

    def evaluate(self, model, tokenizer, examples, cfg, *, batch_size=16, gen=None, split=False):
        fns = reward_functions(cfg)
        prompts = [self.prompt(ex, tokenizer, cfg) for ex in examples]
        args = gen_args(gen, batch_size, max_new_tokens=cfg.max_new_tokens)
        outputs = generate(model, tokenizer, prompts, **args, split=split)
        preds, per = [], {name: [] for name, *_ in fns}
        totals = []
        for ex, out in zip(examples, outputs, strict=True):
            row = {"prompt": ex["prompt"], "answer": ex["answer"]}
            vals = {name: float(fn(out, row, **params)) for name, fn, _, params in fns}
            for k, v in vals.items():
                per[k].append(v)
            totals.append(sum(w * vals[name] for name, _, w, _ in fns))
            preds.append({"where": ex["_where"], "input": ex["prompt"], "prediction": out, "reference": ex["answer"],
                          "reward": totals[-1]})
        if missing := unreferenced(examples, "answer"):  # prompts alone (tunelab predict): no metrics
            return {"n": len(examples), "without_reference": missing}, [
                {k: v for k, v in p.items() if k not in ("reference", "reward")} for p in preds]
        n = max(len(examples), 1)
        first = fns[0][0]
        metrics = {"accuracy": sum(per[first]) / n, "reward": sum(totals) / n,
                   **{f"reward_{k}": sum(v) / n for k, v in per.items()},
                   "completion_words": sum(len(o.split()) for o in outputs) / n, "n": len(examples)}
        return metrics, preds


def row_bytes(ex: dict) -> bytes:
    """The row a reward sees (``prompt`` and ``answer`` as written in the data), as UTF-8 JSON bytes: it
    travels with the prompt's feature through the feature cache and the batches to the rollout."""
    return json.dumps({"prompt": ex["prompt"], "answer": ex["answer"]}).encode()


def rows_of(batch_bytes: torch.Tensor) -> list[dict]:
    """The rows ``row_bytes`` put into a batch (zero-padded)."""
    return [json.loads(bytes(x for x in r.tolist() if x > 0).decode()) for r in batch_bytes]


class PromptCollator:
    """Prompt rows, left-padded (as decoding wants them), with each row (``row_bytes``) beside them."""

    def __init__(self, pad_id: int):
        self.inner = Collator(pad_id, padding_side="left")

    def __call__(self, features):
        if any("row_bytes" not in f for f in features):
            raise ValueError("rl prompts cannot be packed (data.pack=true): each prompt is sampled on its own")
        batch = self.inner([{k: f[k] for k in ("input_ids", "labels", "prompt_len")} for f in features])
        width = max(len(f["row_bytes"]) for f in features)
        rows = torch.zeros(len(features), width, dtype=torch.long)
        for i, f in enumerate(features):
            rows[i, : len(f["row_bytes"])] = torch.tensor(list(f["row_bytes"]), dtype=torch.long)
        batch["row_bytes"] = rows
        return batch


TASKS.register(RLTask.name, RLTask())
