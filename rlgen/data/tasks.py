"""Built-in tasks with verifiable answers and fixed train / held-out splits.

Splits are generated from fixed seeds, so every install sees the same problems; held-out problems never
appear in the train split.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from rlgen.errors import RlgenError
from rlgen.hookspecs import hookimpl

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    build: Callable[[], dict[str, list[dict]]]
    default_rewards: tuple[str, ...] = ("exact-match",)
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def split(self, name: str) -> list[dict]:
        if name not in SPLITS:
            raise RlgenError(f"unknown split '{name}' for task '{self.name}' (known: {', '.join(SPLITS)})")
        if not self._cache:
            self._cache.update(self.build())
        return [dict(r) for r in self._cache[name]]


def _disjoint_splits(problems: list[tuple], make: Callable[[tuple], dict], n_test: int, n_train: int, seed: int):
    rng = random.Random(seed)
    rng.shuffle(problems)
    test = [make(p) for p in problems[:n_test]]
    train = [make(p) for p in problems[n_test : n_test + n_train]]
    return {"train": train, "test": test}


def _arithmetic() -> dict[str, list[dict]]:
    # Three-digit addition: hard enough that a tiny model is imperfect after short SFT.
    rng = random.Random(1234)
    seen: set[tuple[int, int]] = set()
    problems: list[tuple[int, int]] = []
    while len(problems) < 40_500:
        pair = (rng.randint(0, 999), rng.randint(0, 999))
        if pair not in seen:
            seen.add(pair)
            problems.append(pair)

    def make(p):
        a, b = p
        # Operands are zero-padded so that digits of equal place value line up for a char-level model.
        return {"prompt": f"{a:03d}+{b:03d}=", "answer": str(a + b)}

    return _disjoint_splits(problems, make, n_test=500, n_train=40_000, seed=1)


def _sorting() -> dict[str, list[dict]]:
    rng = random.Random(4321)
    seen: set[str] = set()
    problems: list[tuple[str]] = []
    while len(problems) < 20_500:
        length = rng.randint(4, 7)
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        if digits not in seen:
            seen.add(digits)
            problems.append((digits,))

    def make(p):
        return {"prompt": f"sort {p[0]}=", "answer": "".join(sorted(p[0]))}

    return _disjoint_splits(problems, make, n_test=500, n_train=20_000, seed=2)


def _apply(op: str, x: int, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def _countdown() -> dict[str, list[dict]]:
    # Reach the target with + - * over the given numbers (each used at most once).
    rng = random.Random(777)
    problems = []
    seen = set()
    while len(problems) < 10_500:
        nums = [rng.randint(1, 20) for _ in range(3)]
        a, b, c = nums
        op1, op2 = rng.choice("+-*"), rng.choice("+-*")
        target = _apply(op1, a, _apply(op2, b, c)) if op2 == "*" and op1 != "*" else _apply(op2, _apply(op1, a, b), c)
        key = (tuple(nums), target)
        if target < 0 or key in seen:
            continue
        seen.add(key)
        problems.append((nums, target, f"{a}{op1}{b}{op2}{c}"))

    def make(p):
        nums, target, solution = p
        return {
            "prompt": f"use {' '.join(map(str, nums))} to make {target}:",
            "answer": solution,
            "numbers": nums,
            "target": target,
        }

    return _disjoint_splits(problems, make, n_test=500, n_train=10_000, seed=3)


TASKS = (
    Task("arithmetic", "three-digit addition '042+917=' -> '959'", _arithmetic, ("exact-match",)),
    Task("sorting", "sort a string of 4-7 digits", _sorting, ("exact-match",)),
    Task("countdown", "reach a target with + - * over three numbers (1-20)", _countdown, ("countdown",)),
)


@hookimpl
def register_tasks(register):
    for task in TASKS:
        register(task.name, task, task.description)
