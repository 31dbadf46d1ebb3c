"""The error types and messages every room shares: "did you mean", schema explanations, bad data.

Kept at the bottom of the package so that a reader, a task, the config and the API can all raise and
explain the same way without importing each other.
"""

from __future__ import annotations

import difflib

from pydantic import BaseModel, ValidationError

# The sweep sections of a config file (tunelab compare/scale/advise read them; a single run refuses them).
SWEEP_SECTIONS = ("compare", "scale", "advise")


class DataError(ValueError):
    """A data file (or dataset) that cannot be read as asked: the message names file, line and field."""


class UndeclaredMetricWarning(RuntimeWarning):
    """A task family reported a metric its ``metrics`` declaration does not list (so ``compare --metric``
    cannot check that name before training). The test suite turns it into an error (pyproject.toml)."""


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _fields_at(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the section that ``loc`` points into (for "did you mean")."""
    for part in loc[:-1]:
        field = schema.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        schema = ann
    return list(schema.model_fields)


def explain(err: ValidationError, schema: type[BaseModel]) -> str:
    """One indented line per schema error: the key, what is wrong, and the valid keys where one is unknown."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden" and len(loc) == 1 and loc[0] in SWEEP_SECTIONS:
            lines.append(f"  '{loc[0]}' is a sweep section, read by `tunelab {loc[0]} CONFIG`; a single run "
                         f"(tunelab train/eval/bench) takes the rest of the file: remove the section or run tunelab {loc[0]}")
        elif e["type"] == "extra_forbidden":
            valid = _fields_at(schema, loc)
            lines.append(f"  unknown key '{key}'{suggest(loc[-1], valid)}; valid keys here: {', '.join(valid)}")
        elif e["type"] == "value_error":  # a nested schema's own explanation (method/task params): as it is
            lines.append(f"  {key}: {(e.get('ctx') or {}).get('error', e['msg'])}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)
