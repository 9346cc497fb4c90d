"""SMC decoding against an exactly computable target (issue 13, item 25).

A toy policy over the tokens a, b and a stop token (a Markov chain on the last token, at most 3 tokens)
gives every completion y an exact probability p(y). With the guide r(y) = number of a's, SMC's weights
telescope to exp(lam * r(y)), so `pick="sample"` must return draws from the tilted target
p(y) exp(lam r(y)) / Z; `pick="best"` returns the best-scored particle, whose law (with lam = 0, i.e.
K independent draws from p) is that of the maximum of K rewards."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from rlgen.errors import RlgenError
from rlgen.rewards.base import RewardSet, RewardSpec
from rlgen.rollout.engine import Rollouts, SamplingParams
from rlgen.rollout.samplers import check_sampler, draw_final, smc

A, B, STOP = 0, 1, 2
LETTERS = {A: "a", B: "b", STOP: ""}
# next-token probabilities (a, b, stop) given the last token of the completion (None: nothing yet)
NEXT = {None: (0.5, 0.3, 0.2), "a": (0.3, 0.4, 0.3), "b": (0.6, 0.2, 0.2)}
MAX_TOKENS = 3
PROMPT = "Q:"


def count_a(samples, **_):
    """The guide: how many a's the (partial) completion has."""
    return [float(str(s["completion"]).count("a")) for s in samples]


class CountA:
    """The guide as SMC sees a RewardSet (`score` -> components, valid, totals): the number of a's in the
    (partial) completion. A stand-in for RewardSet([RewardSpec(...)]) that keeps thousands of runs fast."""

    def score(self, samples):
        totals = torch.tensor([float(s["completion"].count("a")) for s in samples])
        return totals[:, None], torch.ones(len(samples), dtype=torch.bool), totals


class ToyEngine:
    """A rollout engine for the Markov chain above; the prefix comes back as prompt + completion text
    (one character per token, so SMC's text fallback is exact without a `decode`)."""
    pad_id = STOP

    def encode_prompts(self, prompts):
        return torch.zeros(len(prompts), 1, dtype=torch.long), torch.ones(len(prompts), 1, dtype=torch.long)

    @staticmethod
    def texts(ids, mask):
        return ["".join(LETTERS[t] for t, m in zip(row, keep) if m) for row, keep in zip(ids.tolist(), mask.tolist())]

    def generate(self, prompts, params, generator=None):
        tokens: list[list[int]] = [[] for _ in prompts]
        last = [p[-1:] if len(p) > len(PROMPT) else None for p in prompts]  # the prefix's last letter
        rows = list(range(len(prompts)))
        for _ in range(params.max_new_tokens):
            if not rows:
                break
            probs = torch.tensor([NEXT[last[i]] for i in rows])
            drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()
            for i, token in zip(rows, drawn):
                tokens[i].append(token)
                last[i] = LETTERS[token] or last[i]
            rows = [i for i, token in zip(rows, drawn) if token != STOP]
        width = max(map(len, tokens), default=0)  # right-padded in one go (fast for thousands of rows)
        shape = (len(tokens), width)
        ids = torch.tensor([t + [self.pad_id] * (width - len(t)) for t in tokens], dtype=torch.long).view(shape)
        mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in tokens], dtype=torch.long).view(shape)
        prompt_ids, prompt_mask = self.encode_prompts(prompts)
        truncated = torch.tensor([not t or t[-1] != STOP for t in tokens], dtype=torch.bool)
        return Rollouts(list(prompts), prompt_ids, prompt_mask, ids, mask, truncated, self.texts(ids, mask))


def completions() -> dict[tuple[int, ...], float]:
    """Every completion the toy can produce (token tuples) with its exact probability p(y)."""
    out = {}
    for length in range(1, MAX_TOKENS + 1):
        for seq in itertools.product((A, B, STOP), repeat=length):
            if STOP in seq[:-1] or (length < MAX_TOKENS and seq[-1] != STOP):
                continue  # a stop token ends the completion; without one it runs to MAX_TOKENS
            prob, last = 1.0, None
            for token in seq:
                prob *= NEXT[last][token]
                last = LETTERS[token] or last
            out[seq] = prob
    return out


def tilted(lam: float) -> dict[tuple[int, ...], float]:
    """The target p(y) exp(lam * r(y)) / Z, r(y) = number of a's."""
    weights = {y: p * math.exp(lam * y.count(A)) for y, p in completions().items()}
    z = sum(weights.values())
    return {y: w / z for y, w in weights.items()}


def empirical(rollouts: Rollouts) -> dict[tuple[int, ...], float]:
    lengths = rollouts.completion_mask.sum(dim=1).tolist()
    seqs = Counter(tuple(rollouts.completion_ids[row, :n].tolist()) for row, n in enumerate(lengths))
    return {y: c / len(lengths) for y, c in seqs.items()}


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(y, 0.0) - q.get(y, 0.0)) for y in set(p) | set(q))


