"""Token-budget micro-batching (`optim.max_tokens_per_micro_batch`, rlgen.training.micro_batches): the chunker
keeps its budget, units and row coverage, deterministically and balanced; trimming the all-padding columns of
a micro-batch leaves its log-probs unchanged; and sft, dpo, kto and rm trained with a small budget (several
micro-batches per step) log the metrics and end with the weights of the unsplit run."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import rlgen, rlgen_ok

import rlgen.training.micro_batches as mb
from rlgen.models.causal_lm import load_model, load_tokenizer, resolve_model_path
from rlgen.models.logprobs import completion_logprobs
from rlgen.models.sequences import pad_tokens
from rlgen.rollout.groups import ModelInputs
from rlgen.training.micro_batches import (even_passes, map_micro_batches, micro_batches, pad_to, padded_cost,
                                          pair_units, token_budget_chunks, trimmed)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the chunker ---------------------------------------------------------------------------------------

def rows_of(chunks) -> list[int]:
    return sorted(r for chunk in chunks for r in chunk.tolist())


def test_every_row_once_within_budget_and_oversized_rows_alone():
    costs = [10, 3, 7, 7, 2, 12, 5, 5, 30]
    chunks = token_budget_chunks(costs, 24)
    assert rows_of(chunks) == list(range(len(costs)))
    for chunk in chunks:
        if chunk.tolist() == [8]:  # 30 tokens: over the budget, alone
            continue
        assert padded_cost(costs, chunk) <= 24, chunk
    assert [8] in [c.tolist() for c in chunks]
    # by hand: sorted longest first 30 | 12 10 | 7 7 5 | 5 3 2 -> padded costs 30, 24, 21, 15
    assert [c.tolist() for c in chunks] == [[8], [0, 5], [2, 3, 6], [1, 4, 7]]


def test_budget_large_enough_gives_one_micro_batch_and_tiny_budget_one_row_each():
    costs = [4, 9, 1, 6]
    assert [c.tolist() for c in token_budget_chunks(costs, 10**6)] == [[0, 1, 2, 3]]
    assert sorted(c.tolist() for c in token_budget_chunks(costs, 1)) == [[0], [1], [2], [3]]


def test_units_stay_whole_with_their_row_order():
    costs = [5, 9, 2, 2, 8, 1, 3, 3]
    units = [[1, 0], [2, 3], [5, 4], [6, 7]]
    for budget in (1, 10, 18, 20, 40, 1000):
        chunks = token_budget_chunks(costs, budget, units)
        assert rows_of(chunks) == list(range(8))
        for chunk in chunks:
            rows = chunk.tolist()
            for unit in units:
                if unit[0] in rows:  # the whole unit, its rows next to each other in the given order
                    at = rows.index(unit[0])
                    assert rows[at:at + len(unit)] == unit, (budget, rows)
            if len(rows) > 2:
                assert padded_cost(costs, chunk) <= budget


def test_bad_units_and_budget_raise():
    with pytest.raises(ValueError):
        token_budget_chunks([1, 2, 3], 10, [[0, 1]])  # row 2 missing
    with pytest.raises(ValueError):
        token_budget_chunks([1, 2], 10, [[0, 1], [1]])  # row 1 twice
    with pytest.raises(ValueError):
        token_budget_chunks([1, 2], 0)


def test_deterministic_and_balanced_on_random_lengths():
    rng = random.Random(0)
    for trial in range(30):
        costs = [rng.randint(1, 200) for _ in range(rng.randint(1, 60))]
        budget = rng.randint(200, 2000)
        chunks = token_budget_chunks(costs, budget)
        again = token_budget_chunks(list(costs), budget)
        assert [c.tolist() for c in chunks] == [c.tolist() for c in again]
        assert rows_of(chunks) == list(range(len(costs)))
        assert all(padded_cost(costs, c) <= budget for c in chunks)
        # as few micro-batches as greedy packing of the sorted rows, and the dearest one no dearer than greedy's
        greedy, rows = [], []
        for r in sorted(range(len(costs)), key=lambda r: (-costs[r], r)):
            if rows and (len(rows) + 1) * costs[rows[0]] > budget:
                greedy.append(rows)
                rows = []
            rows.append(r)
        greedy.append(rows)
        assert len(chunks) == len(greedy)
        assert max(padded_cost(costs, c) for c in chunks) <= max(padded_cost(costs, torch.tensor(g)) for g in greedy)


def test_balance_evens_out_what_greedy_leaves_lopsided():
    # greedy at 40 fills one micro-batch with 4 rows of 10 and leaves 1 row alone; balanced: 3 + 2 rows
    chunks = token_budget_chunks([10] * 5, 40)
    assert sorted(len(c) for c in chunks) == [2, 3]
    assert max(padded_cost([10] * 5, c) for c in chunks) == 30


def test_micro_batches_without_a_budget_split_by_count_as_before():
    assert [c.tolist() for c in micro_batches(5, 0, 2)] == [[0, 1, 2], [3, 4]]
    assert [c.tolist() for c in micro_batches(6, 0, 2, units=pair_units(6))] == [[0, 1, 2, 3], [4, 5]]
    assert micro_batches(0, 16, 2, []) == []


def test_even_passes_on_one_process_are_the_chunks():
    chunks = [torch.tensor([0, 1]), torch.tensor([2])]
    assert [(c.tolist(), real) for c, real in even_passes(chunks, None)] == [([0, 1], True), ([2], True)]


# --- trimming ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    path = resolve_model_path("tiny-arith")
    return load_model(path).eval(), load_tokenizer(path)


def encode(tokenizer, prompts: list[str], completions: list[str], extra_prompt=0, extra_completion=0) -> ModelInputs:
    """Left-padded prompts, right-padded completions (with EOS), each widened by extra all-padding columns."""
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = pad_tokens(tokenizer(prompts).input_ids, pad, left=True)
    answers = [tokenizer(c, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for c in completions]
    completion_ids, completion_mask = pad_tokens(answers, pad, left=False)
    prompt_ids = torch.cat([torch.full((len(prompts), extra_prompt), pad), prompt_ids], 1)
    prompt_mask = torch.cat([torch.zeros((len(prompts), extra_prompt), dtype=prompt_mask.dtype), prompt_mask], 1)
    completion_ids = torch.cat([completion_ids, torch.full((len(prompts), extra_completion), pad)], 1)
    completion_mask = torch.cat([completion_mask, torch.zeros((len(prompts), extra_completion), dtype=completion_mask.dtype)], 1)
    return ModelInputs(prompt_ids, prompt_mask, completion_ids, completion_mask)


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_trimmed_inputs_give_the_same_logprobs(tiny, shared_prefix):
    model, tokenizer = tiny
    prompts = ["12+34=", "12+34=", "5+9=", "700+88="]
    inputs = encode(tokenizer, prompts, ["46", "47", "14", "788"], extra_prompt=3, extra_completion=4)
    short = trimmed(inputs)
    assert short.prompt_ids.shape[1] == inputs.prompt_ids.shape[1] - 3
    assert short.completion_ids.shape[1] == inputs.completion_ids.shape[1] - 4
    assert torch.equal(short.prompt_mask.sum(1), inputs.prompt_mask.sum(1))
    with torch.no_grad():
        full, _ = completion_logprobs(model, *inputs, shared_prefix=shared_prefix)
        cut, _ = completion_logprobs(model, *short, shared_prefix=shared_prefix)
    assert cut.shape[1] == short.completion_ids.shape[1]
    mask = inputs.completion_mask.bool()
    torch.testing.assert_close(pad_to(cut, full.shape[1])[mask], full[mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(pad_to(cut, full.shape[1])[:, cut.shape[1]:], torch.zeros(4, 4))


def test_map_micro_batches_puts_rows_back_in_order(tiny):
    model, tokenizer = tiny
    inputs = encode(tokenizer, ["1+2=", "400+500=", "3+4=", "999+1="], ["3", "900", "7", "1000"])
    with torch.no_grad():
        whole = completion_logprobs(model, *inputs)[0]
        for budget in (1, 16, 10**6):
            per_token = map_micro_batches(lambda part: completion_logprobs(model, *part)[0], inputs, budget)
            summed = map_micro_batches(lambda part: (completion_logprobs(model, *part)[0] * part.completion_mask).sum(1),
                                       inputs, budget)
            assert per_token.shape == whole.shape
            torch.testing.assert_close(per_token * inputs.completion_mask, whole * inputs.completion_mask, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(summed, (whole * inputs.completion_mask).sum(1), atol=1e-5, rtol=1e-5)


# --- trainers: split by budget == unsplit ----------------------------------------------------------------

SUMS = [(407, 779), (488, 790), (535, 648), (12, 34), (250, 250), (901, 87), (66, 77), (123, 456),
        (310, 205), (999, 1), (45, 45), (700, 88), (38, 61), (204, 613), (5, 9), (840, 160)]
PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 10 * (k % 3 + 1))}
         for k, (a, b) in enumerate(SUMS)]
# adam_eps = 1e-3 keeps Adam from turning rounding noise in a near-zero gradient entry into an lr-sized step
COMMON = ["--model", "tiny-arith", "--steps", "2", "--set", "optim.lr=1e-3", "--set", "optim.adam_eps=1e-3",
          "--set", "run.threads=1", "--set", "run.eval_every=0", "--quiet"]
CASES = {
    "sft": ["--task", "arithmetic", "--set", "algorithm.batch_size=8", "--set", "data.eval_samples=0"],
    "dpo": ["--data", "{pairs}", "--set", "algorithm.batch_size=6", "--set", "algorithm.rpo_alpha=0.5"],
    "kto": ["--data", "{pairs}", "--set", "algorithm.batch_size=7"],
    "rm": ["--data", "{pairs}", "--set", "algorithm.batch_size=6"],
    # groups of 4 completions (~13 tokens each) stay whole: one group per micro-batch; a KL reference and two
    # iterations, so the old-policy and reference passes are split too
    "grpo": ["--task", "arithmetic", "--set", "rollout.prompts_per_step=4", "--set", "rollout.num_generations=4",
             "--set", "rollout.max_new_tokens=8", "--set", "algorithm.beta=0.1", "--set", "algorithm.num_iterations=2"],
}
BUDGET = 40  # tiny-arith rows are ~10-16 tokens: two to three rows (one pair) per micro-batch


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mb-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(CASES))
def test_budget_split_trains_like_the_unsplit_step(tmp_path, pair_file, monkeypatch, algorithm):
    args = ["train", algorithm, *(a.replace("{pairs}", str(pair_file)) for a in CASES[algorithm]), *COMMON]
    rlgen_ok(*args, "--out", tmp_path / "whole", cwd=tmp_path)
    counts = []
    chunker = mb.token_budget_chunks
    monkeypatch.setattr(mb, "token_budget_chunks", lambda *a, **k: counts.append(len(chunker(*a, **k))) or chunker(*a, **k))
    rlgen_ok(*args, "--set", f"optim.max_tokens_per_micro_batch={BUDGET}", "--out", tmp_path / "split", cwd=tmp_path)
    assert counts and max(counts) >= 3, counts  # the budget did split the steps
    whole, split = metric_rows(tmp_path / "whole"), metric_rows(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2]
    for a, b in zip(whole, split):
        assert set(a) == set(b)
        for key in ("loss", "grad_norm"):
            # metrics are logged to 6 decimals: the rounding on top of the relative tolerance
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
        for key, value in a.items():
            if not key.endswith(("_time", "_per_s")) and value is not None:  # wall-clock figures aside
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (a["step"], key)
    base = load_file(str(resolve_model_path("tiny-arith") / "model.safetensors"))
    ours, theirs = (load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("whole", "split"))
    assert max(float((ours[k] - base[k]).abs().max()) for k in base if k in ours) > 1e-4  # it trained
    worst = max(float((theirs[k] - ours[k]).abs().max()) for k in ours)
    print(f"{algorithm}: micro-batches per pass {sorted(set(counts))}, max |weight diff| {worst:.2e}")
    assert worst <= 1e-6


def test_negative_budget_is_refused_naming_the_key(tmp_path):
    result = rlgen("train", "sft", "--model", "tiny-arith", "--set", "optim.max_tokens_per_micro_batch=-5", "--steps", "1",
                   "--out", tmp_path / "bad", cwd=tmp_path)
    assert result.code != 0 and "optim.max_tokens_per_micro_batch" in result.err



# --- FSDP: ranks split unevenly, every rank runs as many passes --------------------------------------------

# Trains each case (rlgen.api.build_trainer, in this process: on one process or as one torchrun rank), counting
# the filler passes `even_passes` adds (rank-uneven budget splits) -> {algorithm: fillers} in RANK's file.
FSDP_WORKER = """
import json, os, sys
from pathlib import Path
import rlgen.training.micro_batches as mb
import rlgen.algorithms.sft, rlgen.algorithms.parts, rlgen.algorithms.kto, rlgen.algorithms.reward_modeling
from rlgen.api import build_trainer
from rlgen.distributed import shutdown

