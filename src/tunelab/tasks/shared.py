"""Helpers several task families share: row selectors in a data path (``file.jsonl#rows=0:800``),
selecting rows of an Arrow table, and the summed next-token NLL of causal-LM features (the chat and
text families' perplexity). Families import these from here, never from each other."""

from __future__ import annotations

import re

import torch

from tunelab.data.encoding import Collator
from tunelab.data.feature_cache import ArrowExamples
from tunelab.errors import DataError
from tunelab.evaluation import inference
from tunelab.evaluation.scoring import progress
from tunelab.models import chunked_loss, lm_loss

_FRAGMENT = re.compile(r"^(?P<path>.*)#(?P<key>\w+)=(?P<value>[^#]*)$")


def split_source(source: str, key: str = "articles") -> tuple[str, slice | None]:
    """``"file.json#articles=0:40"`` -> ("file.json", slice(0, 40)); a plain path -> (path, None).
    ``key`` is the one selector the caller supports (other families use ``rows``)."""
    m = _FRAGMENT.match(str(source))
    if not m:
        return str(source), None
    if m["key"] != key:
        raise DataError(f"{source}: unknown selector {m['key']!r}; allowed: '#{key}=START:STOP'")
    parts = m["value"].split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise DataError(f"{source}: '#{key}=' wants START:STOP (Python slice, e.g. 0:40 or 40:), got {m['value']!r}") from None
    return m["path"], slice(start, stop)


def select(table, source: str, rows: slice | None, limit: int | None, skip_bad: bool, extra: str) -> ArrowExamples:
    """ArrowExamples over ``table``'s rows ``rows`` (then the first ``limit``); ``_where`` names file and row."""
    ds, offset = table.ds, 0
    if rows is not None:
        idx = range(len(ds))[rows]
        if rows.step not in (None, 1) or not len(idx):
            raise DataError(f"{source}: '#rows=' selects no rows of {len(ds)} (or has a step)")
        ds, offset = ds.select(idx), idx.start
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    ex = ArrowExamples(ds, lambda i: table.where(i + offset), f"{table.fingerprint}|{rows}|{limit}|{skip_bad}|{extra}")
    ex.skip_bad = skip_bad
    return ex


@torch.no_grad()
@torch.no_grad()
def nll(model, tokenizer, feats: list[dict], batch_size: int = 8) -> tuple[float, int, int]:
    """(summed next-token NLL, tokens scored, tokens predicted right by argmax) of causal-LM features
    (labels -100 = not scored).

    The logits only at scored positions and a chunk of them at a time (``chunked_loss.token_stats``)
    where the model allows it (probed on the first rows), so whole eval batches fit; otherwise full
    logits in batches of at most 4. Both under ``inference.inference`` (weights cast once)."""
    collate = Collator(tokenizer.pad_token_id)
    dev = next(model.parameters()).device
    order = sorted(range(len(feats)), key=lambda i: -len(feats[i]["input_ids"]))
    total, count, right = 0.0, 0, 0
    if not order:
        return total, count, right

    def batch_of(idx):
        batch = collate([{k: feats[i][k] for k in ("input_ids", "labels")} for i in idx])
        return {k: v.to(dev) for k, v in batch.items() if k != "prompt_mask"}

    with inference.inference(model):
        probe = batch_of(order[-2:])  # the shortest rows: a cheap probe
        chunked = lm_loss.supports_loss_inputs(model, probe) and lm_loss.supports_chunked_loss(model, probe)
        step = max(1, batch_size if chunked else min(batch_size, 4))  # full-vocabulary logits are large
        bar = progress(len(order), "scoring tokens")
        for s in range(0, len(order), step):
            batch = batch_of(order[s:s + step])
            if chunked:
                t, c, r = chunked_loss.token_stats(model, lm_loss.loss_inputs(batch))
                total, count, right = total + t, count + c, right + r
                bar.update(len(order[s:s + step]))
                continue
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            target = batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
            right += int(((logits.argmax(-1) == target) & (target != -100)).sum())
            bar.update(len(order[s:s + step]))
        bar.close()
    return total, count, right
