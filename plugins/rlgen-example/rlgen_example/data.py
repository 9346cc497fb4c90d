"""Data and model parts: a task, a model alias and a backbone alias."""
from __future__ import annotations

import random

from rlgen.data.tasks import Task


# --- a task (`--task example-doubling`) -----------------------------------------------------------
# Contract: an rlgen.data.tasks.Task(name, description, build, default_rewards). build() returns
# {"train": [...], "test": [...]} lists of records with at least `prompt` and, for verifiable tasks,
# `answer`; it runs once, on first use. default_rewards name the rewards that grade it (the first
# is the correctness reward behind `accuracy`). Keep the splits disjoint and seeded.


def _doubling():
    # x + x = 2x in tiny-arith's format (zero-padded three-digit operands): a sub-task of its training data.
    numbers = list(range(1000))
    random.Random(7).shuffle(numbers)

    def record(x):
        return {"prompt": f"{x:03d}+{x:03d}=", "answer": str(2 * x)}

    return {"test": [record(x) for x in numbers[:50]], "train": [record(x) for x in numbers[50:450]]}


DOUBLING = Task("example-doubling", "x + x for three-digit x (50 test, 400 train; rlgen-example)", _doubling)


# --- a model alias (`--model example-tiny`) ---------------------------------------------------------
# Contract: register(name, directory). The directory holds a model a backbone can load (config.json +
# safetensors + tokenizer for causal LMs). rlgen resolves names before paths.


def tiny_arith_dir():
    """The directory of rlgen's built-in tiny-arith model."""
    from rlgen.models.builtin import BUILTIN_DIR

    return BUILTIN_DIR / "tiny-arith"


# --- a backbone alias -------------------------------------------------------------------------------
# Contract: a backbone is the object that resolves, loads and saves one model family (see
# docs/plugins.md, "backbone"; the protocol is rlgen.models.backbone where it exists). This alias
# forwards every attribute to the built-in "causal-lm" backbone, looked up when first used (the
# registry is still being built while hooks run).


class CausalLMAlias:
    """The causal-lm backbone under the name example-causal-lm."""

    name = "example-causal-lm"
    description = "the built-in causal-lm backbone under another name (rlgen-example)"

    @property
    def target(self):
        from rlgen.plugins import registry

        return registry("backbone").get("causal-lm")

    def __getattr__(self, attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return getattr(self.target, attribute)
