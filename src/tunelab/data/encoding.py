"""Tokenization, padding, packing and batch order.

Features are plain dicts of lists: ``input_ids``, ``labels`` (a list, -100 = no loss; or one int/float for
sequence heads), optional ``prompt_len`` (or a per-token ``prompt_mask``), ``position_ids`` (packed rows),
``token_type_ids`` (BERT pairs). `Collator` turns a list of them into the batch the model takes.

Packed rows must not attend across examples. transformers 5 can infer that from ``position_ids``
(``masking_utils.find_packed_sequence_indices``), but only when ``attention_mask`` is None AND no cache is
built; Llama builds a DynamicCache whenever ``use_cache`` (config default True) is on, even in training, and
padded packed rows need a mask anyway. So the collator builds the block-diagonal causal mask itself and
passes it as a 4D ``attention_mask`` (B, 1, L, L), which the model uses as given.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Sequence

import numpy as np
import torch

IGNORE = -100
_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _adds_bos(tokenizer) -> bool:
    """Whether this tokenizer puts BOS in front when asked for its special tokens (SmolLM2: no)."""
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"] if bos is not None else []
    adds = bool(ids) and ids[0] == bos
    try:
        _ADDS_BOS[tokenizer] = adds
    except TypeError:  # not weak-referenceable: just recompute next time
        pass
    return adds


def tokenize_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, with BOS in front only if the tokenizer normally adds one and `text` lacks it.

    No other special tokens are added (no EOS, no [SEP]): a prompt is continued, not closed.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if _adds_bos(tokenizer) and ids[:1] != [bos]:
        ids.insert(0, bos)
    return ids


def _keep_tail(ids: list[int], keep: int, bos: int | None) -> list[int]:
    """The last `keep` ids, still led by BOS when `ids` started with it."""
    if keep <= 0:
        return []
    if len(ids) <= keep:
        return ids
    if bos is not None and ids[0] == bos and keep >= 2:
        return [bos] + ids[len(ids) - keep + 1:]
    return ids[len(ids) - keep:]


def encode_lm(tokenizer, prompt: str, target: str, max_length: int, add_eos: bool = True) -> dict:
    """Causal-LM feature: loss on `target` (+ EOS), none on `prompt`.

    Prompt and target are tokenized separately and joined, so the prompt/target boundary is exact.
    Returns ``{"input_ids", "labels", "prompt_len"}`` with ``labels = -100`` on the prompt tokens.

    Truncation to `max_length`: the prompt is cut from the LEFT (its start is least relevant to the answer;
    a leading BOS is kept) so the whole target stays. If the target alone is ``>= max_length``, the prompt
    keeps its last ``min(len(prompt), max_length // 2)`` tokens and the target's END is cut (its EOS too,
    so the model is not taught to stop in mid-answer).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    p = tokenize_prompt(tokenizer, prompt)
    return lm_join(tokenizer, p, list(tokenizer(target, add_special_tokens=False)["input_ids"]), max_length, add_eos)


