"""Named-entity recognition over IOB-tagged tokens (CoNLL-2003 and friends).

Data: CoNLL column files (token first, tag last by default; ``token_col`` / ``tag_col`` move them; tab- or
space-separated, with or without ``-DOCSTART-`` lines; known by suffix, WNUT-17's ``.annotated`` included, or by
content when the suffix says nothing) or JSON/JSONL/CSV records whose ``tokens`` and ``tags`` fields are lists
or space-separated strings; tags may be names or ids into ``task.labels`` (the hub's ``ner_tags``:
``task.layout: conll2003`` / ``wnut_17`` name them).

Formulations:
- ``lm`` (generative): the model writes the entities as text, ``"PER: John Smith; LOC: Paris"`` (or
  ``"none"``), which is parsed back and placed on the sentence's tokens (first free occurrence);
  an entity that cannot be placed counts as a false positive.
- ``head`` (token classification): one label per sub-token, the first sub-token of each word carries
  the word's tag and the rest get -100 (no loss, not scored); words are matched to sub-tokens by
  character offsets, so any fast tokenizer works (WordPiece, byte-level BPE, ...).

Metric: entity-level micro precision / recall / F1 (seqeval's chunking rules), F1 first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from tunelab.data.encoding import encode_lm
from tunelab.data.readers import infer_format, read_conll, read_records
from tunelab.errors import DataError
from tunelab.evaluation import inference
from tunelab.evaluation.metrics import entities, entity_prf
from tunelab.evaluation.scoring import generate, progress
from tunelab.methods.base import context
from tunelab.tasks.base import TASKS, HeadSpec, TaskConfig, field_name, gen_args, render_prompt

DEFAULT_TEMPLATE = (
    "List the named entities in the sentence as 'TYPE: entity' separated by '; ', with TYPE one of "
    "{types}. Answer 'none' if there are none.\nSentence: {text}"
)


class NERConfig(TaskConfig):
    labels: list[str] | None = None  # IOB tags in head-label order; None: from the training data (fit)
    format: Literal["auto", "conll", "records"] = "auto"  # auto: CoNLL by file suffix, else records
    token_col: int = 0  # CoNLL columns
    tag_col: int = -1
    eval_max_length: int = Field(512, ge=8)  # truncation when scoring with a head (words beyond it are tagged O)


def render_entities(tokens: list[str], tags: list[str]) -> str:
    found = [f"{t}: {' '.join(tokens[a : b + 1])}" for t, a, b in entities(tags)]
    return "; ".join(found) or "none"


def parse_entities(text: str, types: list[str]) -> tuple[list[tuple[str, str]], int]:
    """``"PER: John Smith; LOC: Paris"`` -> ([("PER", "John Smith"), ("LOC", "Paris")], invalid), where
    ``invalid`` counts parts that name no known type."""
    found, invalid = [], 0
    for part in text.replace("\n", ";").split(";"):
        part = part.strip()
        if not part or part.lower().rstrip(".") == "none":
            continue
        etype, sep, ent = part.partition(":")
        etype, ent = etype.strip().upper(), ent.strip()
        if sep and etype in types and ent:
            found.append((etype, ent))
        else:
            invalid += 1
    return found, invalid


def place_entities(tokens: list[str], entities: list[tuple[str, str]]) -> tuple[list[str], int]:
    """IOB2 tags for ``entities`` placed at their first free exact (then case-blind) occurrence among
    ``tokens``; returns (tags, how many could not be placed)."""
    tags, unplaced = ["O"] * len(tokens), 0
    for etype, text in entities:
        words = text.split()
        spot = None
        for fold in (False, True):
            norm = (lambda s: s.lower()) if fold else (lambda s: s)
            want = [norm(w) for w in words]
            for i in range(len(tokens) - len(words) + 1):
                if [norm(t) for t in tokens[i : i + len(words)]] == want and all(t == "O" for t in tags[i : i + len(words)]):
                    spot = i
                    break
            if spot is not None:
                break
        if spot is None:
            unplaced += 1
            continue
        tags[spot : spot + len(words)] = [f"B-{etype}"] + [f"I-{etype}"] * (len(words) - 1)
    return tags, unplaced


def word_offsets(tokens: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The sentence joined by single spaces and each word's (start, end) character span in it."""
    out, pos = [], 0
    for t in tokens:
        out.append((pos, pos + len(t)))
        pos += len(t) + 1
    return " ".join(tokens), out


