"""Arithmetic and commonsense reasoning (the LLM-Adapters suites, GSM8K).

Data:
- LLM-Adapters JSON: ``instruction``, ``input``, ``output`` (a worked answer, may be empty) and
  ``answer`` (gold): a number (gsm8k, SVAMP, AddSub, MultiArith, SingleEq, mawps), a letter A-E
  (AQuA) or a label (boolq true/false, piqa solution1/2, social_i_qa answer1..3, winogrande
  option1/2, ARC and openbookqa answer1..5).
- GSM8K's own JSONL (``question``, ``answer`` = worked solution ending in ``#### N``): recognised by
  its fields; the ``<<a*b=c>>`` calculator notes are dropped and the target ends "The answer is N.".
Each example's ``kind`` (number | letter | choice) comes from its gold answer unless ``kind`` is set.
Choice candidates come from the instruction's "Answer format: a/b/c" line (else from the labels it
mentions, e.g. "Option1: ... Option2: ...").

Formulation ``lm``. Evaluation, per example kind:
- number: generate, take the last number in the output (commas removed), correct when
  ``|pred - gold| <= tolerance`` (0.001, as LLM-Adapters);
- letter: generate, take the letter after "answer is", else the last standalone A-E;
- choice (``scoring: choices``, the default): score each candidate label as the continuation of
  ``prompt + answer_prefix`` ("the correct answer is", the training outputs' own wording) and pick
  the most likely; with ``scoring: generate`` the first candidate label named in the output.
Metric: accuracy (first), plus ``no_answer`` (generated outputs with nothing to extract).
"""

from __future__ import annotations

import re
from typing import Literal

from tunelab.data.encoding import encode_lm
from tunelab.data.readers import read_records
from tunelab.errors import DataError
from tunelab.evaluation.metrics import numbers_match, pick_choice
from tunelab.evaluation.scoring import generate, score_choices
from tunelab.tasks.base import TASKS, TaskConfig, field_name, gen_args, render_prompt

DEFAULT_TEMPLATE = "{instruction}\n\n{input}"
_CHOICE = re.compile(r"^(?:(answer|option|solution)\d+|true|false)$")
_NUMBER = re.compile(r"-?\d+\.?\d*")


class ReasoningConfig(TaskConfig):
    template_no_input: str = "{instruction}"
    kind: Literal["auto", "number", "letter", "choice"] = "auto"
    scoring: Literal["choices", "generate"] = "choices"  # how choice-kind examples are evaluated
    answer_prefix: str = "the correct answer is"
    tolerance: float = 1e-3


def answer_kind(answer: str) -> str | None:
    a = answer.strip()
    if _CHOICE.match(a.lower()):
        return "choice"
    if re.fullmatch(r"[A-E]", a):
        return "letter"
    try:
        float(a.replace(",", ""))
        return "number"
    except ValueError:
        return None


def choice_list(value, where: str, col: str) -> tuple[list[str], list[str]]:
    """(labels, texts) of a choices field: ``{"label": [...], "text": [...]}`` (CSQA, ARC, OpenBookQA), a list of
    texts (MMLU, HellaSwag, PIQA's collected ``sol1``/``sol2``: labelled A, B, ...), or a list of
    ``{"label", "text"}`` records."""
    if isinstance(value, dict) and "text" in value:
        texts = [str(t) for t in value["text"]]
        labels = [str(x) for x in value.get("label") or [chr(65 + i) for i in range(len(texts))]]
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "text" in v for v in value):
        texts = [str(v["text"]) for v in value]
        labels = [str(v.get("label") or chr(65 + i)) for i, v in enumerate(value)]
    elif isinstance(value, list) and value and all(isinstance(v, str | int | float) for v in value):
        texts, labels = [str(v) for v in value], [chr(65 + i) for i in range(len(value))]
    else:
        raise DataError(f"{where}: field {col!r} must be a list of choices or {{label: [...], text: [...]}}, got {str(value)[:60]!r}")
    if len(labels) != len(texts) or len(set(labels)) != len(labels) or len(texts) < 2:
        raise DataError(f"{where}: field {col!r} needs two or more choices with distinct labels, got labels {labels}")
    return labels, texts


def gold_label(raw, labels: list[str], texts: list[str], where: str, col: str) -> str:
    """The right choice's label from a label ("B"), a 0-based index (1, "1") or the choice's text."""
    if isinstance(raw, bool) or raw is None:
        raise DataError(f"{where}: field {col!r} is missing or not a choice ({raw!r})")
    text = str(raw).strip()
    if text in labels:
        return text
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(labels):
        return labels[int(text)]
    if text in texts:
        return labels[texts.index(text)]
    raise DataError(f"{where}: field {col!r} = {raw!r} is not one of the choice labels {labels}, an index below "
                    f"{len(labels)} or a choice's text")


