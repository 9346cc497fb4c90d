"""Sampling strategies for `rlgen sample --sampler NAME` and `rlgen eval --sampler NAME`.

A sampler is `fn(engine, prompts, params, generator=None, **options) -> Rollouts` with one output row per
input prompt; all of them go through the same rollout engine as training.

Options a sampler declares as named parameters are its options (`--sampler-opt KEY=VALUE`); three
names are reserved and passed by the caller instead:

- `rewards`: the guide (a RewardSet built from `--sampler-reward`); its `score()` (combined, shaped) ranks samples.
  A sampler whose `rewards` parameter has no default needs a guide, and the CLI says so before loading
  anything when none is given.
- `records`: the input records aligned with `prompts`, so the guide sees fields such as `answer`.
- `stats`: a dict the sampler may fill with diagnostics (counts; the CLI sums them over batches).

An option annotated `Annotated[int, Bounds(...)]` (rlgen.config's COUNT, PROBABILITY ...) has its range
checked by `check_sampler` (rlgen.extension.check_options) before any model loads; every numeric option must
be finite.

A catch-all `**_` means "ignore what I do not use" (so `plain` takes no options); a catch-all with any
other name accepts every key. This is the old-style form of the sampler contract; the typed form takes a
`SampleRequest` (rlgen.rollout.contracts), and `call_sampler` / `check_sampler` handle both.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Callable, Literal

import torch

from rlgen.config import COUNT, PROBABILITY, parse_value
from rlgen.errors import RlgenError, show_value
from rlgen.extension import check_options, schema_of, takes
from rlgen.hookspecs import hookimpl
from rlgen.plugins import registry
from rlgen.rewards.base import RewardSet, RewardSpec
from rlgen.rollout.contracts import RESERVED, SampleRequest, option_skip, sampler_capabilities
from rlgen.rollout.engine import Rollouts, SamplingParams
from rlgen.models.sequences import pad_tokens


def plain(engine, prompts, params, generator=None, **_):
    """Ancestral sampling (temperature / top-p / top-k; temperature 0 = greedy)."""
    return engine.generate(prompts, params, generator)


# --- shared helpers --------------------------------------------------------------------------------

def _need_guide(name: str, rewards) -> None:
    if rewards is None:
        raise RlgenError(f"sampler '{name}' needs a guide reward: give --sampler-reward NAME")


def _check_int(name: str, key: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RlgenError(f"sampler '{name}': option '{key}' must be an integer >= {minimum}, got {show_value(value)}")


def _check_float(name: str, key: str, value, low: float | None = None, high: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bounds = f" in [{low}, {high}]" if low is not None and high is not None else f" >= {low}" if low is not None else ""
        raise RlgenError(f"sampler '{name}': option '{key}' must be a finite number{bounds}, got {show_value(value)}")


def guide_scores(rewards, samples: list[dict]) -> torch.Tensor:
    """The guide's score per sample [N] (float32: combined and shaped, as `RewardSet.score` gives it); NaN
    where the guide does not apply or a sample was skipped (rewards_on_error = skip)."""
    components, valid, totals = rewards.score(samples)
    totals = totals.float()
    every_nan = torch.isnan(components).all(dim=1) if components.shape[1] else torch.ones(len(samples), dtype=torch.bool)
    return totals.masked_fill(every_nan | ~valid, float("nan"))


def _samples(prompts: list[str], records, owner: list[int], texts: list[str], lengths: list[int]) -> list[dict]:
    """Reward inputs, one per row: the record of the row's prompt (`owner[row]` indexes `prompts`) plus
    the row's (partial) completion."""
    out = []
    for index, text, length in zip(owner, texts, lengths):
        base = dict(records[index]) if records is not None else {}
        base.update(prompt=prompts[index], completion=text, completion_tokens=length)
        out.append(base)
    return out


def _check_records(prompts, records) -> None:
    if records is not None and len(records) != len(prompts):
        raise RlgenError(f"sampler got {len(records)} records for {len(prompts)} prompts")


# --- best-of-n -------------------------------------------------------------------------------------

def best_rows(scores: torch.Tensor) -> torch.Tensor:
    """Per row of scores [B, n]: the column with the highest score; ties go to the first, NaN loses
    to any number (a row of NaN gives column 0)."""
    return torch.nan_to_num(scores.float(), nan=-math.inf).argmax(dim=1)  # argmax returns the first maximum