def lm_join(tokenizer, p: list[int], t: list[int], max_length: int, add_eos: bool = True) -> dict:
    """`encode_lm` from token ids: prompt ids ``p`` (BOS rule applied) and target ids ``t`` (no EOS yet)."""
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-sequence token (eos_token_id), which ends every training "
                             "target; use a model (model.name) whose tokenizer defines one")
        t.append(tokenizer.eos_token_id)
    cut = len(p) + len(t) > max_length
    if cut:
        keep_p = max_length - len(t) if len(t) < max_length else min(len(p), max_length // 2)
        p = _keep_tail(p, keep_p, tokenizer.bos_token_id)
        t = t[: max_length - len(p)]
    feature = {"input_ids": p + t, "labels": [IGNORE] * len(p) + t, "prompt_len": len(p)}
    if cut:
        feature["truncated"] = True  # counted by the loop (metrics.json run.truncated_rows)
    return feature


def encode_lm_document(tokenizer, render, document: str, target: str, max_length: int, add_eos: bool = True) -> dict:
    """`encode_lm` for a prompt that the task renders around a document (``render(document) -> prompt``).

    A row that does not fit is cut in the DOCUMENT (its last tokens go), never in the instruction, the
    template or the chat header around it: the largest document prefix, in whole tokens, that fits with
    the whole target is found by bisection. Only when even an empty document does not fit does
    `encode_lm`'s rule apply. A cut row carries ``truncated: True``.
    """
    feature = encode_lm(tokenizer, render(document), target, max_length, add_eos)
    if not feature.get("truncated"):
        return feature
    doc = list(tokenizer(document, add_special_tokens=False)["input_ids"])
    t_len = len(tokenizer(target, add_special_tokens=False)["input_ids"]) + (1 if add_eos else 0)

    def fits(k: int) -> bool:
        return len(tokenize_prompt(tokenizer, render(tokenizer.decode(doc[:k])))) + t_len <= max_length

    if not fits(0):
        return feature
    lo, hi = 0, len(doc)  # fits(lo) holds, fits(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    feature = encode_lm(tokenizer, render(tokenizer.decode(doc[:lo])), target, max_length, add_eos)
    feature["truncated"] = True
    return feature


def tokenize_source(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    """Encoder input ids of an encoder-decoder model: the tokenizer's own special tokens (T5 closes
    the source with EOS, BART wraps it in BOS/EOS), cut from the END to ``max_length`` (the specials
    are kept), as the model saw its inputs in pre-training."""
    kw = {"truncation": True, "max_length": max_length} if max_length else {}
    return list(tokenizer(text, add_special_tokens=True, **kw)["input_ids"])


def encode_seq2seq(tokenizer, source: str, target: str, max_length: int, max_target_length: int | None = None) -> dict:
    """Encoder-decoder feature: ``input_ids`` = the source (see `tokenize_source`), ``labels`` = the
    target ids closed by EOS; the model shifts labels right into its ``decoder_input_ids`` (decoder
    start token first), so every label is a target and none is -100. ``prompt_len`` = the whole
    source (every encoder token is prompt); ``seq2seq`` tells the collator that ``labels`` has its
    own length. The target keeps its first ``max_target_length`` (default ``max_length``) tokens; a
    cut target loses its EOS (the model is not taught to stop in mid-summary)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    src = tokenize_source(tokenizer, source, max_length)
    t = list(tokenizer(text_target=target, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("an encoder-decoder target needs an EOS token; the tokenizer has no eos_token_id")
    if t[-1:] != [eos]:  # tokenizers without a post-processor add nothing
        t.append(eos)
    t = t[: max_target_length or max_length]
    return {"input_ids": src, "labels": t, "prompt_len": len(src), "seq2seq": True}


def encode_head(tokenizer, text: str, text_pair: str | None = None, label=None, max_length: int = 512) -> dict:
    """Sequence-head feature (classification/regression): the tokenizer's own special tokens, pairs
    truncated longest-first to `max_length`; ``labels`` is the int (or float) label when given."""
    enc = tokenizer(text, text_pair, truncation=True, max_length=max_length)
    feature = {"input_ids": list(enc["input_ids"])}
    if "token_type_ids" in enc:
        feature["token_type_ids"] = list(enc["token_type_ids"])
    if label is not None:
        feature["labels"] = label
    return feature


def packed_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 1, L, L) causal mask that lets a token see only earlier tokens of its own example.

    An example starts wherever ``position_ids == 0``; padding carries position 0 too, so each pad token is
    its own one-token example (it sees only itself, which keeps SDPA free of all-masked rows and NaNs).
    ``dtype=None`` gives a bool mask (True = attend; for SDPA); a float dtype gives an additive mask
    (0 / dtype min; for eager attention, in the model's dtype).
    """
    seg = (position_ids == 0).cumsum(-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = mask[:, None]
    if dtype is None or dtype == torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class Collator:
    """Pads features into a batch: ``input_ids`` (pad_id), ``attention_mask`` (0 on pads), ``labels``
    (-100 on pads, or stacked when each label is one number), ``prompt_mask`` (bool, True on each example's
    first ``prompt_len`` real tokens, or all real tokens when it has no prompt_len), ``token_type_ids``.

    Encoder-decoder features (``seq2seq`` set, see `encode_seq2seq`) keep their ``labels`` apart: the
    decoder's targets, right-padded with -100 to the longest target whatever ``padding_side`` is.
    Packed features (with ``position_ids``) also get ``position_ids`` and a 4D block-diagonal
    ``attention_mask`` (see `packed_attention_mask`; `mask_dtype` as there).
    `padding_side` "right" for training, "left" for generation.
    """

    def __init__(self, pad_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None,
                 mask_dtype: torch.dtype | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_id is None:
            raise ValueError("pad_id is None: give the tokenizer a pad token (e.g. its EOS) first")
        self.pad_id, self.padding_side = pad_id, padding_side
        self.pad_to_multiple_of, self.mask_dtype = pad_to_multiple_of, mask_dtype

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Collator got an empty list of features")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(features)
        ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        attn = torch.zeros(n, length, dtype=torch.long)
        prompt = torch.zeros(n, length, dtype=torch.bool)
        has_labels = "labels" in features[0]
        token_labels = has_labels and isinstance(features[0]["labels"], list | tuple)
        # Encoder-decoder features: labels are the decoder's targets, right-padded to their own width.
        seq2seq = bool(features[0].get("seq2seq"))
        width = max(len(f["labels"]) for f in features) if seq2seq and has_labels else length
        labels = torch.full((n, width), IGNORE, dtype=torch.long) if token_labels else None
        packed = "position_ids" in features[0]
        pos = torch.zeros(n, length, dtype=torch.long) if packed else None
        types = torch.zeros(n, length, dtype=torch.long) if "token_type_ids" in features[0] else None
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            s = slice(length - k, length) if self.padding_side == "left" else slice(0, k)
            ids[i, s] = torch.tensor(f["input_ids"], dtype=torch.long)
            attn[i, s] = 1
            if "prompt_mask" in f:
                prompt[i, s] = torch.tensor(f["prompt_mask"], dtype=torch.bool)
            else:
                p = f.get("prompt_len", k)
                prompt[i, s.start: s.start + p] = True
            if token_labels and seq2seq:
                labels[i, : len(f["labels"])] = torch.tensor(f["labels"], dtype=torch.long)
            elif token_labels:
                labels[i, s] = torch.tensor(f["labels"], dtype=torch.long)
            if packed:
                pos[i, s] = torch.tensor(f["position_ids"], dtype=torch.long)
            if types is not None:
                types[i, s] = torch.tensor(f["token_type_ids"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": attn, "prompt_mask": prompt}
        if has_labels:
            batch["labels"] = labels if token_labels else torch.tensor([f["labels"] for f in features])
        if types is not None:
            batch["token_type_ids"] = types
        if packed:
            batch["position_ids"] = pos
            batch["attention_mask"] = packed_attention_mask(pos, self.mask_dtype)
        return batch


def pack_plan(lengths: np.ndarray, max_length: int, window: int = 64) -> list[list[int]]:
    """Rows of at most ``max_length`` tokens, as lists of feature indices: each feature goes to the
    first row among the last ``window`` open ones where it fits (so the input order is mostly kept)."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for j, n in enumerate(lengths.tolist()):
        if n > max_length:
            raise ValueError(f"feature {j} has {n} tokens > max_length {max_length}; truncate it first")
        if n == 0:
            continue
        start = max(0, len(rows) - window)
        k = next((k for k in range(start, len(rows)) if fill[k] + n <= max_length), None)
        if k is None:
            rows.append([])
            fill.append(0)
            k = len(rows) - 1
        rows[k].append(j)
        fill[k] += n
    return rows


def pack_row(features: Sequence[dict]) -> dict:
    """One packed row of LM features: ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 for
    every example) and a per-token ``prompt_mask``.

    Each example's first label is set to -100: unpacked it is never a target (labels shift by one), and
    packed it would otherwise be predicted from the previous example's last token.
    """
    row = {"input_ids": [], "labels": [], "position_ids": [], "prompt_mask": []}
    for f in features:
        if f.get("seq2seq"):
            raise ValueError("data.pack does not apply to encoder-decoder (seq2seq) features: set data.pack=false")
        n, p = len(f["input_ids"]), f.get("prompt_len", 0)
        row["input_ids"] += f["input_ids"]
        row["labels"] += [IGNORE] + list(f["labels"][1:])
        row["position_ids"] += range(n)
        row["prompt_mask"] += [True] * p + [False] * (n - p)
    return row


def pack(features: Sequence[dict], max_length: int, window: int = 64) -> list[dict]:
    """``features`` packed into rows (``pack_plan``, then ``pack_row`` for each), all built at once; the
    training pipeline builds the same rows lazily (``tunelab.data.feature_cache``)."""
    lengths = np.array([len(f["input_ids"]) for f in features], dtype=np.int64)
    return [pack_row([features[j] for j in row]) for row in pack_plan(lengths, max_length, window)]


def batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
            group_by_length: bool = True, drop_last: bool = False, mega_batches: int = 50) -> list[list[int]]:
    """Batch index lists for one epoch, a pure function of (lengths, seed, epoch, options).

    A resumed run recomputes the same list and skips the batches already done. Length grouping: shuffle,
    sort by length (longest first) within chunks of ``mega_batches * batch_size`` indices, cut into batches,
    then shuffle the batch order; padding waste falls while batch contents and order stay random.
    Every index appears exactly once (drop_last drops only the one short batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"tunelab-batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        chunk = batch_size * mega_batches
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s:s + chunk], key=lambda i: -lengths[i])]
    out = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if drop_last and out and len(out[-1]) < batch_size:
        out.pop()
    if shuffle and group_by_length:
        rng.shuffle(out)
    return out
