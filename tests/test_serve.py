"""tunelab serve: the batching engine against tunelab.evaluation.scoring.generate, and the OpenAI-compatible API
through the official ``openai`` client against a live uvicorn server on 127.0.0.1."""

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
from tunelab.serve.engine import Engine, Params, QueueFull, _stream_cut
from tunelab.serve.loading import render_chat

from conftest import tiny_llama, tiny_tokenizer_obj

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

PROMPTS = ["the cat sat on the mat", "John visited Paris", "how many apples did Mary buy ?", "hello"]
KEY = "test-key-123"


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer_obj()
    t.chat_template = TEMPLATE
    return t


@pytest.mark.parametrize("method,params", [(None, {}), ("lora", {"r": 2}), ("loreft", {"rank": 2}),
                                           ("prompt_tuning", {"num_virtual_tokens": 3, "init": "random"})])
def test_engine_batch_equals_generate(method, params, tok):
    # ReFT and prompt tuning act on prompt positions: the engine must give them the same view as generate.
    model = perturbed(method, **params)
    want = generate(model, tok, PROMPTS, max_new_tokens=10)
    if method:
        assert want != generate(perturbed(None), tok, PROMPTS, max_new_tokens=10)  # the method matters
    eng = Engine(model, tok, max_batch=4, batch_wait_ms=2000)
    reqs = [eng.submit(eng.encode(p), Params(max_tokens=10)) for p in PROMPTS]
    assert [r.result().strip() for r in reqs] == want
    assert eng.stats["batches"] == 1 and eng.stats["max_batch"] == 4


def test_engine_stop_strings_stream_and_bounds(tok):
    model = tiny_llama()
    eng = Engine(model, tok, max_batch=2, batch_wait_ms=0, max_queue=1)
    full = eng.submit(eng.encode("the cat sat"), Params(max_tokens=12)).result()
    word = full.split()[2]
    req = eng.submit(eng.encode("the cat sat"), Params(max_tokens=12, stop=[word]))
    deltas = [v for k, v in req.events() if k == "delta"]
    assert req.finish_reason == "stop" and "".join(deltas) == req.text == full[: full.find(word)]
    assert req.tokens and len(req.tokens) < 12
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        eng.submit(eng.encode("hello"), Params(max_tokens=300))
    # Streaming never sends a tail that could still start a stop string, nor the last (unsettled) word.
    assert _stream_cut("a b Us", ["\nUser:"], False) == 3
    assert _stream_cut("a b\nUs", ["\nUser:"], False) == 3
    assert _stream_cut("a b\nUs", ["\nUser:"], True) == 6
    blocked = Engine(model, tok, max_queue=1)
    blocked._thread = object()  # no worker: requests stay queued
    blocked.submit([1, 5], Params())
    with pytest.raises(QueueFull, match="queue is full"):
        blocked.submit([1, 5], Params())


@pytest.fixture(scope="module")
def server(tok):
    from tunelab.serve.server import create_app

    model = perturbed("lora", r=2)
    engine = Engine(model, tok, max_batch=4, batch_wait_ms=20, max_queue=16)
    app = create_app(engine, "tiny", api_key=KEY, max_tokens_limit=64)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    yield url, engine, model
    srv.should_exit = True
    th.join(10)


def client(url, key=KEY):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


def chat_prompt(tok, text):
    return render_chat(tok, [{"role": "user", "content": text}])[0]


