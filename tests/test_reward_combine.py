"""Reward combiners and shapings (rlgen.rewards.combine), RewardSet.score, `rlgen score --combine/--shape`
and GRPO with a frozen ref-normalize shaping that survives --resume. Expected numbers are worked out by hand."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from rlgen.rollout.engine import SamplingParams

from cli_helpers import rlgen_process
from rlgen.distributed import Dist
from rlgen.errors import RlgenError
from rlgen.extension import capabilities
from rlgen.plugins import registry
from rlgen.rewards import combine as C
from rlgen.rewards.base import RewardSet, RewardSpec

NAN = float("nan")
# weights [1, 0.5, 2] -> weight * component: [1, 2, NaN], [NaN, NaN, NaN], [3, -0.5, 1]
COMPONENTS = torch.tensor([[1.0, 4.0, NAN], [NAN, NAN, NAN], [3.0, -1.0, 0.5]])
WEIGHTS = torch.tensor([1.0, 0.5, 2.0])


def approx(values, abs=1e-6):
    return pytest.approx(values, abs=abs)


def s(completion, **fields):
    return {"prompt": "p", "completion": completion, **fields}


# --- combiners ---------------------------------------------------------------------------------------

def test_combiners_registered_with_descriptions():
    combiners = registry("reward-combiner")
    assert {"weighted-sum", "min", "mean", "mean-minus-std"} <= set(combiners.names())
    assert all(combiners.entry(n).description for n in ("weighted-sum", "min", "mean", "mean-minus-std"))
    shapings = registry("reward-shaping")
    assert {"par", "ref-normalize", "center", "clip"} <= set(shapings.names())
    assert all(shapings.entry(n).description for n in ("par", "ref-normalize", "center", "clip"))
    assert capabilities(C.par).needs_reference and capabilities(C.center).needs_reference
    assert not capabilities(C.clip).needs_reference and not capabilities(C.ref_normalize).needs_reference


def test_weighted_sum():
    # 1 + 2 = 3;  no reward applies -> 0;  3 - 0.5 + 1 = 3.5
    assert C.weighted_sum(COMPONENTS, WEIGHTS).tolist() == approx([3.0, 0.0, 3.5])


def test_min():
    # min(1, 2) = 1;  none applies -> 0 (as every combiner);  min(3, -0.5, 1) = -0.5
    assert C.minimum(COMPONENTS, WEIGHTS).tolist() == approx([1.0, 0.0, -0.5])


def test_mean():
    # (1 + 2) / 2 = 1.5 (the NaN is not counted);  0;  3.5 / 3
    assert C.mean(COMPONENTS, WEIGHTS).tolist() == approx([1.5, 0.0, 3.5 / 3])


def test_mean_minus_std():
    # row 0: mean 1.5, population std 0.5;  row 2: mean 7/6, deviations 11/6, -10/6, -1/6 -> var 222/36/3
    std2 = math.sqrt(222 / 36 / 3)
    assert C.mean_minus_std(COMPONENTS, WEIGHTS).tolist() == approx([1.0, 0.0, 7 / 6 - std2])
    assert C.mean_minus_std(COMPONENTS, WEIGHTS, k=2.0).tolist() == approx([0.5, 0.0, 7 / 6 - 2 * std2])
    assert C.mean_minus_std(COMPONENTS, WEIGHTS, k=0.0).tolist() == approx(C.mean(COMPONENTS, WEIGHTS).tolist())


def test_combiner_specs_through_reward_set():
    rs = RewardSet([RewardSpec("exact-match", 2.0), RewardSpec("length", 0.5)], combine="mean-minus-std:k=2")
    components, _ = rs.compute([s("12", answer="12"), s("abc")])
    # row 0: weighted [2, 1]: mean 1.5, std 0.5 -> 1.5 - 2 * 0.5 = 0.5;  row 1: only length applies: 1.5 - 0
    assert rs.total(components).tolist() == approx([0.5, 1.5])
    assert RewardSet([RewardSpec("length")]).combiner.name == "weighted-sum"
    assert RewardSet([RewardSpec("length")], combine="").combiner.name == "weighted-sum"


# --- shapings ----------------------------------------------------------------------------------------

def test_par_center_clip():
    values = torch.tensor([0.0, 1.0, -1.0])
    reference = torch.tensor([0.0, 0.0, 1.0])
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert C.par(values, reference).tolist() == approx([0.5, sigmoid(1.0), sigmoid(-2.0)])
    assert C.center(values, reference).tolist() == approx([0.0, 1.0, -2.0])
    wide = torch.tensor([-1.0, 0.25, 2.0])
    assert C.clip(wide, None, low=0.0, high=0.5).tolist() == approx([0.0, 0.25, 0.5])
    assert C.clip(wide, None, high=1.0).tolist() == approx([-1.0, 0.25, 1.0])
    assert C.clip(wide, None, low=0).tolist() == approx([0.0, 0.25, 2.0])


def test_ref_normalize_freezes_after_first_batch():
    shaping = C.Shaping("ref-normalize")
    assert shaping.state() == {}
    # first batch [1, 2, 3]: mean 2, population std sqrt(2/3)
    sd = math.sqrt(2 / 3)
    first = shaping(torch.tensor([1.0, 2.0, 3.0]))
    assert first.tolist() == approx([-1 / (sd + 1e-6), 0.0, 1 / (sd + 1e-6)])
    # later batches use the frozen statistics, not their own
    assert shaping(torch.tensor([5.0, 5.0])).tolist() == approx([3 / (sd + 1e-6)] * 2)
    state = shaping.state()
    assert state["name"] == "ref-normalize"
    assert state["frozen"] == approx({"mean": 2.0, "std": sd})
    json.dumps(state)  # goes into the trainer's JSON state
    restored = C.Shaping("ref-normalize")
    restored.restore(json.loads(json.dumps(state)))
    assert restored(torch.tensor([5.0])).tolist() == approx([3 / (sd + 1e-6)])


def test_ref_normalize_first_batch_ignores_invalid_samples_and_no_spread():
    shaping = C.Shaping("ref-normalize:eps=0")
    # nothing valid yet: values pass through and nothing is frozen
    assert shaping(torch.tensor([7.0]), valid=torch.tensor([False])).tolist() == [7.0]
    assert shaping.state() == {}
    # valid values 1 and 3 (the skipped 100 is not counted): mean 2, std 1
    out = shaping(torch.tensor([1.0, 100.0, 3.0]), valid=torch.tensor([True, False, True]))
    assert out.tolist() == approx([-1.0, 98.0, 1.0])
    # a first batch without spread freezes std = 1 (centring only)
    flat = C.Shaping("ref-normalize")
    assert flat(torch.tensor([1.0, 1.0])).tolist() == [0.0, 0.0]
    assert flat.state()["frozen"] == {"mean": 1.0, "std": 1.0}
    assert flat(torch.tensor([2.0])).tolist() == approx([1 / (1 + 1e-6)])


def test_ref_normalize_given_stats():
    shaping = C.Shaping("ref-normalize:mean=1,std=2,eps=0")
    assert shaping(torch.tensor([3.0, -1.0])).tolist() == approx([1.0, -1.0])
    assert shaping(torch.tensor([10.0])).tolist() == approx([4.5])  # nothing estimated from any batch
    assert shaping.state()["frozen"] == {}
    # only the mean given: the std comes from the first batch [0, 4] (population std 2)
    half = C.Shaping("ref-normalize:mean=0,eps=0")
    assert half(torch.tensor([0.0, 4.0])).tolist() == approx([0.0, 2.0])
    assert half.state()["frozen"] == {"std": 2.0}
    # the pure function itself
    assert C.ref_normalize(torch.tensor([3.0]), None, mean=1.0, std=2.0, eps=0.0).tolist() == [1.0]


def test_reward_set_score_with_par_reference():
    rs = RewardSet([RewardSpec("exact-match"), RewardSpec("length", -0.01)], combine="min", shaping="par:ref_field=answer")
    samples = [s("3", answer="3"), s("22", answer="4"), s("x", answer=18)]
    components, valid, total = rs.score(samples)
    # combined (min of weight * reward): min(1, -0.01), min(0, -0.02), min(0, -0.01)
    assert rs.total(components).tolist() == approx([-0.01, -0.02, -0.01])
    # references "3", "4", "18" (a number becomes its text): min(1, -0.01), min(1, -0.01), min(1, -0.02)
    expected = [0.5, 1 / (1 + math.exp(0.01)), 1 / (1 + math.exp(-0.01))]
    assert total.tolist() == approx(expected)
    assert valid.tolist() == [True, True, True]
    assert components[:, 1].tolist() == approx([1.0, 2.0, 1.0])  # the columns stay raw


def test_reference_copy_drops_completion_tokens():
    rs = RewardSet([RewardSpec("length", 1.0, {"unit": "tokens"})], shaping="center")
    _, _, total = rs.score([s("abcdef", completion_tokens=10, reference="abc")])
    # 10 tokens (policy) minus the reference's own length: 3 characters (no token count for it)
    assert total.tolist() == [7.0]


def test_reference_field_missing_names_field_and_sample():
    rs = RewardSet([RewardSpec("length")], shaping="par")
    with pytest.raises(RlgenError) as info:
        rs.score([s("a", reference="b"), s("a")])
    message = str(info.value)
    assert "'reference'" in message and "sample 1" in message and "\n" not in message


def test_reference_failure_marks_sample_invalid(monkeypatch):
    import types

    mod = types.ModuleType("rlgen_test_combine_mod")
    mod.picky = lambda samples, **_: [float("nan") if x["completion"] == "bad" else 1.0 for x in samples]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    rs = RewardSet([RewardSpec(f"{mod.__name__}:picky")], on_error="skip", shaping="center:ref_field=ref")
    _, valid, total = rs.score([s("a", ref="b"), s("a", ref="bad")])
    assert valid.tolist() == [True, False]
    assert total[0].item() == 0.0


def test_no_shaping_score_equals_total():
    rs = RewardSet([RewardSpec("exact-match", 2.0), RewardSpec("length", 0.5)])
    components, valid, total = rs.score([s("12", answer="12"), s("abc")])
    assert total.tolist() == rs.total(components).tolist() == [3.0, 1.5]
    assert rs.state() == {}


# --- spec parsing and errors ---------------------------------------------------------------------------

def test_parse_spec():
    assert C.parse_spec("min") == ("min", {})
    assert C.parse_spec("mean-minus-std:k=0.5") == ("mean-minus-std", {"k": 0.5})
    assert C.parse_spec("par:ref_field=answer") == ("par", {"ref_field": "answer"})
    assert C.parse_spec(' clip: low=-1 , high=2.5 ') == ("clip", {"low": -1, "high": 2.5})
    assert C.parse_spec('par:ref_field="gold answer"') == ("par", {"ref_field": "gold answer"})


@pytest.mark.parametrize(
    "combine, shaping, pattern",
    [
        ("nope", "", r"unknown reward-combiner 'nope' \(known: (.*, )?mean, mean-minus-std, min, weighted-sum"),
        ("min:k=1", "", r"reward-combiner 'min' has no option 'k'"),
        ("mean-minus-std:kk=1", "", r"reward-combiner 'mean-minus-std' has no option 'kk' \(its options: k\)"),
        ("mean-minus-std:k=abc", "", r"option 'k' of reward-combiner 'mean-minus-std' must be a number, got 'abc'"),
        ("mean-minus-std:k", "", r"'k' in 'mean-minus-std:k' is not key=value"),
        ("mean-minus-std:k=1,k=2", "", r"option 'k' given twice"),
        ("weighted-sum", "nope", r"unknown reward-shaping 'nope' \(known: center, clip, (.*, )?par, ref-normalize"),
        ("weighted-sum", "par:field=answer", r"reward-shaping 'par' has no option 'field' \(its options: ref_field\)"),
        ("weighted-sum", "ref-normalize:ref_field=x", r"reward-shaping 'ref-normalize' has no option 'ref_field'"),
        ("weighted-sum", "ref-normalize:std=0", r"std must be > 0"),
        ("weighted-sum", "clip", r"'clip' needs low=... and/or high=..."),
        ("weighted-sum", "clip:low=2,high=1", r"low=2 is above high=1"),
        ("weighted-sum", "clip:low=zero", r"option 'low' of reward-shaping 'clip' must be a number"),
    ],
)
def test_spec_errors(combine, shaping, pattern):
    with pytest.raises(RlgenError, match=pattern) as info:
        RewardSet([RewardSpec("length")], combine=combine, shaping=shaping)
    assert "\n" not in str(info.value)


# --- CLI -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_score_cli_combine_min_shape_par(tmp_path):
    records = [
        {"prompt": "1+2=", "completion": "3", "answer": "3"},
        {"prompt": "2+2=", "completion": "22", "answer": "4"},
        {"prompt": "5+5=", "completion": "10", "answer": "10"},
        {"prompt": "9+9=", "completion": "x", "answer": "18"},
    ]
    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = rlgen_process("score", data, "-r", "exact-match", "-r", "length:-0.01", "--combine", "min",
                         "--shape", "par:ref_field=answer", cwd=tmp_path, check=True)
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    # per sample: min(exact-match, -0.01 * length) for the completion and for the answer as completion
    #   "3" vs "3":   min(1, -0.01) = -0.01,  ref min(1, -0.01) = -0.01 -> sigmoid(0)     = 0.5
    #   "22" vs "4":  min(0, -0.02) = -0.02,  ref min(1, -0.01) = -0.01 -> sigmoid(-0.01)
    #   "10" vs "10": min(1, -0.02) = -0.02,  ref min(1, -0.02) = -0.02 -> sigmoid(0)     = 0.5
    #   "x" vs "18":  min(0, -0.01) = -0.01,  ref min(1, -0.02) = -0.02 -> sigmoid(0.01)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert [r["reward"] for r in out] == approx([0.5, sigmoid(-0.01), 0.5, sigmoid(0.01)])
    # the per-reward columns stay raw
    assert [r["reward_exact-match"] for r in out] == [1.0, 0.0, 1.0, 0.0]
    assert [r["reward_length"] for r in out] == [1.0, 2.0, 2.0, 1.0]
    assert [r["completion"] for r in out] == [r["completion"] for r in records]

    # a record without the reference field: one line naming the field and the sample (exit status 2)
    data.write_text(json.dumps(records[0]) + "\n" + json.dumps({"prompt": "p", "completion": "1"}) + "\n")
    bad = rlgen_process("score", data, "-r", "exact-match", "--shape", "par:ref_field=answer", cwd=tmp_path, check=False)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "'answer'" in lines[0] and "sample 1" in lines[0]


# --- GRPO ------------------------------------------------------------------------------------------------

# A hot sampler (temperature 10) and room for 8 tokens, so the completion lengths of the first batch have a
# spread and the frozen std is a real one (tiny-arith's greedy-ish answers all have the same length).
GRPO_ARGS = ["train", "grpo", "--model", "tiny-arith", "--task", "arithmetic", "-r", "length",
             "--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2", "--set", "rollout.max_new_tokens=8",
             "--set", "rollout.temperature=10.0", "--set", "run.eval_every=0", "--set", "run.threads=1",
             "--save-every", "1", "--quiet"]


def _metrics(run: Path) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step}" / "trainer_state.json").read_text())


@pytest.mark.slow
def test_grpo_ref_normalize_frozen_and_resumed(tmp_path):
    import tomllib

    run = tmp_path / "run"
    rlgen_process(*GRPO_ARGS, "--steps", "2", "--set", 'reward_shaping="ref-normalize"', "--out", run, cwd=tmp_path,
                  check=True)
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["reward_shaping"] == "ref-normalize" and config["reward_combine"] == "weighted-sum"

    metrics = _metrics(run)
    frozen = _state(run, 1)["reward_shaping"]
    assert frozen["name"] == "ref-normalize"
    mu, sd = frozen["frozen"]["mean"], frozen["frozen"]["std"]
    # frozen on the first batch (4 completions): its mean length and population std (the metric is the
    # sample std), and step 1's shaped reward averages 0
    assert mu == approx(metrics[1]["rewards/length/mean"], abs=1e-5)
    assert metrics[1]["rewards/length/std"] > 0
    assert sd == approx(metrics[1]["rewards/length/std"] * math.sqrt(3 / 4), abs=1e-5)
    assert metrics[1]["reward"] == approx(0.0, abs=1e-5)
    # step 2 is normalised with step 1's statistics, not its own
    assert metrics[2]["reward"] == approx((metrics[2]["rewards/length/mean"] - mu) / (sd + 1e-6), abs=1e-4)

    # resume from step 1 with statistics that no batch could give: the run must use them, not re-estimate
    state_file = run / "checkpoints" / "step-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["reward_shaping"]["frozen"] = {"mean": 100.0, "std": 4.0}
    state_file.write_text(json.dumps(state))
    rlgen_process("train", "grpo", "--resume", run, "--steps", "3", "--quiet", cwd=tmp_path, check=True)
    assert _state(run, 2)["reward_shaping"] == {"name": "ref-normalize", "frozen": {"mean": 100.0, "std": 4.0}}
    resumed = _metrics(run)
    assert sorted(resumed) == [1, 2, 3]
    for step in (2, 3):
        assert resumed[step]["reward"] == approx((resumed[step]["rewards/length/mean"] - 100.0) / (4.0 + 1e-6), abs=1e-4)


def test_remax_greedy_baseline_is_shaped_like_the_rollouts():
    from types import SimpleNamespace

    from rlgen.algorithms.advantages import remax
    from rlgen.algorithms.grpo import GRPOTrainer

    rewards = RewardSet([RewardSpec("length")], shaping="center:ref_field=answer")
    engine = SimpleNamespace(generate=lambda prompts, params: SimpleNamespace(texts=["12345", "1"]))
    trainer = SimpleNamespace(config=SimpleNamespace(rollout=SimpleNamespace(num_generations=2, max_new_tokens=8),
                                                     algorithm=SimpleNamespace(scale_rewards="group")),
                              advantage_fn=remax, engine=engine, rewards=rewards, dist=Dist(),
                              prompt_text=lambda record: record["prompt"], params=SamplingParams(8, 1.0))
    records = [{"prompt": "a", "answer": "12"}, {"prompt": "b", "answer": "9"}]
    total = torch.tensor([1.0, 2.0, 0.0, 0.0])  # already shaped rollout rewards, 2 per prompt
    components = torch.zeros(4, 1)
    advantages = GRPOTrainer._advantages(trainer, records, components, total)
    # greedy baselines, centred on the answer like the rollouts: 5 - 2 = 3 and 1 - 1 = 0
    assert advantages.tolist() == [-2.0, -1.0, 0.0, 0.0]