def first_subtokens(offsets: list[tuple[int, int]], words: list[tuple[int, int]]) -> list[int | None]:
    """For each sub-token, the index of the word it starts (first sub-token of that word), else None.

    A sub-token belongs to the word its character span overlaps (byte-level BPE offsets may include the
    leading space, which overlaps no word); special tokens have empty spans and belong to none."""
    out, seen, w = [], set(), 0
    for s, e in offsets:
        owner = None
        if e > s:
            while w < len(words) and words[w][1] <= s:
                w += 1
            if w < len(words) and words[w][0] < e:
                owner = w
        out.append(owner if owner is not None and owner not in seen else None)
        if owner is not None:
            seen.add(owner)
    return out


def tag_name(tag, labels: list[str] | None) -> str:
    """A tag as text: names stay; an id (int, or digits) is looked up in ``labels`` (task.labels)."""
    if isinstance(tag, str) and not tag.strip().isdigit():
        return tag
    if isinstance(tag, bool) or not isinstance(tag, int | str):
        raise ValueError(f"tag {tag!r} is neither a tag name nor an id")
    if not labels:
        raise ValueError(f"tag ids such as {tag!r} need the tag names in id order: set task.labels, or task.layout "
                         "(conll2003, wnut_17) for a hub set")
    if not 0 <= int(tag) < len(labels):
        raise ValueError(f"tag id {tag!r} is outside task.labels ({len(labels)} names)")
    return labels[int(tag)]


