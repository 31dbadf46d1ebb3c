"""Reading-comprehension QA (SQuAD v1.1 style): answer = a span of the context.

Data: SQuAD JSON (one example per question), or JSON/JSONL/CSV records with ``context``,
``question``, ``answers`` (a list of strings, one string, the hub's ``{text, answer_start}`` or TriviaQA's
``{value, aliases}``) and optional ``answer_starts``, ``id``, ``title``. A row without a context is
closed-book QA (NQ-Open, TriviaQA): the prompt is the question alone (``template_closed_book``), and the
score the best match over all answers, as for any row (``lm`` and ``seq2seq`` only).

Formulations:
- ``lm`` (generative): the model writes the answer after the prompt; first reference is the target.
- ``seq2seq`` (generative, encoder-decoder: T5, Flan-T5, BART): source = template over question and
  context (default ``"question: {question} context: {context}"``, T5's SQuAD format; never chat-wrapped)
  into the encoder, the first reference answer into the decoder.
- ``head`` (extractive): start/end logits over the tokens of ``question [SEP] context``. Contexts
  longer than the window are cut into overlapping windows (``window`` tokens, ``stride`` shared
  tokens); the answer is the best ``start + end`` logit span over all windows whose tokens lie in the
  context, ``end >= start`` and at most ``max_answer_tokens`` long, mapped back to context characters
  with the offsets mapping. Training uses the first window that holds the first reference answer
  (token 0 for start and end when no window does). So that features pad like any token-head
  feature, ``labels`` is per token: ``START`` (1) on the start token, ``END`` (2) on the end token,
  ``BOTH`` (3) for a one-token answer, -100 elsewhere; `install_qa_labels` turns that into the
  ``start_positions`` / ``end_positions`` the model takes.

Metric: SQuAD exact match and F1 (official normalisation, max over the references), F1 first.

Train / eval without leakage (there is no SQuAD train split here). Select whole articles with a
fragment on the source path, Python slice syntax over the file's articles in order::

    data:
      train: ../shared/data/squad_v1.1/dev-v1.1.json#articles=0:40
      eval:  ../shared/data/squad_v1.1/dev-v1.1.json#articles=40:48

Questions of one article (all its paragraphs) stay on one side, so no context is shared. For
non-SQuAD records an article is a distinct ``title`` (or, without titles, a distinct context).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, field_validator

from tunelab.data.encoding import encode_lm, encode_lm_document, encode_seq2seq
from tunelab.data.prompt_splicing import lm_features
from tunelab.data.readers import read_records
from tunelab.errors import DataError
from tunelab.evaluation import inference
from tunelab.evaluation.metrics import squad_scores
from tunelab.evaluation.scoring import generate, progress
from tunelab.methods.base import context as model_context
from tunelab.tasks.base import TASKS, HeadSpec, TaskConfig, field_name, gen_args, render_prompt
from tunelab.tasks.shared import split_source

DEFAULT_TEMPLATE = (
    "Answer the question with a short phrase copied from the context.\nContext: {context}\nQuestion: {question}"
)
SEQ2SEQ_TEMPLATE = "question: {question} context: {context}"
CLOSED_BOOK_TEMPLATE = "Answer the question with a short phrase.\nQuestion: {question}"
CLOSED_BOOK_SEQ2SEQ = "question: {question}"
START, END, BOTH = 1, 2, 3


class QAConfig(TaskConfig):
    formulation: Literal["lm", "head", "seq2seq"] = "lm"
    window: int = Field(384, ge=8)  # extractive head: tokens per window (question + context + specials)
    stride: int = Field(128, ge=0)  # tokens shared by consecutive windows (below task.window)
    max_answer_tokens: int = Field(30, ge=1)
    n_best: int = Field(20, ge=1)  # start/end candidates tried per window
    template_closed_book: str | None = None  # prompt of rows without a context (closed-book QA); {question}

    @field_validator("stride")
    @classmethod
    def _stride_below_window(cls, v, info):
        window = info.data.get("window")
        if window is not None and v >= window:
            raise ValueError(f"task.stride={v} must be below task.window={window} "
                             "(it is the tokens consecutive windows share)")
        return v


def select_articles(records: list[dict], articles: slice, keys: list) -> list[dict]:
    """Records whose article (``keys[i]``, in order of first appearance) falls in ``articles``."""
    order = list(dict.fromkeys(keys))
    chosen = set(order[articles])
    return [r for r, k in zip(records, keys, strict=True) if k in chosen]


def windows(tokenizer, question: str, context: str, max_length: int, stride: int) -> list[dict]:
    """Overlapping ``question + context`` windows: ``input_ids``, ``token_type_ids`` (when the tokenizer
    makes them) and ``offsets``: the (start, end) context characters of each token, None for question,
    special and padding tokens.

    The question keeps at most half the window (a longer one is cut at a token boundary) and the
    stride is capped below the context room: the tokenizer aborts otherwise."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    q = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    keep = max(1, max_length // 2 - specials)
    if len(q["input_ids"]) > keep:
        question = question[: q["offset_mapping"][keep - 1][1]]
    room = max_length - specials - min(len(q["input_ids"]), keep)
    stride = max(0, min(stride, room - 1))
    enc = tokenizer(question, context, truncation="only_second", max_length=max_length, stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True)
    out = []
    for w in range(len(enc["input_ids"])):
        seq = enc.sequence_ids(w)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], seq, strict=True)]
        win = {"input_ids": list(enc["input_ids"][w]), "offsets": offsets}
        if "token_type_ids" in enc:
            win["token_type_ids"] = list(enc["token_type_ids"][w])
        out.append(win)
    return out


