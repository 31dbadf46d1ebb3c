"""Instruction following on Alpaca-style data.

Data: JSON/JSONL/CSV records with ``instruction``, optional ``input`` (context for the instruction)
and ``output`` (the reference response). Rows with an empty instruction or output are dropped and
counted in the log. A file without its own splits is cut by row range, Python slice syntax over the
file's rows: ``alpaca_en_demo.json#rows=0:900`` to train, ``alpaca_en_demo.json#rows=900:`` to
evaluate (disjoint rows; identical duplicate rows in the file can still fall on both sides).

Formulations. ``lm``: the user turn is ``template`` (instruction and input) or
``template_no_input`` when the input is empty, wrapped in the tokenizer's chat template for chat
models (``system`` adds a system turn); the target is the output. ``seq2seq`` (T5, Flan-T5, BART):
the same templates (no chat wrapping, no system turn) are the encoder's source, the output is the
decoder's target.

Metrics: ROUGE-L (first), BLEU (sacrebleu, 0-100) on greedy generations, and the perplexity of the
reference outputs given their prompts: exp(total negative log-likelihood / total reference tokens),
scored with ``tunelab.evaluation.scoring.score_choices`` (no generation needed for it).
"""

from __future__ import annotations

from typing import Literal

from tunelab.data.encoding import encode_lm, encode_lm_document, encode_seq2seq
from tunelab.data.prompt_splicing import lm_features
from tunelab.data.readers import read_records
from tunelab.evaluation.metrics import bleu, perplexity, rouge
from tunelab.evaluation.scoring import generate, score_choices
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
from tunelab.tasks.shared import split_source

DEFAULT_TEMPLATE = "{instruction}\n\n{input}"


class GenerationConfig(TaskConfig):
    formulation: Literal["lm", "head", "seq2seq"] = "lm"
    template_no_input: str = "{instruction}"
    system: str | None = None


class Generation:
    name = "generation"
    # The metric names evaluate() may report (a trailing * matches a prefix): compare checks --metric before training.
    metrics = ("rougeL", "bleu", "perplexity")
    selectors = ("rows",)  # data path selectors it applies itself (tunelab.tasks.splits)
    teaches_stop = True  # training preflight warns when the loss leaves the end-of-turn token out
    Config = GenerationConfig

    def read(self, source, cfg, *, limit=None, skip_bad=False) -> list[dict]:
        icol, xcol, ocol = (field_name(cfg, k) for k in ("instruction", "input", "output"))
        path, rows = split_source(source, "rows")
        records = read_records(path, skip_bad=skip_bad, text=[icol])

        def build(r):
            refs = [c.strip() for c in references(r[ocol], r["_where"], ocol)]  # one text, or a list of references
            return {"instruction": str(r[icol]).strip(), "input": str(r.get(xcol) or "").strip(),
                    "output": refs[0] if refs else "", "references": refs, "_where": r["_where"]}  # "": predict only

        return text_pairs(records[rows] if rows is not None else records, source, (icol, ocol), build, limit=limit,
                          skip_bad=skip_bad, keys=("instruction", "output"), hint="{instruction: prompt, output: response}")

    def head(self, cfg, examples):
        if cfg.formulation == "head":
            raise ValueError("task 'generation' has only the 'lm' formulation (and 'seq2seq' for encoder-decoders)")
        return HeadSpec("seq2seq") if cfg.formulation == "seq2seq" else None

    def prompt(self, ex, tokenizer, cfg) -> str:
        template = (cfg.template or DEFAULT_TEMPLATE) if ex["input"] else cfg.template_no_input
        text = template.format(instruction=ex["instruction"], input=ex["input"])
        if cfg.formulation == "seq2seq":
            return text
        return render_prompt(tokenizer, text, cfg.chat, system=cfg.system)

    def encode(self, ex, tokenizer, cfg, max_length) -> dict:
        if cfg.formulation == "seq2seq":
            return encode_seq2seq(tokenizer, self.prompt(ex, tokenizer, cfg), ex["output"], max_length)
        if ex["input"]:  # too long: the input is cut, never the instruction or chat header
            return encode_lm_document(tokenizer, lambda d: self.prompt({**ex, "input": d}, tokenizer, cfg),
                                      ex["input"], ex["output"], max_length)
        return encode_lm(tokenizer, self.prompt(ex, tokenizer, cfg), ex["output"], max_length)

    def encode_many(self, rows, tokenizer, cfg, max_length) -> list[dict] | None:
        """``[self.encode(ex, ...) for ex in rows]`` in batched tokenizer calls (`tunelab.data.prompt_splicing`)."""
        if cfg.formulation == "seq2seq":
            return None
        return lm_features(self, rows, tokenizer, cfg, max_length, slots=lambda ex: ("instruction", "input") if ex["input"] else ("instruction",),
                           render=lambda ex, v: self.prompt({**ex, **v}, tokenizer, cfg),
                           group=lambda ex: bool(ex["input"]), target=lambda ex: ex["output"])

    def evaluate(self, model, tokenizer, examples, cfg, *, batch_size=16, gen=None, split=False):
        prompts = [self.prompt(ex, tokenizer, cfg) for ex in examples]
        refs = [ex["output"] for ex in examples]
        args = gen_args(gen, batch_size, max_new_tokens=128)
        outputs = generate(model, tokenizer, prompts, **args, split=split)
        preds = [{"where": ex["_where"], "input": ex["instruction"] + (f"\n\n{ex['input']}" if ex["input"] else ""),
                  "prediction": o, **({"reference": ex["output"]} if ex["output"] else {})}
                 for ex, o in zip(examples, outputs, strict=True)]
        if missing := unreferenced(examples, "output"):  # prompts alone (tunelab predict): no metrics
            return {"n": len(examples), "without_reference": missing}, preds
        logp = score_choices(model, tokenizer, prompts, [[r] for r in refs], batch_size=args["batch_size"], split=split)
        n_tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
        every = [ex.get("references") or [ex["output"]] for ex in examples]  # ROUGE best match, BLEU all at once
        metrics = {"rougeL": rouge(outputs, every, types=("rougeL",))["rougeL"], "bleu": bleu(outputs, every),
                   "perplexity": perplexity(sum(s[0] for s in logp), n_tokens), "n": len(examples)}
        return metrics, preds


TASKS.register(Generation.name, Generation())
