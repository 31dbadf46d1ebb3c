"""Multi-turn chat data tunelab writes itself (for examples/chat_smollm2.yaml and tests).

A small arithmetic assistant: each conversation has 2-4 user turns that build on the previous answer
("What is 7 plus 5?" then "And times 3?"), and the assistant always answers in one fixed style
("7 plus 5 is 12." / "12 times 3 is 36."), sometimes after a system turn. Composed from number ranges
with a fixed seed (no copied data); train and eval conversations never share an opening question.

    python -m tunelab.data.demo_chat runs/chat-demo/data     # writes train.jsonl and dev.jsonl there
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
SYSTEM = "You are a calculator. Answer with one short sentence that repeats the operation."
FOLLOW = ["And {op} {b}?", "Now {op} {b}.", "What about {op} {b}?", "Then {op} {b}?"]


def conversation(rng: random.Random) -> list[dict]:
    a, b, op = rng.randint(2, 20), rng.randint(2, 12), rng.choice(list(OPS))
    msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    value = OPS[op](a, b)
    msgs += [{"role": "user", "content": f"What is {a} {op} {b}?"}, {"role": "assistant", "content": f"{a} {op} {b} is {value}."}]
    for _ in range(rng.randint(1, 3)):
        op, b = rng.choice(list(OPS)), rng.randint(2, 9)
        new = OPS[op](value, b)
        msgs += [{"role": "user", "content": rng.choice(FOLLOW).format(op=op, b=b)},
                 {"role": "assistant", "content": f"{value} {op} {b} is {new}."}]
        value = new
    return msgs


def write_chat(directory: str | Path, n_train: int = 400, n_eval: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``dev.jsonl`` ({"messages": [...]}) with no opening question in both."""
    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seen, rows = set(), []
    while len(rows) < n_train + n_eval:
        msgs = conversation(rng)
        first = next(m["content"] for m in msgs if m["role"] == "user")
        if first not in seen:
            seen.add(first)
            rows.append({"messages": msgs})
    paths = directory / "train.jsonl", directory / "dev.jsonl"
    for path, part in zip(paths, (rows[:n_train], rows[n_train:]), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


if __name__ == "__main__":
    for p in write_chat(sys.argv[1] if len(sys.argv) > 1 else "runs/chat-demo/data"):
        print(p)
