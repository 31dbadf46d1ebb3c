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


# ---------------------------------------------------------------- memory
MEMORY_SHARE = 0.5  # a note when the estimated activations pass this share of the free memory,
WEIGHTS_TIMES, NOTE_GB = 5, 2.0  # or pass NOTE_GB and WEIGHTS_TIMES the model's weights


def activation_bytes(model_config, batch: int, length: int, *, checkpointing: bool, bytes_per_value: int = 2,
                     eager_attention: bool = False) -> float:
    """Estimated activation memory of one training micro-batch of a decoder (Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models", eq. 2 without tensor parallelism): per layer
    ``s b h (34 + 5 a s / h)`` bytes at 16 bits, the ``5 a s / h`` attention-score term only where attention is
    computed eagerly (fused kernels do not store the scores); scaled by ``bytes_per_value / 2``. With gradient
    checkpointing only each layer's input is kept (``2 s b h`` bytes a layer) plus one layer recomputed. The
    fp32 logits and their gradient (``2 x 4 s b V`` bytes) come on top either way."""
    h = getattr(model_config, "hidden_size", None) or getattr(model_config, "d_model", None) or 0
    layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "num_layers", None) or 0
    heads = getattr(model_config, "num_attention_heads", None) or 1
    vocab = getattr(model_config, "vocab_size", None) or 0
    s, b = length, batch
    per_layer = s * b * h * (34 + (5 * heads * s / h if eager_attention and h else 0)) * bytes_per_value / 2
    body = (2 * s * b * h * layers * bytes_per_value / 2 + per_layer) if checkpointing else per_layer * layers
    return body + 2 * 4 * s * b * vocab


def free_memory_bytes(device) -> float | None:
    """Free memory where the activations will live: the CUDA device's, else the machine's available RAM."""
    import torch

    try:
        if getattr(device, "type", str(device)) == "cuda":
            return float(torch.cuda.mem_get_info(device)[0])
        import os

        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, RuntimeError, AttributeError):
        return None


def memory_note(cfg, model, device, free: float | None = None) -> str | None:
    """A one-line note before training when the planned micro-batch (train.batch_size x data.max_length) needs
    activations that are large next to the free memory (or many times the model's weights, and over a few GB):
    it names train.gradient_checkpointing and packing."""
    free = free_memory_bytes(device) if free is None else free
    mc = getattr(model, "config", None)
    if not free or mc is None:
        return None
    b, s = cfg.train.batch_size, cfg.data.max_length
    wide = 4 if cfg.train.precision == "fp32" or (cfg.train.precision == "auto" and getattr(device, "type", str(device)) == "cpu") else 2
    eager = getattr(mc, "_attn_implementation", None) == "eager"
    need = activation_bytes(mc, b, s, checkpointing=cfg.train.gradient_checkpointing, bytes_per_value=wide, eager_attention=eager)
    gb = 1024**3
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) if hasattr(model, "parameters") else 0
    heavy = weights and need >= WEIGHTS_TIMES * weights and need >= NOTE_GB * gb
    if need < MEMORY_SHARE * free and not heavy:
        return None
    if cfg.train.gradient_checkpointing:
        fix = "lower train.batch_size and raise train.grad_accum (the same step), or data.max_length"
    else:
        saved = activation_bytes(mc, b, s, checkpointing=True, bytes_per_value=wide, eager_attention=eager)
        fix = (f"train.gradient_checkpointing=true would need about {saved / gb:.1f} GB (a forward pass more per step); "
               "or lower train.batch_size and raise train.grad_accum")
    pack = "" if cfg.data.pack else "; data.pack=true packs short rows together instead of padding them to the longest"
    times = f", {need / weights:.0f}x the model's weights" if weights else ""
    return (f"train.batch_size={b} x data.max_length={s} tokens may need about {need / gb:.1f} GB of activations "
            f"(estimate{times}) with {free / gb:.1f} GB free: {fix}{pack}")
