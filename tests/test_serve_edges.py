"""tunelab serve stays up and answers every other client correctly whatever one client sends (tunelab
issue 26, item 3): body limit, tokenization off the event loop, one bad request fails alone, OpenAI-shaped
errors for every kind of bad body, refused features named, defaults that fit the context."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from test_chat_cli import TEMPLATE, perturbed
from tunelab.evaluation.scoring import generate
from tunelab.serve.engine import Engine, Params
from tunelab.serve.loading import render_chat

from conftest import tiny_bert, tiny_llama, tiny_tokenizer_obj

uvicorn = pytest.importorskip("uvicorn")
PROMPTS = ["the cat sat on the mat", "John visited Paris", "how many apples did Mary buy ?", "hello"]


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer_obj()
    t.chat_template = TEMPLATE
    return t


def _start(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)
    return srv, th, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def server(tok):
    from tunelab.serve.server import create_app

    model = perturbed("lora", r=2)
    engine = Engine(model, tok, max_batch=8, batch_wait_ms=20, max_queue=32)
    srv, th, url = _start(create_app(engine, "tiny", max_tokens_limit=64, max_body_bytes=1_000_000))
    yield url, engine, model
    srv.should_exit = True
    th.join(10)


def call(url, body: bytes | str | None = None, ctype="application/json", timeout=120):
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def huge_post(url, size: int, path="/v1/chat/completions"):
    """POST a body of ``size`` bytes (Content-Length given), sending only its first 64 KiB before reading
    the answer (a server that reads it whole first would keep us waiting): (status, JSON)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode() + b'{"model": "tiny", "prompt": "' + b"a" * 65536)
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < int(
                raw.lower().split(b"content-length:")[1].split(b"\r\n")[0]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, body = raw.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def openai_error(status, got, code, needle):
    assert status == code, got
    err = got["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"], got


def chat_body(content, **kw):
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                       "temperature": 0, **kw})


@pytest.mark.parametrize("body, ctype, code, needle", [
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', "application/json", 400, "not UTF-8"),
    ("{not json", "application/json", 400, "not valid JSON"),
    ("[1, 2]", "application/json", 400, "must be a JSON object"),
    ('{"model": "tiny", "prompt": "hi"}', "text/plain", 415, "application/json"),
    ('{"model": "tiny", "prompt": "hi", "temperature": NaN}', "application/json", 400, "finite"),
    ('{"model": "tiny", "prompt": "hi", "top_p": Infinity}', "application/json", 400, "finite"),
    ('{"model": "tiny", "prompt": "hi", "stream": "yes"}', "application/json", 400, "stream"),
    ('{"model": "tiny", "prompt": "hi", "seed": 1180591620717411303424}', "application/json", 400, "seed"),
    ('{"model": "tiny", "prompt": "a\\ud800b"}', "application/json", 400, "not valid Unicode"),
    ('{"model": "tiny", "prompt": "hi", "presence_penalty": 0.5}', "application/json", 400, "'presence_penalty' is not supported"),
    ('{"model": "tiny", "prompt": "hi", "frequency_penalty": 1}', "application/json", 400, "'frequency_penalty' is not supported"),
])
def test_every_bad_completion_body_gets_an_openai_error(server, body, ctype, code, needle):
    openai_error(*call(f"{server[0]}/v1/completions", body, ctype), code, needle)


@pytest.mark.parametrize("body, needle", [
    (chat_body([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]), "'image_url' part is not supported"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}),
     "tool calls are not supported"),
    (chat_body("hi", tools=[{"type": "function", "function": {"name": "f"}}]), "'tools' is not supported"),
    (chat_body("hi", tool_choice="auto"), "'tool_choice' is not supported"),
    (chat_body("hi", response_format={"type": "json_object"}), "'response_format' is not supported"),
    (chat_body("a\ud800b"), "not valid Unicode"),
])
def test_unsupported_chat_features_are_named(server, body, needle):
    openai_error(*call(f"{server[0]}/v1/chat/completions", body), 400, needle)


def test_unknown_path_is_an_openai_error_too(server):
    openai_error(*call(f"{server[0]}/v1/embeddings", '{"model": "tiny", "input": "x"}'), 404, "no route")


