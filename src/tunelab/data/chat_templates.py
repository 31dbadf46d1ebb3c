"""Chat conversations: message normalisation, templates, and assistant-only loss spans.

Normalisation: a row holds either OpenAI ``messages`` (``[{"role", "content"}, ...]``, roles system /
user / assistant / tool, an assistant ``tool_calls`` list kept as JSON text) or ShareGPT
``conversations`` (``[{"from", "value"}, ...]``, from system / human / gpt / tool / function_call / observation).
`normalize` returns ``[{"role", "content"}]`` with roles in {system, user, assistant, tool} and raises
`ChatError` naming the turn and field for an unknown role, a missing or non-text content, an empty
conversation, or one with no assistant turn.

Templates: ``None``/"auto" uses the tokenizer's own chat template; a named one (`TEMPLATES`: chatml,
llama3, alpaca, zephyr) serves base models. `render` returns the text plus the character spans that
carry loss: every assistant turn's content and its end-of-turn marker (so the model learns to stop),
never the role headers. For the tokenizer's template the spans are found by rendering once with
private-use sentinel characters around each assistant content (one Jinja render per conversation);
the end marker is the text the template puts after an assistant content, probed once per tokenizer.
`token_mask` turns character spans into a per-token loss mask from the fast tokenizer's offsets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "chatgpt": "assistant", "tool": "tool", "function_call": "assistant",
                  "observation": "tool", "function": "tool"}
OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters: never in real text, untouched by templates


class ChatError(ValueError):
    """A conversation that cannot be used; the message names the turn and field."""


def detect(row: dict, fields: dict | None = None) -> str:
    """'openai' or 'sharegpt' from which column a row has (``fields`` may rename them)."""
    fields = fields or {}
    if fields.get("messages", "messages") in row:
        return "openai"
    if fields.get("conversations", "conversations") in row:
        return "sharegpt"
    present = sorted(k for k in row if not k.startswith("_"))
    raise ChatError(f"no 'messages' (OpenAI) or 'conversations' (ShareGPT) column (present: {present}); "
                    "map yours with task.fields, e.g. {messages: dialog}")


def _text(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: keep the text parts
        other = next((p for p in value if not isinstance(p, dict) or p.get("type", "text") != "text"), None)
        if other is None:
            return "".join(p.get("text", "") for p in value)
        if isinstance(other, dict):
            raise ChatError(f"{where}: holds a non-text part of type {other.get('type')!r} (an image, audio or file): tunelab trains "
                            "on text only; drop such rows or their non-text parts")
    raise ChatError(f"{where}: content must be text, got {type(value).__name__}")


def normalize(turns, style: str = "openai") -> list[dict]:
    """``[{"role", "content"}]`` from an OpenAI or ShareGPT turn list; see the module docstring."""
    if not isinstance(turns, list) or not turns:
        raise ChatError(f"the conversation must be a non-empty list of turns, got {type(turns).__name__ if not isinstance(turns, list) else 'an empty list'}")
    role_key, text_key = ("role", "content") if style == "openai" else ("from", "value")
    out = []
    for i, t in enumerate(turns):
        where = f"turn {i}"
        if not isinstance(t, dict):
            raise ChatError(f"{where}: expected an object with {role_key!r} and {text_key!r}, got {type(t).__name__}")
        raw = t.get(role_key)
        role = raw if style == "openai" else SHAREGPT_ROLES.get(str(raw).lower())
        if role not in ROLES:
            allowed = ROLES if style == "openai" else sorted(SHAREGPT_ROLES)
            raise ChatError(f"{where}: field {role_key!r} has unknown role {raw!r}; allowed: {list(allowed)}")
        content = t.get(text_key)
        calls = t.get("tool_calls") if style == "openai" else None
        if content is None and not calls:
            raise ChatError(f"{where}: field {text_key!r} is missing or null")
        text = _text(content, f"{where} field {text_key!r}") if content is not None else ""
        if calls:  # tool-call turns are kept as text the model learns to write
            text = (text + "\n" if text else "") + json.dumps(calls, ensure_ascii=False)
        if "\x00" in text:
            raise ChatError(f"{where}: field {text_key!r} contains a NUL character (\\x00) at character "
                            f"{text.index(chr(0)) + 1}: binary or mis-encoded data")
        if role == "assistant" and not text.strip():
            raise ChatError(f"{where}: the assistant answer is empty: nothing to learn from")
        out.append({"role": role, "content": text})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatError(f"no assistant turn (roles: {[m['role'] for m in out]}): nothing to learn from")
    return out


@dataclass(frozen=True)
class Template:
    """A named chat format: ``header[role]`` before a turn's content, ``end[role]`` after it ({eos} = the
    tokenizer's EOS). Loss covers an assistant content plus ``end['assistant'].rstrip()``."""

    header: dict
    end: dict
    bos: str = ""

    def parts(self, role: str, eos: str) -> tuple[str, str]:
        return self.header[role].replace("{eos}", eos), self.end[role].replace("{eos}", eos)


def _chatml() -> Template:
    return Template({r: f"<|im_start|>{r}\n" for r in ROLES}, dict.fromkeys(ROLES, "<|im_end|>\n"))


