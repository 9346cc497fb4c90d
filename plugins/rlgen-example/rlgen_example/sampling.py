"""Sampling parts: a text sampler and an image sampler."""
from __future__ import annotations

import dataclasses


# --- a sampler (`rlgen sample --sampler example-cooled --sampler-opt factor=0.5`) --------------------
# Contract: fn(engine, prompts, params, generator=None, **options) -> Rollouts, one row per prompt.
# engine is rlgen's rollout engine (engine.generate(prompts, params, generator) samples); params is
# rlgen.rollout.engine.SamplingParams (max_new_tokens, temperature, top_p, top_k). Named keyword
# parameters are the sampler's options (--sampler-opt KEY=VALUE); the names rewards (the guide),
# records (the input records) and stats (a dict for diagnostics) are passed by rlgen when declared.


def cooled(engine, prompts, params, generator=None, *, factor: float = 0.5):
    """Ancestral sampling at temperature x factor (option factor=0.5; factor=0 is greedy)."""
    if not 0.0 <= factor <= 1.0:
        from rlgen.errors import RlgenError

        raise RlgenError(f"sampler 'example-cooled': option 'factor' must be in [0, 1], got {factor}")
    return engine.generate(prompts, dataclasses.replace(params, temperature=params.temperature * factor), generator)


# --- an image sampler (`rlgen sample --model tiny-digits --sampler example-plain`) -------------------
# Contract: fn(model, prompts, params, generator, *, records, rewards, stats, **options) -> samples,
# on a diffusers pipeline; the same reserved names as text samplers. This one delegates to rlgen's
# own `plain` image sampler: a plugin may build on the built-in ones.


def plain_images(engine, prompts, params, generator=None, *, records=None, **_):
    """One image per prompt, as the built-in `plain` image sampler draws it."""
    from rlgen.rollout import image_search

    return image_search.plain(engine, prompts, params, generator, records=records)
