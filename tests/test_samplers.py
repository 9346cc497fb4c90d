"""Reward-guided samplers (best-of-n, smc): the weighting / resampling math against hand-worked values,
their behaviour on the built-in tiny-arith model (argmax pick, accuracy over greedy / plain sampling,
reproducibility, token budget), option checking, and `rlgen sample` / `rlgen eval --sampler` end to end."""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from cli_helpers import cli_env, rlgen, rlgen_process
from rlgen.errors import RlgenError
from rlgen.rewards.base import RewardSet, RewardSpec
from rlgen.rollout.engine import SamplingParams
from rlgen.rollout.samplers import (best_of_n, best_rows, call_sampler, check_sampler, effective_sample_size,
                                    parse_sampler_options, plain, resample_indices, smc, update_log_weights)


# --- in-test guide rewards (resolved as `module:function`) ---------------------------------------------

def count_ones(samples, **_):
    """How many '1' characters the completion has."""
    return [float(str(s["completion"]).count("1")) for s in samples]


def answer_prefix(samples, **_):
    """Fraction of the answer matched so far: len(c) / len(answer) when the answer starts with the
    (partial) completion c, else 0 -- a potential that is informative before the answer is complete."""
    out = []
    for s in samples:
        c, a = str(s["completion"]).strip(), str(s["answer"])
        out.append(len(c) / len(a) if a.startswith(c) else 0.0)
    return out


def guide(name: str) -> RewardSet:
    return RewardSet([RewardSpec(name if name in ("exact-match",) else f"{__name__}:{name}")])


# --- pure math: best pick, weights, ESS, resampling ---------------------------------------------------

def test_best_rows_ties_first_and_nan_loses():
    nan = float("nan")
    scores = torch.tensor([
        [1.0, 3.0, 3.0, 2.0],  # tie between 1 and 2 -> the first
        [nan, 0.0, nan, -1.0],  # NaN loses even to a negative score
        [nan, nan, nan, nan],  # nothing scored -> column 0
        [-5.0, -2.0, -3.0, -2.5],
    ])
    assert best_rows(scores).tolist() == [1, 1, 0, 1]


def test_update_log_weights_hand_values():
    log_w = torch.tensor([[0.0, 0.5, -1.0]])
    prev = torch.tensor([[0.2, float("nan"), 1.0]])
    new = torch.tensor([[1.0, 0.3, float("nan")]])
    # lam 2: 0 + 2 * (1.0 - 0.2) = 1.6; 0.5 + 2 * (0.3 - 0) = 1.1; -1 + 2 * (0 - 1.0) = -3.0
    out = update_log_weights(log_w, prev, new, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.6, 1.1, -3.0]]))
    # lam 0: weights never move
    torch.testing.assert_close(update_log_weights(log_w, prev, new, 0.0), log_w)


def test_effective_sample_size_hand_values():
    # weights 1, 1, 2: (1 + 1 + 2)^2 / (1 + 1 + 4) = 16 / 6
    log_w = torch.tensor([[0.0, 0.0, math.log(2.0)],
                          [0.0, 0.0, 0.0],  # equal weights: ESS = K
                          [0.0, -1e4, -1e4]])  # one particle holds everything: ESS = 1
    torch.testing.assert_close(effective_sample_size(log_w), torch.tensor([16 / 6, 3.0, 1.0]))
    # scale-free: multiplying every weight by a constant (adding to the log) changes nothing
    torch.testing.assert_close(effective_sample_size(log_w + 50.0), effective_sample_size(log_w))
    # weights e^0, e^1: (1 + e)^2 / (1 + e^2)
    e = math.e
    assert effective_sample_size(torch.tensor([0.0, 1.0])).item() == pytest.approx((1 + e) ** 2 / (1 + e * e), rel=1e-6)


