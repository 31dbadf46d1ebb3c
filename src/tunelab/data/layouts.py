"""Data layouts as data: the column names public sets ship with, mapped onto a family's canonical fields.

A layout is a row of ``LAYOUTS``: which families read it, a field map ``canonical field -> column`` (a list
of columns collects those present into one list: PIQA's ``sol1``/``sol2`` become the choices, DialogSum's
``summary1..3`` the references), the task settings it implies (label names in id order, ``pair``) and one
example row. ``task.layout: csqa`` selects one by name; ``task.layout: {question: stem, choices: options,
answer: gold}`` is the generic form for any other set (``task.layout_eval`` when the eval file differs).
The family then reads canonical fields, whose values may be structured as the hub ships them:

- multiple choice (reasoning): ``question``, ``choices`` (a list of texts, or ``{label: [...], text: [...]}``),
  ``answer`` (a label, a 0-based index, or the right choice's text), optional ``context``;
- QA: ``question``, ``answers`` (a text, a list, SQuAD's ``{text, answer_start}`` or TriviaQA's
  ``{value, aliases}``), optional ``context`` (absent: closed-book);
- summaries: ``dialogue`` and ``summary`` (one text or a list of references);
- classification: ``text`` (+ ``text_pair``) and ``label`` (a name or an id into ``task.labels``);
- NER: ``tokens`` and ``tags`` (tag names, or ids into ``task.labels``).

Reading applies the map to every record (``tunelab.data.readers.record_transform``, set up by
``tunelab.tasks.splits``); a record whose columns do not fit is an error naming the row, what is present and which
layout names would fit. Families that read Arrow tables column by column (``reads_tables``: chat, text) take no
layout; ``task.fields`` names their column.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tunelab.errors import DataError

# fields a family can do without: their absence is no mismatch
OPTIONAL = {"context", "id", "title", "input", "output", "text_pair"}


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    families: tuple[str, ...]
    fields: dict[str, str | list[str]]
    example: dict
    about: str
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    drop: dict[str, tuple] = dataclasses.field(default_factory=dict)  # rows whose canonical field holds these


CLASSIFY = ("classification", "sentiment", "paraphrase")
NLI = ["entailment", "neutral", "contradiction"]
CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
WNUT_TAGS = ["O"] + [f"{p}-{t}" for t in ("corporation", "creative-work", "group", "location", "person", "product")
                     for p in ("B", "I")]
_MC = {"question": "question", "choices": "choices", "answer": "answerKey"}
_CHOICES = {"label": ["A", "B", "C"], "text": ["in the cupboard", "on the floor", "in the car"]}

LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (
    # ---- multiple choice (reasoning, scored by the log-likelihood of each choice's label)
    Layout("csqa", ("reasoning",), _MC, {"question": "Where do you put a clean cup?", "choices": _CHOICES, "answerKey": "A"},
           "CommonsenseQA: question, choices {label, text}, answerKey"),
    Layout("arc", ("reasoning",), _MC, {"id": "Mercury_1", "question": "Which is a mammal?",
           "choices": {"label": ["A", "B"], "text": ["shark", "whale"]}, "answerKey": "B"},
           "ARC-Easy / ARC-Challenge: question, choices {label, text}, answerKey"),
    Layout("openbookqa", ("reasoning",), {**_MC, "question": "question_stem"},
           {"question_stem": "The sun is a", "choices": {"label": ["A", "B"], "text": ["star", "planet"]}, "answerKey": "A"},
           "OpenBookQA: question_stem, choices {label, text}, answerKey"),
    Layout("hellaswag", ("reasoning",), {"question": "ctx", "choices": "endings", "answer": "label"},
           {"ctx": "He picks up the cup and", "endings": ["drinks.", "flies away.", "sings.", "melts."], "label": "0"},
           "HellaSwag: ctx, endings (list), label (index)"),
    Layout("piqa", ("reasoning",), {"question": "goal", "choices": ["sol1", "sol2"], "answer": "label"},
           {"goal": "Dry wet shoes", "sol1": "Stuff them with paper.", "sol2": "Put them in water.", "label": 0},
           "PIQA: goal, sol1, sol2, label (index)"),
    Layout("mmlu", ("reasoning",), {"question": "question", "choices": "choices", "answer": "answer"},
           {"question": "2 + 2 =", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
           "MMLU: question, choices (list), answer (index)"),
    # ---- question answering
    Layout("nq_open", ("qa",), {"question": "question", "answers": "answer"},
           {"question": "who lives in paris", "answer": ["Mary", "Mary Smith"]},
           "NQ-Open: question, answer (list); closed-book, best match over the answers"),
    Layout("trivia_qa", ("qa",), {"question": "question", "answers": "answer"},
           {"question": "Capital of France?", "answer": {"value": "Paris", "aliases": ["Paris", "City of Light"]}},
           "TriviaQA (rc.nocontext): question, answer {value, aliases}; closed-book"),
    Layout("squad", ("qa",), {"id": "id", "title": "title", "context": "context", "question": "question", "answers": "answers"},
           {"id": "1", "title": "Paris", "context": "Mary lives in Paris.", "question": "Who lives in Paris?",
            "answers": {"text": ["Mary"], "answer_start": [0]}},
           "SQuAD on the hub: context, question, answers {text, answer_start}"),
    # ---- summaries (ROUGE and BLEU against every reference)
    Layout("dialogsum", ("summarization",), {"dialogue": "dialogue", "summary": ["summary", "summary1", "summary2", "summary3"]},
           {"id": "test_1", "dialogue": "#Person1#: hi\n#Person2#: hello", "summary1": "They greet.",
            "summary2": "Two people say hello.", "summary3": "A greeting."},
           "DialogSum: dialogue, summary (train) or summary1..3 (test: three references)"),
    Layout("cnn_dailymail", ("summarization",), {"dialogue": "article", "summary": "highlights"},
           {"id": "1", "article": "Mary moved to Paris ...", "highlights": "Mary moved."}, "CNN/DailyMail: article, highlights"),
    Layout("xsum", ("summarization",), {"dialogue": "document", "summary": "summary"},
           {"id": "1", "document": "Mary moved to Paris ...", "summary": "Mary moved."}, "XSum: document, summary"),
    # ---- instruction following
    Layout("dolly", ("generation",), {"instruction": "instruction", "input": "context", "output": "response"},
           {"instruction": "Say hello", "context": "", "response": "hello", "category": "open_qa"},
           "Dolly-15k: instruction, context, response"),
    # ---- classification and pairs
    Layout("imdb", CLASSIFY, {"text": "text", "label": "label"}, {"text": "A fine film.", "label": 1},
           "IMDB on the hub: text, label (0 negative, 1 positive)", {"labels": ["negative", "positive"]}),
    Layout("imdb_csv", CLASSIFY, {"text": "review", "label": "sentiment"}, {"review": "A fine film.", "sentiment": "positive"},
           "IMDB as a CSV (the Kaggle file): review, sentiment (positive / negative)", {"labels": ["negative", "positive"]}),
    Layout("sst2", CLASSIFY, {"text": "sentence", "label": "label"}, {"idx": 0, "sentence": "a fine film", "label": 1},
           "SST-2 (GLUE): sentence, label (0 negative, 1 positive)", {"labels": ["negative", "positive"]}),
    Layout("ag_news", CLASSIFY, {"text": "text", "label": "label"}, {"text": "Stocks rose today.", "label": 2},
           "AG News: text, label (0 World, 1 Sports, 2 Business, 3 Sci/Tech)",
           {"labels": ["World", "Sports", "Business", "Sci/Tech"]}),
    Layout("snli", CLASSIFY, {"text": "premise", "text_pair": "hypothesis", "label": "label"},
           {"premise": "A man sleeps.", "hypothesis": "A person rests.", "label": 0},
           "SNLI / MultiNLI: premise, hypothesis, label (0 entailment, 1 neutral, 2 contradiction; -1 dropped)",
           {"labels": NLI, "pair": True}, {"label": (-1, "-1")}),
    Layout("rte", CLASSIFY, {"text": "sentence1", "text_pair": "sentence2", "label": "label"},
           {"sentence1": "A man sleeps.", "sentence2": "A person rests.", "label": 0},
           "RTE (GLUE): sentence1, sentence2, label (0 entailment, 1 not_entailment)",
           {"labels": ["entailment", "not_entailment"], "pair": True}),
    Layout("mrpc", CLASSIFY, {"text": "sentence1", "text_pair": "sentence2", "label": "label"},
           {"sentence1": "He left.", "sentence2": "He went away.", "label": 1},
           "MRPC (GLUE on the hub): sentence1, sentence2, label (0 no, 1 yes)", {"labels": ["no", "yes"], "pair": True}),
    Layout("qqp", CLASSIFY, {"text": "question1", "text_pair": "question2", "label": "label"},
           {"question1": "How old is he?", "question2": "What is his age?", "label": 1},
           "QQP (GLUE): question1, question2, label (0 no, 1 yes)", {"labels": ["no", "yes"], "pair": True}),
    # ---- named entities (CoNLL column files need no layout: .conll/.iob/.annotated/... are read as they are)
    Layout("conll2003", ("ner",), {"tokens": "tokens", "tags": "ner_tags"},
           {"id": "0", "tokens": ["John", "lives", "in", "Paris"], "ner_tags": [1, 0, 0, 5]},
           "CoNLL-2003 on the hub: tokens, ner_tags (ids: O, B-PER, I-PER, B-ORG, I-ORG, B-LOC, I-LOC, B-MISC, I-MISC)",
           {"labels": CONLL_TAGS}),
    Layout("wnut_17", ("ner",), {"tokens": "tokens", "tags": "ner_tags"},
           {"id": "0", "tokens": ["@paul", "loves", "Paris"], "ner_tags": [9, 0, 7]},
           "WNUT-17 on the hub: tokens, ner_tags (ids: O, then B-/I- of corporation, creative-work, group, location, "
           "person, product)", {"labels": WNUT_TAGS}),
)}


# One row each family reads with no layout at all (its canonical fields; `tunelab tasks NAME` shows it).
DEFAULT_ROWS: dict[str, dict] = {
    "chat": {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]},
    "classification": {"text": "A fine film.", "label": "positive"},
    "sentiment": {"sentence": "a fine film", "label": 1},
    "paraphrase": {"#1 String": "He left.", "#2 String": "He went away.", "Quality": 1},
    "generation": {"instruction": "Say hello in French.", "input": "", "output": "Bonjour."},
    "ner": {"tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]},
    "preference": {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
    "qa": {"context": "Mary lives in Paris.", "question": "Who lives in Paris?", "answers": ["Mary"]},
    "rl": {"prompt": "What is 17 + 25?", "answer": "42"},
    "unpaired": {"prompt": "Say hi.", "completion": "Hi!", "label": True},
    "reasoning": {"instruction": "Tom had 3 apples and bought 4. How many?", "input": "",
                  "output": "3 + 4 = 7. The answer is 7.", "answer": "7"},
    "summarization": {"id": "1", "dialogue": "Tom: hi\nMary: hello", "summary": "Tom and Mary greet."},
    "text": {"text": "Any plain text to continue training on."},
}


def for_family(family: str) -> list[Layout]:
    return [lay for lay in LAYOUTS.values() if family in lay.families]


def resolve(family: str, spec) -> tuple[str, dict, dict]:
    """(name, field map, settings) of ``task.layout``: a layout name of ``family``, or a field map."""
    if isinstance(spec, dict):
        return "the task.layout map", dict(spec), {}
    lay = LAYOUTS.get(spec)
    if lay is None or family not in lay.families:
        names = [lay.name for lay in for_family(family)]
        other = f" ({spec!r} is a layout of {', '.join(lay.families)})" if lay else ""
        raise ValueError(f"task.layout={spec!r} is not a layout of task '{family}'{other}; its layouts: "
                         f"{', '.join(names) or 'none'}, or a map {{canonical field: column}}")
    return lay.name, dict(lay.fields), dict(lay.settings)


def configure(family: str, cfg):
    """``cfg`` with the settings its layout implies (label names, ``pair``) where the config sets none."""
    if getattr(cfg, "layout", None) is None and getattr(cfg, "layout_eval", None) is None:
        return cfg
    update = {}
    for key in ("layout", "layout_eval"):
        if getattr(cfg, key, None) is not None:
            _, _, settings = resolve(family, getattr(cfg, key))
            update.update({k: v for k, v in settings.items() if k in type(cfg).model_fields
                           and k not in cfg.model_fields_set and k not in update})
    return cfg.model_copy(update=update) if update else cfg


def _present(record: dict, spec) -> bool:
    cols = spec if isinstance(spec, list) else [spec]
    return any(c in record and record[c] is not None for c in cols)


def fitting(family: str, columns) -> list[str]:
    """Layout names of ``family`` whose required columns are all among ``columns``."""
    cols = set(columns)
    out = []
    for lay in for_family(family):
        if all(_present(dict.fromkeys(cols, ""), spec) for key, spec in lay.fields.items() if key not in OPTIONAL):
            out.append(lay.name)
    return out


def transform(family: str, spec, user_fields: dict):
    """``fn(record, where) -> record`` renaming a record's columns to canonical fields as ``spec`` says."""
    name, fields, _ = resolve(family, spec)
    fields.update(user_fields or {})
    drop = LAYOUTS[name].drop if name in LAYOUTS else {}

    def fn(record: dict, where: str):
        out = {k: v for k, v in record.items() if k not in fields}  # other columns stay (id, ...)
        missing = []
        for key, cols in fields.items():
            if isinstance(cols, list):
                values = [record[c] for c in cols if c in record and record[c] not in (None, "")]
                if values:
                    out[key] = values
                elif key in record:  # already canonical
                    out[key] = record[key]
                elif key not in OPTIONAL:
                    missing.append("/".join(cols))
            elif cols in record:
                out[key] = record[cols]
            elif key in record:
                out[key] = record[key]
            elif key not in OPTIONAL:
                missing.append(cols)
        if missing:
            present = sorted(k for k in record if k != "_where")
            fits = fitting(family, present)
            raise DataError(f"{where}: the row does not have {name}'s column(s) {missing} (present: {present}); "
                            + (f"layouts that fit these columns: {', '.join(fits)} (task.layout)" if fits else
                               "no known layout fits these columns")
                            + "; or map yours with task.layout: {canonical field: column}")
        if any(out.get(k) in values for k, values in drop.items()):
            return None
        return out

    return fn


def describe(lay: Layout) -> str:
    """One line: the layout's name, what it is, and its field map."""
    fields = ", ".join(f"{k}<-{'/'.join(v) if isinstance(v, list) else v}" for k, v in lay.fields.items())
    return f"{lay.name}: {lay.about} [{fields}]"