def answer_tokens(offsets: list, start_char: int, end_char: int) -> tuple[int, int] | None:
    """First and last token of the window covering context characters [start_char, end_char)."""
    inside = [i for i, o in enumerate(offsets) if o is not None and o[1] > start_char and o[0] < end_char]
    if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return None  # the answer is not wholly in this window
    return inside[0], inside[-1]


def best_span(start: torch.Tensor, end: torch.Tensor, offsets: list, max_answer_tokens: int, n_best: int):
    """(score, first, last) of the best valid span in one window, or None: both ends on context tokens,
    ``last >= first``, at most ``max_answer_tokens`` tokens; score = start + end logit."""
    ok = torch.tensor([o is not None for o in offsets])
    if not ok.any():
        return None
    s_log = start.float().masked_fill(~ok, float("-inf"))
    e_log = end.float().masked_fill(~ok, float("-inf"))
    k = min(n_best, int(ok.sum()))
    best = None
    for s in s_log.topk(k).indices.tolist():
        for e in e_log.topk(k).indices.tolist():
            if e < s or e - s + 1 > max_answer_tokens:
                continue
            score = float(s_log[s] + e_log[e])
            if best is None or score > best[0]:
                best = (score, s, e)
    return best


def span_labels(length: int, start: int, end: int) -> list[int]:
    labels = [-100] * length
    labels[start], labels[end] = (BOTH, BOTH) if start == end else (START, END)
    return labels


def install_qa_labels(model):
    """Let a ``*ForQuestionAnswering`` model take the loop's per-token ``labels`` (see `span_labels`)
    as ``start_positions`` / ``end_positions``. Idempotent."""
    if getattr(model, "tunelab_qa_labels", False):
        return model

    def hook(module, args, kwargs):
        labels = kwargs.pop("labels", None)
        if labels is not None:
            both = labels == BOTH
            kwargs["start_positions"] = ((labels == START) | both).int().argmax(-1)
            kwargs["end_positions"] = ((labels == END) | both).int().argmax(-1)
        return args, kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)
    model.tunelab_qa_labels = True
    return model


def answer_list(value) -> list[str]:
    """Reference answers from a field: one string, a list of strings, hub SQuAD's ``{"text": [...]}`` or
    TriviaQA's ``{"value": ..., "aliases": [...]}`` (value first, duplicates dropped)."""
    if isinstance(value, dict):
        if "text" in value:  # hub SQuAD: the texts pair with answer_start, duplicates included
            return [str(a) for a in value["text"] if str(a).strip()]
        value = list(dict.fromkeys(([value["value"]] if value.get("value") else []) + list(value.get("aliases") or [])))
    if value is None:
        return []
    items = [value] if isinstance(value, str | int | float) else list(value)
    return [str(a) for a in items if str(a).strip()]  # duplicates kept: SQuAD pairs them with answer_starts


