"""rlgen-example: a template third-party rlgen plugin that registers one item of every hook kind.

rlgen finds this module through the entry point in pyproject.toml (`[project.entry-points.rlgen]`)
and calls the functions marked `@hookimpl` below. Each hook gets a `register(name, item,
description="")` callable; call it once per item you provide (`register_commands` gets the typer app
instead). The first line of an item's docstring is its description in `rlgen plugins` unless you
pass one.

Keep this module's top level light: rlgen imports every plugin to build `rlgen --help`, so heavy
imports (torch, rlgen's trainers ...) live inside the hook functions and the submodules they import.
The contract of each kind is written next to its item:

    reward, advantage estimator ........ this module
    policy loss, preference loss, algorithm .. rlgen_example.training
    a trainer built from public parts .. rlgen_example.raft
    reward combiner, reward shaping, metric .. rlgen_example.scoring
    tracker ............................ rlgen_example.tracking
    sampler, image sampler ............. rlgen_example.sampling
    merger ............................. rlgen_example.merging
    task, model alias, backbone alias .. rlgen_example.data
    command ............................ rlgen_example.commands
"""
from __future__ import annotations

from rlgen.hookspecs import hookimpl

__version__ = "0.2.0"


# --- a reward -------------------------------------------------------------------------------------
# Contract: fn(samples, **options) -> list[float | None], one value per sample, where each sample is
# a dict with 'prompt', 'completion' and the dataset's fields ('answer', ...). Return None where the
# reward does not apply: rlgen skips it for that sample instead of counting it as 0.


def digit_overlap(samples, **_):
    """Partial credit: fraction of the answer's characters the completion matches position by position."""
    out = []
    for sample in samples:
        if sample.get("answer") is None:
            out.append(None)  # nothing to compare against
            continue
        answer = str(sample["answer"]).strip()
        completion = str(sample["completion"]).strip()
        # Divide by the longer string so trailing junk after a right prefix costs credit and only an
        # exact match scores 1.0: '42' vs answer '42' -> 1.0, '45' -> 0.5, '42xx' -> 0.5.
        longest = max(len(answer), len(completion))
        if longest == 0:
            out.append(1.0)  # both empty
            continue
        matched = sum(a == c for a, c in zip(answer, completion))
        out.append(matched / longest)
    return out


# Rewards that say whether an answer is *right* set is_correctness = True (their mean is reported as
# `accuracy`). Partial credit is not correctness.
digit_overlap.is_correctness = False


# --- an advantage estimator -----------------------------------------------------------------------
# Contract: fn(rewards, **kwargs) -> Tensor. `rewards` is the weighted total reward shaped
# [num_groups, group_size] (one row per prompt); return advantages of the same shape. rlgen passes
# extra keyword arguments (components, weights, scale_rewards, ...): accept and ignore what you don't use.


def rank(rewards, **_):
    """Rank-based: each completion's centred rank within its group, in [-1, 1]; ties share their average rank."""
    import torch

    group_size = rewards.shape[1]
    if group_size < 2:
        return torch.zeros_like(rewards)
    # Pairwise comparisons within each group: [num_groups, group_size (i), group_size (j)].
    below = (rewards.unsqueeze(1) < rewards.unsqueeze(2)).sum(dim=2)  # how many j have r_j < r_i
    equal = (rewards.unsqueeze(1) == rewards.unsqueeze(2)).sum(dim=2)  # how many j have r_j == r_i (i included)
    ranks = below + (equal - 1) / 2  # 0-based average rank: 0 = worst, group_size - 1 = best
    # Centre on the mean rank (group_size - 1) / 2 and scale to [-1, 1].
    return (2 * ranks - (group_size - 1)) / (group_size - 1)


# --- the hooks ------------------------------------------------------------------------------------
# Names are global across rlgen and every installed plugin: a name that is already taken is dropped
# (with a warning naming both packages; built-ins keep theirs), so every name here starts "example-"
# (the two oldest items excepted).


@hookimpl
def register_rewards(register):
    register("digit-overlap", digit_overlap)


@hookimpl
def register_advantage_estimators(register):
    register("rank", rank)


@hookimpl
def register_policy_losses(register):
    from rlgen_example import training

    register("example-unclipped", training.unclipped_surrogate)


@hookimpl
def register_preference_losses(register):
    from rlgen_example import training

    register("example-ref-free", training.reference_free_sigmoid)


@hookimpl
def register_algorithms(register):
    from rlgen_example import training

    register("example-grpo", training.example_grpo())
    from rlgen_example import raft  # a trainer of its own, built from rlgen.api's parts

    register("example-raft", raft.example_raft())


@hookimpl
def register_reward_combiners(register):
    from rlgen_example import scoring

    register("example-max", scoring.maximum)


@hookimpl
def register_reward_shapings(register):
    from rlgen_example import scoring

    register("example-affine", scoring.affine)


@hookimpl
def register_metrics(register):
    from rlgen_example import scoring

    register("example-well-formed", scoring.well_formed)


@hookimpl
def register_trackers(register):
    from rlgen_example import tracking

    register("example-jsonl", tracking.JsonlTracker)


@hookimpl
def register_samplers(register):
    from rlgen_example import sampling

    register("example-cooled", sampling.cooled)


@hookimpl
def register_image_samplers(register):
    from rlgen_example import sampling

    register("example-plain", sampling.plain_images)


@hookimpl
def register_mergers(register):
    from rlgen_example import merging

    register("example-mean", merging.MEAN)


@hookimpl
def register_tasks(register):
    from rlgen_example import data

    register(data.DOUBLING.name, data.DOUBLING)


@hookimpl
def register_models(register):
    from rlgen_example import data

    register("example-tiny", data.tiny_arith_dir(), "the built-in tiny-arith model under another name")


@hookimpl
def register_backbones(register):
    from rlgen_example import data

    register("example-causal-lm", data.CausalLMAlias(), "the built-in causal-lm backbone under another name")


@hookimpl
def register_commands(app):
    from rlgen_example import commands

    app.command("example-hello")(commands.hello)
