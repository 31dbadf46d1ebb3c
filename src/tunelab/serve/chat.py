"""``tunelab chat``: a terminal conversation with a run or a model, streamed token by token.

Lines starting with ``/`` are commands: ``/reset`` (forget the conversation), ``/system TEXT`` (set
the system message; ``/system`` alone removes it), ``/exit`` (or end of input, Ctrl-D). Ctrl-C stops
the answer being written. Reads stdin, so it can be scripted: ``printf 'hi\\n/exit\\n' | tunelab chat RUN``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from tunelab.serve.engine import Engine, Params
from tunelab.serve.loading import render_chat

HELP = "commands: /reset, /system <text>, /exit"


class Conversation:
    def __init__(self, engine: Engine, params: Params, system: str | None = None):
        self.engine, self.params = engine, params
        self.system, self.turns = system, []

    def messages(self, user: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs += self.turns
        return msgs + ([{"role": "user", "content": user}] if user is not None else [])

    def fit(self, user: str, write: Callable[[str], None]) -> tuple[list[int], list[str], int] | None:
        """The prompt ids, stop strings and answer budget for ``user``: the oldest exchanges are dropped
        (the system message kept) until the prompt leaves room for an answer in the model's context, with
        a one-line notice; the budget is --max-new-tokens cut to what is left. None (and a message) when
        the message alone leaves no room."""
        ctx = self.engine.context_len
        reserve = min(self.params.max_tokens, 64)  # room an answer needs before old turns are dropped
        dropped, kept = 0, self.turns
        while True:
            prompt, stops = render_chat(self.engine.tok, self.messages(user))
            ids = self.engine.encode(prompt)
            if not ctx or len(ids) + reserve <= ctx or not self.turns:
                break
            self.turns = self.turns[2:]
            dropped += 1
        left = ctx - len(ids) if ctx else self.params.max_tokens
        if left < 1:  # the message alone does not fit: refused, the conversation kept whole
            self.turns = kept
            write(f"(this message is {len(ids)} tokens with the chat format; the model's context is {ctx} tokens: "
                  "shorten it)\n")
            return None
        if dropped:
            write(f"(the conversation outgrew the model's context of {ctx} tokens: dropped the oldest "
                  f"{dropped} exchange{'s' if dropped > 1 else ''})\n")
        return ids, stops, min(self.params.max_tokens, left)

    def reply(self, user: str, write: Callable[[str], None]) -> str | None:
        """Stream the answer to ``user`` through ``write`` and add the exchange to the history."""
        fitted = self.fit(user, write)
        if fitted is None:
            return None
        ids, stops, budget = fitted
        p = Params(**{**vars(self.params), "stop": list(self.params.stop) + stops, "max_tokens": budget})
        req = self.engine.submit(ids, p)
        started = False
        try:
            for kind, value in req.events():
                if kind == "error":
                    raise RuntimeError(value)
                if kind == "delta":
                    if not started:
                        value = value.lstrip()
                        started = bool(value)
                    write(value)
        except KeyboardInterrupt:
            req.cancel()
            req.result()
            write(" [stopped]")
        answer = req.text.strip()
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer


def command(conv: Conversation, line: str) -> str | None:
    """Handle a ``/`` command; returns the message to print, or None to quit."""
    name, _, arg = line[1:].partition(" ")
    if name in ("exit", "quit"):
        return None
    if name == "reset":
        conv.turns = []
        return "(conversation reset)"
    if name == "system":
        conv.system = arg.strip() or None
        return f"(system message set: {conv.system})" if conv.system else "(system message removed)"
    return f"(unknown command /{name}; {HELP})"


def repl(conv: Conversation, banner: str, stdin=None, stdout=None) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if hasattr(stdin, "reconfigure"):  # bytes that are not UTF-8 reach us as surrogates: named, not a traceback
        stdin.reconfigure(errors="surrogateescape")
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    write(f"{banner}\n{HELP}\n")
    while True:
        write("you> ")
        try:
            line = input() + "\n" if interactive and stdin is sys.stdin else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            line = ""
        if not line:  # end of input
            write("\n")
            return
        line = line.strip()
        if not interactive:
            write(line + "\n")  # echo scripted input so the transcript reads like a session
        if not line:
            continue
        if line.startswith("/"):
            msg = command(conv, line)
            if msg is None:
                return
            write(msg + "\n")
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as e:
            write(f"(that line is not UTF-8 text (byte {e.start + 1}); it was not sent)\n")
            continue
        write("model> ")
        try:
            conv.reply(line, write)
        except (ValueError, RuntimeError) as e:  # the engine refused or failed: the conversation goes on
            write(f"\n(error: {e})")
        write("\n")