def answer_mismatch(context: str, answers: list[str], starts) -> str | None:
    """Why the answers do not sit at their ``answer_start`` offsets in ``context`` (None when they do)."""
    if not isinstance(starts, list) or len(starts) != len(answers):
        return f"answer_starts {starts!r} does not give one offset per answer ({len(answers)} answers)"
    for text, start in zip(answers, starts, strict=True):
        if isinstance(start, bool) or not isinstance(start, int | str) or not str(start).lstrip("-").isdigit():
            return f"answer_start {start!r} is not a character offset"
        start = int(start)
        if start < 0 or context[start : start + len(text)] != text:
            return f"answer {text!r} is not at character {start} of the context"
    return None


class QA:
    name = "qa"
    # The metric names evaluate() may report (a trailing * matches a prefix): compare checks --metric before training.
    metrics = ("f1", "exact_match")
    selectors = ("articles",)  # data path selectors it applies itself (tunelab.tasks.splits)
    Config = QAConfig

    @staticmethod
    def split_group(ex) -> str:  # data.eval_split keeps an article's questions on one side
        return ex["title"] or ex["context"] or ex["question"]

    def read(self, source, cfg, *, limit=None, skip_bad=False) -> list[dict]:
        path, articles = split_source(source)
        cols = {k: field_name(cfg, k) for k in ("context", "question", "answers", "answer_starts", "id", "title")}
        rows = read_records(path, skip_bad=skip_bad, text=[cols["context"], cols["question"]])
        if ".paragraphs[" in rows[0]["_where"]:  # SQuAD JSON: canonical keys, article index in _where
            cols = {k: k for k in cols}
            keys = [re.search(r"data\[(\d+)\]", r["_where"])[1] for r in rows]
        else:
            qcol = cols["question"]
            bad = [r["_where"] for r in rows if not str(r.get(qcol) or "").strip()]
            if bad and not skip_bad:
                raise DataError(f"{bad[0]}: field {qcol!r} is missing or empty (present: "
                                f"{sorted(k for k in next(r for r in rows if r['_where'] == bad[0]) if k != '_where')})")
            rows = [r for r in rows if str(r.get(qcol) or "").strip()]
            keys = [r.get(cols["title"]) or r.get(cols["context"]) or r[qcol] for r in rows]
        if articles is not None:
            rows = select_articles(rows, articles, keys)
            if not rows:
                raise DataError(f"{source}: the article selection holds no questions ({len(set(keys))} articles in the file)")
        out = []
        for r in rows:
            answers = answer_list(r.get(cols["answers"]))
            if not answers:
                if skip_bad:
                    continue
                raise DataError(f"{r['_where']}: field {cols['answers']!r} is missing or empty (unanswerable questions are not supported)")
            ctx = str(r.get(cols["context"]) or "").strip() and str(r[cols["context"]])
            if not ctx:  # closed-book QA (NQ-Open, TriviaQA): the question alone, answers scored by best match
                if cfg.formulation == "head":
                    raise DataError(f"{r['_where']}: field {cols['context']!r} is missing or empty, and task.formulation=head "
                                    "extracts the answer from the context; for closed-book QA (question + answers, no "
                                    "context) use task.formulation: lm (or seq2seq)")
                out.append({"id": str(r.get(cols["id"], r["_where"])), "title": r.get(cols["title"], ""), "context": "",
                            "question": str(r[cols["question"]]), "answers": answers, "answer_starts": [],
                            "_where": r["_where"]})
                continue
            starts = r.get(cols["answer_starts"])
            if isinstance(r.get(cols["answers"]), dict) and not starts:  # hub SQuAD: answers {text, answer_start}
                starts = r[cols["answers"]].get("answer_start")
            if not starts:  # no offsets given: where the answers first occur in the context
                starts = [ctx.find(a) for a in answers]
                lost = next((a for a, k in zip(answers, starts, strict=True) if k < 0), None)
                if lost is not None:  # checked for every formulation: a misaligned file, not a closed-book one
                    if skip_bad:
                        continue
                    raise DataError(f"{r['_where']}: answer {lost!r} does not occur in the context (the row gives no "
                                    "answer_starts); for closed-book QA (question + answers, no context) leave the context "
                                    "out, e.g. task.layout: nq_open")
            wrong = answer_mismatch(ctx, answers, starts)  # checked before training
            if wrong:
                if skip_bad:
                    continue
                raise DataError(f"{r['_where']}: {wrong}")
            out.append({"id": str(r.get(cols["id"], r["_where"])), "title": r.get(cols["title"], ""), "context": ctx,
                        "question": str(r[cols["question"]]), "answers": answers,
                        "answer_starts": [int(k) for k in starts], "_where": r["_where"]})
        return out[:limit] if limit is not None else out

    def head(self, cfg, examples):
        if cfg.formulation == "seq2seq":
            return HeadSpec("seq2seq")
        return HeadSpec("qa", install=install_qa_labels) if cfg.formulation == "head" else None

    def check(self, cfg, train_ex, eval_ex, tokenizer, model) -> None:
        """Before step 1: the head's eval windows must fit the model's positions, and each eval question
        (+ the special tokens) must leave room for context in task.window."""
        if cfg.formulation == "head" and eval_ex:
            specials = tokenizer.num_special_tokens_to_add(pair=True)
            counts = [len(ids) for ids in tokenizer([ex["question"] for ex in eval_ex], add_special_tokens=False)["input_ids"]]
            k, ex = max(zip(counts, eval_ex, strict=True), key=lambda t: t[0])
            if k + specials >= cfg.window:
                raise ValueError(f"{ex.get('_where', 'an eval example')}: the question is {k} tokens (+ {specials} special), "
                                 f"which leaves no room for the context in task.window={cfg.window}; "
                                 f"set task.window above {k + specials}")
        n = getattr(model.config, "max_position_embeddings", None)
        if cfg.formulation != "head" or not n or cfg.window <= n or not eval_ex:
            return
        lengths = [len(ids) for ids in tokenizer([ex["question"] for ex in eval_ex], [ex["context"] for ex in eval_ex])["input_ids"]]
        long = next((ex for ex, k in zip(eval_ex, lengths, strict=True) if k > n), None)
        if long is not None:
            raise ValueError(f"{long['_where']}: question + context is longer than the model's {n} positions and "
                             f"task.window={cfg.window} would not cut it; set task.window={n}")

    def prompt(self, ex, tokenizer, cfg) -> str:
        if not ex["context"]:  # closed-book: the question alone (task.template_closed_book)
            if cfg.formulation == "seq2seq":
                return (cfg.template_closed_book or CLOSED_BOOK_SEQ2SEQ).format(question=ex["question"])
            text = (cfg.template_closed_book or CLOSED_BOOK_TEMPLATE).format(question=ex["question"])
            return render_prompt(tokenizer, text, cfg.chat)
        if cfg.formulation == "seq2seq":
            return (cfg.template or SEQ2SEQ_TEMPLATE).format(context=ex["context"], question=ex["question"])
        text = (cfg.template or DEFAULT_TEMPLATE).format(context=ex["context"], question=ex["question"])
        return render_prompt(tokenizer, text, cfg.chat)

    def encode(self, ex, tokenizer, cfg, max_length) -> dict:
        if cfg.formulation == "seq2seq":
            return encode_seq2seq(tokenizer, self.prompt(ex, tokenizer, cfg), ex["answers"][0], max_length)
        if cfg.formulation != "head" and not ex["context"]:
            return encode_lm(tokenizer, self.prompt(ex, tokenizer, cfg), ex["answers"][0], max_length)
        if cfg.formulation != "head":
            return encode_lm_document(tokenizer, lambda c: self.prompt({**ex, "context": c}, tokenizer, cfg),
                                      ex["context"], ex["answers"][0], max_length)
        start = ex["answer_starts"][0]
        if start < 0 or ex["context"][start : start + len(ex["answers"][0])] != ex["answers"][0]:
            raise DataError(f"{ex['_where']}: answer {ex['answers'][0]!r} is not at character {start} of the context")
        wins = windows(tokenizer, ex["question"], ex["context"], max_length, min(cfg.stride, max_length // 2))
        span, win = (0, 0), wins[0]
        for w in wins:
            found = answer_tokens(w["offsets"], start, start + len(ex["answers"][0]))
            if found is not None:
                span, win = found, w
                break
        n = len(win["input_ids"])
        feat = {"input_ids": win["input_ids"], "labels": span_labels(n, *span), "prompt_len": n}
        if "token_type_ids" in win:
            feat["token_type_ids"] = win["token_type_ids"]
        return feat

    def encode_many(self, rows, tokenizer, cfg, max_length) -> list[dict] | None:
        """``[self.encode(ex, ...) for ex in rows]`` in batched tokenizer calls (`tunelab.data.prompt_splicing`); lm only."""
        if cfg.formulation != "lm":
            return None
        return lm_features(self, rows, tokenizer, cfg, max_length,
                           slots=lambda ex: ("context", "question") if ex["context"] else ("question",),
                           render=lambda ex, v: self.prompt({**ex, **v}, tokenizer, cfg),
                           group=lambda ex: bool(ex["context"]), target=lambda ex: ex["answers"][0])

    def evaluate(self, model, tokenizer, examples, cfg, *, batch_size=16, gen=None, split=False):
        if cfg.formulation == "head":
            answers = self._extract(model, tokenizer, examples, cfg, batch_size)
        else:
            args = gen_args(gen, batch_size, max_new_tokens=32, stop=["\n"])
            answers = generate(model, tokenizer, [self.prompt(ex, tokenizer, cfg) for ex in examples], **args, split=split)
        scores = squad_scores(answers, [ex["answers"] for ex in examples])
        metrics = {"f1": scores["f1"], "exact_match": scores["exact_match"], "n": len(examples)}
        preds = [{"id": ex["id"], "where": ex["_where"], "input": ex["question"], "prediction": a, "reference": ex["answers"]}
                 for ex, a in zip(examples, answers, strict=True)]
        return metrics, preds

    def _extract(self, model, tokenizer, examples, cfg, batch_size) -> list[str]:
        dev = next(model.parameters()).device
        feats = [(i, w) for i, ex in enumerate(examples)
                 for w in windows(tokenizer, ex["question"], ex["context"], cfg.window, cfg.stride)]
        best: list = [None] * len(examples)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(feats)), key=lambda k: -len(feats[k][1]["input_ids"]))
        bar = progress(len(order), "extracting")
        with inference.inference(model):
            for b in range(0, len(order), batch_size):
                batch = [feats[k] for k in order[b : b + batch_size]]
                width = max(len(w["input_ids"]) for _, w in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask, types = torch.zeros_like(ids), torch.zeros_like(ids)
                ok = torch.zeros((len(batch), width), dtype=torch.bool)  # context tokens
                for row, (_, w) in enumerate(batch):
                    n = len(w["input_ids"])
                    ids[row, :n], mask[row, :n] = torch.tensor(w["input_ids"]), 1
                    ok[row, :n] = torch.tensor([o is not None for o in w["offsets"]])
                    if "token_type_ids" in w:
                        types[row, :n] = torch.tensor(w["token_type_ids"])
                inputs = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
                if "token_type_ids" in batch[0][1]:
                    inputs["token_type_ids"] = types.to(dev)
                model_context(model)["prompt_mask"] = inputs["attention_mask"].bool()
                out = model(**inputs)
                # the n-best search of every window of the batch in tensors (`best_span`, vectorized)
                spans = inference.best_spans(out.start_logits.cpu(), out.end_logits.cpu(), ok,
                                             [len(w["input_ids"]) for _, w in batch], cfg.max_answer_tokens, cfg.n_best)
                for (i, w), span in zip(batch, spans, strict=True):
                    if span is not None and (best[i] is None or span[0] > best[i][0]):
                        best[i] = (span[0], w["offsets"][span[1]][0], w["offsets"][span[2]][1])
                bar.update(len(batch))
            model_context(model).pop("prompt_mask", None)
        bar.close()
        return [examples[i]["context"][b[1] : b[2]] if b else "" for i, b in enumerate(best)]


TASKS.register(QA.name, QA())