def test_text_parts_are_accepted_like_a_string(server):
    url = server[0]
    code, a = call(f"{url}/v1/chat/completions", chat_body("hello"))
    code2, b = call(f"{url}/v1/chat/completions", chat_body([{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]))
    assert code == code2 == 200 and a["choices"][0]["message"] == b["choices"][0]["message"]
    code, c = call(f"{url}/v1/chat/completions", chat_body("hello", response_format={"type": "text"}, presence_penalty=0))
    assert code == 200 and c["choices"][0]["message"] == a["choices"][0]["message"]  # no-op values are fine


def test_default_max_tokens_fits_what_the_context_leaves(server, tok):
    url, engine, _ = server
    prompt = "the cat " * 125  # 250 tokens of the model's 256
    n = len(engine.encode(prompt))
    code, got = call(f"{url}/v1/completions", json.dumps({"model": "tiny", "prompt": prompt, "temperature": 0}))
    assert code == 200 and got["usage"]["completion_tokens"] <= 256 - n, got
    code, got = call(f"{url}/v1/completions", json.dumps({"model": "tiny", "prompt": "the cat " * 128}))
    openai_error(code, got, 400, "no room for an answer")


def test_one_bad_request_fails_alone_in_its_batch(tok):
    """A request that makes the batch fail (a seed torch cannot take, slipped past the checks) is retried
    alone: the others get exactly the answers they get without it."""
    model = perturbed("lora", r=2)
    want = generate(model, tok, PROMPTS, max_new_tokens=8)
    eng = Engine(model, tok, max_batch=5, batch_wait_ms=3000)
    reqs = [eng.submit(eng.encode(p), Params(max_tokens=8)) for p in PROMPTS[:2]]
    bad = eng.submit(eng.encode("hello"), Params(max_tokens=8, temperature=1.0, seed=1))
    bad.params.seed = 2**70
    reqs += [eng.submit(eng.encode(p), Params(max_tokens=8)) for p in PROMPTS[2:]]
    assert [r.result().strip() for r in reqs] == want
    with pytest.raises(RuntimeError, match="generation failed"):
        bad.result()
    assert eng.stats["batches"] >= 2
    with pytest.raises(ValueError, match="seed=.* cannot seed"):
        eng.submit(eng.encode("hello"), Params(max_tokens=8, seed=2**70))


def test_a_10mb_body_is_refused_while_others_are_answered_promptly(server, tok):
    url, engine, model = server
    want = generate(model, tok, [render_chat(tok, [{"role": "user", "content": p}])[0] for p in PROMPTS], max_new_tokens=8)
    out: dict = {}

    def hostile():  # announces 10 MB and starts sending; the answer comes before the body is read
        out["hostile"] = huge_post(url, 10_000_000)

    def normal(i):
        out[i] = call(f"{url}/v1/chat/completions", chat_body(PROMPTS[i]))

    threads = [threading.Thread(target=hostile)] + [threading.Thread(target=normal, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    code, models = call(f"{url}/v1/models", None, ctype=None)
    models_s = time.perf_counter() - t0
    for t in threads:
        t.join(120)
    assert code == 200 and models["data"][0]["id"] == "tiny" and models_s < 5, models_s
    openai_error(*out["hostile"], 413, "larger than this server's limit of 1000000 bytes")
    assert [out[i][1]["choices"][0]["message"]["content"] for i in range(4)] == want


def test_a_huge_prompt_tokenizes_off_the_event_loop(tok):
    from tunelab.serve.server import create_app

    engine = Engine(tiny_llama(), tok, max_batch=2, batch_wait_ms=0)
    srv, th, url = _start(create_app(engine, "tiny", max_body_bytes=20_000_000))
    try:
        box = {}
        t = threading.Thread(target=lambda: box.update(r=call(f"{url}/v1/completions",
                                                              json.dumps({"model": "tiny", "prompt": "the cat " * 1_000_000}))))
        t.start()
        time.sleep(1.0)  # the body is in; tokenizing 2M words takes seconds
        t0 = time.perf_counter()
        code, _ = call(f"{url}/v1/models", None, ctype=None)
        waited = time.perf_counter() - t0
        t.join(300)
        assert code == 200 and waited < 2.0, waited
        openai_error(*box["r"], 400, "context")
    finally:
        srv.should_exit = True
        th.join(10)


def test_serve_refuses_a_bad_port_and_a_model_that_cannot_generate(tmp_path, tok, monkeypatch):
    from typer.testing import CliRunner

    import tunelab.serve.server as server_mod
    from tunelab.cli import app

    monkeypatch.setattr(server_mod, "serve", lambda *a: pytest.fail("must not start"))
    for port in ("0", "70000", "-1"):
        res = CliRunner().invoke(app, ["serve", "x", "--port", port])
        assert res.exit_code == 2 and "--port" in res.output and "Traceback" not in res.output, res.output
    bert = tmp_path / "bert"
    tiny_bert().bert.save_pretrained(bert)
    tok.save_pretrained(bert)
    for cmd in ("serve", "chat"):
        res = CliRunner().invoke(app, [cmd, str(bert)], input="/exit\n")
        assert res.exit_code == 2 and "cannot generate text" in res.output and "Traceback" not in res.output, res.output