def test_resample_indices_follow_the_weights_and_the_generator():
    # a degenerate population: every draw is the heavy particle
    assert resample_indices(torch.tensor([-1e4, 0.0, -1e4]), torch.Generator().manual_seed(0)).tolist() == [1, 1, 1]
    # sorted ancestors, reproducible with the same generator
    log_w = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(3000, 4)
    a = resample_indices(log_w, torch.Generator().manual_seed(7))
    b = resample_indices(log_w, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert bool((a[:, 1:] >= a[:, :-1]).all())
    frequencies = torch.bincount(a.flatten(), minlength=4).double() / a.numel()
    torch.testing.assert_close(frequencies, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.01, rtol=0)


# --- on the tiny-arith model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def arith():
    from rlgen.models.causal_lm import ModelConfig, load_policy
    from rlgen.plugins import registry
    from rlgen.rollout.engine import HFEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer, _ = load_policy(ModelConfig(path="tiny-arith"))
    engine = HFEngine(model.eval(), tokenizer)
    records = registry("task").get("arithmetic").split("test")[:100]
    yield engine, records
    torch.set_num_threads(threads)


def accuracy(rollouts, records) -> float:
    return sum(t.strip() == r["answer"] for t, r in zip(rollouts.texts, records)) / len(records)


def test_best_of_n_returns_the_argmax_of_the_same_draws(arith):
    engine, records = arith
    records = records[:20]
    prompts = [r["prompt"] for r in records]
    params = SamplingParams(max_new_tokens=6, temperature=1.5)
    rewards, n = guide("count_ones"), 6
    picked = best_of_n(engine, prompts, params, torch.Generator().manual_seed(3), rewards=rewards, records=records, n=n)
    # the same n draws, reproduced with the same seed (best-of-n makes one generate call, prompts repeated n times)
    drawn = engine.generate([p for p in prompts for _ in range(n)], params, torch.Generator().manual_seed(3))
    scores = torch.tensor(count_ones([{"completion": t} for t in drawn.texts])).view(len(prompts), n)
    assert len(picked.texts) == len(prompts) and picked.prompts == prompts
    assert len(set(drawn.texts)) > len(prompts)  # the draws differ, so the pick is a real choice
    for i, text in enumerate(picked.texts):
        assert text.count("1") == scores[i].max().item()
        first = int(scores[i].argmax())
        assert text == drawn.texts[i * n + first]  # ties -> the first drawn
        row = i * n + first
        assert torch.equal(picked.completion_ids[i], drawn.completion_ids[row])
        assert torch.equal(picked.completion_mask[i], drawn.completion_mask[row])
        assert torch.equal(picked.prompt_ids[i], drawn.prompt_ids[row])


def test_best_of_8_exact_match_beats_greedy(arith):
    engine, records = arith
    prompts = [r["prompt"] for r in records]
    greedy = accuracy(engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0)), records)
    best = accuracy(best_of_n(engine, prompts, SamplingParams(max_new_tokens=8, temperature=1.0),
                              torch.Generator().manual_seed(0), rewards=guide("exact-match"), records=records, n=8), records)
    print(f"greedy {greedy:.2f}  best-of-8 {best:.2f} on {len(records)} problems")
    assert best > greedy
    assert best >= 0.9  # an oracle guide over 8 draws nearly always finds the answer


def test_smc_with_a_prefix_guide_beats_plain_sampling_and_is_reproducible(arith):
    engine, records = arith
    prompts = [r["prompt"] for r in records]
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    plain_acc = accuracy(plain(engine, prompts, params, torch.Generator().manual_seed(0)), records)
    options = dict(rewards=guide("answer_prefix"), records=records, particles=8, block_size=1, lam=3.0)
    stats: dict = {}
    first = smc(engine, prompts, params, torch.Generator().manual_seed(0), stats=stats, **options)
    smc_acc = accuracy(first, records)
    print(f"plain {plain_acc:.2f}  smc {smc_acc:.2f} on {len(records)} problems; {stats}")
    assert smc_acc > plain_acc + 0.2
    assert stats["smc_resamplings"] > 0 and stats["smc_prompts"] == len(prompts)
    again = smc(engine, prompts, params, torch.Generator().manual_seed(0), **options)
    assert again.texts == first.texts
    assert torch.equal(again.completion_ids, first.completion_ids)


