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


LR_HIGH, LR_LOW = 100, 1 / 1000  # train.lr this far above / below the method's recommended lr is warned


def warn_lr(method_name: str, params: dict, lr: float | None) -> list[str]:
    """A warning when ``train.lr`` is far outside the method's usual range: above ``LR_HIGH`` times or
    below ``LR_LOW`` times its recommended learning rate (training would diverge, or not move)."""
    if lr is None:
        return []
    from tunelab.training.optimizer import default_lr

    usual = default_lr(method_name, params)
    if lr > usual * LR_HIGH:
        how = f"{lr / usual:.0f}x above"
    elif lr < usual * LR_LOW:
        how = f"1/{usual / lr:.0f} of"
    else:
        return []
    return [f"train.lr={lr:g} is {how} the recommended learning rate of method '{method_name}', {usual:g}: "
            f"training will likely {'diverge' if lr > usual else 'not move'}; leave train.lr unset to use {usual:g}"]


def _local(source) -> object:
    from pathlib import Path

    if not source or str(source).startswith("hf:"):
        return None
    p = Path(str(source))
    return p.resolve() if p.exists() else None


def check_data_sources(train, eval_) -> None:
    """Before reading: data.train and data.eval are not the same file, and a folder data set does not
    hold the other split's file (every file of a folder is read: the eval set would be trained on)."""
    t, e = _local(train), _local(eval_)
    if t is None or e is None:
        return
    if t == e:
        raise ValueError(f"data.train and data.eval are the same {'folder' if t.is_dir() else 'file'} ({train}): "
                         "the model would be scored on the rows it trained on; give data.eval a held-out file")
    for folder, inner, fkey, ikey in ((t, e, "data.train", "data.eval"), (e, t, "data.eval", "data.train")):
        if folder.is_dir() and (inner.parent == folder or (inner.is_dir() and folder in inner.parents)):
            raise ValueError(f"{fkey}={folder} is a folder and every file in it is read, including {ikey}={inner}: "
                             f"the eval set would leak into training; move {inner.name} out of {folder} "
                             f"(or point {fkey} at the files themselves)")


def _fingerprint(ex: dict) -> str:
    import hashlib
    import json

    content = {k: v for k, v in ex.items() if not k.startswith("_") and k != "id"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def overlap_warning(train_ex: list[dict], eval_ex: list[dict]) -> str | None:
    """A one-line warning when eval examples also occur in the training data (same content hash)."""
    if not train_ex or not eval_ex:
        return None
    seen = {_fingerprint(ex) for ex in train_ex}
    dup = [ex for ex in eval_ex if _fingerprint(ex) in seen]
    if not dup:
        return None
    first = dup[0].get("_where")
    return (f"warning: {len(dup)} of {len(eval_ex)} eval examples also occur in the training data (identical "
            f"content{', e.g. ' + str(first) if first else ''}): the eval score overstates how the model does "
            "on new data; remove them from one of the sets")