fillers = {"count": 0}
even = mb.even_passes

def counted(chunks, dist):
    passes = even(chunks, dist)
    fillers["count"] += sum(1 for _, real in passes if not real)
    return passes

for module in (mb, rlgen.algorithms.sft, rlgen.algorithms.parts, rlgen.algorithms.kto, rlgen.algorithms.reward_modeling):
    module.even_passes = counted
root, mode = Path(sys.argv[1]), sys.argv[2]
cases = json.loads((root / "cases.json").read_text())
out = {}
for algorithm, case in cases.items():
    fillers["count"] = 0
    sets = case["sets"] + (["run.distributed=fsdp"] if mode == "two" else [])
    build_trainer(algorithm, sets=sets, out=str(root / mode / algorithm), **case["flags"]).fit()
    out[algorithm] = fillers["count"]
(root / f"{mode}-rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(out))
shutdown()
"""


def launch(tmp_path: Path, mode: str, processes: int) -> list[dict]:
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, str(script)]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                   str(port), str(script)]
    proc = subprocess.run([*command, str(tmp_path), mode], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"{mode}-rank{r}.json").read_text()) for r in range(processes)]


# Rows of 5 to 30 tokens: budgets of one to three rows a micro-batch, picked so that with each trainer the
# two ranks' shards split into different numbers of micro-batches at some step.
FSDP_BUDGETS = {"sft": 64, "dpo": 64, "kto": 40, "rm": 64}
VARIED = [{"prompt": f"{'7' * (1 + 5 * k % 11)}+{k}=", "chosen": str(k) * (1 + k % 4), "rejected": str(k + 1) * (1 + 3 * k % 5)}
          for k in range(16)]


@pytest.mark.slow
def test_fsdp_ranks_with_uneven_budget_splits_train_like_one_process(tmp_path):
    pair_file, record_file = tmp_path / "pairs.jsonl", tmp_path / "records.jsonl"
    pair_file.write_text("".join(json.dumps(p) + "\n" for p in VARIED))
    record_file.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n" for p in VARIED))
    common = ["optim.lr=1e-3", "optim.adam_eps=1e-3", "run.threads=1", "run.eval_every=0"]
    pairs = {"model": "tiny-arith", "data": str(pair_file), "steps": 2}
    cases = {
        "sft": {"flags": {**pairs, "data": str(record_file)}, "sets": ["algorithm.batch_size=8", *common]},
        "dpo": {"flags": pairs, "sets": ["algorithm.batch_size=6", "algorithm.rpo_alpha=0.5", *common]},
        "kto": {"flags": pairs, "sets": ["algorithm.batch_size=8", *common]},  # FSDP: a multiple of the 2 ranks
        "rm": {"flags": pairs, "sets": ["algorithm.batch_size=6", *common]},
    }
    for algorithm, case in cases.items():
        case["sets"].append(f"optim.max_tokens_per_micro_batch={FSDP_BUDGETS[algorithm]}")
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    one = launch(tmp_path, "one", 1)[0]
    two = launch(tmp_path, "two", 2)
    assert all(count == 0 for count in one.values())
    print("filler passes per rank:", two)
    # some rank did run fewer micro-batches than its peer, with each trainer
    assert all(sum(rank[a] for rank in two) > 0 for a in cases), two
    for algorithm in cases:
        single, sharded = metric_rows(tmp_path / "one" / algorithm), metric_rows(tmp_path / "two" / algorithm)
        assert [r["step"] for r in sharded] == [r["step"] for r in single] == [1, 2]
        for a, b in zip(single, sharded):
            for key, value in a.items():
                if key in ("step_time", "rewards/accuracies") or value is None:
                    continue
                # dpo's rewards are beta x differences of summed log-probs, computed with gathered shards of
                # the weights: ~1e-5 of rounding apart at step 2 (with or without filler passes)
                assert b[key] == pytest.approx(value, rel=1e-4, abs=2e-5), (algorithm, a["step"], key)
        ours, theirs = (load_file(str(tmp_path / run / algorithm / "final" / "model.safetensors")) for run in ("one", "two"))
        for name in ours:
            torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=1e-5, msg=name)