def candidates(instruction: str, answer: str) -> list[str]:
    """The labels a choice question offers: its "Answer format: a/b/c" line, else the labels of the
    gold answer's family (answerN / optionN / solutionN) that the instruction names."""
    m = re.search(r"Answer format:\s*([\w/]+)", instruction)
    if m:
        return [c.lower() for c in m[1].split("/") if c]
    if answer in ("true", "false"):
        return ["true", "false"]
    prefix = re.match(r"[a-z]+", answer)[0]
    nums = {int(n) for n in re.findall(prefix + r"\s*(\d+)", instruction.lower())} | {int(answer[len(prefix):])}
    return [f"{prefix}{n}" for n in sorted(nums)]


def extract_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def extract_letter(text: str) -> str | None:
    m = re.search(r"answer is\s*\(?([A-E])\b", text)
    if m:
        return m[1]
    found = re.findall(r"\b([A-E])\b", text)
    return found[-1] if found else None


def extract_choice(text: str, choices: list[str]) -> str | None:
    """The first choice label named in ``text`` (case-blind; the label as the choices spell it)."""
    by_lower = {c.lower(): c for c in choices}
    m = re.search("|".join(re.escape(c) for c in sorted(by_lower, key=len, reverse=True)), text.lower())
    return by_lower[m[0]] if m else None


def from_gsm8k(question: str, solution: str) -> tuple[str, str]:
    """GSM8K answer text -> (target with "The answer is N.", N)."""
    work, _, final = solution.rpartition("####")
    number = final.strip().replace(",", "")
    work = re.sub(r"<<[^>]*>>", "", work).strip()
    return f"{work}\nThe answer is {number}.", number


