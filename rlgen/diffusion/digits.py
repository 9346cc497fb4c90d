"""scikit-learn's 8x8 handwritten digits: class names, prompt parsing, a fixed train / test split of the
images, and the `digits` prompt task that the tiny-digits image models are trained and evaluated on."""
from __future__ import annotations

import re
from functools import lru_cache

import torch

from rlgen.data.tasks import SPLITS, Task
from rlgen.errors import RlgenError
from rlgen.hookspecs import hookimpl

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

N_TEST = 297  # the last 297 of the fixed permutation; the first 1500 are the train split
SPLIT_SEED = 0

_WORD = re.compile(r"[a-z]+|\d+")


def parse_digit_prompt(text) -> int | None:
    """The digit class a prompt names ("3", "three", "a handwritten seven", "the digit 7.") or None when it
    names none, or more than one, or a multi-digit number ("13")."""
    found = []
    for token in _WORD.findall(str(text).lower()):
        if token.isdigit():
            # a multi-digit number is not a digit; it still counts as a mention, making the prompt ambiguous
            found.append(int(token) if len(token) == 1 else None)
        elif token in CLASS_NAMES:
            found.append(CLASS_NAMES.index(token))
    return found[0] if len(found) == 1 else None


@lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images [1797,1,8,8] in [0,1], labels [1797], the fixed permutation of the indices)."""
    from sklearn.datasets import load_digits  # imported late: the plugin is loaded by every command

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return images, labels, order


def split_indices(split: str) -> torch.Tensor:
    """Indices into scikit-learn's digits array of a split (train: 1500, test: 297; disjoint)."""
    if split not in SPLITS:
        raise RlgenError(f"unknown digits split '{split}' (known: {', '.join(SPLITS)})")
    order = _all_digits()[2]
    return order[: len(order) - N_TEST] if split == "train" else order[len(order) - N_TEST :]


def load_digit_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images FloatTensor [N,1,8,8] in [0,1], labels LongTensor [N]) of the 'train' or 'test' split."""
    index = split_indices(split)
    images, labels, _ = _all_digits()
    # fancy indexing copies, so callers may modify the result without touching the cache
    return images[index], labels[index]


def _digit_prompts() -> dict[str, list[dict]]:
    # Training prompts are the bare forms; the held-out phrasing checks that prompt parsing generalises.
    train = [{"prompt": p, "label": c} for c in range(10) for p in (str(c), CLASS_NAMES[c])]
    test = [{"prompt": f"the digit {CLASS_NAMES[c]}", "label": c} for c in range(10)]
    return {"train": train, "test": test}


DIGITS_TASK = Task(
    "digits",
    "prompts naming a handwritten digit (0-9) for the tiny-digits image models",
    _digit_prompts,
    ("digit-classifier",),
)


@hookimpl
def register_tasks(register):
    register(DIGITS_TASK.name, DIGITS_TASK, DIGITS_TASK.description)