def test_chat_and_completions(server, tok):
    url, engine, model = server
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    want = generate(model, tok, [chat_prompt(tok, "hello")], max_new_tokens=8)[0]
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == len(engine.encode(chat_prompt(tok, "hello")))
    parts = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                      temperature=0, stream=True, stream_options={"include_usage": True})
    parts = list(parts)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want
    assert parts[-2].choices[0].finish_reason == "length" and parts[-1].usage.completion_tokens == 8
    want = generate(model, tok, ["John visited"], max_new_tokens=6)[0]
    r = c.completions.create(model="tiny", prompt="John visited", max_tokens=6, temperature=0)
    assert r.choices[0].text.strip() == want and r.usage.completion_tokens == 6
    s = c.completions.create(model="tiny", prompt="John visited", max_tokens=6, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in s).strip() == want
    # Sampling with a seed is reproducible.
    a, b = (c.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=1.0, top_p=0.9, seed=3)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_four_concurrent_streams_are_batched(server, tok):
    url, engine, model = server
    want = generate(model, tok, [chat_prompt(tok, p) for p in PROMPTS], max_new_tokens=10)
    before = dict(engine.stats)
    engine.wait_s = 5.0  # a wide window: the batch closes as soon as all 4 are in (max_batch=4)
    results, errors = [None] * 4, []

    def one(i):
        try:
            s = client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[i]}],
                                                    max_tokens=10, temperature=0, stream=True)
            results[i] = "".join(p.choices[0].delta.content or "" for p in s)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine.wait_s = 0.02
    assert not errors and results == want
    assert engine.stats["requests"] - before["requests"] == 4
    assert engine.stats["batches"] - before["batches"] == 1 and engine.stats["max_batch"] == 4


def post(url, body: bytes | str, key=KEY):
    req = urllib.request.Request(url, data=body.encode() if isinstance(body, str) else body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("path,body,status,needle", [
    ("chat/completions", "{not json", 400, "not valid JSON"),
    ("chat/completions", '{"model": "tiny"}', 400, "messages: Field required"),
    ("chat/completions", '{"model": "tiny", "messages": []}', 400, "messages: List should have at least 1 item"),
    ("chat/completions", '{"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}', 400, "messages.0.role"),
    ("chat/completions", '{"model": "tiny", "messages": [{"role": "user"}]}', 400, "messages.0.content"),
    ("chat/completions", '{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404, "'gpt-4' is not served"),
    ("chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens"),
    ("chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}', 400, "above this server's limit of 64"),
    ("chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n=2"),
    ("chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}', 400, "temperature"),
    ("chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', 400, "'tools' is not supported"),
    ("completions", '{"model": "tiny", "prompt": ["a", "b"]}', 400, "give one prompt"),
    ("completions", '{"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
])
def test_bad_requests_get_clear_4xx(server, path, body, status, needle):
    url = server[0]
    code, err = post(f"{url}/{path}", body)
    assert code == status, err
    assert needle in err["error"]["message"], err


def test_api_key_is_enforced(server):
    url = server[0]
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    code, err = post(f"{url}/completions", '{"model": "tiny", "prompt": "hi"}', key="")
    assert code == 401 and "API key" in err["error"]["message"] and KEY not in json.dumps(err)


def test_serve_command_binds_loopback_and_reads_key_from_env(tmp_path, tok, monkeypatch):
    from typer.testing import CliRunner

    import tunelab.serve.server as server_mod
    from tunelab.cli import app

    model_dir = tmp_path / "base"
    tiny_llama().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    seen = {}
    monkeypatch.setattr(server_mod, "serve", lambda app_, host, port: seen.update(app=app_, host=host, port=port))
    res = CliRunner().invoke(app, ["serve", str(model_dir), "--threads", "1"], env={"TUNELAB_API_KEY": KEY})
    assert res.exit_code == 0, res.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000
    assert "http://127.0.0.1:8000/v1" in res.output and "API key required" in res.output and KEY not in res.output
    from fastapi.testclient import TestClient

    with TestClient(seen["app"]) as http:
        assert http.get("/v1/models").status_code == 401
        r = http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert [m["id"] for m in r.json()["data"]] == [str(model_dir)]
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "nope" in res.output and "Traceback" not in res.output


def test_full_queue_gets_429_and_long_prompt_400(tok):
    from fastapi.testclient import TestClient

    from tunelab.serve.server import create_app

    engine = Engine(tiny_llama(), tok, max_queue=1)
    engine._thread = object()  # no worker: what is queued stays queued
    http = TestClient(create_app(engine, "tiny", max_tokens_limit=64))
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
    engine.submit(engine.encode("hello"), Params(max_tokens=4))
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={**body, "prompt": "the cat " * 200, "max_tokens": 64})
    assert r.status_code == 400 and "exceeds the model's context of 256" in r.json()["error"]["message"]
