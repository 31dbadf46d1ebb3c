"""The task interface: a task family is data plus a small hook.

A task has a ``name``, a pydantic ``Config`` (field names, template, formulation, ...), and:

- ``read(source, cfg, *, limit, skip_bad) -> list[dict]``: examples from a file or hub id, each a
  plain dict of the family's canonical fields (plus ``"_where"``: "file:line" for error messages).
- optional ``fit(cfg, train_examples) -> cfg``: complete the config from the training data (e.g. the
  label set); the loop calls it once and saves the result, so evaluation uses the same labels.
- ``head(cfg, examples) -> HeadSpec | None``: the model head the formulation needs (``None`` =
  causal LM with prompt/target text).
- ``encode(example, tokenizer, cfg, max_length) -> dict``: one training feature with
  ``input_ids`` (list[int]), ``labels`` (list[int] with -100 on prompt tokens, or an int / list of
  ints for a head) and ``prompt_len`` (how many leading tokens are prompt).
- ``metrics``: the names ``evaluate`` may report (scores; counts such as ``n`` need not be listed; a
  trailing ``*`` matches a prefix, e.g. NER's ``f1_*`` per entity type). ``compare``/``scale`` check a
  ``--metric`` against it before training; a reported name missing from it is an
  ``UndeclaredMetricWarning`` (an error in the test suite).
- ``evaluate(model, tokenizer, examples, cfg, *, batch_size, gen, split=False) -> (metrics, predictions)``:
  the family's metric(s) with ``"n"`` (examples scored) included; predictions are JSON-able dicts.
  ``split`` is passed on to the batched evaluation primitives (``score_choices``, ``generate``,
  ``classify``): under torchrun each rank then scores a share of the examples and gathers the rest.
  The first key of ``metrics`` is the family's primary metric (it picks the best checkpoint, in its direction:
  ``tunelab.evaluation.metrics.selection_metric`` / ``higher_is_better``).

Nothing outside ``tasks/`` branches on a task name.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from tunelab.models.heads import HeadSpec  # noqa: F401  (tasks return it; importable from here)
from tunelab.registry import Registry


class TaskConfig(BaseModel):
    """Settings every family shares; families extend it with their own."""

    model_config = ConfigDict(extra="forbid")
    formulation: Literal["lm", "head"] = "lm"
    # Maps the family's canonical field names onto the columns of the user's file.
    fields: dict[str, str] = {}
    # The eval file's own map when its columns differ from the training file's; None: ``fields``.
    fields_eval: dict[str, str] | None = None
    # A known data layout by name (``tunelab tasks NAME`` lists them; see tunelab.data.layouts) or a generic
    # map {canonical field: column, or a list of columns collected into one list}; None: ``fields`` alone.
    layout: str | dict[str, str | list[str]] | None = None
    layout_eval: str | dict[str, str | list[str]] | None = None  # the eval file's layout; None: ``layout``
    # Prompt template (a str.format string over the canonical fields); None = the family default.
    template: str | None = None
    # Wrap prompts in the tokenizer's chat template when it has one.
    chat: bool = True


class Task(Protocol):
    name: ClassVar[str]
    Config: ClassVar[type[TaskConfig]]
    metrics: ClassVar[tuple[str, ...]]

    def read(self, source: str, cfg: Any, *, limit: int | None, skip_bad: bool) -> list[dict]: ...
    def head(self, cfg: Any, examples: list[dict]) -> HeadSpec | None: ...
    def encode(self, example: dict, tokenizer, cfg: Any, max_length: int) -> dict: ...
    def evaluate(self, model, tokenizer, examples: list[dict], cfg: Any, *, batch_size: int, gen: dict,
                 split: bool = False) -> tuple[dict, list[dict]]: ...


TASKS: Registry[Task] = Registry("task")


def declares_metric(task: Task, name: str) -> bool:
    """Whether ``task`` may report ``name`` (its ``metrics`` list, where ``f1_*`` matches ``f1_PER``)."""
    return any(name == d or (d.endswith("*") and name.startswith(d[:-1])) for d in getattr(task, "metrics", ()))


def check_reported(task: Task, metrics: dict) -> None:
    """Warn (``UndeclaredMetricWarning``) about every score in ``metrics`` that ``task.metrics`` does not list."""
    import warnings

    from tunelab.errors import UndeclaredMetricWarning
    from tunelab.evaluation.metrics import NOT_SCORES

    extra = [k for k, v in metrics.items() if k not in NOT_SCORES and k != "eval_loss"
             and isinstance(v, int | float) and not declares_metric(task, k)]
    if extra:
        warnings.warn(f"task '{task.name}' reported {', '.join(extra)}, which its metrics declaration "
                      f"({', '.join(getattr(task, 'metrics', ())) or 'none'}) does not list", UndeclaredMetricWarning, stacklevel=2)


def field_name(cfg: TaskConfig, canonical: str) -> str:
    """The column that holds ``canonical`` in the user's data."""
    return cfg.fields.get(canonical, canonical)


