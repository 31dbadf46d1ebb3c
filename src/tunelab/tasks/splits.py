"""Reading a run's train and eval examples the same way for every family.

- ``file.jsonl#rows=START:STOP`` (Python slice over the file's examples, in file order) works for every
  family: a family that selects rows itself (over an Arrow table: chat, text, generation, preference) or
  by another selector (``#articles=`` of qa) says so in ``selectors``; for the others the examples are read
  whole and sliced here.
- ``data.eval_split: 0.1`` holds out that share of the training examples as the eval set: a seeded
  permutation (``data.split_seed``), deterministic, no example on both sides. A family may name a
  ``split_group(example)`` (qa: the article) so that examples sharing it stay on one side.
- A missing file is one error everywhere: ``PATH: file not found``.
- The data layout (``task.layout`` / ``task.layout_eval``, ``tunelab.data.layouts``) and the per-split
  field map (``task.fields_eval``) are applied while reading.
"""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path

from tunelab.data import layouts
from tunelab.data.readers import _is_hub_name, record_transform
from tunelab.errors import DataError
from tunelab.tasks.shared import split_source

_FRAGMENT_KEYS = ("rows", "articles")


def _selector(source: str) -> str | None:
    head, sep, frag = str(source).rpartition("#")
    if not sep or "=" not in frag:
        return None
    return frag.split("=", 1)[0]


def check_exists(source: str) -> None:
    """``PATH: file not found`` for a local source that is not there (hub ids are left to the reader)."""
    path = str(source).rpartition("#")[0] if _selector(source) else str(source)
    if path.startswith("hf:") or Path(path).exists():
        return
    if _is_hub_name(path):
        return
    raise DataError(f"{path}: file not found")


def read_examples(task, source: str, cfg, *, role: str = "train", limit: int | None = None, skip_bad: bool = False):
    """``task.read`` of ``source`` with the layout and field map of ``role`` ("train" or "eval") applied, and
    ``#rows=`` honoured for every family."""
    check_exists(source)
    key = _selector(source)
    own = tuple(getattr(task, "selectors", ()))
    rows = None
    if key is not None and key not in own:
        if key != "rows":
            allowed = ", ".join(f"'#{k}=START:STOP'" for k in dict.fromkeys(("rows", *own)))
            raise DataError(f"{source}: unknown selector {key!r}; allowed: {allowed}")
        source, rows = split_source(source, "rows")
    layout = cfg.layout_eval if role == "eval" and cfg.layout_eval is not None else cfg.layout
    fields = cfg.fields_eval if role == "eval" and cfg.fields_eval is not None else cfg.fields
    read_cfg = cfg.model_copy(update={"fields": {} if layout is not None else fields})
    # over a layout, only the fields the config sets (a family's default map, e.g. sentiment's, gives way)
    own = fields if "fields" in cfg.model_fields_set or (role == "eval" and cfg.fields_eval is not None) else {}
    ctx = (record_transform(layouts.transform(task.name, layout, own)) if layout is not None
           else contextlib.nullcontext())
    try:
        with ctx:
            examples = task.read(source, read_cfg, limit=None if rows is not None else limit, skip_bad=skip_bad)
    except DataError as e:
        raise DataError(_with_layout_hint(str(e), task.name, source, layout)) from None
    if rows is not None:
        picked = range(len(examples))[rows]
        if rows.step not in (None, 1) or not len(picked):
            raise DataError(f"{source}#rows={rows.start or ''}:{rows.stop or ''}: selects no rows of {len(examples)} examples")
        examples = take(examples, list(picked))
        if limit is not None:
            examples = take(examples, list(range(min(limit, len(examples)))))
    return examples


def _with_layout_hint(message: str, family: str, source: str, layout) -> str:
    """A 'field is missing' error of a read without a layout, plus the layouts that fit the file's columns."""
    if layout is not None or "missing" not in message or "present: [" not in message:
        return message
    present = message.split("present: [", 1)[1].split("]", 1)[0]
    cols = [c.strip().strip("'\"") for c in present.split(",") if c.strip()]
    fits = layouts.fitting(family, cols)
    return message + (f"; these columns fit task.layout: {' or '.join(fits)}" if fits else "")


def take(examples, indices: list[int]):
    """The examples at ``indices`` (a list, or an ArrowExamples over the selected rows)."""
    from tunelab.data.feature_cache import ArrowExamples

    if isinstance(examples, ArrowExamples):
        where = examples._where
        sub = ArrowExamples(examples.ds.select(indices), lambda i: where(indices[i]),
                            f"{examples.fingerprint}|take{hash(tuple(indices))}")
        sub.skip_bad = getattr(examples, "skip_bad", False)
        return sub
    return [examples[i] for i in indices]


def hold_out(task, examples, share: float, seed: int):
    """(train, eval): ``share`` of ``examples`` held out by a seeded permutation (of groups, where the family
    names ``split_group``), both kept in file order; neither side empty."""
    group = getattr(task, "split_group", None)
    keys = [group(examples[i]) for i in range(len(examples))] if group else list(range(len(examples)))
    order = list(dict.fromkeys(keys))
    if len(order) < 2:
        raise DataError(f"data.eval_split={share}: {len(examples)} example(s) in {len(order)} group(s) cannot be split "
                        "into train and eval; give data.eval a file")
    random.Random(seed).shuffle(order)
    n_eval = min(len(order) - 1, max(1, math.ceil(share * len(order))))
    held = set(order[:n_eval])
    train = [i for i, k in enumerate(keys) if k not in held]
    evals = [i for i, k in enumerate(keys) if k in held]
    return take(examples, train), take(examples, evals)


def read_run_data(task, cfg, data) -> tuple:
    """(train examples, eval examples) of a run: ``data`` is its ``data`` section (train, eval, max_train,
    max_eval, skip_bad_rows, eval_split, split_seed); ``cfg`` its task config."""
    skip = data.skip_bad_rows
    share = getattr(data, "eval_split", None)
    if share and data.eval:
        raise ValueError(f"data.eval={data.eval} and data.eval_split={share} both name an eval set; set one of them")
    if share and not data.train:
        raise ValueError(f"data.eval_split={share} holds out part of data.train, which is not set")
    if share:
        every = read_examples(task, data.train, cfg, role="train", skip_bad=skip)
        train, evals = hold_out(task, every, share, getattr(data, "split_seed", 0))
        if data.max_train is not None:
            train = take(train, list(range(min(data.max_train, len(train)))))
        if data.max_eval is not None:
            evals = take(evals, list(range(min(data.max_eval, len(evals)))))
        return train, evals
    train = read_examples(task, data.train, cfg, role="train", limit=data.max_train, skip_bad=skip) if data.train else []
    evals = read_examples(task, data.eval, cfg, role="eval", limit=data.max_eval, skip_bad=skip) if data.eval else []
    return train, evals