def run_smc(draws: int, seed: int, guide=None, **options) -> Rollouts:
    """`draws` independent SMC runs in one call (one prompt each, all equal)."""
    return smc(ToyEngine(), [PROMPT] * draws, SamplingParams(max_new_tokens=MAX_TOKENS, temperature=1.0),
               torch.Generator().manual_seed(seed), rewards=guide or CountA(), **options)


def test_the_toy_enumeration_is_a_distribution():
    p = completions()
    assert len(p) == 1 + 2 + 4 + 8  # the stop token 1st, 2nd or 3rd, or three tokens without one
    assert sum(p.values()) == pytest.approx(1.0)
    assert p[(A, A, STOP)] == pytest.approx(0.5 * 0.3 * 0.3)


@pytest.mark.parametrize("lam, block_size", [(1.0, 1), pytest.param(-1.5, 2, marks=pytest.mark.slow)])  # ~3 s each
def test_smc_sample_follows_the_tilted_target(lam, block_size):
    target = tilted(lam)
    assert total_variation(target, completions()) > 0.15  # the tilt moves the target well away from p
    out = run_smc(2000, seed=0, particles=16, block_size=block_size, lam=lam)
    distance = total_variation(empirical(out), target)
    print(f"lam {lam}: TV(smc sample, target) = {distance:.3f}")
    # 2000 draws: about 0.03 of sampling noise plus the O(1/particles) bias of SMC (measured 0.03-0.06);
    # the argmax of the weights accumulated since the last resampling (the old pick) was 0.32 and 0.22 away
    assert distance < 0.1
    # the best particle (what an argmax-style pick tracks) is far from the target: the test tells them apart
    best = run_smc(2000, seed=0, particles=16, block_size=block_size, lam=lam, pick="best")
    assert total_variation(empirical(best), target) > 0.25


def test_smc_best_is_the_maximum_of_independent_particles():
    # lam = 0: weights never move, nothing is resampled, the K particles are K independent draws from p;
    # "best" returns the highest count of a's, whose law is P(max <= m) = F(m)^K
    k, draws = 4, 2000
    out = run_smc(draws, seed=1, particles=k, block_size=1, lam=0.0, pick="best")
    rewards = Counter(text.count("a") for text in out.texts)
    law = Counter()
    for y, p in completions().items():
        law[y.count(A)] += p
    cdf = list(itertools.accumulate(law[m] for m in range(MAX_TOKENS + 1)))
    expected = [cdf[m] ** k - (cdf[m - 1] ** k if m else 0.0) for m in range(MAX_TOKENS + 1)]
    observed = [rewards[m] / draws for m in range(MAX_TOKENS + 1)]
    assert sum(abs(o - e) for o, e in zip(observed, expected)) / 2 < 0.04
    # and "sample" with lam = 0 is plain sampling from p
    plain = run_smc(draws, seed=1, particles=k, block_size=1, lam=0.0)
    assert total_variation(empirical(plain), completions()) < 0.06


def test_smc_sample_is_reproducible_and_the_stand_in_guide_matches_the_reward_set():
    reward_set = RewardSet([RewardSpec(f"{__name__}:count_a")])
    a = run_smc(200, seed=5, particles=4, lam=1.0)
    b = run_smc(200, seed=5, particles=4, lam=1.0, guide=reward_set)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert a.texts != run_smc(200, seed=6, particles=4, lam=1.0).texts


def test_draw_final_hand_cases():
    g = torch.Generator().manual_seed(0)
    nan, inf = float("nan"), float("inf")
    # one particle holds all the weight; NaN and -inf weigh nothing
    assert draw_final(torch.tensor([[nan, 0.0, -inf], [-inf, -inf, 3.0]]), g).tolist() == [1, 2]
    # a row with no usable weight draws uniformly instead of failing
    row = draw_final(torch.tensor([[nan, -inf, nan]]).expand(3000, 3), g)
    torch.testing.assert_close(torch.bincount(row, minlength=3).double() / 3000,
                               torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03, rtol=0)
    # weights 1 : 3 -> frequencies 0.25 : 0.75
    draws = draw_final(torch.log(torch.tensor([1.0, 3.0])).expand(4000, 2), g)
    assert float(draws.double().mean()) == pytest.approx(0.75, abs=0.02)


def test_pick_option_is_checked_before_loading():
    check_sampler("smc", smc, {"pick": "best"}, has_guide=True)
    check_sampler("smc", smc, {"pick": "sample"}, has_guide=True)
    with pytest.raises(RlgenError, match="option 'pick' of sampler 'smc' must be one of sample, best, got 'argmax'"):
        check_sampler("smc", smc, {"pick": "argmax"}, has_guide=True)
    with pytest.raises(RlgenError, match="option 'pick' must be one of sample, best"):
        run_smc(1, seed=0, pick=3)
