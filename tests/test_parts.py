"""Trainer parts (issue 14, item 5): `RolloutBatch` / `GroupRollout` (rlgen.rollout.groups), `PairEncoder`
(rlgen.training.parts), `PairwiseUpdate` (rlgen.algorithms.parts), and online DPO built from them.

Checked against values computed here: shapes and tokens of the shipped tiny-arith model's char tokenizer,
exact-match rewards recomputed from the sampled texts, pairings worked out by hand, and the online-DPO
loss of one step recomputed from plain unpadded forward passes of the policy and the reference.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from rlgen.algorithms.online_dpo import OnlineDPOConfig, OnlineDPOTrainer, best_worst_pairs
from rlgen.algorithms.parts import PairwiseUpdate
from rlgen.algorithms.preference_losses import PairScores, PreferenceOptions, sigmoid
from rlgen.config import from_dict
from rlgen.models.causal_lm import load_model, load_tokenizer, resolve_model_path
from rlgen.rewards.base import RewardSet, RewardSpec
from rlgen.rollout.engine import HFEngine, Rollouts, SamplingParams
from rlgen.rollout.groups import GroupRollout, ModelInputs, RolloutBatch
from rlgen.training.parts import PairEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    path = resolve_model_path("tiny-arith")
    return load_model(path).eval(), load_tokenizer(path)


@torch.no_grad()
def plain_sequence_logp(model, inputs: ModelInputs, row: int) -> float:
    """Summed log-prob of one row's completion tokens after its prompt: one unpadded forward, float64 softmax."""
    prompt = inputs.prompt_ids[row][inputs.prompt_mask[row].bool()].tolist()
    completion = inputs.completion_ids[row][inputs.completion_mask[row].bool()].tolist()
    logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + completion])).logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt) + j - 1, token]) for j, token in enumerate(completion))


# --- RolloutBatch and GroupRollout ---------------------------------------------------------------------

def test_group_rollout_samples_each_prompt_g_times_and_scores_every_row(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    records = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "5+9="}, {"prompt": "7+1=", "answer": "8"}]
    before = copy.deepcopy(records)
    rollout = GroupRollout(engine, RewardSet([RewardSpec("exact-match")]), 3, SamplingParams(6, 1.0),
                           torch.Generator().manual_seed(0))
    batch = rollout.sample(records)

    assert len(batch) == 9 and batch.num_groups == 3 and batch.group_size == 3
    assert batch.group_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert batch.records == records and records == before  # the drawn records are not written to
    assert [s["prompt"] for s in batch.samples] == ["12+34="] * 3 + ["5+9="] * 3 + ["7+1="] * 3
    inputs = batch.inputs
    assert inputs.completion_ids.shape[0] == 9 and inputs.completion_ids.shape[1] <= 6
    for row in range(9):  # each row: its prompt's tokens, left-padded; the sample holds its text and length
        assert inputs.prompt_ids[row][inputs.prompt_mask[row].bool()].tolist() == tokenizer(batch.samples[row]["prompt"]).input_ids
        assert batch.samples[row]["completion"] == batch.rollouts.texts[row]
        assert batch.samples[row]["completion_tokens"] == int(inputs.completion_mask[row].sum()) == int(batch.completion_lengths[row])
    # exact-match by hand; "5+9=" has no answer: no reward applies, so those rows do not count
    expected = [float(t.strip() == "46") for t in batch.rollouts.texts[:3]] + [0.0] * 3 \
        + [float(t.strip() == "8") for t in batch.rollouts.texts[6:]]
    assert batch.total.tolist() == expected and batch.valid.all()
    assert batch.counted.tolist() == [True] * 3 + [False] * 3 + [True] * 3
    assert torch.isnan(batch.components[3:6, 0]).all() and batch.components[:3, 0].tolist() == expected[:3]
    assert batch.old_logps is None and batch.ref_logps is None

    again = GroupRollout(engine, RewardSet([RewardSpec("exact-match")]), 3, SamplingParams(6, 1.0),
                         torch.Generator().manual_seed(0)).sample(records)
    assert again.rollouts.texts == batch.rollouts.texts and torch.equal(again.inputs.completion_ids, inputs.completion_ids)