class Reasoning:
    name = "reasoning"
    # The metric names evaluate() may report (a trailing * matches a prefix): compare checks --metric before training.
    metrics = ("accuracy", "no_answer")
    Config = ReasoningConfig

    def read(self, source, cfg, *, limit=None, skip_bad=False) -> list[dict]:
        icol, xcol, ocol, acol = (field_name(cfg, k) for k in ("instruction", "input", "output", "answer"))
        out = []
        for r in read_records(source, skip_bad=skip_bad, text=[icol, "question"]):
            try:
                out.append(self._example(r, cfg, icol, xcol, ocol, acol))
            except DataError:
                if not skip_bad:
                    raise
            if limit is not None and len(out) >= limit:
                break
        if not out:
            raise DataError(f"{source}: no usable records")
        return out

    def _example(self, r, cfg, icol, xcol, ocol, acol) -> dict:
        where = r["_where"]
        ccol = field_name(cfg, "choices")
        if r.get(ccol) not in (None, "", [], {}):  # multiple choice as the hub ships it (CSQA, ARC, MMLU, ...)
            return self._multiple_choice(r, cfg, ccol, acol)
        if icol not in r and "question" in r and "####" in str(r.get("answer", "")):
            output, answer = from_gsm8k(str(r["question"]), str(r["answer"]))
            ex = {"instruction": str(r["question"]).strip(), "input": "", "output": output, "answer": answer}
        else:
            missing = [c for c in (icol, acol) if c not in r or not str(r[c]).strip()]
            if missing:
                raise DataError(f"{where}: field {missing[0]!r} is missing or empty (present: {sorted(k for k in r if k != '_where')}; "
                                "LLM-Adapters JSON needs instruction/answer, GSM8K JSONL question/answer with '#### N')")
            ex = {"instruction": str(r[icol]).strip(), "input": str(r.get(xcol) or "").strip(),
                  "output": str(r.get(ocol) or "").strip(), "answer": str(r[acol]).strip()}
        kind = answer_kind(ex["answer"]) if cfg.kind == "auto" else cfg.kind
        if kind is None or (kind == "number" and answer_kind(ex["answer"]) != "number"):
            raise DataError(f"{where}: field {acol!r} = {ex['answer']!r} is not a number, a letter A-E or a choice label "
                            "(answerN/optionN/solutionN/true/false); set task.kind to say which it is")
        ex.update(kind=kind, _where=where)
        if kind == "choice":
            ex["answer"] = ex["answer"].lower()
            ex["choices"] = candidates(ex["instruction"], ex["answer"])
            if ex["answer"] not in ex["choices"]:
                raise DataError(f"{where}: gold answer {ex['answer']!r} is not among the offered choices {ex['choices']}")
        return ex

    def _multiple_choice(self, r, cfg, ccol, acol) -> dict:
        """A question with its choices listed as "A. text" lines; the target is the gold label after
        ``answer_prefix``; evaluation scores each label (``kind`` choice)."""
        where = r["_where"]
        qcol, xcol = field_name(cfg, "question"), field_name(cfg, "context")
        labels, texts = choice_list(r[ccol], where, ccol)
        question = " ".join(str(r.get(c) or "").strip() for c in (xcol, qcol) if str(r.get(c) or "").strip())
        if not question:
            raise DataError(f"{where}: field {qcol!r} is missing or empty (present: {sorted(k for k in r if k != '_where')})")
        answer = gold_label(r.get(acol), labels, texts, where, acol)
        options = "\n".join(f"{lab}. {t}" for lab, t in zip(labels, texts, strict=True))
        return {"instruction": question, "input": options, "output": "", "answer": answer, "kind": "choice",
                "choices": labels, "_where": where}

    def head(self, cfg, examples):
        if cfg.formulation != "lm":
            raise ValueError("task 'reasoning' has only the 'lm' formulation")
        return None

    def prompt(self, ex, tokenizer, cfg) -> str:
        template = (cfg.template or DEFAULT_TEMPLATE) if ex["input"] else cfg.template_no_input
        return render_prompt(tokenizer, template.format(instruction=ex["instruction"], input=ex["input"]), cfg.chat)

    def target(self, ex, cfg) -> str:
        if ex["output"]:
            return ex["output"]
        return f"{cfg.answer_prefix} {ex['answer']}" if ex["kind"] == "choice" else f"The answer is {ex['answer']}."

    def encode(self, ex, tokenizer, cfg, max_length) -> dict:
        return encode_lm(tokenizer, self.prompt(ex, tokenizer, cfg), self.target(ex, cfg), max_length)

    def evaluate(self, model, tokenizer, examples, cfg, *, batch_size=16, gen=None, split=False):
        prompts = [self.prompt(ex, tokenizer, cfg) for ex in examples]
        scored = [i for i, ex in enumerate(examples) if ex["kind"] == "choice" and cfg.scoring == "choices"]
        gen_idx = [i for i in range(len(examples)) if i not in set(scored)]
        outputs: list = [None] * len(examples)
        pred: list = [None] * len(examples)
        tied: list = [False] * len(examples)
        if scored:
            sep = " " if cfg.answer_prefix else ""
            scores = score_choices(model, tokenizer, [prompts[i] + cfg.answer_prefix for i in scored],
                                   [[sep + c for c in examples[i]["choices"]] for i in scored], batch_size=batch_size, split=split)
            for i, s in zip(scored, scores, strict=True):
                best, tied[i] = pick_choice(s)
                pred[i] = examples[i]["choices"][best]
                outputs[i] = {c: round(v, 4) for c, v in zip(examples[i]["choices"], s, strict=True)}
        if gen_idx:
            args = gen_args(gen, batch_size, max_new_tokens=256)
            texts = generate(model, tokenizer, [prompts[i] for i in gen_idx], **args, split=split)
            for i, text in zip(gen_idx, texts, strict=True):
                ex, outputs[i] = examples[i], text
                kind = ex["kind"]
                pred[i] = (extract_number(text) if kind == "number" else extract_letter(text) if kind == "letter"
                           else extract_choice(text, ex["choices"]))
        correct = [self._correct(ex, p, cfg) for ex, p in zip(examples, pred, strict=True)]
        metrics = {"accuracy": sum(correct) / len(examples), "n": len(examples),
                   "no_answer": sum(pred[i] is None for i in gen_idx)}
        if scored:  # choices whose top scores were exactly equal: decided by order, not by the model
            metrics["tied_predictions"] = sum(tied)
        preds = [{"where": ex["_where"], "input": ex["instruction"], "output": o, "prediction": p, "reference": ex["answer"],
                  "correct": c, **({"tied": True} if t else {})}
                 for ex, o, p, c, t in zip(examples, outputs, pred, correct, tied, strict=True)]
        return metrics, preds

    @staticmethod
    def _correct(ex, pred, cfg) -> bool:
        if ex["kind"] == "number":
            return numbers_match(pred, float(ex["answer"].replace(",", "")), cfg.tolerance)
        return pred is not None and pred == ex["answer"]


TASKS.register(Reasoning.name, Reasoning())
