"""Make the unit-conversion SFT set: a skill the base model lacks, scored exactly.

The online merging demonstration (``scripts/online_merging_pipeline.py``) needs an SFT model that
differs from its base (``tau = SFT - base != 0``) by a skill a held-out set measures as accuracy,
so that the alignment tax of later preference training can be read off as lost accuracy.

The skill: convert a whole number of one unit into another and answer in one fixed line,
``"<n> <from> = <n * factor> <to>."`` (e.g. ``"7 hours = 420 minutes."``). SmolLM2-135M-Instruct
answers such questions with a paragraph of (often wrong) working, so the exact answer line is a
skill it does not have; the factors mix "append zeros" (x10, x100, x1000) with real products (x60,
x24, x12, x7, x3), so accuracy is not all-or-nothing.

Held out: the test set's (value, conversion) combinations never occur in training, so test
accuracy measures the conversion, not recall of a seen line. Deterministic for a given ``--seed``.

    python scripts/make_sft_data.py     # writes configs/data/sft_units_{train,test}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONVERSIONS = [
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("liters", "milliliters", 1000),
    ("meters", "centimeters", 100),
    ("centimeters", "millimeters", 10),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("feet", "inches", 12),
    ("weeks", "days", 7),
    ("yards", "feet", 3),
]
VALUES = range(2, 30)
QUESTIONS = [
    "Convert {n} {src} to {dst}.",
    "How many {dst} are in {n} {src}?",
    "{n} {src} is how many {dst}?",
    "What is {n} {src} in {dst}?",
]


def answer(n: int, src: str, dst: str, factor: int) -> str:
    """The one correct reply, in the fixed answer format."""
    return f"{n} {src} = {n * factor} {dst}."


def example(n: int, conversion: tuple[str, str, int], rng: random.Random) -> dict:
    src, dst, factor = conversion
    question = rng.choice(QUESTIONS).format(n=n, src=src, dst=dst)
    return {"prompt": question, "response": answer(n, src, dst, factor)}


def make(seed: int, n_train: int, n_test_combos: int) -> tuple[list[dict], list[dict]]:
    """``(train, test)``: train examples drawn from the combinations not held out for test."""
    rng = random.Random(seed)
    combos = [(n, c) for c in CONVERSIONS for n in VALUES]
    rng.shuffle(combos)
    test_combos, train_combos = combos[:n_test_combos], combos[n_test_combos:]
    test = [example(n, c, rng) for n, c in test_combos]
    train = [example(*rng.choice(train_combos), rng) for _ in range(n_train)]
    return train, test


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=800, help="training examples")
    parser.add_argument("--test", type=int, default=80, help="held-out (value, conversion) combinations")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "configs" / "data")
    args = parser.parse_args(argv)
    train, test = make(args.seed, args.train, args.test)
    write(args.output_dir / "sft_units_train.jsonl", train)
    write(args.output_dir / "sft_units_test.jsonl", test)
    print(f"wrote {len(train)} training and {len(test)} held-out examples to {args.output_dir}")


if __name__ == "__main__":
    main()
