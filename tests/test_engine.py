"""Sampling filters, completion masks and pass@k against hand-worked cases."""
import math

import pytest
import torch

from rlgen.evaluation.metrics import pass_at_k
from rlgen.rollout.engine import (SamplingParams, choose_tokens, completion_mask_from_ids, filter_logits, row_seeds,
                                 row_uniforms)

# A hand-made distribution over 4 tokens, deliberately not sorted:
# token 0: 0.10, token 1: 0.50, token 2: 0.15, token 3: 0.25
PROBS = torch.tensor([0.10, 0.50, 0.15, 0.25])
LOGITS = PROBS.log()


def survivors(logits):
    return torch.isfinite(logits).nonzero().flatten().tolist()


# --- filter_logits -----------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k, expected", [
    (1, [1]),
    (2, [1, 3]),  # 0.50, 0.25
    (3, [1, 2, 3]),  # 0.50, 0.25, 0.15
    (4, [0, 1, 2, 3]),
    (10, [0, 1, 2, 3]),  # larger than the vocabulary: nothing removed
    (0, [0, 1, 2, 3]),  # 0 = off
])
def test_top_k(top_k, expected):
    assert survivors(filter_logits(LOGITS, top_k, 1.0)) == expected


@pytest.mark.parametrize("top_p, expected", [
    # sorted: 0.50 (t1), 0.25 (t3), 0.15 (t2), 0.10 (t0); cumulative before each: 0, 0.50, 0.75, 0.90
    # a token is kept while the mass before it is < top_p (the token crossing top_p is kept)
    (0.4, [1]),  # 0.50 alone already covers 0.4
    (0.7, [1, 3]),  # 0.50 < 0.7 -> add 0.25 -> 0.75 >= 0.7
    (0.8, [1, 2, 3]),  # 0.75 < 0.8 -> add 0.15 -> 0.90
    (0.95, [0, 1, 2, 3]),  # 0.90 < 0.95 -> all
    (1.0, [0, 1, 2, 3]),  # off
])
def test_top_p(top_p, expected):
    assert survivors(filter_logits(LOGITS, 0, top_p)) == expected


def test_top_k_then_top_p_renormalises():
    # top-k 3 keeps 0.50, 0.25, 0.15 (mass 0.9), renormalised: 0.5556, 0.2778, 0.1667;
    # cumulative before: 0, 0.5556, 0.8333 -> with top_p 0.8 the third (0.8333 >= 0.8) goes.
    # Without top-k, top_p 0.8 would keep three tokens (see test_top_p).
    assert survivors(filter_logits(LOGITS, 3, 0.8)) == [1, 3]


def test_survivors_keep_their_logits_and_rows_are_independent():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])  # row 1: 0.25, 0.15, 0.50, 0.10
    out = filter_logits(logits, 2, 1.0)
    assert survivors(out[0]) == [1, 3]
    assert survivors(out[1]) == [0, 2]
    assert out[0, 1] == LOGITS[1] and out[0, 3] == LOGITS[3]
    assert out[1, 0] == LOGITS[3] and out[1, 2] == LOGITS[1]
    assert out[0, 0] == float("-inf")
    out = filter_logits(logits, 0, 0.7)
    assert survivors(out[0]) == [1, 3]
    assert survivors(out[1]) == [0, 2]
    assert out[1, 0] == LOGITS[3] and out[1, 2] == LOGITS[1]


def test_filtered_tokens_are_never_sampled():
    logits = LOGITS.expand(2000, 4)
    tokens = choose_tokens(logits, SamplingParams(temperature=1.0, top_k=2), row_seeds(0, 0, 2000))
    assert set(tokens.tolist()) == {1, 3}
    # greedy (temperature 0) is the argmax
    assert choose_tokens(logits[:3], SamplingParams(temperature=0.0), None).tolist() == [1, 1, 1]


# --- completion_mask_from_ids ------------------------------------------------------------------------

def test_completion_mask_includes_first_stop_token_only():
    stop = torch.tensor([0, 9])
    ids = torch.tensor([
        [5, 6, 0, 0, 0],  # stop at 2 (then padding with the stop id)
        [5, 0, 7, 0, 8],  # first stop at 1; later tokens and stops masked
        [5, 6, 7, 8, 9],  # stop (9) at the last position
        [1, 2, 3, 4, 5],  # no stop: truncated, all tokens count
        [9, 5, 5, 5, 5],  # stop first
    ])
    assert completion_mask_from_ids(ids, stop).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]


# --- pass@k ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),  # c / n = 2 / 5
    (5, 2, 2, 0.7),  # 1 - C(3, 2) / C(5, 2) = 1 - 3 / 10
    (5, 2, 3, 0.9),  # 1 - C(3, 3) / C(5, 3) = 1 - 1 / 10
    (5, 0, 1, 0.0),
    (5, 0, 5, 0.0),
    (5, 4, 2, 1.0),  # n - c = 1 < k = 2: every draw of 2 has a correct one
    (5, 5, 1, 1.0),
    (10, 3, 4, 1 - 35 / 210),  # 1 - C(7, 4) / C(10, 4) = 1 - 35 / 210 = 0.83333
])
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError, match="pass@6"):
        pass_at_k(5, 1, 6)
    assert math.isclose(pass_at_k(1, 1, 1), 1.0)


# --- per-row seeded sampling ---------------------------------------------------------------------------

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:  # the reference, on Python integers
    x &= _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