def best_of_n(engine, prompts, params, generator=None, *, rewards, records=None, n: Annotated[int, COUNT] = 8):
    """Draw n samples per prompt (one batched call, each prompt repeated n times so the engine prefills
    it once) and keep the one the guide scores highest (ties -> the first drawn)."""
    _need_guide("best-of-n", rewards)
    _check_int("best-of-n", "n", n, 1)
    _check_records(prompts, records)
    expanded = [p for p in prompts for _ in range(n)]
    owner = [i for i in range(len(prompts)) for _ in range(n)]
    drawn = engine.generate(expanded, params, generator)
    lengths = drawn.completion_mask.sum(dim=1).tolist()
    scores = guide_scores(rewards, _samples(prompts, records, owner, drawn.texts, lengths))
    pick = best_rows(scores.view(len(prompts), n))
    return drawn.select((torch.arange(len(prompts)) * n + pick).to(drawn.completion_ids.device))


# --- sequential Monte Carlo ------------------------------------------------------------------------
# "Sampling for Quality" style reward-guided SMC: K particles per prompt are extended block by block;
# after each block a particle's weight is multiplied by exp(lam * (Phi_t - Phi_{t-1})), Phi being the
# guide's score of the particle's current completion prefix, and the population is resampled when the
# effective sample size drops below ess_threshold * K. The three small functions below are the whole
# weighting / resampling math, on [B, K] tensors (one row per prompt).

