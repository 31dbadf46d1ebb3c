"""The demo: fine-tune the embedded SmolLM2 on a small sentiment set tunelab writes itself.

The reviews are composed from phrase lists with a fixed seed (no copied data): plain praise and
complaints, negated phrases ("not exactly thrilling"), and contrast clauses whose second half
decides ("the first act drags, but the ending is wonderful"), so the zero-shot model has room to
improve.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ["the film", "this movie", "the story", "the acting", "the script", "the soundtrack", "the direction",
            "the cast", "the ending", "the dialogue", "the pacing", "the cinematography"]
GOOD = ["wonderful", "moving", "brilliant", "a joy to watch", "gripping", "beautifully made", "sharp and funny",
        "touching", "superb", "delightful", "clever", "genuinely thrilling"]
BAD = ["dull", "a mess", "tedious", "painfully slow", "lifeless", "forgettable", "clumsy", "boring", "awful",
       "a waste of time", "flat", "annoying"]
NOT_GOOD = ["not exactly thrilling", "hardly memorable", "far from clever", "never really moving", "not funny at all"]
NOT_BAD = ["not bad at all", "far from boring", "never dull", "hardly a waste of time", "not as slow as I feared"]


def _review(rng: random.Random, label: int) -> str:
    s1, s2 = rng.sample(SUBJECTS, 2)
    kind = rng.random()
    if kind < 0.4:
        word = rng.choice(GOOD if label else BAD)
        return f"{s1.capitalize()} is {word}."
    if kind < 0.7:
        word = rng.choice(NOT_BAD if label else NOT_GOOD)
        return f"{s1.capitalize()} is {word}."
    first, second = (rng.choice(BAD), rng.choice(GOOD)) if label else (rng.choice(GOOD), rng.choice(BAD))
    return f"{s1.capitalize()} is {first}, but {s2} is {second}."


def write_data(directory: str | Path, n_train: int = 400, n_eval: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``dev.jsonl`` ({"sentence", "label"}) with no sentence in both."""
    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_eval:
        label = len(rows) % 2
        text = _review(rng, label)
        if text not in seen:
            seen.add(text)
            rows.append({"sentence": text, "label": label})
    rng.shuffle(rows)
    paths = directory / "train.jsonl", directory / "dev.jsonl"
    for path, part in zip(paths, (rows[:n_train], rows[n_train:]), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths
