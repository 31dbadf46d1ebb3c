"""Batched prompt encoding by substitution, with exactly the ids of the per-row path.

A task family renders a prompt from a few per-row texts (its *slots*: the review, the instruction, the
dialogue) inside fixed text (its template and the chat template). `Skeleton.detect` renders the prompt
twice with two different sentinel texts in the slots; when both renders are the same fixed pieces
around the sentinels, a row's prompt is those pieces joined with its texts (no Jinja per row). Callers
also compare the first rows' real renders with the joined strings and fall back when they differ.

`Splicer` then turns many joined prompts into ids in one batched fast-tokenizer call. Where the
tokenizer allows it, only the per-row texts are tokenized and the fixed pieces' ids (computed once) are
spliced around them: this is exact when every junction between pieces is a point where the tokenizer
must split anyway. That is proven here only for the GPT-2 byte-level pre-tokenizer (SmolLM2, GPT-2,
StarCoder, ...: no normalizer, ``ByteLevel(use_regex=True, add_prefix_space=False)``, BPE without
dropout, added tokens without whitespace or strip flags): its regex has no look-behind, no match
holds a non-space character followed by whitespace, so text ending in a non-space followed by text
starting with ASCII whitespace always splits there; and added tokens are cut out before the regex runs,
so a safe special token at a junction splits too. Trailing whitespace of a fixed piece is moved into
the next slot's text to make such junctions. Rows where a junction is not provably safe (an empty text,
a text ending in a space before a newline) and tokenizers outside that family take the whole joined
string instead: still one batched call, still exact.
"""

from __future__ import annotations

import json
import weakref
from types import SimpleNamespace

ASCII_SPACE = " \t\n\r\x0b\x0c"
# private-use characters (never in real text) with letters, quotes, braces and markup a template might touch,
# inside edge whitespace (a template that trims or escapes contents does not keep the sentinel whole)
SENTINELS = (" \n\ue010{} Ab'\"{{x}}<&>\n\ue011 ", "\t\ue012{} zY.,\\ [y]\t\ue013\n ")


class Skeleton:
    """A prompt with holes: ``fixed[0] slot[0] fixed[1] ... slot[n-1] fixed[n]``."""

    def __init__(self, fixed: list[str]):
        self.fixed = fixed

    @classmethod
    def detect(cls, render, slots: tuple[str, ...]) -> Skeleton | None:
        """``render(values)`` -> prompt for ``{slot: text}``; the skeleton, or None when a render does not
        hold each sentinel once, in slot order, inside the same fixed text."""
        seen = []
        for sentinel in SENTINELS:
            values = {s: sentinel.format(i) for i, s in enumerate(slots)}
            try:
                text = render(values)
            except Exception:  # noqa: BLE001 - a template that cannot take the sentinels: no shortcut
                return None
            fixed = []
            for s in slots:
                head, sep, text = text.partition(values[s])
                if not sep or values[s] in text:
                    return None
                fixed.append(head)
            seen.append(fixed + [text])
        return cls(seen[0]) if seen[0] == seen[1] else None

    def fill(self, values: list[str]) -> str:
        out = [self.fixed[0]]
        for v, f in zip(values, self.fixed[1:], strict=True):
            out += [v, f]
        return "".join(out)


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``; through the backend (no offsets,
    about twice as fast) when it has no truncation or padding of its own that transformers would reset."""
    if not texts:
        return []
    bk = getattr(tokenizer, "_tokenizer", None)
    if (bk is not None and hasattr(bk, "encode_batch_fast") and bk.truncation is None and bk.padding is None
            and not getattr(tokenizer, "split_special_tokens", False)):
        return [e.ids for e in bk.encode_batch_fast(texts, add_special_tokens=False)]
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {key: value}, dies with it


def _memo(tokenizer) -> dict:
    try:
        return _MEMO.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no memo
        return {}


def splittable(tokenizer) -> list | None:
    """The added tokens' contents when ``tokenizer`` is in the family the junction rule is proven for, else None."""
    bk = getattr(tokenizer, "backend_tokenizer", None)
    if bk is None:
        return None
    memo = _memo(tokenizer)
    if "splittable" not in memo:
        memo["splittable"] = _check(tokenizer, bk)
    return memo["splittable"]