def hand_batch(texts: list[str], totals: list[float], group_size: int, valid: list[bool] | None = None,
               prompt_width: int = 2, completion_width: int = 3, first_token: int = 10) -> RolloutBatch:
    """A RolloutBatch built by hand: row r's prompt tokens are [r + first_token] * prompt_width, its completion
    [r + first_token + 100] * completion_width; one reward column equal to the totals."""
    n = len(texts)
    ids = torch.arange(n).unsqueeze(1) + first_token
    rollouts = Rollouts(prompts=[f"p{r // group_size}" for r in range(n)], prompt_ids=ids.repeat(1, prompt_width),
                        prompt_mask=torch.ones(n, prompt_width, dtype=torch.long),
                        completion_ids=(ids + 100).repeat(1, completion_width),
                        completion_mask=torch.ones(n, completion_width, dtype=torch.long),
                        truncated=torch.zeros(n, dtype=torch.bool), texts=list(texts))
    records = [{"prompt": f"p{k}"} for k in range(n // group_size)]
    samples = [{"prompt": f"p{r // group_size}", "completion": t} for r, t in enumerate(texts)]
    total = torch.tensor(totals)
    return RolloutBatch(records, group_size, rollouts, samples, total.unsqueeze(1), torch.tensor(valid or [True] * n), total)


def test_rollout_batch_selects_groups_and_concatenates_with_padding():
    first = hand_batch(["a", "b", "c", "d"], [1.0, 0.0, 2.0, 2.0], 2)
    second = hand_batch(["e", "f"], [5.0, 4.0], 2, prompt_width=3, completion_width=1, first_token=50)
    both = RolloutBatch.concat([first, second], pad_id=0)
    assert len(both) == 6 and both.num_groups == 3 and both.records == first.records + second.records
    assert both.inputs.prompt_ids.tolist() == [[0, 10, 10], [0, 11, 11], [0, 12, 12], [0, 13, 13], [50, 50, 50],
                                                [51, 51, 51]]  # prompts left-padded
    assert both.inputs.prompt_mask[:4, 0].tolist() == [0, 0, 0, 0]
    assert both.inputs.completion_ids[4:].tolist() == [[150, 0, 0], [151, 0, 0]]  # completions right-padded
    assert both.inputs.completion_mask[4:].tolist() == [[1, 0, 0], [1, 0, 0]]
    assert both.total.tolist() == [1.0, 0.0, 2.0, 2.0, 5.0, 4.0] and both.rollouts.texts == list("abcdef")

    both.old_logps = torch.arange(18.0).view(6, 3)
    picked = both.select_groups([2, 0])
    assert picked.records == [{"prompt": "p0"}, {"prompt": "p0"}]  # second's group 0, then first's group 0
    assert picked.rollouts.texts == ["e", "f", "a", "b"] and picked.total.tolist() == [5.0, 4.0, 1.0, 0.0]
    assert [s["completion"] for s in picked.samples] == ["e", "f", "a", "b"]
    assert picked.old_logps[:, 0].tolist() == [12.0, 15.0, 0.0, 3.0] and picked.ref_logps is None
    assert picked.inputs.rows(torch.tensor([1])).completion_ids.tolist() == [[151, 0, 0]]
    assert len(both.select_groups([])) == 0
    with pytest.raises(ValueError):
        RolloutBatch.concat([first, hand_batch(["x", "y", "z"], [0.0, 1.0, 2.0], 3)], pad_id=0)


# --- pairing (online DPO) ------------------------------------------------------------------------------

def test_best_worst_pairs_pair_as_rlgen_pairs_does():
    nan = float("nan")
    batch = hand_batch(
        ["a", "b", "c", "d",  # best: the first of the 3s (row 1), worst row 3
         "e", "f", "g", "h",  # no spread: no pair
         "i", "j", "k", "l",  # rows 10, 11 invalid: best 8, worst 9
         "m", "n", "o", "p",  # only row 13 valid: no pair
         "q", "r", "s", "t",  # best 18; of the tied lowest the last (row 19), as `rlgen pairs` picks
         "u", "v", "w", "x",  # NaN rows: a reward that does not apply; best 21, worst 22
         "y", "z", "y", "Z"],  # "y" twice counts once (row 24); best 25, worst 24
        [1.0, 3.0, 3.0, 0.0, 2.0, 2.0, 2.0, 2.0, 5.0, 1.0, 9.0, 0.0, 4.0, 7.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0,
         nan, 2.0, 1.0, nan, 0.0, 1.0, 0.0, 0.5], 4,
        valid=[True] * 8 + [True, True, False, False] + [False, True, False, False] + [True] * 4
        + [False, True, True, False] + [True] * 4)
    pairs, rows = best_worst_pairs(batch)
    assert rows.tolist() == [1, 3, 8, 9, 18, 19, 21, 22, 25, 24]
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [
        ("b", "d", 3.0), ("i", "j", 4.0), ("s", "t", 1.0), ("v", "w", 1.0), ("z", "y", 1.0)]
    assert pairs[0].keys() == {"group", "chosen", "rejected", "chosen_score", "rejected_score", "margin"}
    assert all(s.keys() == {"prompt", "completion"} for s in batch.samples)  # the batch's samples are not written to

    none, empty = best_worst_pairs(hand_batch(["a", "b"], [1.0, 1.0], 2))
    assert none == [] and empty.tolist() == []


# --- PairEncoder ----------------------------------------------------------------------------------------

def test_pair_encoder_interleaves_pairs_and_tokenises_the_runs_pairs_once(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    dataset = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}, {"prompt": "10+20=", "chosen": "30", "rejected": "301"}]
    snapshot = copy.deepcopy(dataset)
    tokenised: list[list[str]] = []
    tokenize_completions = engine.tokenize_completions
    engine.tokenize_completions = lambda texts: tokenised.append(list(texts)) or tokenize_completions(texts)
    encoder = PairEncoder(tokenizer, engine, dataset)
    eos = tokenizer.eos_token_id

    inputs = encoder.encode([dataset[1], dataset[0]])
    assert isinstance(inputs, ModelInputs) and inputs.prompt_ids.shape == (4, len(tokenizer("10+20=").input_ids))
    for row, (prompt, answer) in enumerate([("10+20=", "30"), ("10+20=", "301"), ("1+2=", "3"), ("1+2=", "4")]):
        assert inputs.prompt_ids[row][inputs.prompt_mask[row].bool()].tolist() == tokenizer(prompt).input_ids
        expected = tokenizer(answer, add_special_tokens=False).input_ids + [eos]
        assert inputs.completion_ids[row][: len(expected)].tolist() == expected
        assert inputs.completion_mask[row].tolist() == [1] * len(expected) + [0] * (inputs.completion_ids.shape[1] - len(expected))
    assert inputs.prompt_mask[2:, 0].tolist() == [0, 0]  # the shorter prompt is left-padded
    assert tokenised == [["30", "301", "3", "4"]]
    assert dataset == snapshot  # nothing is written into the records
    assert encoder.positions([dataset[1], dataset[0]]) == [1, 0]

    again = encoder.encode([dataset[0], dataset[1]])  # a later epoch: padded from the cache
    assert tokenised == [["30", "301", "3", "4"]]
    assert torch.equal(again.completion_ids, inputs.completion_ids[[2, 3, 0, 1]])
    held_out = dict(dataset[0])  # equal content, another record: not the run's, tokenised every time
    for _ in range(2):
        assert torch.equal(encoder.encode([held_out]).completion_ids, again.completion_ids[:2, :2])
    assert tokenised == [["30", "301", "3", "4"], ["3", "4"], ["3", "4"]]
    with pytest.raises(KeyError):
        encoder.positions([held_out])


# --- PairwiseUpdate -------------------------------------------------------------------------------------

def test_pairwise_update_is_one_step_of_the_mean_pair_loss_in_any_micro_batching(tiny):
    _, tokenizer = tiny
    path = resolve_model_path("tiny-arith")
    pairs = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a, b in [(1, 2), (30, 4), (5, 55)]]
    results = []
    for accumulation in (1, 2):
        model = load_model(path).train()
        engine = HFEngine(model, tokenizer)
        inputs = PairEncoder(tokenizer, engine).encode(pairs)
        policy = [plain_sequence_logp(model, inputs, row) for row in range(6)]
        grads = {}

        def step() -> float:
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            model.zero_grad(set_to_none=True)
            return 1.5

        update = PairwiseUpdate(model, sigmoid, PreferenceOptions(beta=0.5), step, rpo_alpha=0.25,
                                accumulation_steps=accumulation)
        ref = torch.tensor([[policy[0] + 0.2, policy[1]], [policy[2], policy[3] + 0.4], [policy[4], policy[5] - 0.3]])
        metrics = update.step(inputs, ref)
        results.append((metrics, grads))

    # by hand: h = beta * ((c - c_ref) - (r - r_ref)) per pair = 0.5 * (-0.2, 0.4, -0.3); the NLL term is the
    # chosen answers' summed log-prob over their token count
    h = [0.5 * -0.2, 0.5 * 0.4, 0.5 * -0.3]
    chosen_tokens = float(inputs.completion_mask[0::2].sum())
    nll = -(policy[0] + policy[2] + policy[4]) / chosen_tokens
    expected = sum(-math.log(1 / (1 + math.exp(-x))) for x in h) / 3 + 0.25 * nll
    for metrics, grads in results:
        assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
        assert metrics["nll"] == pytest.approx(nll, rel=1e-5) and metrics["pairs"] == 3 and metrics["grad_norm"] == 1.5
        assert metrics["rewards/margins"] == pytest.approx(sum(h) / 3, abs=1e-5)
        assert metrics["rewards/accuracies"] == pytest.approx(1 / 3)  # only the second pair's margin is > 0
        assert metrics["logps/chosen"] == pytest.approx((policy[0] + policy[2] + policy[4]) / 3, rel=1e-5)
    (one, grads_one), (two, grads_two) = results
    assert grads_one.keys() == grads_two.keys() and grads_one
    for name, grad in grads_one.items():
        assert (grads_two[name] - grad).abs().max() <= 1e-4 * grad.abs().max().clamp(min=1e-12), name