def looks_like_conll(path: Path) -> bool | None:
    """For a file whose suffix says nothing: True when its first non-blank line is whitespace-separated token
    columns (not JSON, not a CSV header), None when it is not there or unreadable."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            line = next((ln for ln in f if ln.strip()), "")
    except OSError:
        return None
    parts = line.split()
    return bool(line) and line.lstrip()[:1] not in "{[" and len(parts) >= 2


class NER:
    name = "ner"
    # The metric names evaluate() may report (a trailing * matches a prefix): compare checks --metric before training.
    metrics = ("f1", "precision", "recall", "f1_*")
    Config = NERConfig

    def read(self, source, cfg, *, limit=None, skip_bad=False) -> list[dict]:
        conll = cfg.format == "conll"
        if cfg.format == "auto":
            try:
                conll = infer_format(Path(str(source)), "task.format: conll (token columns) or records") == "conll"
            except DataError:
                conll = looks_like_conll(Path(str(source)))  # an unknown suffix: the content decides
                if conll is None:
                    raise
        if conll:
            return read_conll(source, cfg.token_col, cfg.tag_col, skip_bad=skip_bad, limit=limit, iob=True)
        tcol, gcol = field_name(cfg, "tokens"), field_name(cfg, "tags")
        out = []
        for r in read_records(source, skip_bad=skip_bad, limit=limit, required=[tcol, gcol]):
            tokens, tags = (r[c].split() if isinstance(r[c], str) else list(r[c]) for c in (tcol, gcol))
            tokens = [str(t) for t in tokens]
            try:  # tag ids (the hub's ner_tags) name the tags in task.labels order (a layout sets them)
                tags = [tag_name(t, cfg.labels) for t in tags]
            except ValueError as e:
                if skip_bad:
                    continue
                raise DataError(f"{r['_where']}: field {gcol!r}: {e}") from None
            if len(tokens) != len(tags):
                if skip_bad:
                    continue
                raise DataError(f"{r['_where']}: field {tcol!r} has {len(tokens)} tokens but {gcol!r} has {len(tags)} tags")
            bad = [t for t in tags if t != "O" and t[:2] not in ("B-", "I-")]
            if bad:
                if skip_bad:
                    continue
                raise DataError(f"{r['_where']}: field {gcol!r} has tag {bad[0]!r}; allowed: O, B-TYPE, I-TYPE")
            out.append({"tokens": tokens, "tags": tags, "_where": r["_where"]})
        if not out:
            raise DataError(f"{source}: no usable sentences")
        return out

    # ---- labels -------------------------------------------------------------------------------
    def _labels(self, cfg, examples) -> list[str]:
        if cfg.labels:
            return cfg.labels
        types = sorted({t[2:] for ex in examples for t in ex["tags"] if t != "O"})
        return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]

    def _types(self, cfg, examples) -> list[str]:
        return sorted({lab[2:] for lab in self._labels(cfg, examples) if lab != "O"})

    def fit(self, cfg, examples):
        return cfg if cfg.labels else cfg.model_copy(update={"labels": self._labels(cfg, examples)})

    def check(self, cfg, train_ex, eval_ex, tokenizer, model) -> None:
        """Before step 1: no eval entity type the model never saw; no eval sentence the head cannot take."""
        types = set(self._types(cfg, train_ex or eval_ex))
        for ex in eval_ex:
            unseen = [t for t in ex["tags"] if t != "O" and t[2:] not in types]
            if unseen:
                raise DataError(f"{ex['_where']}: tag {unseen[0]!r} has an entity type the training data never has "
                                f"(types: {sorted(types)}); the model could never predict it")
        n = getattr(model.config, "max_position_embeddings", None)
        if cfg.formulation == "head" and n and cfg.eval_max_length > n and eval_ex:
            lengths = [len(ids) for ids in tokenizer([" ".join(ex["tokens"]) for ex in eval_ex])["input_ids"]]
            long = next((ex for ex, k in zip(eval_ex, lengths, strict=True) if k > n), None)
            if long is not None:
                raise ValueError(f"{long['_where']}: this eval sentence is longer than the model's {n} positions and "
                                 f"task.eval_max_length={cfg.eval_max_length} would not cut it; set task.eval_max_length={n}")

    def head(self, cfg, examples):
        return HeadSpec("token", self._labels(cfg, examples)) if cfg.formulation == "head" else None

    # ---- training features --------------------------------------------------------------------
    def prompt(self, ex, tokenizer, cfg, types: list[str]) -> str:
        text = (cfg.template or DEFAULT_TEMPLATE).format(text=" ".join(ex["tokens"]), types=", ".join(types))
        return render_prompt(tokenizer, text, cfg.chat)

    def align(self, tokenizer, tokens: list[str], tags: list[str] | None, label2id: dict, max_length: int) -> dict:
        """Sub-token ids and labels (-100 except on each word's first sub-token) plus ``words``: the word
        each labelled position belongs to (None elsewhere)."""
        text, words = word_offsets(tokens)
        enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
        owners = first_subtokens(enc["offset_mapping"], words)
        labels = [-100 if w is None or tags is None else label2id[tags[w]] for w in owners]
        return {"input_ids": list(enc["input_ids"]), "labels": labels, "words": owners}

    def encode(self, ex, tokenizer, cfg, max_length) -> dict:
        if not cfg.labels:  # one sentence's tags would give a per-example label set / prompt
            raise ValueError("task 'ner': labels are unset; call fit(cfg, train_examples) first (train.run does)")
        labels = cfg.labels
        if cfg.formulation == "head":
            unknown = [t for t in ex["tags"] if t not in labels]
            if unknown:
                raise DataError(f"{ex['_where']}: tag {unknown[0]!r} is not in the label set {labels}")
            feat = self.align(tokenizer, ex["tokens"], ex["tags"], {t: i for i, t in enumerate(labels)}, max_length)
            ids = feat["input_ids"]
            return {"input_ids": ids, "labels": feat["labels"], "prompt_len": len(ids)}
        target = render_entities(ex["tokens"], ex["tags"])
        return encode_lm(tokenizer, self.prompt(ex, tokenizer, cfg, self._types(cfg, [])), target, max_length)

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, model, tokenizer, examples, cfg, *, batch_size=16, gen=None, split=False):
        gold = [ex["tags"] for ex in examples]
        unplaced, lost = 0, [0] * len(examples)  # lost: each sentence's unplaced entities
        if cfg.formulation == "head":
            pred, texts = self._tag_with_head(model, tokenizer, examples, cfg, batch_size), None
        else:
            types = self._types(cfg, examples)
            args = gen_args(gen, batch_size, max_new_tokens=64, stop=["\n"])
            texts = generate(model, tokenizer, [self.prompt(ex, tokenizer, cfg, types) for ex in examples], **args, split=split)
            pred = []
            for i, (ex, out) in enumerate(zip(examples, texts, strict=True)):
                ents, invalid = parse_entities(out, types)
                tags, missed = place_entities(ex["tokens"], ents)
                pred.append(tags)
                unplaced += invalid + missed
                lost[i] = invalid + missed
        metrics = entity_prf(gold, pred, unplaced=unplaced)
        metrics = {"f1": metrics.pop("f1"), **metrics, "n": len(examples)}
        if texts is not None:
            metrics["unplaced"] = unplaced
        preds = []
        for i, ex in enumerate(examples):
            row = {"where": ex["_where"], "input": " ".join(ex["tokens"]),
                   "prediction": render_entities(ex["tokens"], pred[i]), "reference": render_entities(ex["tokens"], gold[i]),
                   # the tags themselves, so the report's paired test counts entities as entity_prf does
                   "pred_tags": list(pred[i]), "gold_tags": list(gold[i])}
            if texts is not None:
                row["output"] = texts[i]
                row["unplaced"] = lost[i]
            preds.append(row)
        return metrics, preds

    def _tag_with_head(self, model, tokenizer, examples, cfg, batch_size) -> list[list[str]]:
        id2label = self._labels(cfg, examples) if cfg.labels else [
            model.config.id2label[i] for i in range(model.config.num_labels)]
        dev = next(model.parameters()).device
        # one batched tokenizer call (the same ids and offsets as `align` gives one sentence at a time)
        texts, words = zip(*(word_offsets(ex["tokens"]) for ex in examples), strict=True) if examples else ((), ())
        enc = tokenizer(list(texts), truncation=True, max_length=cfg.eval_max_length, return_offsets_mapping=True)
        feats = [{"input_ids": list(ids), "words": first_subtokens(off, w)}
                 for ids, off, w in zip(enc["input_ids"], enc["offset_mapping"], words, strict=True)]
        out: list[list[str]] = [["O"] * len(ex["tokens"]) for ex in examples]
        order = sorted(range(len(feats)), key=lambda i: -len(feats[i]["input_ids"]))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        bar = progress(len(order), "tagging")
        with inference.inference(model):
            for b in range(0, len(order), batch_size):
                batch = order[b : b + batch_size]
                width = max(len(feats[i]["input_ids"]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(batch):
                    n = len(feats[i]["input_ids"])
                    ids[row, :n] = torch.tensor(feats[i]["input_ids"])
                    mask[row, :n] = 1
                context(model)["prompt_mask"] = mask.bool().to(dev)
                best = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.argmax(-1).cpu()
                # labelled positions of the whole batch in one gather
                at = [(row, pos, i, w) for row, i in enumerate(batch) for pos, w in enumerate(feats[i]["words"]) if w is not None]
                if at:
                    got = best[torch.tensor([a[0] for a in at]), torch.tensor([a[1] for a in at])].tolist()
                    for (_, _, i, w), k in zip(at, got, strict=True):
                        out[i][w] = id2label[k]
                bar.update(len(batch))
            context(model).pop("prompt_mask", None)
        bar.close()
        return out


TASKS.register(NER.name, NER())
