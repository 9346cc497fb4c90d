"""Preference trainers (dpo / simpo / rpo / orpo, kto, online-dpo) on tiny models, checked against values
computed here: the first DPO step on policy == reference is log 2 with zero rewards, SimPO / ORPO / RPO
step-1 losses equal the formulas applied to log-probs computed independently with a plain forward pass,
a few DPO steps separate chosen from rejected, the reference log-prob cache survives `--resume`
(its restored values are used, not recomputed), and plain HF checkpoints train and load back.

The CLI runs start together from one module fixture, two at a time (each pays the torch import); the
in-process checks run meanwhile.
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import rlgen_ok, rlgen_process

from rlgen.cli.report import Reporter
from rlgen.cli.train import build_config
from rlgen.plugins import registry
from rlgen.training.data import PromptSampler
from rlgen.training.run_dir import RunDir

LOG2 = math.log(2)
# tiny-arith style prompts: chosen is the right sum, rejected a wrong one
SUMS = [(407, 779), (488, 790), (535, 648), (12, 34), (250, 250), (901, 87), (66, 77), (123, 456),
        (310, 205), (999, 1), (45, 45), (700, 88), (38, 61), (204, 613), (5, 9), (840, 160)]
PAIRS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 10 * (k % 3 + 1))}
         for k, (a, b) in enumerate(SUMS)]
TINY = ["--set", "run.threads=1", "--set", "run.eval_every=0"]


# In-process training runs beside the CLI subprocesses: one intra-op thread avoids oversubscription.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def build_trainer(algorithm: str, out: Path, data: Path | None, *sets: str, model="tiny-arith", steps=3, seed=0):
    """A trainer built in-process exactly as `rlgen train` builds it (config from presets and --set)."""
    algo = registry("algorithm").get(algorithm)
    flags = {"model.path": str(model), "data.path": str(data) if data else None, "run.out": str(out), "run.steps": steps,
             "run.seed": seed}
    cfg = build_config(algo, None, ["run.eval_every=0", *sets], flags, None)
    return algo.trainer_cls(cfg, RunDir(cfg.run.out), Reporter(quiet=True))


def make_trainer(*args, **kwargs):
    trainer = build_trainer(*args, **kwargs)
    trainer.setup()
    return trainer


@torch.no_grad()
def plain_logps(model, tokenizer, prompt: str, completion: str) -> tuple[float, int]:
    """(summed log-prob, token count) of completion + EOS after prompt, one unpadded forward pass."""
    prompt_ids = tokenizer(prompt).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total = sum(float(logp[len(prompt_ids) + j - 1, tok]) for j, tok in enumerate(completion_ids))
    return total, len(completion_ids)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- CLI runs, started together ---------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def cli_runs(request, tmp_path_factory):
    """CLI subprocesses started with the module, two at a time, while the in-process tests run; only those whose
    test this session runs (both are slow tests)."""
    root = tmp_path_factory.mktemp("pref-cli")
    unpaired = write_jsonl(root / "unpaired.jsonl",
                           [{"prompt": p["prompt"], "completion": p["chosen"] if k % 2 else p["rejected"], "label": bool(k % 2)}
                            for k, p in enumerate(PAIRS)])
    jobs = {
        "kto-unpaired": lambda: rlgen_process("train", "kto", "--model", "tiny-arith", "--data", unpaired,
                                              "--out", root / "kto-unpaired", "--steps", 3,
                                              "--set", "algorithm.batch_size=4", *TINY, "--quiet", "--json",
                                              cwd=root, check=True),
        "online-dpo": lambda: rlgen_process("train", "online-dpo", "--model", "tiny-arith", "--task", "arithmetic",
                                            "--out", root / "online", "--steps", 2,
                                            "--set", "rollout.prompts_per_step=4", "--set", "rollout.num_generations=4",
                                            "--set", "rollout.max_new_tokens=6", *TINY, "--quiet", "--json",
                                            cwd=root, check=True),
    }
    reader = {"kto-unpaired": "test_kto_on_unpaired_data_reports_kl", "online-dpo": "test_online_dpo_logs_pairs"}
    selected = {item.originalname for item in request.session.items}
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {"root": root, **{name: pool.submit(job) for name, job in jobs.items() if reader[name] in selected}}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- dpo / simpo / rpo / orpo in-process -------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pref-data") / "pairs.jsonl", PAIRS)


def test_dpo_step_one_is_log2_with_a_reference_and_simpo_has_none(tmp_path, pair_file):
    dpo = make_trainer("dpo", tmp_path / "dpo", pair_file, "algorithm.batch_size=4")
    assert dpo.uses_reference and dpo.reference is not None
    assert all(not p.requires_grad for p in dpo.reference.module.parameters())
    batch = PromptSampler(dpo.pairs, 4, 0).next_batch()  # the batch step 1 will draw
    metrics = dpo.train_step()
    assert metrics["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/rejected"] == 0.0 and metrics["rewards/margins"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0  # equal rewards are not a win
    # the sequence log-probs the trainer logs equal a plain unpadded forward pass of the reference model
    plain = [plain_logps(dpo.reference.module, dpo.tokenizer, p["prompt"], p["chosen"])[0] for p in batch]
    assert metrics["logps/chosen"] == pytest.approx(sum(plain) / len(plain), rel=1e-4, abs=1e-5)
    cached = dpo.ref_cache[[dpo.pairs.index(p) for p in batch], 0]
    assert cached.tolist() == pytest.approx(plain, rel=1e-4, abs=1e-5)
    assert int(torch.isnan(dpo.ref_cache[:, 0]).sum()) == len(PAIRS) - 4  # only the seen pairs are cached

    simpo = make_trainer("simpo", tmp_path / "simpo", pair_file, "algorithm.batch_size=4")
    assert not simpo.uses_reference and simpo.reference is None
    assert simpo.extra_tensors() == {}


def test_simpo_and_orpo_step_one_equal_the_formulas_on_plain_log_probs(tmp_path, pair_file):
    for algorithm in ("simpo", "orpo"):
        trainer = make_trainer(algorithm, tmp_path / algorithm, pair_file, "algorithm.batch_size=4")
        a = trainer.config.algorithm
        batch = PromptSampler(trainer.pairs, 4, 0).next_batch()
        chosen = [plain_logps(trainer.model, trainer.tokenizer, p["prompt"], p["chosen"]) for p in batch]
        rejected = [plain_logps(trainer.model, trainer.tokenizer, p["prompt"], p["rejected"]) for p in batch]
        metrics = trainer.train_step()
        avg_c = [s / n for s, n in chosen]
        avg_r = [s / n for s, n in rejected]
        nll = -sum(s for s, _ in chosen) / sum(n for _, n in chosen)
        if algorithm == "simpo":  # preset: beta 2, gamma 1, no NLL
            assert (a.beta, a.simpo_gamma, a.rpo_alpha) == (2.0, 1.0, 0.0)
            expected = sum(-logsig(a.beta * (c - r) - a.simpo_gamma) for c, r in zip(avg_c, avg_r)) / 4
        else:  # preset: beta 0.1 on the odds-ratio term plus the NLL of the chosen answers
            assert (a.beta, a.rpo_alpha) == (0.1, 1.0)

            def log_odds(x):
                return x - math.log(1 - math.exp(x))

            expected = sum(-a.beta * logsig(log_odds(c) - log_odds(r)) for c, r in zip(avg_c, avg_r)) / 4 + nll
        assert metrics["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        assert metrics["nll"] == pytest.approx(nll, rel=1e-4, abs=1e-5)
        assert metrics["rewards/chosen"] == pytest.approx(a.beta * sum(avg_c) / 4, rel=1e-4, abs=1e-5)
        assert metrics["rewards/rejected"] == pytest.approx(a.beta * sum(avg_r) / 4, rel=1e-4, abs=1e-5)


def test_rpo_adds_alpha_times_nll_to_dpo(tmp_path, pair_file):
    dpo = make_trainer("dpo", tmp_path / "dpo", pair_file, "algorithm.batch_size=4", seed=5)
    rpo = make_trainer("rpo", tmp_path / "rpo", pair_file, "algorithm.batch_size=4", "algorithm.rpo_alpha=0.5", seed=5)
    assert rpo.config.algorithm.loss_type == "sigmoid"
    m_dpo, m_rpo = dpo.train_step(), rpo.train_step()
    assert m_rpo["nll"] == pytest.approx(m_dpo["nll"], rel=1e-6) and m_rpo["nll"] > 0.1
    assert m_dpo["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert m_rpo["loss"] - m_dpo["loss"] == pytest.approx(0.5 * m_rpo["nll"], rel=1e-5)
    # the NLL term changes the update: the chosen answers gain more under rpo than under dpo
    batch = PromptSampler(dpo.pairs, 4, 5).next_batch()
    gain = {}
    for name, trainer in (("dpo", dpo), ("rpo", rpo)):
        after = sum(plain_logps(trainer.model, trainer.tokenizer, p["prompt"], p["chosen"])[0] for p in batch)
        before = sum(plain_logps(trainer.reference.module, trainer.tokenizer, p["prompt"], p["chosen"])[0] for p in batch)
        gain[name] = after - before
    assert gain["rpo"] > gain["dpo"]


def test_dpo_steps_separate_chosen_from_rejected(tmp_path, pair_file):
    trainer = make_trainer("dpo", tmp_path / "dpo", pair_file, "algorithm.batch_size=16", "optim.lr=1e-4",
                           "algorithm.beta=0.5", steps=8)
    pairs = [dict(p) for p in PAIRS]  # held-out copies: other records than the run's, so not in its caches
    assert trainer.pair_accuracy(pairs) == 0.0  # policy == reference: every pair ties, and a tie is wrong

    def margins():
        out = []
        for p in pairs:
            values = [plain_logps(m, trainer.tokenizer, p["prompt"], p[k])[0]
                      for m in (trainer.model, trainer.reference.module) for k in ("chosen", "rejected")]
            out.append((values[0] - values[2]) - (values[1] - values[3]))  # (c - c_ref) - (r - r_ref)
        return out

    assert max(abs(m) for m in margins()) < 1e-6
    trainer.model.train()
    steps = [trainer.train_step() for _ in range(8)]
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"] + 0.5
    assert steps[-1]["rewards/accuracies"] == 1.0
    assert steps[-1]["loss"] < 0.5 * LOG2
    after = margins()
    assert min(after) > 0, after  # every training pair now prefers its chosen answer
    assert trainer.pair_accuracy(pairs) == 1.0


# --- reference cache across --resume ------------------------------------------------------------------------

@pytest.mark.slow
def test_reference_cache_is_checkpointed_and_restored(tmp_path, pair_file):
    """2 steps (checkpoint at step 1; in-process through the CLI entry point), a tampered cache value, then
    `rlgen train dpo --resume` to 4 steps as a real subprocess."""
    run = tmp_path / "run"
    rlgen_ok("train", "dpo", "--model", "tiny-arith", "--data", pair_file, "--out", run, "--steps", 2,
             "--save-every", 1, "--seed", 3, "--set", "algorithm.batch_size=4", *TINY, "--quiet")
    step1 = run / "checkpoints" / "step-1"
    first_cache = load_file(str(step1 / "extra.safetensors"))["extra.ref_cache"].clone()
    first_metrics = metrics_of(run)
    seen_first = [i for i in range(len(PAIRS)) if not math.isnan(float(first_cache[i, 0]))]
    tampered = seen_first[0]
    changed = first_cache.clone()
    changed[tampered, 0] = -123.0  # a value only the restored cache can have
    save_file({"extra.ref_cache": changed}, str(step1 / "extra.safetensors"))
    rlgen_process("train", "dpo", "--resume", run, "--steps", 4, "--quiet", cwd=tmp_path, check=True)

    # the first run: step 1 logs DPO's log 2 and zero rewards (policy == reference)
    row1 = first_metrics[0]
    assert row1["step"] == 1 and row1["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert row1["rewards/margins"] == 0.0 and row1["rewards/chosen"] == 0.0

    order = PromptSampler(list(range(len(PAIRS))), 4, 3)
    batches = [order.next_batch() for _ in range(3)]
    assert sorted(i for i in range(len(PAIRS)) if not math.isnan(float(first_cache[i, 0]))) == sorted(batches[0])
    assert first_cache.dtype == torch.float64 and tuple(first_cache.shape) == (len(PAIRS), 2)

    # the resumed run: every step once, and the checkpoint at step 3 holds pairs seen in steps 1-3, NaN for the rest
    assert [r["step"] for r in metrics_of(run)] == [1, 2, 3, 4]
    assert metrics_of(run)[0] == first_metrics[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
    cache = load_file(str(run / "checkpoints" / "step-3" / "extra.safetensors"))["extra.ref_cache"]
    seen = {i for b in batches for i in b}
    assert len(seen) == 12
    for i in range(len(PAIRS)):
        assert bool(torch.isnan(cache[i]).all()) == (i not in seen), i
    # the restored value was used, not recomputed ...
    assert float(cache[tampered, 0]) == -123.0
    # ... and the others are the base model's log-probs, unchanged by training
    from rlgen.models.causal_lm import load_model, load_tokenizer, resolve_model_path

    base = resolve_model_path("tiny-arith")
    model, tokenizer = load_model(base, "float32").eval(), load_tokenizer(base)
    for i in sorted(seen - {tampered}):
        expected = [plain_logps(model, tokenizer, PAIRS[i]["prompt"], PAIRS[i][k])[0] for k in ("chosen", "rejected")]
        assert cache[i].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-5), i
        if i in batches[0]:
            assert cache[i].tolist() == first_cache[i].tolist()  # bit-identical to the first run's


# --- kto ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kto_on_unpaired_data_reports_kl(cli_runs):
    proc = cli_runs["kto-unpaired"].result(timeout=600)
    rows = metrics_of(cli_runs["root"] / "kto-unpaired")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert json.loads(proc.stdout)["last_step"]["step"] == 3
    # step 1: policy == reference, so the batch KL is 0 and every example's loss is w (1 - s(0)) = 1/2
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    for row in rows:
        assert math.isfinite(row["kl"]) and 0.0 <= row["desirable_fraction"] <= 1.0
        assert ("rewards/chosen" in row) == (row["desirable_fraction"] > 0)
        assert ("rewards/rejected" in row) == (row["desirable_fraction"] < 1)


def test_kto_on_pair_file_with_weights(tmp_path, pair_file):
    trainer = make_trainer("kto", tmp_path / "kto", pair_file, "algorithm.batch_size=8", "optim.lr=1e-3",
                           "algorithm.desirable_weight=2.0", "algorithm.undesirable_weight=0.5", steps=4)
    assert len(trainer.examples) == 2 * len(PAIRS)  # each pair: one desirable, one undesirable example
    assert [e["label"] for e in trainer.examples[:4]] == [True, False, True, False]
    rows = [trainer.train_step() for _ in range(4)]
    # step 1: KL 0 and each loss w (1 - s(0)) = w / 2, so the mean is (2 f + 0.5 (1 - f)) / 2
    f = rows[0]["desirable_fraction"]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["loss"] == pytest.approx((2.0 * f + 0.5 * (1 - f)) / 2, abs=1e-6)
    assert any(abs(r["kl"]) > 1e-4 for r in rows[1:])  # the policy moved: the KL estimate follows
    assert not torch.isnan(trainer.ref_cache).all() and trainer.extra_tensors()["ref_cache"] is trainer.ref_cache


# --- online dpo ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_online_dpo_logs_pairs(cli_runs):
    proc = cli_runs["online-dpo"].result(timeout=600)
    rows = metrics_of(cli_runs["root"] / "online")
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads(proc.stdout)["last_step"]["step"] == 2
    for row in rows:
        assert isinstance(row["pairs"], int) and 0 <= row["pairs"] <= 4
        assert 0.0 <= row["reward"] <= 1.0
        assert ("loss" in row) == (row["pairs"] > 0)
        if row["pairs"]:
            assert row["rewards/accuracies"] >= 0 and "grad_norm" in row
        else:
            assert row["skipped_update"] == 1
    assert (cli_runs["root"] / "online" / "final" / "model.safetensors").is_file()


# --- plain HF checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cls", [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
def test_dpo_on_plain_hf_checkpoint_loads_back(tmp_path, hf_dirs, pair_file, name, cls):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    trainer = build_trainer("dpo", run, pair_file, "algorithm.batch_size=4", "optim.lr=1e-2", "run.save_every=2",
                            model=hf_dirs[name], steps=3)
    last = trainer.fit()
    assert last["step"] == 3
    rows = metrics_of(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(LOG2, abs=1e-6) and rows[0]["rewards/margins"] == 0.0
    assert rows[-1]["rewards/margins"] != 0.0
    assert (run / "checkpoints" / "step-2" / "extra.safetensors").is_file()
    trained = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    base = AutoModelForCausalLM.from_pretrained(str(hf_dirs[name]))
    assert type(trained).__name__ == cls
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "training did not change the weights"
    ids = torch.tensor([[1, 21, 22, 15, 23, 33]])
    with torch.no_grad():
        assert torch.isfinite(trained(input_ids=ids).logits).all()