# --- online DPO = group rollout + pairing + pairwise update --------------------------------------------

def test_online_dpo_step_loss_equals_the_preference_loss_of_its_pairs(tmp_path):
    from rlgen.cli.report import Reporter
    from rlgen.training.run_dir import RunDir

    out = tmp_path / "online"
    cfg = from_dict(OnlineDPOConfig, {
        "model": {"path": "tiny-arith"},
        "data": {"task": "arithmetic"},
        "rollout": {"prompts_per_step": 8, "num_generations": 4, "max_new_tokens": 6},
        "algorithm": {"beta": 0.3},
        "optim": {"lr": 1e-3, "gradient_accumulation_steps": 2},
        "run": {"out": str(out), "steps": 1, "seed": 3, "eval_every": 0, "threads": 1},
    })
    trainer = OnlineDPOTrainer(cfg, RunDir(out), Reporter(quiet=True))
    trainer.setup()
    reference = load_model(resolve_model_path("tiny-arith")).eval()  # the reference is the initial model
    with torch.no_grad():  # move the policy off it a little, so that the log-ratios are not all 0
        noise = torch.Generator().manual_seed(0)
        for param in trainer.model.parameters():
            param.add_(0.003 * torch.randn(param.shape, generator=noise))

    seen = {}
    sample, step = trainer.group_rollout.sample, trainer.pairwise_update.step

    def recording_sample(records, first_row=0):
        seen["batch"] = sample(records, first_row)
        return seen["batch"]

    def recording_step(inputs, ref):
        seen["inputs"] = inputs
        seen["policy"] = [plain_sequence_logp(trainer.model, inputs, row) for row in range(inputs.prompt_ids.shape[0])]
        seen["reference"] = [plain_sequence_logp(reference, inputs, row) for row in range(inputs.prompt_ids.shape[0])]
        return step(inputs, ref)

    trainer.group_rollout.sample, trainer.pairwise_update.step = recording_sample, recording_step
    trainer.step = 1
    metrics = trainer.train_step()

    batch, inputs = seen["batch"], seen["inputs"]
    pairs, rows = best_worst_pairs(batch)
    assert metrics["pairs"] == len(pairs) > 0 and inputs.prompt_ids.shape[0] == 2 * len(pairs)
    assert torch.equal(inputs.completion_ids, batch.inputs.completion_ids[rows])  # the sampled tokens themselves
    for k, pair in enumerate(pairs):  # chosen rows are each group's better-rewarded completions
        chosen, rejected = int(rows[2 * k]), int(rows[2 * k + 1])
        assert batch.rollouts.texts[chosen] == pair["chosen"] and batch.rollouts.texts[rejected] == pair["rejected"]
        assert batch.total[chosen] > batch.total[rejected] and chosen // 4 == rejected // 4
    policy, reference = torch.tensor(seen["policy"]), torch.tensor(seen["reference"])
    tokens = inputs.completion_mask.sum(1).double()
    scores = PairScores(policy[0::2], policy[1::2], tokens[0::2], tokens[1::2], reference[0::2], reference[1::2])
    expected = sigmoid(scores, PreferenceOptions(beta=0.3))
    assert metrics["loss"] == pytest.approx(float(expected.losses.mean()), rel=1e-4)
    assert metrics["rewards/margins"] == pytest.approx(float((expected.chosen_rewards - expected.rejected_rewards).mean()),
                                                       abs=1e-5)
    assert metrics["reward"] == pytest.approx(float(batch.total.mean()))


