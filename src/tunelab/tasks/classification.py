"""Text classification (one text or a pair): label words for causal LMs, or a classification head.

Formulations:
- ``lm``: prompt = template over the example (chat-wrapped for chat models), target = the label's
  word; evaluation compares the label words' log-likelihoods after the prompt (one forward per
  example when every label word is a single token).
- ``head``: a sequence-classification head on the backbone (new head trains with the method).

Metrics: accuracy (primary), macro-F1, and for two classes the F1 of the second (positive) class.
Sentiment (SST-2) and paraphrase (MRPC) are this family with their own defaults.
"""

from __future__ import annotations

from typing import Literal

from tunelab.data.encoding import encode_head, encode_lm_document
from tunelab.data.prompt_splicing import lm_features
from tunelab.data.readers import read_records
from tunelab.errors import DataError
from tunelab.evaluation.metrics import pick_choice
from tunelab.evaluation.scoring import classify, score_choices
from tunelab.tasks.base import (
    TASKS,
    HeadSpec,
    TaskConfig,
    field_name,
    render_prompt,
    targets_are_optional,
    unreferenced,
)


class ClassificationConfig(TaskConfig):
    labels: list[str] | None = None  # class names in label-id order; None: collected from the data
    label_words: list[str] | None = None  # what the LM says for each class; None: the label names
    quoting: Literal["minimal", "none"] = "minimal"
    pair: bool = False  # two texts per example (fields text and text_pair)


DEFAULT_TEMPLATE = "Classify the text into one of: {choices}.\nText: {text}\nAnswer with the label only."
PAIR_TEMPLATE = "Classify the pair into one of: {choices}.\nText 1: {text}\nText 2: {text_pair}\nAnswer with the label only."


