"""Abstractive summarization (SAMSum dialogues and any document/summary pairs).

Data: JSON/JSONL/CSV records with ``dialogue`` (the text to summarise) and ``summary`` (the
reference, or a list of references: ROUGE then scores each example's best match, as multi-reference
papers do; ``task.layout: dialogsum`` collects DialogSum's ``summary1..3``), optional ``id``. Windows line ends (SAMSum's ``\\r\\n``) become ``\\n``. Records whose text
or summary is empty (SAMSum train has one empty dialogue) are dropped and counted in the log; a
record without the fields at all is an error naming file, line and field.

Formulations (evaluation generates greedily, ``gen`` settings, and scores with ROUGE-1/2/L,
rouge-score, Porter stemming, F-measure, ROUGE-1 first):
- ``lm``: prompt = template over the dialogue (chat-wrapped for chat models), target = the summary.
- ``seq2seq`` (T5, BART): source = template over the dialogue (default ``"summarize: {dialogue}"``, T5's
  task prefix; never chat-wrapped) into the encoder, the summary into the decoder, loss on the summary.
"""

from __future__ import annotations

from typing import Literal

from tunelab.data.encoding import encode_lm_document, encode_seq2seq
from tunelab.data.prompt_splicing import lm_features
from tunelab.data.readers import read_records
from tunelab.evaluation.metrics import rouge
from tunelab.evaluation.scoring import generate
from tunelab.tasks.base import (
    TASKS,
    HeadSpec,
    TaskConfig,
    field_name,
    gen_args,
    references,
    render_prompt,
    text_pairs,
    unreferenced,
)

DEFAULT_TEMPLATE = "Summarize the dialogue in one or two sentences.\n\n{dialogue}"
SEQ2SEQ_TEMPLATE = "summarize: {dialogue}"


class SummarizationConfig(TaskConfig):
    formulation: Literal["lm", "head", "seq2seq"] = "lm"


def clean(text) -> str:
    return str(text).replace("\r\n", "\n").replace("\r", "\n").strip()


class Summarization:
    name = "summarization"
    # The metric names evaluate() may report (a trailing * matches a prefix): compare checks --metric before training.
    metrics = ("rouge1", "rouge2", "rougeL")
    Config = SummarizationConfig

    def read(self, source, cfg, *, limit=None, skip_bad=False) -> list[dict]:
        dcol, scol, icol = (field_name(cfg, k) for k in ("dialogue", "summary", "id"))
        def build(r):
            refs = [clean(v) for v in references(r[scol], r["_where"], scol)]
            return {"id": str(r.get(icol, r["_where"])), "dialogue": clean(r[dcol]), "summary": refs[0] if refs else "",
                    "references": refs, "_where": r["_where"]}

        return text_pairs(read_records(source, skip_bad=skip_bad, text=[dcol]), source, (dcol, scol), build, limit=limit,
                          skip_bad=skip_bad, keys=("dialogue", "summary"), hint="{dialogue: article, summary: highlights}")

    def head(self, cfg, examples):
        if cfg.formulation == "head":
            raise ValueError("task 'summarization' has only the 'lm' formulation (and 'seq2seq' for encoder-decoders)")
        return HeadSpec("seq2seq") if cfg.formulation == "seq2seq" else None

    def prompt(self, ex, tokenizer, cfg) -> str:
        if cfg.formulation == "seq2seq":
            return (cfg.template or SEQ2SEQ_TEMPLATE).format(dialogue=ex["dialogue"])
        return render_prompt(tokenizer, (cfg.template or DEFAULT_TEMPLATE).format(dialogue=ex["dialogue"]), cfg.chat)

    def encode(self, ex, tokenizer, cfg, max_length) -> dict:
        if cfg.formulation == "seq2seq":
            return encode_seq2seq(tokenizer, self.prompt(ex, tokenizer, cfg), ex["summary"], max_length)
        # too long: the dialogue is cut, never the instruction or chat header around it
        return encode_lm_document(tokenizer, lambda d: self.prompt({**ex, "dialogue": d}, tokenizer, cfg),
                                  ex["dialogue"], ex["summary"], max_length)

    def encode_many(self, rows, tokenizer, cfg, max_length) -> list[dict] | None:
        """``[self.encode(ex, ...) for ex in rows]`` in batched tokenizer calls (`tunelab.data.prompt_splicing`)."""
        if cfg.formulation == "seq2seq":
            return None
        return lm_features(self, rows, tokenizer, cfg, max_length, slots=("dialogue",),
                           render=lambda ex, v: self.prompt({**ex, **v}, tokenizer, cfg),
                           group=lambda ex: 0, target=lambda ex: ex["summary"])

    def evaluate(self, model, tokenizer, examples, cfg, *, batch_size=16, gen=None, split=False):
        args = gen_args(gen, batch_size, max_new_tokens=64)
        outputs = generate(model, tokenizer, [self.prompt(ex, tokenizer, cfg) for ex in examples], **args, split=split)
        preds = [{"id": ex["id"], "where": ex["_where"], "input": ex["dialogue"], "prediction": o,
                  **({"reference": ex["summary"]} if ex["summary"] else {}),
                  **({"references": ex["references"]} if len(ex.get("references") or []) > 1 else {})} for ex, o in zip(examples, outputs, strict=True)]
        if missing := unreferenced(examples, "summary"):  # prompts alone (tunelab predict): no metrics
            return {"n": len(examples), "without_reference": missing}, preds
        # every reference counts: an example scores its best match (rouge-score's score_multi)
        refs = [ex.get("references") or [ex["summary"]] for ex in examples]
        return {**rouge(outputs, refs), "n": len(examples)}, preds


TASKS.register(Summarization.name, Summarization())
