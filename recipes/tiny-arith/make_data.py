"""Step 2 of the tiny-arith recipe: SFT demonstrations for the arithmetic task's train split, written
by a "sloppy annotator" who forgets to carry in a fraction of the answers.

Why: the base model should be clearly imperfect in a way that RL with a verifiable reward can fix.
A model imitating these demonstrations learns both the right and the carry-free procedure, so its
greedy answers are often wrong while correct answers still appear among its samples.
"""
import argparse
import json
import random

from rlgen.api import task_records


def add_without_carry(a: int, b: int) -> int:
    digits, place = 0, 1
    while a or b:
        digits += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return digits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--sloppy", type=float, default=0.5, help="fraction of answers without carries")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with open(args.out, "w") as handle:
        for record in task_records("arithmetic", "train"):
            a, b = (int(x) for x in record["prompt"].rstrip("=").split("+"))
            answer = add_without_carry(a, b) if rng.random() < args.sloppy else a + b
            handle.write(json.dumps({"prompt": record["prompt"], "answer": str(answer)}) + "\n")


if __name__ == "__main__":
    main()
