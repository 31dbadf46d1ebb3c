"""Verifiable rewards: small named functions that score a completion, for the ``rl`` task's GRPO.

A reward is ``fn(completion: str, example: dict, **params) -> float`` where ``example`` holds the
row's ``prompt`` (the text as written in the data) and ``answer`` (its reference, "" when the row
has none). Built in (``REWARDS``):

- ``numeric``: 1.0 when the completion's answer number equals the reference's answer number
  (``|a - b| <= tolerance``, default 1e-6), else 0.0. Both sides are parsed by ``answer_number``.
- ``label``: 1.0 when the completion names the reference label (``label_matches``), else 0.0.
- ``format``: 1.0 when the completion holds an answer tag with something in it
  (``<answer>...</answer>``; ``tag`` changes the tag name), else 0.0.
- ``length``: 0.0 up to ``limit`` words (default 64), then -(words - limit) / limit, at least -1.0.

Parsing rules (``answer_number``), first that applies:
1. GSM8K style: the text after the last ``####``: its first number.
2. A boxed answer: the contents of the last ``\\boxed{...}`` (nested braces allowed): its last number.
3. An answer tag: the contents of the last ``<answer>...</answer>``: its last number.
4. Otherwise the last number anywhere in the text.
A number (``NUMBER``) is an optional minus sign, digits, an optional decimal part: ``-12``, ``3.5``,
``.5`` is read as 5 (a leading point is not part of it). A comma is a thousands separator only
between groups of exactly three digits (``1,234,567`` = 1234567; ``1,23`` is two numbers, 1 and 23).
A minus sign counts only where it does not follow a letter, digit or point (so ``10-4`` holds 10
and 4, ``x = -4`` holds -4). Currency signs, percent signs and a trailing full stop are ignored
(``$1,200.`` = 1200). A text without any number has no answer (None): ``numeric`` gives 0.0.

``label_matches``: both sides lower-cased with surrounding spaces and ``.,!?;:"'`` stripped; the
completion matches when it equals the label, or starts with the label followed by a non-word
character (``positive, because ...`` names ``positive``; ``positively`` does not).

A user's own reward is named by a ``module:function`` path (``my_rewards:brevity``): the module is
imported when the run's config is checked (never from the data), and the function is called once on
the first training row before training, so a missing module, a missing function, a function that
raises or one that returns no finite number is an error naming the reward before step 1.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

from tunelab.registry import Registry

RewardFn = Callable[..., float]
REWARDS: Registry[RewardFn] = Registry("reward")

NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<=[\w.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_HASHES = "####"
_TAG = "answer"


def numbers(text: str) -> list[float]:
    """Every number in ``text``, in order (see the module docstring's rules)."""
    out = []
    for m in NUMBER.finditer(text):
        s = m.group(0).replace(",", "")
        try:
            out.append(float(s))
        except ValueError:
            continue
    return out


def _boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unclosed


def tagged(text: str, tag: str = _TAG) -> str | None:
    """The contents of the last ``<tag>...</tag>`` in ``text``, or None."""
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.S)
    return found[-1] if found else None


def answer_number(text: str) -> float | None:
    """The answer number of ``text`` (``####``, then ``\\boxed{}``, then ``<answer>``, then the last number)."""
    if _HASHES in text:
        after = numbers(text.rsplit(_HASHES, 1)[1])
        return after[0] if after else None
    for part in (_boxed(text), tagged(text)):
        if part is not None:
            found = numbers(part)
            return found[-1] if found else None
    found = numbers(text)
    return found[-1] if found else None


_STRIP = " \t\n\r.,!?;:\"'"


def label_matches(completion: str, label: str) -> bool:
    c, lab = completion.strip(_STRIP).lower(), label.strip(_STRIP).lower()
    if not lab:
        return False
    return c == lab or (c.startswith(lab) and not (c[len(lab)].isalnum() or c[len(lab)] == "_"))


def numeric(completion: str, example: dict, tolerance: float = 1e-6) -> float:
    gold, got = answer_number(str(example.get("answer", ""))), answer_number(completion)
    return float(gold is not None and got is not None and abs(got - gold) <= tolerance)


def label(completion: str, example: dict) -> float:
    return float(label_matches(completion, str(example.get("answer", ""))))


def format_tag(completion: str, example: dict, tag: str = _TAG) -> float:
    inside = tagged(completion, tag)
    return float(inside is not None and bool(inside.strip()))


def length(completion: str, example: dict, limit: int = 64) -> float:
    words = len(completion.split())
    return 0.0 if words <= limit else max(-1.0, -(words - limit) / limit)


REWARDS.register("numeric", numeric)
REWARDS.register("label", label)
REWARDS.register("format", format_tag)
REWARDS.register("length", length)


def load(name: str, where: str = "task.reward") -> RewardFn:
    """The reward called ``name``: a built-in, or ``module:function`` imported now. ValueError naming
    ``where`` when it cannot be found."""
    if ":" not in name:
        if name not in REWARDS.names():
            raise ValueError(f"{where}: reward {name!r} is unknown; built in: {', '.join(sorted(REWARDS.names()))}, "
                             "or your own as 'module:function'")
        return REWARDS.get(name)
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise ValueError(f"{where}: {name!r} is not a 'module:function' path")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{where}: reward {name!r}: module {module!r} cannot be imported ({e}); put it on "
                         "PYTHONPATH or in the directory you run tunelab from") from None
    except Exception as e:  # the module itself failed while importing
        raise ValueError(f"{where}: reward {name!r}: importing module {module!r} failed "
                         f"({type(e).__name__}: {e})") from None
    fn = getattr(mod, attr, None)
    if fn is None:
        raise ValueError(f"{where}: reward {name!r}: module {module!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"{where}: reward {name!r}: {module}.{attr} is not a function")
    return fn


def check(fn: RewardFn, name: str, params: dict, example: dict, where: str = "task.reward") -> None:
    """Call ``fn`` once on ``example`` (its own reference as the completion): ValueError naming the
    reward and the row when it raises or returns no finite number."""
    try:
        value = fn(str(example.get("answer", "")), {k: example[k] for k in ("prompt", "answer") if k in example}, **params)
    except Exception as e:
        raise ValueError(f"{where}: reward {name!r} raised {type(e).__name__}: {e} on {example.get('_where', 'a row')} "
                         "(called once before training on the row's own answer)") from None
    if not is_score(value):
        raise ValueError(f"{where}: reward {name!r} returned {value!r} on {example.get('_where', 'a row')}; "
                         "a reward must return a finite number")


def is_score(value) -> bool:
    """A finite int/float (a bool counts as 0/1)."""
    return isinstance(value, int | float) and math.isfinite(value)
