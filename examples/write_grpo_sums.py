"""Write the data of examples/grpo_sums.yaml: sums of two numbers from 1 to 30 with numeric answers, in three forms so
GRPO, SFT and DPO train on the same questions (train and dev use disjoint (a, b) pairs):

- ``grpo_sums_{train,dev}.jsonl``: ``prompt`` and ``answer`` (the ``rl`` task; the reward checks the number);
- ``grpo_sums_sft_train.jsonl``: ``instruction`` and ``output`` = the right answer (the ``generation`` task);
- ``grpo_sums_pairs_train.jsonl``: ``prompt``, ``chosen`` = right, ``rejected`` = off by 1 to 10 (``preference``).

    python examples/write_grpo_sums.py                 # -> examples/data/
    python examples/write_grpo_sums.py --out DIR --train 480 --dev 120 --low 10 --high 99   # two-digit sums
"""

import argparse
import json
import random
from pathlib import Path


def questions(n: int, rng: random.Random, taken: set, low: int, high: int) -> list[tuple[int, int]]:
    if (high - low + 1) ** 2 < n + len(taken):
        raise SystemExit(f"--low {low} --high {high} give {(high - low + 1) ** 2} distinct sums; {n + len(taken)} asked")
    out = []
    while len(out) < n:
        a, b = rng.randint(low, high), rng.randint(low, high)
        if (a, b) not in taken:
            taken.add((a, b))
            out.append((a, b))
    return out


def prompt(a: int, b: int) -> str:
    return f"What is {a} + {b}? Answer with the number only."


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{path}: {len(rows)} rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data", help="output folder")
    ap.add_argument("--train", type=int, default=480, help="training questions")
    ap.add_argument("--dev", type=int, default=120, help="held-out questions")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--low", type=int, default=1, help="smallest operand")
    ap.add_argument("--high", type=int, default=30, help="largest operand")
    args = ap.parse_args()
    rng, taken = random.Random(args.seed), set()
    args.out.mkdir(parents=True, exist_ok=True)
    train = questions(args.train, rng, taken, args.low, args.high)
    dev = questions(args.dev, rng, taken, args.low, args.high)
    write(args.out / "grpo_sums_train.jsonl", [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in train])
    write(args.out / "grpo_sums_dev.jsonl", [{"prompt": prompt(a, b), "answer": str(a + b)} for a, b in dev])
    write(args.out / "grpo_sums_sft_train.jsonl", [{"instruction": prompt(a, b), "output": str(a + b)} for a, b in train])
    write(args.out / "grpo_sums_pairs_train.jsonl", [
        {"prompt": prompt(a, b), "chosen": str(a + b), "rejected": str(a + b + rng.choice([-1, 1]) * rng.randint(1, 10))}
        for a, b in train])


if __name__ == "__main__":
    main()