@pytest.mark.parametrize("base", [0, 123456789, 2**62 - 1])
def test_row_streams_are_splitmix64(base):
    golden = 0x9E3779B97F4A7C15
    seeds = row_seeds(base, 5, 3)
    expected = [_splitmix64(base + (5 + k + 1) * golden) for k in range(3)]
    assert [int(v) & _MASK for v in seeds.tolist()] == expected
    for step in (0, 7, 10**6):
        assert row_uniforms(seeds, step).tolist() == [(_splitmix64(s + (step + 1) * golden) >> 11) * 2.0**-53 for s in expected]


def test_a_rows_draw_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    seeds = row_seeds(42, 0, 6)
    whole = choose_tokens(logits, params, seeds, step=3)
    parts = torch.cat([choose_tokens(logits[:2], params, seeds[:2], 3), choose_tokens(logits[2:], params, row_seeds(42, 2, 4), 3)])
    assert torch.equal(whole, parts)
    # reversed batch order, same rows: same tokens
    assert torch.equal(choose_tokens(logits.flip(0), params, seeds.flip(0), 3), whole.flip(0))


def test_seeded_draws_follow_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.log().expand(20000, 4)
    tokens = choose_tokens(logits, SamplingParams(temperature=1.0), row_seeds(7, 0, 20000))
    frequency = torch.bincount(tokens, minlength=4).double() / 20000
    assert frequency[1] == 0  # a zero-probability token is never drawn
    assert torch.allclose(frequency, probs.double(), atol=0.015)


def test_greedy_decoding_draws_nothing_from_the_global_rng():
    from rlgen.models.causal_lm import load_model, load_tokenizer, resolve_model_path
    from rlgen.rollout.engine import HFEngine

    path = resolve_model_path("tiny-arith")
    engine = HFEngine(load_model(path), load_tokenizer(path))
    state = torch.get_rng_state()
    engine.generate(["12+34=", "5+6="], SamplingParams(max_new_tokens=4, temperature=0.0))
    assert torch.equal(torch.get_rng_state(), state)  # evaluation leaves dropout's RNG (checkpointed) alone
    engine.generate(["12+34="], SamplingParams(max_new_tokens=4, temperature=1.0))
    assert not torch.equal(torch.get_rng_state(), state)  # sampling without a generator draws its base seed there


# --- min_p, repetition_penalty, stop strings (vLLM's and transformers' meanings) ---------------------------

@pytest.fixture(scope="module")
def tiny_engine():
    from rlgen.models.causal_lm import load_model, load_tokenizer, resolve_model_path
    from rlgen.rollout.engine import HFEngine

    path = resolve_model_path("tiny-arith")
    return HFEngine(load_model(path), load_tokenizer(path))


def test_repetition_penalty_is_ctrls():
    from rlgen.rollout.engine import penalize_repetitions, seen_tokens

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = seen_tokens(torch.tensor([[9, 0, 1]]).clamp(max=3), torch.tensor([[0, 1, 1]]), 4)  # padding not seen
    assert seen.tolist() == [[True, True, False, False]]
    assert penalize_repetitions(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_min_p_keeps_tokens_above_a_fraction_of_the_best():
    from rlgen.rollout.engine import keep_min_p

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = keep_min_p(probs.log(), 0.2)  # threshold 0.1: 0.05 goes
    assert torch.isinf(kept[0, 3]) and torch.isfinite(kept[0, :3]).all()
    # sampling never picks a dropped token, whatever the uniform draw
    params = SamplingParams(max_new_tokens=1, temperature=1.0, min_p=0.2)
    draws = {int(choose_tokens(probs.log(), params, row_seeds(s, 0, 1))) for s in range(200)}
    assert draws == {0, 1, 2}


def test_greedy_with_a_repetition_penalty_avoids_the_seen_token():
    params = SamplingParams(max_new_tokens=1, temperature=0.0, repetition_penalty=4.0)
    logits = torch.tensor([[2.0, 1.0]])
    seen = torch.tensor([[True, False]])
    assert int(choose_tokens(logits, params, None, 0, seen)) == 1  # 2 / 4 < 1
    assert int(choose_tokens(logits, SamplingParams(temperature=0.0), None, 0, seen)) == 0


def test_stop_strings_end_the_completion_at_the_completing_token(tiny_engine):
    engine = tiny_engine
    free = engine.generate(["407+779="], SamplingParams(max_new_tokens=12, temperature=0.0))
    text = free.texts[0]
    assert len(text) >= 3, text  # something to cut
    stop = text[1:3]
    cut = engine.generate(["407+779="], SamplingParams(max_new_tokens=12, temperature=0.0, stop=(stop, "never-there")))
    assert cut.texts[0] == text[: text.find(stop)]  # the text stops before the stop string
    kept = int(cut.completion_mask[0].sum())
    decoded = engine.tokenizer.decode(cut.completion_ids[0, :kept].tolist(), skip_special_tokens=True)
    assert decoded.endswith(stop) or stop in decoded  # the token that completed the string is kept (trained on)
    assert stop not in engine.tokenizer.decode(cut.completion_ids[0, :kept - 1].tolist(), skip_special_tokens=True)
    assert not bool(cut.truncated[0])


def test_rollout_settings_reach_the_engine():
    from rlgen.algorithms.grpo import RolloutConfig

    params = RolloutConfig(max_new_tokens=7, temperature=0.9, top_p=0.8, top_k=5, min_p=0.1, repetition_penalty=1.2,
                           stop=["\n", "###"]).sampling_params()
    assert params == SamplingParams(7, 0.9, 0.8, 5, 0.1, 1.2, ("\n", "###"))
