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

    def reply(self, user: str, write: Callable[[str], None]) -> str:
        """Stream the answer to ``user`` through ``write`` and add the exchange to the history."""
        prompt, stops = render_chat(self.engine.tok, self.messages(user))
        p = Params(**{**vars(self.params), "stop": list(self.params.stop) + stops})
        req = self.engine.submit(self.engine.encode(prompt), p)
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
        write("model> ")
        conv.reply(line, write)
        write("\n")
