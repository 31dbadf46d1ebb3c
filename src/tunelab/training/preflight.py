"""Checks that run before step 1, so a mistake fails in seconds rather than after hours of training.

- every family: the prompt template renders for the first training and eval example (a key the
  family does not provide is one clear error naming ``task.template``);
- the family's own ``check(cfg, train, eval, tokenizer, model)`` hook, when it has one: eval labels
  unseen in training, ``label_words`` of the wrong length, eval lengths above the model's positions.
"""

from __future__ import annotations

import logging
import string

log = logging.getLogger(__name__)


def template_keys(template: str | None) -> list[str]:
    if not template:
        return []
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as e:
        raise ValueError(f"task.template {template!r} is not a valid format string ({e})") from None


def check_run(task, tcfg, train_ex: list[dict], eval_ex: list[dict], tokenizer, model, max_length: int) -> None:
    template_keys(getattr(tcfg, "template", None))
    for ex in [e for e in (train_ex[:1] + eval_ex[:1])]:
        try:
            task.encode(ex, tokenizer, tcfg, max_length)
        except KeyError as e:
            raise ValueError(f"task.template {tcfg.template!r} uses {{{e.args[0]}}}, which task '{task.name}' does not "
                             f"provide (the template may use: {', '.join(_offered(task, ex))})") from None
        except IndexError:
            raise ValueError(f"task.template {tcfg.template!r} has a positional {{}} field; name the fields, "
                             f"e.g. {{{next(iter(_offered(task, ex)), 'text')}}}") from None
    if hasattr(task, "check"):
        task.check(tcfg, train_ex, eval_ex, tokenizer, model)
    if getattr(task, "teaches_stop", False) and getattr(tcfg, "formulation", "lm") == "lm":
        for warning in warn_stop(task, tcfg, train_ex[:8], tokenizer, max_length):
            log.warning(warning)


def warn_stop(task, tcfg, examples: list[dict], tokenizer, max_length: int) -> list[str]:
    """A warning when training examples' loss does not end on an end-of-turn token (EOS or another special
    token such as ``<|im_end|>``): the model would never learn to stop and would run to max_new_tokens."""
    stops = set(getattr(tokenizer, "all_special_ids", []) or [])
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    bad = []
    for ex in examples:
        labels = [t for t in task.encode(ex, tokenizer, tcfg, max_length).get("labels", []) if t != -100]
        if labels and labels[-1] not in stops:
            bad.append(labels[-1])
    if not bad:
        return []
    last = tokenizer.convert_ids_to_tokens(bad[0])
    return [f"task '{task.name}': {len(bad)} of the first {len(examples)} training examples end their loss on "
            f"{last!r}, not an end-of-turn token: the model will not learn to stop (a chat template that writes "
            "nothing after an assistant turn, a tokenizer without eos_token, or answers cut at data.max_length)"]


def _offered(task, ex: dict) -> list[str]:
    return sorted(getattr(task, "template_fields", None) or (k for k in ex if not k.startswith("_")))


def positions(model) -> int | None:
    """How many positions the model can take (None when its config does not say)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def warn_rank(model, params: dict) -> list[str]:
    """Warnings for a low-rank method whose rank ``r`` exceeds a wrapped layer's width (no gain, more cost)."""
    r = params.get("r")
    if not isinstance(r, int):
        return []
    widths = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "base_layer") and hasattr(mod, "in_features") and hasattr(mod, "out_features"):
            widths[name] = min(mod.in_features, mod.out_features)
    narrow = {n: w for n, w in widths.items() if r > w}
    if not narrow:
        return []
    name, w = next(iter(narrow.items()))
    return [f"method rank r={r} is above the width of {len(narrow)} wrapped layer(s) (e.g. {name}: {w}); "
            f"a rank above min(in, out) adds parameters but no capacity"]
