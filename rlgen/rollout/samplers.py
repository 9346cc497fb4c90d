"""Sampling strategies for `rlgen sample --sampler NAME`. Each takes (engine, prompts, params, generator,
**options) and returns Rollouts; all of them go through the same rollout engine as training."""
from __future__ import annotations

from rlgen.hookspecs import hookimpl


def plain(engine, prompts, params, generator=None, **_):
    """Ancestral sampling (temperature / top-p / top-k; temperature 0 = greedy)."""
    return engine.generate(prompts, params, generator)


@hookimpl
def register_samplers(register):
    register("plain", plain)