_TARGETS_OPTIONAL = contextvars.ContextVar("targets_optional", default=False)


@contextlib.contextmanager
def targets_optional():
    """Within this block (``tunelab predict``) prompt/target readers accept records without a target
    (no field, or an empty one): the example's target is "" and its family writes predictions only,
    without metrics (see ``unreferenced``)."""
    token = _TARGETS_OPTIONAL.set(True)
    try:
        yield
    finally:
        _TARGETS_OPTIONAL.reset(token)


def targets_are_optional() -> bool:
    """Inside ``targets_optional()``: a family's reader accepts rows without their reference."""
    return _TARGETS_OPTIONAL.get()


def unreferenced(examples: list[dict], key: str) -> int:
    """How many examples have no reference in ``key``; when some lack one, logs that metrics are skipped."""
    n = sum(1 for ex in examples if not ex[key])
    if n:
        logging.getLogger(__name__).warning("%d of %d examples have no %r reference: writing predictions only, "
                                            "no metrics", n, len(examples), key)
    return n


def text_pairs(records, source: str, cols: tuple[str, str], build: Callable[[dict], dict], *, limit: int | None,
               skip_bad: bool, keys: tuple[str, str], hint: str) -> list[dict]:
    """Examples of a prompt/target family (summarization, generation) from raw records.

    ``cols`` must be present in every record (else a DataError naming the record, or a skip with
    ``skip_bad``); ``build`` maps a record to an example; examples whose ``keys`` are empty are
    dropped and counted; an empty result is an error. Inside ``targets_optional()`` the target
    column (``cols[1]``) may be absent or empty."""
    from tunelab.errors import DataError

    optional = _TARGETS_OPTIONAL.get()
    out, empty = [], 0
    for r in records:
        if optional and r.get(cols[1]) is None:
            r = {**r, cols[1]: ""}
        missing = [c for c in cols if c not in r]
        if missing:
            if skip_bad:
                continue
            raise DataError(f"{r['_where']}: field {missing[0]!r} is missing (present: {sorted(k for k in r if k != '_where')}; "
                            f"map your columns with task.fields, e.g. {hint})")
        ex = build(r)
        if not ex[keys[0]] or (not ex[keys[1]] and not optional):
            empty += 1
            continue
        out.append(ex)
        if limit is not None and len(out) >= limit:
            break
    if empty:
        logging.getLogger(__name__).warning("%s: dropped %d records with an empty %r or %r", source, empty, *cols)
    if not out:
        raise DataError(f"{source}: no records with {cols[0]!r} filled" if optional else
                        f"{source}: no records with both {cols[0]!r} and {cols[1]!r} filled")
    return out


def references(value, where: str, col: str) -> list[str]:
    """The references of a field (summaries, responses): one text, or a list of texts (DialogSum's test set has three,
    ``task.layout: dialogsum`` collects them); empty ones dropped. The first is the training target."""
    from tunelab.errors import DataError

    values = value if isinstance(value, list) else [value]
    bad = next((v for v in values if not isinstance(v, str)), None) if value is not None else None
    if bad is not None:
        raise DataError(f"{where}: field {col!r} must be text or a list of texts, got {type(bad).__name__} {str(bad)[:40]!r}")
    return [v for v in values if v is not None and v.strip()]


GEN_KEYS = ("max_new_tokens", "batch_size", "do_sample", "temperature", "top_p", "num_beams", "stop")


def gen_args(gen: dict | None, batch_size: int, **defaults) -> dict:
    """Arguments for ``tunelab.evaluation.scoring.generate``: the family's ``defaults``, then the run's decoding
    settings (``eval.*``) on top; the eval batch size unless the settings name one."""
    return {"batch_size": batch_size, **defaults, **{k: v for k, v in (gen or {}).items() if k in GEN_KEYS}}


def render_prompt(tokenizer, text: str, chat: bool, system: str | None = None) -> str:
    """The prompt string the model sees: the chat template (with the assistant turn opened) when
    ``chat`` and the tokenizer has one, else ``text`` itself."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text