def update_log_weights(log_weights: torch.Tensor, phi_prev: torch.Tensor, phi_new: torch.Tensor,
                       lam: float) -> torch.Tensor:
    """log w_t = log w_{t-1} + lam * (Phi_t - Phi_{t-1}); a NaN potential counts as 0."""
    return log_weights + lam * (torch.nan_to_num(phi_new, nan=0.0) - torch.nan_to_num(phi_prev, nan=0.0))


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS = (sum w)^2 / sum w^2 over the last dim, computed from log-weights (scale-free): K for
    equal weights, 1 when one particle holds all the weight."""
    w = torch.softmax(log_weights.double(), dim=-1)
    return (1.0 / (w * w).sum(dim=-1)).to(log_weights.dtype)


def draw_final(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One particle index per row [B], drawn in proportion to the weights (the SMC estimate of the tilted
    target is the weighted population, so a draw from it, not its heaviest member, is a sample of the
    target). A NaN or infinite log-weight counts as weight 0; a row with no finite weight draws uniformly."""
    log_weights = torch.nan_to_num(log_weights.double(), nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    hopeless = torch.isneginf(log_weights).all(dim=-1, keepdim=True)
    log_weights = log_weights.masked_fill(hopeless, 0.0)
    probs = torch.softmax(log_weights, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def resample_indices(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multinomial resampling: K ancestor indices per row drawn with replacement in proportion to the
    weights, sorted (so copies of one particle are consecutive and share their prompt prefix)."""
    probs = torch.softmax(log_weights.double(), dim=-1)
    return torch.multinomial(probs, log_weights.shape[-1], replacement=True, generator=generator).sort(dim=-1).values


SMC_PICKS = ("sample", "best")


def smc(engine, prompts, params, generator=None, *, rewards, records=None, particles: Annotated[int, COUNT] = 8,
        block_size: Annotated[int, COUNT] = 4, ess_threshold: Annotated[float, PROBABILITY] = 0.5, lam: float = 1.0,
        pick: Literal["sample", "best"] = "sample", stats: dict | None = None):
    """Reward-guided sequential Monte Carlo: `particles` partial completions per prompt, extended
    `block_size` tokens at a time at the sampling params' temperature, reweighted by exp(lam * increase of
    the guide score of the prefix) and multinomially resampled when ESS / particles < ess_threshold.

    The weights telescope to exp(lam * (Phi_final - Phi_empty)), so the final weighted population
    approximates the tilted target p(y | prompt) * exp(lam * r(y)), r being the guide's score of the whole
    completion. Returned per prompt: `pick="sample"` (default) one particle drawn in proportion to its
    final weight with `generator` (a draw from that target, exact as particles -> infinity);
    `pick="best"` the particle whose complete completion the guide scores highest (ties -> the first
    particle, NaN loses), a best-of-particles choice that is not a draw from the target."""
    name = "smc"
    _need_guide(name, rewards)
    if pick not in SMC_PICKS:
        raise RlgenError(f"sampler 'smc': option 'pick' must be one of {', '.join(SMC_PICKS)}, got {show_value(pick)}")
    _check_int(name, "particles", particles, 1)
    _check_int(name, "block_size", block_size, 1)
    _check_float(name, "ess_threshold", ess_threshold, 0.0, 1.0)
    _check_float(name, "lam", lam)
    _check_records(prompts, records)
    batch, k = len(prompts), particles
    total = batch * k
    owner = [i for i in range(batch) for _ in range(k)]  # particle p belongs to prompt p // k
    tokens: list[list[int]] = [[] for _ in range(total)]
    texts = [""] * total
    finished = [params.max_new_tokens <= 0] * total
    stopped = [False] * total  # ended with a stop token (else truncated at max_new_tokens)
    phi = guide_scores(rewards, _samples(prompts, records, owner, texts, [0] * total))  # Phi_0 of the empty prefix
    log_w = torch.zeros(batch, k)
    steps = resamplings = 0
    while not all(finished):
        active = [p for p in range(total) if not finished[p]]
        # Unfinished particles have all produced the same number of tokens (a block ends early only at a
        # stop token), so one budget fits all: no particle ever exceeds params.max_new_tokens.
        budget = params.max_new_tokens - max(len(tokens[p]) for p in active)
        block = dataclasses.replace(params, max_new_tokens=min(block_size, budget))
        # The prefix goes back in as text: prompt + decoded partial completion, re-tokenised by the engine.
        # For character-level tokenizers (tiny-arith) that is exactly the sampled sequence; for BPE tokenizers
        # the re-encoding may split the prefix differently from the tokens that were sampled, so the model
        # conditions on an equivalent text but possibly different token boundaries. The returned token ids
        # are always the sampled ones.
        out = engine.generate([prompts[owner[p]] + texts[p] for p in active], block, generator)
        block_ids, block_mask = out.completion_ids.tolist(), out.completion_mask.tolist()
        truncated = out.truncated.tolist()
        for row, p in enumerate(active):
            tokens[p].extend(t for t, m in zip(block_ids[row], block_mask[row]) if m)
            stopped[p] = not truncated[row]
            finished[p] = stopped[p] or len(tokens[p]) >= params.max_new_tokens
        new_texts = _decode(engine, [tokens[p] for p in active], [texts[p] + out.texts[row] for row, p in enumerate(active)])
        for row, p in enumerate(active):
            texts[p] = new_texts[row]
        index = torch.tensor(active)
        phi_new = phi.clone()
        phi_new[index] = guide_scores(rewards, _samples(prompts, records, [owner[p] for p in active],
                                                        [texts[p] for p in active], [len(tokens[p]) for p in active]))
        log_w = update_log_weights(log_w, phi.view(batch, k), phi_new.view(batch, k), lam)  # finished: increment 0
        phi = phi_new
        steps += 1
        live = torch.tensor([not all(finished[i * k:(i + 1) * k]) for i in range(batch)])
        low = (effective_sample_size(log_w) < ess_threshold * k) & live  # a finished population is not resampled
        rows = low.nonzero().flatten()
        if rows.numel():  # all low rows at once (one multinomial call): the loop is per particle, not per row
            sources = (resample_indices(log_w[rows], generator) + rows[:, None] * k).flatten()
            targets = (rows[:, None] * k + torch.arange(k)).flatten()
            source_list, target_list = sources.tolist(), targets.tolist()
            # each copy gets its own token list: the particles are extended independently afterwards
            copied = [[list(tokens[a]) for a in source_list]]
            copied += [[state[a] for a in source_list] for state in (texts, finished, stopped)]
            for state, values in zip((tokens, texts, finished, stopped), copied):
                for target, value in zip(target_list, values):
                    state[target] = value
            phi[targets] = phi[sources]
            log_w[rows] = 0.0
            resamplings += int(rows.numel())
    if stats is not None:
        stats["smc_steps"] = stats.get("smc_steps", 0) + steps
        stats["smc_resamplings"] = stats.get("smc_resamplings", 0) + resamplings
        stats["smc_prompts"] = stats.get("smc_prompts", 0) + batch
    # phi holds each particle's score of its complete completion now that every particle has finished
    chosen = draw_final(log_w, generator) if pick == "sample" else best_rows(phi.view(batch, k))
    picked = [i * k + int(c) for i, c in enumerate(chosen.tolist())]
    return _build_rollouts(engine, prompts, [tokens[p] for p in picked], [stopped[p] for p in picked],
                           [texts[p] for p in picked])


def _decode(engine, token_lists: list[list[int]], fallback: list[str]) -> list[str]:
    """Completion texts of token lists, the way the engine decodes its own output (when it can)."""
    decode = getattr(engine, "decode", None)
    if decode is None or not token_lists:
        return fallback
    ids, mask = pad_tokens(token_lists, getattr(engine, "pad_id", 0), left=False)
    return decode(ids, mask)


def _build_rollouts(engine, prompts, token_lists, stopped, texts) -> Rollouts:
    """Rollouts for completions given as sampled token lists (stop token included where one ended it)."""
    if hasattr(engine, "encode_prompts"):
        prompt_ids, prompt_mask = engine.encode_prompts(list(prompts))
    else:  # an engine without encode_prompts: let it tell us the prompt encoding
        probe = engine.generate(list(prompts), SamplingParams(max_new_tokens=0))
        prompt_ids, prompt_mask = probe.prompt_ids, probe.prompt_mask
    # on the prompts' device (the model's): the rollouts' tensors live together
    completion_ids, completion_mask = (t.to(prompt_ids.device) for t in pad_tokens(token_lists, getattr(engine, "pad_id", 0), left=False))
    truncated = torch.tensor([not s for s in stopped], dtype=torch.bool, device=prompt_ids.device)
    return Rollouts(list(prompts), prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, list(texts))


# --- options: checking and calling ----------------------------------------------------------------

def sampler_parameters(fn: Callable) -> tuple[dict, bool]:
    """(named options and reserved keys after the inputs, whether any other key is accepted)."""
    schema = schema_of(fn, option_skip(fn))
    return schema.options, schema.open_ended


def parse_sampler_options(items: list[str] | None) -> dict:
    """`--sampler-opt KEY=VALUE` items -> {key: value}, values read as TOML scalars."""
    options: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RlgenError(f"--sampler-opt expects KEY=VALUE, got '{item}'")
        options[key] = parse_value(value.strip())
    return options


def check_sampler(name: str, fn: Callable, options: dict, has_guide: bool, kind: str = "sampler") -> None:
    """Unknown or reserved option keys, values of the wrong type or out of range (every number must be finite),
    and a missing guide, as one-line errors (before any model is loaded)."""
    reserved = {key: " (use --sampler-reward)" if key == "rewards" else " (the caller gives it)" for key in RESERVED}
    check_options(kind, name, fn, options, skip=option_skip(fn), reserved=reserved)
    if sampler_capabilities(fn).needs_guide and not has_guide:
        raise RlgenError(f"{kind} '{name}' needs a guide reward: give --sampler-reward NAME")


def prepare_sampler(name: str, option_items: list[str] | None, reward_specs: list[str] | None, kind: str = "sampler"):
    """(sampler function, options, guide RewardSet or None) from the CLI's --sampler, --sampler-opt and
    --sampler-reward, checked before any model is loaded; kind "image-sampler" for diffusers pipelines."""
    fn = registry(kind).get(name)
    options = parse_sampler_options(option_items)
    check_sampler(name, fn, options, has_guide=bool(reward_specs), kind=kind)
    guide = RewardSet([RewardSpec.parse(spec) for spec in reward_specs]) if reward_specs else None
    return fn, options, guide


def call_sampler(fn: Callable, engine, prompts, params, generator=None, *, rewards=None, records=None,
                 stats: dict | None = None, options: dict | None = None) -> Rollouts:
    """Call a sampler of either form: the typed one with a SampleRequest, the old one with its options plus
    whichever of rewards / records / stats it declares."""
    if takes(fn, SampleRequest):
        return fn(SampleRequest(engine, list(prompts), params, generator, rewards, records, stats), **(options or {}))
    named, open_ended = sampler_parameters(fn)
    extra = {key: value for key, value in (("rewards", rewards), ("records", records), ("stats", stats))
             if key in named or open_ended}
    return fn(engine, prompts, params, generator, **extra, **(options or {}))


@hookimpl
def register_samplers(register):
    register("plain", plain)
    register("best-of-n", best_of_n, "best of n samples per prompt under the --sampler-reward guide (option n=8)")
    register("smc", smc, "reward-guided sequential Monte Carlo over blocks of tokens (particles=8, block_size=4, "
                         "ess_threshold=0.5, lam=1.0, pick=sample|best)")