def test_smc_stays_within_max_new_tokens_and_returns_consistent_rollouts(arith):
    engine, records = arith
    records = records[:30]  # answers of 3 digits (+ stop token) fit a budget of 4, answers of 4 digits do not
    prompts = [r["prompt"] for r in records]
    budgets = []

    class Spy:  # the engine, recording the token budget of every block
        pad_id, decode, encode_prompts = engine.pad_id, engine.decode, engine.encode_prompts

        def generate(self, prompts, params, generator=None):
            budgets.append(params.max_new_tokens)
            return engine.generate(prompts, params, generator)

    out = smc(Spy(), prompts, SamplingParams(max_new_tokens=4, temperature=1.0), torch.Generator().manual_seed(1),
              rewards=guide("answer_prefix"), records=records, particles=4, block_size=3)
    assert budgets == [3, 1]  # 3 + 1 = 4 tokens at most for any particle
    lengths = out.completion_mask.sum(dim=1)
    assert int(lengths.max()) <= 4
    stop = engine.stop_ids
    for row in range(len(prompts)):
        ids = out.completion_ids[row, : int(lengths[row])]
        ends_with_stop = bool(torch.isin(ids[-1:], stop).any())
        assert bool(out.truncated[row]) == (not ends_with_stop)
        if out.truncated[row]:
            assert int(lengths[row]) == 4
    assert bool(out.truncated.any()) and not bool(out.truncated.all())
    assert out.texts == engine.decode(out.completion_ids, out.completion_mask)
    prompt_ids, prompt_mask = engine.encode_prompts(prompts)
    assert torch.equal(out.prompt_ids, prompt_ids) and torch.equal(out.prompt_mask, prompt_mask)
    assert out.prompts == prompts


def test_smc_without_guidance_never_resamples(arith):
    engine, records = arith
    records = records[:10]
    stats: dict = {}
    out = smc(engine, [r["prompt"] for r in records], SamplingParams(max_new_tokens=8), torch.Generator().manual_seed(0),
              rewards=guide("answer_prefix"), records=records, particles=4, block_size=1, lam=0.0, ess_threshold=1.0,
              stats=stats)
    assert stats["smc_resamplings"] == 0  # equal weights: ESS = K is never below K
    assert len(out.texts) == len(records)


# --- option checking ----------------------------------------------------------------------------------

def test_option_parsing_and_checks():
    assert parse_sampler_options(["n=4", "lam=0.5", "name=abc"]) == {"n": 4, "lam": 0.5, "name": "abc"}
    with pytest.raises(RlgenError, match="KEY=VALUE"):
        parse_sampler_options(["n"])
    check_sampler("best-of-n", best_of_n, {"n": 4}, has_guide=True)
    check_sampler("smc", smc, {"particles": 4, "block_size": 2, "ess_threshold": 1, "lam": 2}, has_guide=True)
    check_sampler("plain", plain, {}, has_guide=False)
    cases = [
        (("best-of-n", best_of_n, {"k": 4}, True), r"^sampler 'best-of-n' has no option 'k' \(its options: n\)$"),
        (("best-of-n", best_of_n, {"n": 4}, False), "needs a guide reward.*--sampler-reward"),
        (("best-of-n", best_of_n, {"n": 2.5}, True), "option 'n' of sampler 'best-of-n' must be an integer, got 2.5"),
        (("smc", smc, {"lam": "high"}, True), "option 'lam' of sampler 'smc' must be a number, got 'high'"),
        (("smc", smc, {"rewards": "x"}, True), "--sampler-reward"),
        (("plain", plain, {"n": 2}, False), r"^sampler 'plain' has no option 'n' \(its options: none\)$"),
    ]
    for args, message in cases:
        with pytest.raises(RlgenError, match=message):
            check_sampler(*args)


def test_call_sampler_passes_only_what_the_sampler_declares():
    seen = {}

    def minimal(engine, prompts, params, generator=None, *, width: int = 1):
        seen.update(width=width)
        return "ok"

    def everything(engine, prompts, params, generator=None, **options):
        seen.update(options)
        return "ok"

    assert call_sampler(minimal, None, [], None, rewards="g", records=[], stats={}, options={"width": 3}) == "ok"
    assert seen == {"width": 3}
    seen.clear()
    call_sampler(everything, None, [], None, rewards="g", records=["r"], stats=None, options={"x": 1})
    assert seen == {"rewards": "g", "records": ["r"], "stats": None, "x": 1}
    check_sampler("everything", everything, {"anything": 1}, has_guide=False)  # open-ended: every key accepted


# --- CLI end to end -----------------------------------------------------------------------------------

