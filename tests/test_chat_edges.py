"""tunelab chat never loses the conversation (tunelab issue 26, item 4): history trimmed to the model's
context (oldest turns first, the system message kept) with a notice, the answer budget cut to the context
left, and a too-long line, non-UTF-8 input or a seed torch cannot take get a message, not a traceback."""

from __future__ import annotations

import io

from typer.testing import CliRunner

from test_chat_cli import TEMPLATE
from tunelab.cli import app
from tunelab.serve.chat import Conversation, repl
from tunelab.serve.engine import Engine, Params

from conftest import tiny_llama, tiny_tokenizer_obj


def engine():
    tok = tiny_tokenizer_obj()
    tok.chat_template = TEMPLATE
    return Engine(tiny_llama(), tok, max_batch=1, batch_wait_ms=0)  # a context of 256 positions


def run_repl(conv, data: bytes) -> str:
    out = io.StringIO()
    repl(conv, "banner", stdin=io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"), stdout=out)
    return out.getvalue()


def test_history_is_trimmed_to_the_context_oldest_first_system_kept():
    eng = engine()
    conv = Conversation(eng, Params(max_tokens=40), system="the cat sat")
    long = " ".join(["the cat sat on the mat"] * 8)  # ~50 tokens a turn with the format
    out = run_repl(conv, ("\n".join([f"{long} {w}" for w in ("John", "Mary", "Tom", "Paris", "Berlin")]) + "\n").encode())
    assert "the conversation outgrew the model's context of 256 tokens: dropped the oldest" in out
    assert conv.system == "the cat sat" and conv.turns[-2]["content"].endswith("Berlin")
    assert not any(t["content"].endswith("John") for t in conv.turns)  # the oldest went first
    assert "Traceback" not in out and out.count("model> ") == 5
    ids, _, budget = conv.fit("hello", lambda s: None)
    assert len(ids) + budget <= 256


def test_the_answer_budget_fits_what_the_context_leaves():
    eng = engine()
    conv = Conversation(eng, Params(max_tokens=256))  # the CLI's default --max-new-tokens on a 256-token model
    ids, _, budget = conv.fit("hello", lambda s: None)
    assert budget == 256 - len(ids)
    answer = conv.reply("hello", lambda s: None)
    assert answer is not None and len(conv.turns) == 2


def test_a_line_longer_than_the_context_and_bytes_that_are_not_utf8_get_a_message():
    conv = Conversation(engine(), Params(max_tokens=8))
    out = run_repl(conv, b"hello\n" + b"the cat " * 300 + b"\nJohn \xff\xfe visited\nhello\n/exit\n")
    assert "shorten it" in out and "not UTF-8 text" in out and "Traceback" not in out
    assert out.count("model> ") == 3 and len(conv.turns) == 4  # the two hellos; the rest was not sent


def test_a_seed_torch_cannot_take_is_a_message(tmp_path):
    conv = Conversation(engine(), Params(max_tokens=4, temperature=1.0, seed=2**70))
    out = run_repl(conv, b"hello\n/exit\n")
    assert "(error: seed=" in out and "Traceback" not in out
    for seed in ("1e23", str(2**70)):
        res = CliRunner().invoke(app, ["chat", str(tmp_path / "x"), "--seed", seed], input="")
        assert res.exit_code == 2 and "seed" in res.output and "Traceback" not in res.output, res.output
