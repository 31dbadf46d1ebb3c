"""Load a running ``tunelab serve``: requests/s and generated tokens/s with C concurrent clients.

    tunelab serve runs/demo/lora --threads 2 &
    python bench/serve_load.py --url http://127.0.0.1:8000/v1 --model runs/demo/lora --clients 1,4

Each client sends ``--requests`` streaming chat completions one after another (greedy, ``--max-tokens``
each, prompts varied per request) with the official openai client; tokens are the server's usage counts.
"""

from __future__ import annotations

import argparse
import json
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

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)
        for k in range(requests):
            try:
                s = c.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": PROMPTS[(i + k * clients) % len(PROMPTS)]}],
                    max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True})
                for chunk in s:
                    if chunk.usage:
                        tokens[i] += chunk.usage.completion_tokens
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
            "batches": after["batches"] - before["batches"], "largest_batch": after["max_batch"], "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", default="1,4")
    ap.add_argument("--requests", type=int, default=4, help="per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--api-key", default="none")
    a = ap.parse_args()
    for c in (int(x) for x in a.clients.split(",")):
        print(json.dumps(load(a.url, a.model, c, a.requests, a.max_tokens, a.api_key)), flush=True)


if __name__ == "__main__":
    main()
