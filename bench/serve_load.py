"""Load a running ``tunelab serve``: requests/s and generated tokens/s with C concurrent clients.

    tunelab serve runs/demo/lora --threads 2 &
    python bench/serve_load.py --url http://127.0.0.1:8000/v1 --model runs/demo/lora --clients 1,4

Each client sends ``--requests`` streaming chat completions one after another (greedy, ``--max-tokens``
each, prompts varied per request) with the official openai client; tokens are the server's usage counts.

``--hostile N`` adds two rows: N normal clients alone, then the same N beside one hostile client that
keeps sending what must fail alone (a body announced as 10 MB, a seed of 2**70, a lone surrogate, a NaN
temperature, text/plain, stream "yes"), bounded by the normal clients' run. The normal clients' latency
(mean, p95) and answers are reported side by side; ``answers_unchanged`` compares them (greedy decoding).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
import urllib.request

import openai

PROMPTS = ["Write one sentence about the sea.", "Name three fruits.", "What is a good name for a cat?",
           "Describe a rainy day in a sentence.", "Give me a short tip for sleeping well.", "What is 12 plus 30?"]


def stats(url: str) -> dict:
    with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/stats") as r:
        return json.loads(r.read())


def load(url: str, model: str, clients: int, requests: int, max_tokens: int, key: str) -> dict:
    tokens, errors = [0] * clients, []
    latencies, answers = [], {}

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
        for k in range(requests):
            try:
                t_req, text = time.perf_counter(), []
                s = c.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": PROMPTS[(i + k * clients) % len(PROMPTS)]}],
                    max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
                for chunk in s:
                    if chunk.usage:
                        tokens[i] += chunk.usage.completion_tokens
                    if chunk.choices:
                        text.append(chunk.choices[0].delta.content or "")
                latencies.append(time.perf_counter() - t_req)
                answers[(i, k)] = "".join(text)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    before = stats(url)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = stats(url)
    n = clients * requests
    return {"clients": clients, "requests": n, "wall_s": round(wall, 2), "requests_per_s": round(n / wall, 3),
            "tokens_per_s": round(sum(tokens) / wall, 1), "completion_tokens": sum(tokens),
            "batches": after["batches"] - before["batches"], "largest_batch": after["max_batch"], "errors": errors,
            "latency_mean_s": round(statistics.mean(latencies), 3) if latencies else None,
            "latency_p95_s": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
            "answers": answers}


def _raw_post(url: str, body: bytes, ctype: str = "application/json", announce: int | None = None) -> int:
    """POST ``body`` to ``url`` over a plain socket (Content-Length ``announce`` or its length); the status."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, port = host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\nConnection: close\r\n"
                     f"Content-Length: {announce or len(body)}\r\n\r\n".encode() + body)
        head = sock.recv(65536)
    return int(head.split()[1]) if head else 0


def hostile(url: str, model: str, stop: threading.Event, key: str) -> dict:
    """One client sending bad requests in a loop until ``stop``: how many of each, and the statuses."""
    chat = f"{url}/chat/completions"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    attacks = [
        ("10MB body", lambda: _raw_post(chat, b'{"model": "' + b"a" * 65536, announce=10_000_000)),
        ("seed 2**70", lambda: _raw_post(chat, json.dumps({**body, "seed": 2**70, "temperature": 1}).encode())),
        ("lone surrogate", lambda: _raw_post(chat, json.dumps({**body, "messages": [{"role": "user", "content": "a\ud800b"}]}).encode())),
        ("NaN temperature", lambda: _raw_post(chat, json.dumps({**body, "temperature": float("nan")}).encode())),
        ("text/plain", lambda: _raw_post(chat, json.dumps(body).encode(), ctype="text/plain")),
        ('stream "yes"', lambda: _raw_post(chat, json.dumps({**body, "stream": "yes"}).encode())),
    ]
    seen: dict = {}
    k = 0
    while not stop.is_set() and k < 2000:
        name, send = attacks[k % len(attacks)]
        try:
            status = send()
        except OSError as e:
            status = type(e).__name__
        seen.setdefault(name, {}).setdefault(str(status), 0)
        seen[name][str(status)] += 1
        k += 1
        time.sleep(0.05)
    return seen


def hostile_rows(url: str, model: str, clients: int, requests: int, max_tokens: int, key: str) -> list[dict]:
    calm = load(url, model, clients, requests, max_tokens, key)
    stop, box = threading.Event(), {}
    t = threading.Thread(target=lambda: box.update(seen=hostile(url, model, stop, key)))
    t.start()
    try:
        rough = load(url, model, clients, requests, max_tokens, key)
    finally:
        stop.set()
        t.join()
    same = calm["answers"] == rough["answers"]
    rows = []
    for label, row in (("no hostile client", calm), ("one hostile client", rough)):
        row = {k: v for k, v in row.items() if k != "answers"}
        rows.append({"row": label, **row, "answers_unchanged": same if label != "no hostile client" else None})
    rows[1]["hostile_requests"] = box.get("seen", {})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--requests", type=int, default=4, help="per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--hostile", type=int, default=0, help="N normal clients alone, then beside one hostile client")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    a = ap.parse_args()
    rows = []
    if a.hostile:
        rows += hostile_rows(a.url, a.model, a.hostile, a.requests, a.max_tokens, a.api_key)
    else:
        for c in (int(x) for x in a.clients.split(",")):
            row = load(a.url, a.model, c, a.requests, a.max_tokens, a.api_key)
            rows.append({k: v for k, v in row.items() if k != "answers"})
    for row in rows:
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