TEMPLATES = {
    "chatml": _chatml(),
    "llama3": Template({r: f"<|start_header_id|>{'ipython' if r == 'tool' else r}<|end_header_id|>\n\n" for r in ROLES},
                       dict.fromkeys(ROLES, "<|eot_id|>"), bos="<|begin_of_text|>"),
    "alpaca": Template({"system": "", "user": "### Instruction:\n", "tool": "### Input:\n", "assistant": "### Response:\n"},
                       {"system": "\n\n", "user": "\n\n", "tool": "\n\n", "assistant": "{eos}\n\n"}),
    "zephyr": Template({r: f"<|{r}|>\n" for r in ROLES}, dict.fromkeys(ROLES, "{eos}\n")),
}


def _check_name(template: str | None) -> None:
    if template not in (None, "auto") and template not in TEMPLATES:
        raise ChatError(f"unknown chat template {template!r}; named ones: {sorted(TEMPLATES)}, or 'auto' for the tokenizer's own")


def _named(messages: list[dict], t: Template, eos: str, add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    pieces, spans, pos = [t.bos], [], len(t.bos)
    for m in messages:
        head, end = t.parts(m["role"], eos)
        pieces += [head, m["content"], end]
        pos += len(head)
        if m["role"] == "assistant":
            spans.append((pos, pos + len(m["content"]) + len(end.rstrip())))
        pos += len(m["content"]) + len(end)
    if add_generation_prompt:
        pieces.append(t.parts("assistant", eos)[0])
    return "".join(pieces), spans


_END_MARK: dict = {}


def _end_marker(tokenizer) -> str:
    """What the tokenizer's template writes right after an assistant content (e.g. ``<|im_end|>``)."""
    key = (id(tokenizer), tokenizer.chat_template)
    if key not in _END_MARK:
        msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": OPEN + "a" + CLOSE}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        tail = text.split(CLOSE, 1)[1] if CLOSE in text else ""
        _END_MARK[key] = tail.rstrip()
    return _END_MARK[key]


def render(messages: list[dict], tokenizer=None, template: str | None = None, *,
           add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """(text, loss spans) of a normalised conversation; see the module docstring."""
    _check_name(template)
    if template in TEMPLATES:
        eos = (tokenizer.eos_token if tokenizer is not None else None) or "</s>"
        return _named(messages, TEMPLATES[template], eos, add_generation_prompt)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ChatError(f"the tokenizer has no chat template of its own; set task.template to one of {sorted(TEMPLATES)}")
    return _own(messages, tokenizer, add_generation_prompt)


_SHAPES: dict = {}
_MARK = re.compile("\ue002(\\d+)\ue003")


def _own(messages, tokenizer, agp: bool):
    """The tokenizer's template through a skeleton per conversation shape (roles, options): rendered once
    with numbered placeholders, then filled by string joins. A shape's skeleton is trusted only after it
    matched the real rendering of three conversations exactly; otherwise every row takes `_sentinel`."""
    key = (id(tokenizer), tokenizer.chat_template, tuple(m["role"] for m in messages), agp)
    st = _SHAPES.get(key)
    if st is None:
        if len(_SHAPES) > 10000:
            _SHAPES.clear()
        marked = [{"role": m["role"], "content": f"\ue002{i}\ue003"} for i, m in enumerate(messages)]
        parts = _MARK.split(tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=agp))
        ok = [int(x) for x in parts[1::2]] == list(range(len(messages)))
        st = _SHAPES[key] = {"parts": parts, "ok": ok, "checked": 0, "end": _end_marker(tokenizer)}
    if st["ok"] and st["checked"] >= 3:
        return _fill(st, messages)
    real = _sentinel(messages, tokenizer, agp)
    if st["ok"]:
        st["ok"] = _fill(st, messages) == real
        st["checked"] += 1
    return real


def _fill(st: dict, messages) -> tuple[str, list[tuple[int, int]]]:
    parts, end = st["parts"], st["end"]
    out, spans, pos = [parts[0]], [], len(parts[0])
    for i, m in enumerate(messages):
        after = parts[2 * i + 2]
        out += [m["content"], after]
        if m["role"] == "assistant":
            spans.append((pos, pos + len(m["content"]) + (len(end) if end and after.startswith(end) else 0)))
        pos += len(m["content"]) + len(after)
    return "".join(out), spans


def _sentinel(messages, tokenizer, add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """One real Jinja render with private-use sentinels around each assistant content."""
    marked = [dict(m, content=OPEN + m["content"] + CLOSE) if m["role"] == "assistant" else m for m in messages]
    text = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
    end = _end_marker(tokenizer)
    out, spans, i = [], [], 0
    while True:
        j = text.find(OPEN, i)
        if j < 0:
            out.append(text[i:])
            break
        k = text.find(CLOSE, j)
        if k < 0:
            raise ChatError("the tokenizer's chat template dropped the end of an assistant turn")
        out.append(text[i:j])
        start = sum(map(len, out))
        out.append(text[j + 1:k])
        stop = start + k - j - 1
        if end and text.startswith(end, k + 1):
            stop += len(end)
        spans.append((start, stop))
        i = k + 1
    rendered = "".join(out)
    if len(spans) != sum(m["role"] == "assistant" for m in messages):
        raise ChatError("the tokenizer's chat template does not render every assistant turn; use a named template")
    return rendered, spans


def token_mask(offsets, spans: list[tuple[int, int]]) -> np.ndarray:
    """Bool per token: True when the token's last character lies in a loss span."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if not spans or not len(off):
        return np.zeros(len(off), dtype=bool)
    bounds = np.asarray(spans, dtype=np.int64).reshape(-1)
    last = np.maximum(off[:, 1] - 1, off[:, 0])
    return np.searchsorted(bounds, last, side="right") % 2 == 1
