"""Plain text: continued pretraining, loss on every token, perplexity as the metric.

Data: ``.txt`` files (one document per blank-line separated paragraph; ``unit`` "line" or "document"
for one per line or per file), or a ``text`` column in JSONL/JSON/CSV/Parquet/Arrow/hub sources
(``fields`` maps another column name), or a folder of such files. ``#rows=START:STOP`` selects rows.

Encoding: each document is tokenized (BOS first when the tokenizer normally adds one), EOS appended, and
cut into consecutive pieces of at most ``data.max_length`` tokens (nothing is thrown away but a last
piece of a single token, which nothing could predict); empty documents are dropped and counted. With ``data.pack: true`` the pieces are packed into full rows and the
collator's block-diagonal mask keeps documents from attending to each other (`tunelab.data.encoding`).

Metrics: next-token accuracy (first, because the loop keeps the checkpoint whose first metric is highest)
and perplexity = exp(mean next-token negative log-likelihood) over the held-out pieces.
"""

from __future__ import annotations

import math
from typing import Literal

from tunelab.data.encoding import _adds_bos
from tunelab.data.feature_cache import DROPPED, KEPT
from tunelab.data.readers import check_column, load_table
from tunelab.tasks.base import TASKS, TaskConfig, field_name
from tunelab.tasks.shared import nll, select, split_source


class TextConfig(TaskConfig):
    unit: Literal["paragraph", "line", "document"] = "paragraph"


class Text:
    name = "text"
    # The metric names evaluate() may report (a trailing * matches a prefix): compare checks --metric before training.
    metrics = ("token_accuracy", "perplexity")
    selectors = ("rows",)  # data path selectors it applies itself (tunelab.tasks.splits)
    reads_tables = True  # reads Arrow columns, not records: no task.layout (tunelab.data.layouts)
    Config = TextConfig

    def read(self, source, cfg, *, limit=None, skip_bad=False):
        path, rows = split_source(source, "rows")
        table = load_table(path, text_unit=cfg.unit)
        col = field_name(cfg, "text")
        check_column(table, col, "text", path, skip_bad)
        table.ds = table.ds.select_columns([col])
        return select(table, source, rows, limit, skip_bad, col)

    def head(self, cfg, examples):
        if cfg.formulation != "lm":
            raise ValueError("task 'text' has only the 'lm' formulation")
        return None

    def encode_batch(self, batch, tokenizer, cfg, max_length, *, skip_bad=False) -> dict:
        col = field_name(cfg, "text")
        texts = [t if isinstance(t, str) else "" for t in batch[col]]
        if tokenizer.eos_token_id is None:
            raise ValueError("task 'text' separates documents with EOS, but the tokenizer has no eos_token_id")
        bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
        ids_list = tokenizer([t.strip() for t in texts], add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "labels": [], "prompt_len": [], "length": [], "status": []}
        for text, ids in zip(texts, ids_list, strict=True):
            if not text.strip():
                pieces, status = [[]], DROPPED
            else:
                doc = bos + list(ids) + [tokenizer.eos_token_id]
                pieces, status = [doc[s:s + max_length] for s in range(0, len(doc), max_length)], KEPT
                if len(pieces) > 1 and len(pieces[-1]) < 2:  # a lone last token teaches nothing
                    pieces.pop()
            for p in pieces:
                out["input_ids"].append(p)
                out["labels"].append(p)
                out["prompt_len"].append(0)
                out["length"].append(len(p))
                out["status"].append(status)
        return out

    def encode(self, ex, tokenizer, cfg, max_length) -> dict:
        """The first piece of one document (`encode_batch` gives every piece)."""
        out = self.encode_batch({field_name(cfg, "text"): [ex[field_name(cfg, "text")]]}, tokenizer, cfg, max_length)
        return {"input_ids": out["input_ids"][0], "labels": out["labels"][0], "prompt_len": 0}

    def evaluate(self, model, tokenizer, examples, cfg, *, batch_size=16, gen=None, split=False):
        col = field_name(cfg, "text")
        length = min(getattr(tokenizer, "model_max_length", 2048) or 2048, 2048)
        out = self.encode_batch({col: [ex[col] for ex in examples]}, tokenizer, cfg, length)
        feats = [{"input_ids": i, "labels": lab} for i, lab in zip(out["input_ids"], out["labels"], strict=True) if i]
        total, count, right = nll(model, tokenizer, feats, batch_size)
        # next-token accuracy first: the primary metric, which picks the best checkpoint (higher is better)
        metrics = {"token_accuracy": right / count if count else 0.0,
                   "perplexity": math.exp(total / count) if count else float("nan"), "tokens": count, "n": len(examples)}
        return metrics, []


TASKS.register(Text.name, Text())