# --- GRPO's rollout batch ------------------------------------------------------------------------------

def grpo_trainer(tmp_path, seed: int, **algorithm):
    from rlgen.algorithms.grpo import GRPOConfig, GRPOTrainer
    from rlgen.cli.report import Reporter
    from rlgen.training.run_dir import RunDir

    out = tmp_path / f"grpo-{seed}"
    cfg = from_dict(GRPOConfig, {
        "model": {"path": "tiny-arith"},
        "data": {"task": "arithmetic"},
        "rollout": {"prompts_per_step": 4, "num_generations": 4, "max_new_tokens": 6},
        "algorithm": algorithm,
        "optim": {"lr": 1e-4},
        "run": {"out": str(out), "steps": 1, "seed": seed, "eval_every": 0, "threads": 1},
    })
    trainer = GRPOTrainer(cfg, RunDir(out), Reporter(quiet=True))
    trainer.setup()
    return trainer


def test_grpo_dynamic_sampling_keeps_groups_with_a_spread_and_overlong_shaping_adds_the_penalty(tmp_path):
    trainer = grpo_trainer(tmp_path, 2, dynamic_sampling=True, max_resample_rounds=3)
    batch, zero_std, rounds = trainer._collect()
    assert rounds >= 2  # this seed's first round has groups without a spread: the batch was refilled
    assert 0 < batch.num_groups <= 4 and len(batch) == 4 * batch.num_groups and 0.0 < zero_std <= 1.0
    for k in range(batch.num_groups):
        rows = slice(4 * k, 4 * k + 4)
        assert {s["prompt"] for s in batch.samples[rows]} == {batch.records[k]["prompt"]}
        correct = [float(s["completion"].strip() == s["answer"]) for s in batch.samples[rows]]
        assert batch.total[rows].tolist() == correct and max(correct) > min(correct)

    trainer = grpo_trainer(tmp_path, 3, overlong_buffer=2, overlong_penalty=0.5)
    batch, _, rounds = trainer._collect()
    assert rounds == 1 and batch.num_groups == 4
    for sample, total in zip(batch.samples, batch.total.tolist()):  # buffer 2 of 6 tokens: penalised past 4
        penalty = min(0.0, (4 - sample["completion_tokens"]) / 2 * 0.5)
        assert total == pytest.approx(float(sample["completion"].strip() == sample["answer"]) + penalty)


def test_grpo_update_fills_in_the_old_and_reference_log_probs_of_its_batch(tmp_path):
    trainer = grpo_trainer(tmp_path, 0, beta=0.05, num_iterations=2)
    seen = {}
    update = trainer._update

    def recording_update(batch, mask, advantages):
        seen["batch"] = batch
        return update(batch, mask, advantages)

    trainer._update = recording_update
    trainer.step = 1
    metrics = trainer.train_step()
    batch = seen["batch"]
    assert batch.old_logps.shape == batch.ref_logps.shape == batch.inputs.completion_ids.shape
    reference = load_model(resolve_model_path("tiny-arith")).eval()
    mask = batch.inputs.completion_mask.bool()
    for row in (0, len(batch) - 1):
        assert float(batch.ref_logps[row][mask[row]].sum()) == pytest.approx(plain_sequence_logp(reference, batch.inputs, row),
                                                                             rel=1e-4, abs=1e-5)
    # before the first update the policy is the reference: the same log-probs, and a KL of 0 in iteration 1
    assert torch.allclose(batch.old_logps[mask], batch.ref_logps[mask], atol=1e-5)
    assert "kl" in metrics