SAMPLE = ["sample", "--model", "tiny-arith", "--task", "arithmetic", "--limit", "3", "--max-new-tokens", "8", "--quiet"]
EVAL = ["eval", "--model", "tiny-arith", "--task", "arithmetic", "--limit", "50", "--json", "--quiet"]
CLI_CASES = {
    "best-of-n": [*SAMPLE, "-n", "2", "--sampler", "best-of-n", "--sampler-opt", "n=4", "--sampler-reward", "exact-match"],
    "no-guide": [*SAMPLE, "--sampler", "smc"],
    "unknown-option": [*SAMPLE, "--sampler", "best-of-n", "--sampler-opt", "m=4", "--sampler-reward", "exact-match"],
    "bad-pick": [*SAMPLE, "--sampler", "smc", "--sampler-opt", "pick=argmax", "--sampler-reward", "exact-match"],
    "eval-greedy": EVAL,
    "eval-best-of-8": [*EVAL, "--sampler", "best-of-n", "--sampler-opt", "n=8", "--sampler-reward", "exact-match"],
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("samplers-cli")

    def run(args):
        return rlgen_process(*args, cwd=cwd, timeout=240, env=cli_env(OMP_NUM_THREADS="1"))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CLI_CASES, pool.map(run, CLI_CASES.values())))


@pytest.mark.slow
def test_cli_sample_best_of_n(cli_runs):
    proc = cli_runs["best-of-n"]
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 3 * 2  # prompts x -n
    assert [r["sample_index"] for r in rows] == [0, 1] * 3
    assert all({"prompt", "answer", "completion"} <= set(r) for r in rows)
    assert sum(r["completion"] == r["answer"] for r in rows) >= 5  # an oracle guide over 4 draws


@pytest.mark.slow
@pytest.mark.parametrize("case, words", [("no-guide", ["smc", "--sampler-reward"]), ("unknown-option", ["'best-of-n'", "no option 'm'", "its options: n"]),
                                         ("bad-pick", ["pick", "sample, best", "'argmax'"])])
def test_cli_sampler_errors_are_one_line(cli_runs, case, words):
    proc = cli_runs[case]
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlgen: error:"), proc.stderr
    assert all(word in lines[0] for word in words)
    assert proc.stdout == ""


@pytest.mark.slow
def test_cli_eval_with_best_of_n_beats_greedy(cli_runs):
    greedy, best = (cli_runs[name] for name in ("eval-greedy", "eval-best-of-8"))
    assert greedy.returncode == 0, greedy.stderr
    assert best.returncode == 0, best.stderr
    greedy, best = json.loads(greedy.stdout), json.loads(best.stdout)
    print(f"eval --limit 50: greedy {greedy['accuracy']:.2f}  best-of-8 {best['accuracy']:.2f}")
    assert greedy["sampler"] == "greedy" and best["sampler"] == "best-of-n"
    assert best["sampler_options"] == {"n": 8} and best["sampler_reward"] == ["exact-match"]
    assert best["num_problems"] == greedy["num_problems"] == 50
    assert best["accuracy"] > greedy["accuracy"]


# --- option ranges are checked before any model loads or any progress shows (review round 2, F6) ---

@pytest.mark.parametrize("name, options, words", [
    ("smc", {"particles": 0}, ["'smc'", "option 'particles'", "an integer >= 1, got 0"]),
    ("smc", {"block_size": -2}, ["option 'block_size'", "got -2"]),
    ("smc", {"ess_threshold": 1.5}, ["option 'ess_threshold'", "[0, 1], got 1.5"]),
    ("smc", {"ess_threshold": math.nan}, ["option 'ess_threshold'", "got nan"]),
    ("smc", {"lam": math.inf}, ["option 'lam'", "finite", "got inf"]),
    ("best-of-n", {"n": 0}, ["'best-of-n'", "option 'n'", ">= 1, got 0"]),
])
def test_check_sampler_rejects_out_of_range_options(name, options, words):
    from rlgen.plugins import registry

    with pytest.raises(RlgenError) as info:
        check_sampler(name, registry("sampler").get(name), options, has_guide=True)
    assert all(word in str(info.value) for word in words), str(info.value)
    check_sampler(name, registry("sampler").get(name), {key: 1 for key in options}, has_guide=True)  # in range


@pytest.mark.parametrize("opt", ["particles=0", "ess_threshold=nan"])
def test_cli_sampler_option_range_error_comes_before_any_progress(opt, monkeypatch):
    from rlgen.api import _sample
    from rlgen.models import causal_lm

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(causal_lm, "load_policy", no_load)
    monkeypatch.setattr(_sample, "load_policy", no_load)  # the name `rlgen sample` calls
    code, out, err = rlgen("sample", "--model", "tiny-arith", "--task", "arithmetic", "--limit", 1, "--sampler", "smc",
                           "--sampler-opt", opt, "--sampler-reward", "exact-match")
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("rlgen: error: option '") and "of sampler 'smc' must be" in lines[0], err
