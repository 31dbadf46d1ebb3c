"""Chat: multi-turn conversations, loss on every assistant turn.

Data: any source `tunelab.data.readers.load_table` reads (JSONL/JSON, Parquet, Arrow, a ``save_to_disk``
folder, a folder of files, ``hf:`` ids), one conversation per row: OpenAI ``messages``
(role/content; ``tool_calls`` kept as text) or ShareGPT ``conversations`` (from/value), detected from
the column (``style`` names it; ``fields`` maps other column names). ``#rows=START:STOP`` selects rows.
A row without the column is an error naming file and row when read; each row is checked when it is encoded:
an unknown role, a missing content, an image (non-text) part, an empty assistant answer, no assistant turn
is an error naming file, row and turn (``data.skip_bad_rows`` drops and counts them instead).

Formatting: ``template`` None/"auto" = the tokenizer's own chat template, or a named one for base models
(`tunelab.data.chat_templates.TEMPLATES`: chatml, llama3, alpaca, zephyr). ``system`` adds a system turn to
conversations without one. Labels cover each assistant content plus its end-of-turn marker; headers,
system, user and tool turns are -100.

Too long (> data.max_length tokens): ``truncation="turns"`` cuts whole exchanges from the START (a leading
system turn stays) until it fits, then if needed the end of the last turn; the row counts as truncated and
the log says how many turns were cut. ``truncation="error"`` stops with the row, its length and the cut
that would fit.

Metrics: ROUGE-L of greedy generations for each held-out conversation's LAST assistant turn (given the
turns before it) first, then the perplexity of all assistant tokens of the held-out conversations.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np

from tunelab.data.chat_templates import TEMPLATES, ChatError, detect, normalize, render, token_mask
from tunelab.data.encoding import IGNORE
from tunelab.data.feature_cache import DROPPED, KEPT, TRUNCATED, ArrowExamples
from tunelab.data.readers import check_column, load_table
from tunelab.errors import DataError
from tunelab.evaluation.metrics import rouge
from tunelab.evaluation.scoring import generate
from tunelab.tasks.base import TASKS, TaskConfig, field_name, gen_args
from tunelab.tasks.shared import select, split_source

log = logging.getLogger(__name__)
_WARNED = [0]


class ChatConfig(TaskConfig):
    style: Literal["auto", "openai", "sharegpt"] = "auto"
    system: str | None = None
    truncation: Literal["turns", "error"] = "turns"


class Chat:
    name = "chat"
    # The metric names evaluate() may report (a trailing * matches a prefix): compare checks --metric before training.
    metrics = ("rougeL", "perplexity")
    selectors = ("rows",)  # data path selectors it applies itself (tunelab.tasks.splits)
    reads_tables = True  # reads Arrow columns, not records: no task.layout (tunelab.data.layouts)
    teaches_stop = True  # training preflight warns when the loss leaves the end-of-turn token out
    Config = ChatConfig

    def read(self, source, cfg, *, limit=None, skip_bad=False) -> ArrowExamples:
        if cfg.template not in (None, "auto") and cfg.template not in TEMPLATES:
            raise ValueError(f"task 'chat': unknown template {cfg.template!r}; named ones: {sorted(TEMPLATES)}, or auto")
        path, rows = split_source(source, "rows")
        table = load_table(path)
        cols = {"openai": field_name(cfg, "messages"), "sharegpt": field_name(cfg, "conversations")}
        style = cfg.style if cfg.style != "auto" else next((s for s, c in cols.items() if c in table.ds.column_names), None)
        if style is None:
            raise DataError(f"{path}: no {cols['openai']!r} (OpenAI) or {cols['sharegpt']!r} (ShareGPT) column "
                            f"(present: {table.ds.column_names}); map yours with task.fields, e.g. {{messages: dialog}}")
        check_column(table, cols[style], "list", path, skip_bad)
        table.ds = table.ds.select_columns([cols[style]])
        return select(table, source, rows, limit, skip_bad, style)

    def head(self, cfg, examples):
        if cfg.formulation != "lm":
            raise ValueError("task 'chat' has only the 'lm' formulation")
        return None

    def messages(self, row: dict, cfg) -> list[dict]:
        """The normalised turns of one row (with the configured system turn); ChatError when unusable."""
        style = detect(row, cfg.fields) if cfg.style == "auto" else cfg.style
        key = field_name(cfg, "messages" if style == "openai" else "conversations")
        msgs = normalize(row[key], style)
        if cfg.system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": cfg.system}] + msgs
        return msgs

    def _tokens(self, texts_spans, tokenizer):
        enc = tokenizer([t for t, _ in texts_spans], add_special_tokens=False, return_offsets_mapping=True)
        return [(np.asarray(ids, dtype=np.int64), token_mask(off, spans))
                for ids, off, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], texts_spans, strict=True)]

    def _fit(self, msgs, tokenizer, cfg, max_length, where):
        """(ids, mask, turns cut) for a conversation over ``max_length``; see the module docstring."""
        lead = 0
        while lead < len(msgs) and msgs[lead]["role"] == "system":
            lead += 1
        cuts = [p for p in range(lead + 1, len(msgs)) if msgs[p]["role"] == "user"
                and any(m["role"] == "assistant" for m in msgs[p:])]
        total = None
        for p in cuts:
            kept = msgs[:lead] + msgs[p:]
            ids, mask = self._tokens([render(kept, tokenizer, cfg.template)], tokenizer)[0]
            if total is None and cfg.truncation == "error":
                total = len(ids)
            if len(ids) <= max_length:
                if cfg.truncation == "error":
                    raise DataError(f"{where}: the conversation is longer than max_length {max_length}; cutting the "
                                    f"first {p - lead} turns would fit (task.truncation='turns' does that)")
                return ids, mask, p - lead
        if cfg.truncation == "error":
            raise DataError(f"{where}: the conversation is longer than max_length {max_length} and even its last "
                            "exchange does not fit; raise data.max_length or use task.truncation='turns'")
        p = cuts[-1] if cuts else lead
        ids, mask = self._tokens([render(msgs[:lead] + msgs[p:], tokenizer, cfg.template)], tokenizer)[0]
        return ids[:max_length], mask[:max_length], p - lead

    def encode_batch(self, batch, tokenizer, cfg, max_length, *, skip_bad=False) -> dict:
        wheres = batch.get("_where") or [f"row {i}" for i in range(len(next(iter(batch.values()))))]
        n = len(wheres)
        rows = [{k: v[i] for k, v in batch.items() if k != "_where"} for i in range(n)]
        convs, bad = [], []
        for row, where in zip(rows, wheres, strict=True):
            try:
                convs.append(self.messages(row, cfg))
            except ChatError as e:
                if not skip_bad:
                    raise DataError(f"{where}: {e}") from None
                convs.append(None)
                bad.append(where)
        good = [i for i, m in enumerate(convs) if m is not None]
        encoded = dict(zip(good, self._tokens([render(convs[i], tokenizer, cfg.template) for i in good], tokenizer), strict=True))
        out = {"input_ids": [], "labels": [], "prompt_len": [], "length": [], "status": []}
        for i in range(n):
            status, ids, mask = KEPT, np.zeros(0, np.int64), np.zeros(0, bool)
            if i in encoded:
                ids, mask = encoded[i]
                if len(ids) > max_length:
                    ids, mask, cut = self._fit(convs[i], tokenizer, cfg, max_length, wheres[i])
                    status = TRUNCATED
                    if _WARNED[0] < 3 and mask.any():
                        _WARNED[0] += 1
                        log.warning("%s: longer than max_length %d: cut %d turns from the start%s", wheres[i], max_length,
                                    cut, " and the end of the last turn" if len(ids) == max_length else "")
            if not mask.any():
                status, ids, mask = DROPPED, ids[:0], mask[:0]
            out["input_ids"].append(ids.tolist())
            out["labels"].append(np.where(mask, ids, IGNORE).tolist())
            out["prompt_len"].append(int(mask.argmax()) if mask.any() else 0)
            out["length"].append(len(ids))
            out["status"].append(status)
        return out

    def encode(self, ex, tokenizer, cfg, max_length) -> dict:
        out = self.encode_batch({k: [v] for k, v in ex.items()}, tokenizer, cfg, max_length)
        return {"input_ids": out["input_ids"][0], "labels": out["labels"][0], "prompt_len": out["prompt_len"][0]}

    def evaluate(self, model, tokenizer, examples, cfg, *, batch_size=16, gen=None, split=False):
        from tunelab.tasks.shared import nll

        convs = []
        for ex in examples:
            try:
                convs.append((ex, self.messages(ex, cfg)))
            except ChatError as e:
                raise DataError(f"{ex['_where']}: {e}") from None
        prompts, refs = [], []
        for _, msgs in convs:
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompts.append(render(msgs[:last], tokenizer, cfg.template, add_generation_prompt=True)[0])
            refs.append(msgs[last]["content"])
        outputs = generate(model, tokenizer, prompts, **gen_args(gen, batch_size, max_new_tokens=128), split=split)
        feats = [f for f in (self.encode(ex, tokenizer, cfg, 4096) for ex, _ in convs) if f["input_ids"]]
        total, count, _ = nll(model, tokenizer, feats, batch_size)
        metrics = {"rougeL": rouge(outputs, refs, types=("rougeL",))["rougeL"],
                   "perplexity": math.exp(total / count) if count else float("nan"), "n": len(convs)}
        preds = [{"where": ex["_where"], "input": p, "prediction": o, "reference": r}
                 for (ex, _), p, o, r in zip(convs, prompts, outputs, refs, strict=True)]
        return metrics, preds


TASKS.register(Chat.name, Chat())