class Classification:
    name = "classification"
    # The metric names evaluate() may report (a trailing * matches a prefix): compare checks --metric before training.
    metrics = ("accuracy", "macro_f1", "f1")
    Config = ClassificationConfig

    def read(self, source, cfg, *, limit=None, skip_bad=False) -> list[dict]:
        keys = ["text", "label"] + (["text_pair"] if cfg.pair else [])
        cols = {k: field_name(cfg, k) for k in keys}
        texts = [c for k, c in cols.items() if k != "label"]
        optional = targets_are_optional()  # tunelab predict: rows without a label are predicted, not scored
        rows = read_records(source, skip_bad=skip_bad, quoting=cfg.quoting, limit=limit,
                            required=texts if optional else list(cols.values()), text=texts)
        out = []
        for r in rows:
            ex = {k: str(r[c]).strip() for k, c in cols.items() if k != "label"}
            label = r.get(cols["label"])
            if optional and (label is None or label == "" or (isinstance(label, float) and label != label)):
                out.append({**ex, "label": "", "_where": r.get("_where", source)})
                continue
            if isinstance(label, float) and label.is_integer():
                label = int(label)
            if not isinstance(label, str | int):  # a list, a mapping, 0.5: never a class name
                if skip_bad:
                    continue
                raise DataError(f"{r['_where']}: field {cols['label']!r} must be a class name or index, got {label!r}")
            ex["label"] = str(label).strip()
            ex["_where"] = r.get("_where", source)
            out.append(ex)
        return out

    def _labels(self, cfg, examples) -> list[str]:
        if cfg.labels:
            return cfg.labels
        seen = sorted({ex["label"] for ex in examples if ex["label"]},
                      key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
        if not seen and examples:
            raise DataError(f"{examples[0]['_where']}: the rows have no labels and task.labels is not set, so the "
                            "classes are unknown: set task.labels (in label-id order)")
        return seen

    def label_id(self, ex: dict, labels: list[str]) -> int:
        raw = ex["label"]
        if raw in labels:
            return labels.index(raw)
        if raw.lstrip("-").isdigit() and 0 <= int(raw) < len(labels):
            return int(raw)
        raise DataError(f"{ex['_where']}: field 'label' has value {raw!r}, not one of {labels} or an index below {len(labels)}")

    def check(self, cfg, train_ex, eval_ex, tokenizer, model) -> None:
        """Before step 1: one label word per class, and every eval label known (else DataError naming the row)."""
        labels = self._labels(cfg, train_ex or eval_ex)
        if cfg.label_words is not None and len(cfg.label_words) != len(labels):
            raise ValueError(f"task.label_words has {len(cfg.label_words)} words {cfg.label_words} but there are "
                             f"{len(labels)} labels {labels}: give one word per label, in label order")
        for ex in eval_ex:
            if ex["label"]:  # a row without one (tunelab predict) is predicted, not scored
                self.label_id(ex, labels)

    def fit(self, cfg, examples):
        """Complete the config from the training data: the label set when none was given."""
        return cfg if cfg.labels else cfg.model_copy(update={"labels": self._labels(cfg, examples)})

    def head(self, cfg, examples):
        if cfg.formulation != "head":
            return None
        return HeadSpec("sequence", self._labels(cfg, examples))

    def prompt(self, ex: dict, tokenizer, cfg, labels: list[str]) -> str:
        words = cfg.label_words or labels
        template = cfg.template or (PAIR_TEMPLATE if cfg.pair else DEFAULT_TEMPLATE)
        text = template.format(choices=", ".join(words), **{k: v for k, v in ex.items() if not k.startswith("_")})
        return render_prompt(tokenizer, text, cfg.chat)

    def encode(self, ex, tokenizer, cfg, max_length) -> dict:
        labels = self._labels(cfg, [ex]) if ex["label"] or not cfg.labels else cfg.labels
        # only tunelab predict reads rows without a label (the template check encodes one): any class renders
        y = self.label_id(ex, labels) if ex["label"] else 0
        if cfg.formulation == "head":
            return encode_head(tokenizer, ex["text"], ex.get("text_pair"), label=y, max_length=max_length)
        words = cfg.label_words or labels
        # too long: the text is cut, never the instruction, the choices or the chat header
        return encode_lm_document(tokenizer, lambda d: self.prompt({**ex, "text": d}, tokenizer, cfg, labels),
                                  ex["text"], words[y], max_length)

    def encode_many(self, rows, tokenizer, cfg, max_length) -> list[dict] | None:
        """``[self.encode(ex, ...) for ex in rows]`` in batched tokenizer calls (`tunelab.data.prompt_splicing`)."""
        if not cfg.labels:  # encode() then takes each row's own label as the whole label set
            return None
        labels = cfg.labels
        if cfg.formulation == "head":
            ys = [self.label_id(ex, labels) for ex in rows]  # a bad label: the per-row error, in row order
            feats: list = [None] * len(rows)
            paired = [i for i, ex in enumerate(rows) if ex.get("text_pair")]  # an empty pair encodes as a single text
            for members, pairs in ((paired, True), (sorted(set(range(len(rows))) - set(paired)), False)):
                if not members:
                    continue
                enc = tokenizer([rows[i]["text"] for i in members], [rows[i]["text_pair"] for i in members] if pairs else None,
                                truncation=True, max_length=max_length)
                for j, i in enumerate(members):
                    feats[i] = {"input_ids": list(enc["input_ids"][j])}
                    if "token_type_ids" in enc:
                        feats[i]["token_type_ids"] = list(enc["token_type_ids"][j])
                    feats[i]["labels"] = ys[i]
            return feats
        words = cfg.label_words or labels
        return lm_features(self, rows, tokenizer, cfg, max_length, slots=("text", "text_pair") if cfg.pair else ("text",),
                           render=lambda ex, v: self.prompt({**ex, **v}, tokenizer, cfg, labels),
                           group=lambda ex: ex["label"], target=lambda ex: words[self.label_id(ex, labels)])

    def evaluate(self, model, tokenizer, examples, cfg, *, batch_size=16, gen=None, split=False):
        labels = self._labels(cfg, examples)
        missing = unreferenced(examples, "label")  # rows without a label (tunelab predict): predictions only
        gold = [self.label_id(ex, labels) if ex["label"] else -1 for ex in examples]
        if cfg.formulation == "head":
            texts = [ex["text"] for ex in examples]
            pairs = [ex["text_pair"] for ex in examples] if cfg.pair else None
            pred = classify(model, tokenizer, texts, pairs, batch_size=batch_size, split=split).argmax(-1).tolist()
        else:
            words = cfg.label_words or labels
            prompts = [self.prompt(ex, tokenizer, cfg, labels) for ex in examples]
            scores = score_choices(model, tokenizer, prompts, [words] * len(prompts), batch_size=batch_size, split=split)
            picked = [pick_choice(s) for s in scores]
            pred, tied = [p for p, _ in picked], sum(t for _, t in picked)
        if missing:
            return {"n": len(examples), "without_reference": missing}, [
                {"where": ex["_where"], "text": ex["text"], "prediction": labels[p], "reference": labels[g] if g >= 0 else None}
                for ex, p, g in zip(examples, pred, gold, strict=True)]
        metrics = {"accuracy": sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)}
        from sklearn.metrics import f1_score  # here: sklearn (+ scipy, pandas) costs seconds to import

        metrics["macro_f1"] = float(f1_score(gold, pred, average="macro", labels=list(range(len(labels)))))
        if len(labels) == 2:
            metrics["f1"] = float(f1_score(gold, pred, pos_label=1, average="binary", zero_division=0))
        metrics["n"] = len(gold)
        if cfg.formulation != "head":  # label words whose scores were exactly equal: decided by order
            metrics["tied_predictions"] = tied
        preds = [{"where": ex["_where"], "text": ex["text"], "prediction": labels[p], "reference": labels[g]}
                 for ex, p, g in zip(examples, pred, gold, strict=True)]
        return metrics, preds


class SentimentConfig(ClassificationConfig):
    labels: list[str] | None = ["negative", "positive"]
    fields: dict[str, str] = {"text": "sentence", "label": "label"}
    template: str | None = "What is the sentiment of this movie review? Answer positive or negative.\nReview: {text}"


class Sentiment(Classification):
    name = "sentiment"
    Config = SentimentConfig


class ParaphraseConfig(ClassificationConfig):
    labels: list[str] | None = ["no", "yes"]
    fields: dict[str, str] = {"text": "#1 String", "text_pair": "#2 String", "label": "Quality"}
    quoting: Literal["minimal", "none"] = "none"
    pair: bool = True
    template: str | None = (
        "Do these two sentences mean the same thing? Answer yes or no.\nSentence 1: {text}\nSentence 2: {text_pair}"
    )


class Paraphrase(Classification):
    name = "paraphrase"
    Config = ParaphraseConfig


for _task in (Classification(), Sentiment(), Paraphrase()):
    TASKS.register(_task.name, _task)
