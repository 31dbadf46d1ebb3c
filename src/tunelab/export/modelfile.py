"""An Ollama Modelfile beside a GGUF export (``tunelab export RUN DIR --format ollama``).

Ollama does not run the tokenizer's Jinja chat template: it needs a Go text/template over ``.Messages``.
Translation is by behaviour, not by parsing Jinja: the tokenizer's template renders a probe conversation
(system, user, assistant, user, then the generation prompt) and must give exactly what one of tunelab's
named chat formats (`tunelab.data.chat_templates.TEMPLATES`: chatml, llama3, zephyr, alpaca) gives; that
format's headers and end markers are then written as the Go template. A template that injects a default
system turn when the conversation has none (SmolLM2, Qwen2) keeps that default as the Modelfile's SYSTEM.
Any other template is refused, naming its first line. The run's own ``task.template`` (a named format)
and ``task.system`` win over the tokenizer's.

``PARAMETER stop`` lists every end-of-turn text: the format's end marker after an assistant turn and the
tokenizer's EOS token.
"""

from __future__ import annotations

from tunelab.data.chat_templates import TEMPLATES, Template

_PROBE = [{"role": "user", "content": "\ue010u1"}, {"role": "assistant", "content": "\ue010a1"},
          {"role": "user", "content": "\ue010u2"}]
_SYS = {"role": "system", "content": "\ue010s"}
GO_ROLES = ("system", "user", "assistant", "tool")


class TemplateError(ValueError):
    """A chat template tunelab cannot translate for Ollama."""


def _render_named(t: Template, messages, eos: str) -> str:
    out = [t.bos]
    for m in messages:
        head, end = t.parts(m["role"], eos)
        out += [head, m["content"], end]
    return "".join(out) + t.parts("assistant", eos)[0]


def _render_own(tok, messages) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def identify(tok) -> tuple[str, str | None]:
    """(format name, the template's default system prompt or None) of the tokenizer's chat template."""
    source = getattr(tok, "chat_template", None)
    if not isinstance(source, str) or not source.strip():
        raise TemplateError("the tokenizer has no chat template to translate for Ollama; train with a named "
                            f"task.template ({', '.join(TEMPLATES)}) or export with --format gguf")
    eos = tok.eos_token or ""
    try:
        with_sys, without = _render_own(tok, [_SYS, *_PROBE]), _render_own(tok, _PROBE)
    except Exception as e:  # a template that needs tools, dates, strict role order...
        raise TemplateError(f"the chat template failed on a plain conversation ({type(e).__name__}: {e})") from None
    for name, t in TEMPLATES.items():
        if _render_named(t, [_SYS, *_PROBE], eos) != with_sys:
            continue
        if _render_named(t, _PROBE, eos) == without:
            return name, None
        head, end = t.parts("system", eos)
        lead = t.bos + head
        if without.startswith(lead) and end and end in without[len(lead):]:
            default = without[len(lead):].split(end, 1)[0]
            if _render_named(t, [{"role": "system", "content": default}, *_PROBE], eos) == without:
                return name, default
    first = source.strip().splitlines()[0][:80]
    raise TemplateError(f"the tokenizer's chat template ({first!r}...) is not one tunelab can translate for Ollama "
                        f"(it renders like none of {', '.join(TEMPLATES)}); export with --format gguf and write "
                        "the Modelfile's TEMPLATE yourself")


def _go(text: str) -> str:
    """Literal text inside a Go template (only ``{{`` needs escaping)."""
    return text.replace("{{", '{{"{{"}}')


def _by_role(t: Template, eos: str, which: int) -> str:
    texts = {r: t.parts(r, eos)[which] for r in GO_ROLES}
    if len(set(texts.values())) == 1:
        return _go(texts["user"])
    if all(v == texts["user"].replace("user", r) for r, v in texts.items()):
        return _go(texts["user"]).replace("user", "{{ .Role }}")
    chain = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{_go(texts[r])}'
                    for i, r in enumerate(GO_ROLES))
    return chain + "{{ end }}"


def go_template(name: str, eos: str) -> str:
    """The Go template of named format ``name`` over Ollama's ``.Messages`` (BOS is added by llama.cpp)."""
    t = TEMPLATES[name]
    return ("{{- range .Messages }}" + _by_role(t, eos, 0) + "{{ .Content }}" + _by_role(t, eos, 1)
            + "{{ end }}" + _go(t.parts("assistant", eos)[0]))


def stops(name: str, tok) -> list[str]:
    out = [TEMPLATES[name].parts("assistant", tok.eos_token or "")[1].strip(), tok.eos_token or ""]
    return list(dict.fromkeys(s for s in out if s))


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise TemplateError(f'the {what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, tok, task_params: dict) -> str:
    """The Modelfile for ``gguf_name`` (beside it) given the run's tokenizer and task parameters."""
    named = task_params.get("template")
    if named in TEMPLATES:
        name, default = named, None
    else:
        name, default = identify(tok)
    system = task_params.get("system") or default
    lines = [f"FROM ./{gguf_name}", f"TEMPLATE {_quoted(go_template(name, tok.eos_token or ''), 'template')}"]
    lines += [f"PARAMETER stop {_stop_literal(s)}" for s in stops(name, tok)]
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    return "\n".join(lines) + "\n"


def _stop_literal(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