def _check(tokenizer, bk) -> list | None:
    spec = json.loads(bk.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if spec.get("normalizer") is not None or getattr(tokenizer, "split_special_tokens", False):
        return None
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return None
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
        return None
    added = spec.get("added_tokens") or []
    for t in added:
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word") or any(c.isspace() for c in t["content"]):
            return None
    return [t["content"] for t in added]


class Splicer:
    """Ids of ``skeleton.fill(values)`` for many rows at once (see the module docstring)."""

    def __init__(self, tokenizer, skeleton: Skeleton):
        try:  # held in a memo keyed weakly by the tokenizer: a strong reference here would keep it alive
            self.tok = weakref.proxy(tokenizer)
        except TypeError:
            self.tok = tokenizer
        self.sk = skeleton
        self.added = splittable(tokenizer)
        self.units = None
        if self.added is not None:
            # fixed[i] loses its trailing ASCII whitespace to the slot after it
            fixed, self.lead = list(skeleton.fixed), []
            for i in range(len(fixed) - 1):
                stripped = fixed[i].rstrip(ASCII_SPACE)
                self.lead.append(fixed[i][len(stripped):])
                fixed[i] = stripped
            self.units = fixed
            self.ids = _ids(tokenizer, fixed)
            self.starts_special = [self._starts_special(f) for f in fixed]
            self.ends_special = [self._ends_special(f, ids) for f, ids in zip(fixed, self.ids, strict=True)]

    def _starts_special(self, text: str) -> bool:
        """Text that opens with an added token that no other added token can reach into from the left."""
        if not any(text.startswith(c) for c in self.added):
            return False
        return not any(text.startswith(t[k:]) for t in self.added for k in range(1, len(t)))

    def _ends_special(self, text: str, ids: list[int]) -> bool:
        hit = [c for c in self.added if text.endswith(c)]
        if not hit or not ids or ids[-1] != self.tok.convert_tokens_to_ids(max(hit, key=len)):
            return False
        return not any(text.endswith(t[:k]) for t in self.added for k in range(1, len(t)))

    def encode(self, rows: list[list[str]]) -> list[list[int]]:
        out: list = [None] * len(rows)
        whole: list[int] = []
        chunks: list[str] = []
        plans: list = []
        for r, values in enumerate(rows):
            plan = self._plan(values) if self.units is not None else None
            if plan is None:
                whole.append(r)
                continue
            plans.append((r, plan, len(chunks)))
            chunks += [p for p in plan if isinstance(p, str)]
        chunk_ids = _ids(self.tok, chunks)
        for r, plan, start in plans:
            ids, k = [], start
            for p in plan:
                if isinstance(p, str):
                    ids += chunk_ids[k]
                    k += 1
                else:
                    ids += self.ids[p]
            out[r] = ids
        for r, ids in zip(whole, _ids(self.tok, [self.sk.fill(rows[r]) for r in whole]), strict=True):
            out[r] = ids
        self.whole_rows = len(whole)  # rows that took the whole-string path (tests, diagnostics)
        return out

    def _plan(self, values: list[str]) -> list | None:
        """The row as units (an int: a fixed piece; a str: a text to tokenize), or None when a junction is unsafe."""
        units: list = []
        for i, f in enumerate(self.units):
            if f:
                units.append(i)
            if i < len(values):
                chunk = self.lead[i] + values[i]
                if chunk:
                    units.append(chunk)
        for a, b in zip(units, units[1:], strict=False):
            if isinstance(b, int) and self.starts_special[b]:
                continue
            if isinstance(a, int) and self.ends_special[a]:
                continue
            left = self.units[a] if isinstance(a, int) else a
            right = self.units[b] if isinstance(b, int) else b
            if left[-1].isspace() or right[0] not in ASCII_SPACE:
                return None
        return units


def splicer(tokenizer, sk: Skeleton) -> Splicer:
    """One `Splicer` per tokenizer and skeleton (its fixed pieces are tokenized and checked once, not per batch)."""
    memo = _memo(tokenizer).setdefault("splicers", {})
    key = tuple(sk.fixed)
    if key not in memo:
        if len(memo) > 256:
            memo.clear()
        memo[key] = Splicer(tokenizer, sk)
    return memo[key]


def lm_features(task, rows: list[dict], tokenizer, cfg, max_length: int, *, slots, render, group,
                target) -> list[dict]:
    """``[task.encode(ex, tokenizer, cfg, max_length) for ex in rows]`` for a prompt/target family, batched.

    ``render(ex, values)`` is the family's prompt for ``ex`` with ``values`` in its ``slots`` (a tuple of
    field names, or a function of the group's first row that returns one); ``group(ex)``
    names what else shapes the prompt (rows of one group share a skeleton); ``target(ex)`` is the target
    text. The first three rows of each group and a few more spread over it must render exactly as their
    joined skeleton (the real render, Jinja and all), else the group
    takes the per-row path; so do rows that need truncation (the family's own cut rule decides those)."""
    from tunelab.data.encoding import _adds_bos, lm_join

    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    groups: dict = {}
    for r, ex in enumerate(rows):
        groups.setdefault(group(ex), []).append(r)
    out: list = [None] * len(rows)
    prompts: list = [None] * len(rows)
    for members in groups.values():
        first = rows[members[0]]
        names = slots(first) if callable(slots) else slots
        sk = Skeleton.detect(lambda v, ex=first: render(ex, v), names)
        values = [[rows[r][s] for s in names] for r in members]
        probe = sorted({*range(min(3, len(members))), *range(0, len(members), max(1, len(members) // 5))})
        if sk is not None and all(sk.fill(values[j]) == render(rows[members[j]], dict(zip(names, values[j], strict=True)))
                                  for j in probe):
            for r, ids in zip(members, splicer(tokenizer, sk).encode(values), strict=True):
                prompts[r] = ids
    wanted = [target(rows[r]) if prompts[r] is not None else None for r in range(len(rows))]
    texts = sorted({t for t in wanted if t is not None})
    t_ids = dict(zip(texts, _ids(tokenizer, texts), strict=True))
    # transformers looks special token ids up through the vocabulary on every access: once here
    ids = SimpleNamespace(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    adds = _adds_bos(tokenizer)
    for r, ex in enumerate(rows):
        p = prompts[r]
        if p is not None:
            if adds and p[:1] != [ids.bos_token_id]:
                p = [ids.bos_token_id] + p
            f = lm_join(ids, p, list(t_ids[wanted[r]]), max_length)
            if not f.get("truncated"):
                out[r] = f
                continue
        out[r] = task.encode(ex, tokenizer, cfg, max_length)
    return out
