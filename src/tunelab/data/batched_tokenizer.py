"""Batched tokenization for tasks that only have a per-row ``encode``, with identical results.

`Prefetching` stands in for the tokenizer while a batch of rows is encoded twice: the first pass records
every text the task asks to tokenize (answers are placeholders, and a pass that fails on them is simply
ignored); one batched fast-tokenizer call per set of options then answers them all; the second pass
is the real one and reads its answers from that table (anything not recorded goes to the tokenizer as
usual). Calls with options outside `BATCHABLE` always go straight to the tokenizer.

``apply_chat_template(..., tokenize=False)`` is rendered once per shape of conversation (roles and
options) with placeholders for the contents, then filled by string substitution; the shortcut is used
only after it reproduced the real rendering of three different rows exactly, so a template that alters
contents keeps the slow, exact path.
"""

from __future__ import annotations

BATCHABLE = {"add_special_tokens", "truncation", "max_length", "return_offsets_mapping"}
_PLACEHOLDER = {"input_ids": [0], "attention_mask": [1], "token_type_ids": [0], "offset_mapping": [(0, 1)]}
MARK = "\ue002{}\ue003"


class Prefetching:
    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._memo: dict = {}
        self._record: list | None = None
        self._shapes: dict = {}

    def __getattr__(self, name):
        if name.startswith("_"):  # not yet set (unpickling in a worker): no recursion through _tok
            raise AttributeError(name)
        if name.endswith("_token_id"):  # transformers looks these up in the whole vocabulary on every access
            ids = self.__dict__.setdefault("_ids", {})
            if name not in ids:
                ids[name] = getattr(self._tok, name)
            return ids[name]
        return getattr(self._tok, name)

    def __call__(self, text=None, text_pair=None, **kw):
        simple = isinstance(text, str) and (text_pair is None or isinstance(text_pair, str))
        try:
            key = (text, text_pair, tuple(sorted(kw.items()))) if simple else None
            hash(key)
        except TypeError:
            key = None
        if key is not None:
            hit = self._memo.get(key)
            if hit is not None:
                return hit
            if self._record is not None:
                if set(kw) <= BATCHABLE:
                    self._record.append(key)
                    return dict(_PLACEHOLDER)
                self._memo[key] = self._tok(text, text_pair, **kw)  # not batchable: computed once, reused
                return self._memo[key]
        return self._tok(text, text_pair, **kw)

    def apply_chat_template(self, conversation, *args, **kw):
        if args or kw.get("tokenize", True) or not all(isinstance(m.get("content"), str) and set(m) == {"role", "content"}
                                                       for m in conversation):
            return self._tok.apply_chat_template(conversation, *args, **kw)
        shape = (tuple(m["role"] for m in conversation), tuple(sorted(kw.items())))
        state = self._shapes.setdefault(shape, {"checked": 0, "skeleton": None, "ok": True})
        if state["ok"] and state["skeleton"] is None:
            marked = [{"role": m["role"], "content": MARK.format(i)} for i, m in enumerate(conversation)]
            state["skeleton"] = self._tok.apply_chat_template(marked, **kw)
        if not state["ok"] or state["checked"] < 3:
            real = self._tok.apply_chat_template(conversation, **kw)
            if state["ok"]:
                state["ok"] = self._fill(state["skeleton"], conversation) == real
                state["checked"] += 1
            return real
        return self._fill(state["skeleton"], conversation)

    @staticmethod
    def _fill(skeleton: str, conversation) -> str:
        for i, m in enumerate(conversation):
            skeleton = skeleton.replace(MARK.format(i), m["content"], 1)
        return skeleton

    def encode_rows(self, encode, rows: list) -> list:
        """``[encode(row, self) for row in rows]``, with the tokenizer calls batched (see the module docstring)."""
        self._record = []
        try:
            for row in rows:
                try:
                    encode(row, self)
                except Exception:  # noqa: BLE001 - placeholders may upset a task; the real pass decides
                    pass
            wanted = list(dict.fromkeys(self._record))
        finally:
            self._record = None
        groups: dict = {}
        for key in wanted:
            groups.setdefault((key[1] is not None, key[2]), []).append(key)
        for (paired, kw), keys in groups.items():
            enc = self._tok([k[0] for k in keys], [k[1] for k in keys] if paired else None, **dict(kw))
            encodings = getattr(enc, "encodings", None)
            for i, k in enumerate(keys):
                from transformers import BatchEncoding

                self._memo[k] = BatchEncoding({name: v[i] for name, v in enc.items()},
                                              encoding=encodings[i] if encodings else None)
        try:
            return [encode(row, self) for row in rows]
        finally:
            self._memo = {}
