"""Write a small preference set for examples/preference_smollm2.yaml: sums whose chosen answer is right
and whose rejected answer is wrong (off by 1 to 10). Train and dev use disjoint (a, b) pairs.

    python examples/write_preference_pairs.py            # -> examples/data/preference_{train,dev}.jsonl
"""

import json
import random
import sys
from pathlib import Path


def pairs(n: int, rng: random.Random, taken: set) -> list[dict]:
    rows = []
    while len(rows) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (a, b) in taken:
            continue
        taken.add((a, b))
        wrong = a + b + rng.choice([-1, 1]) * rng.randint(1, 10)
        rows.append({"prompt": f"What is {a} + {b}? Answer with the number only.", "chosen": str(a + b), "rejected": str(wrong)})
    return rows


def main(out: Path) -> None:
    rng, taken = random.Random(0), set()
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 480), ("dev", 120)):
        path = out / f"preference_{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in pairs(n, rng, taken)))
        print(f"{path}: {n} pairs")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "data")
