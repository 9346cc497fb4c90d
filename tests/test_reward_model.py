"""Reward models (`rlgen train rm`): a learnable preference set (the chosen answer ends in "77", the
rejected one never contains a 7) is learnt by tiny-arith, a random HF Llama and a random GPT-2 with a
sequence-classification head, and by tiny-arith with the value head; held-out pairwise accuracy through
`rlgen eval --rm`, ties counted wrong, per-subset accuracy; saved models load back with plain
transformers (or `load_reward_model` for the value head) and score exactly as rlgen scores them;
`rlgen score -r rm:PATH` gives the same values.

tiny-arith's training and a bad-input run are CLI subprocesses started in the background; the other runs
and the evaluations go through the same CLI entry point in-process (no interpreter start each).
"""
from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import rlgen, rlgen_ok, rlgen_process
from test_preference_trainers import write_jsonl

from rlgen.models.reward_model import MARKER, VALUE_HEAD_FILE, ValueHeadModel, load_reward_model, reward_scores


def learnable_pairs(n: int, seed: int, subset: str | None = None) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        pair = {"prompt": f"{a}+{b}=", "chosen": f"{a + b}77",
                "rejected": f"{a + b}" + "".join(rng.choice("01234568") for _ in range(2))}
        if subset:
            pair["subset"] = subset
        out.append(pair)
    return out


TRAIN = learnable_pairs(64, seed=0)
HELD_OUT = learnable_pairs(40, seed=1, subset="digits")
TIE = {"prompt": "5+5=", "chosen": "10", "rejected": "10", "tie": True, "subset": "ties"}
RM_SETS = ["--steps", 30, "--set", "algorithm.batch_size=16", "--set", "optim.lr=3e-3", "--set", "optim.warmup_steps=0",
           "--set", "optim.lr_scheduler=constant", "--set", "run.threads=1", "--set", "run.eval_every=0", "--quiet", "--json"]
SCORED = [{"prompt": "1+2=", "completion": "377", "answer": "3"}, {"prompt": "1+2=", "completion": "3", "answer": "3"},
          {"prompt": "40+2=", "completion": "4205", "answer": "42"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rm")
    write_jsonl(root / "train.jsonl", TRAIN)
    write_jsonl(root / "held_out.jsonl", [TIE, *HELD_OUT])
    write_jsonl(root / "scored_in.jsonl", SCORED)
    write_jsonl(root / "margins.jsonl", [{**TRAIN[0], "chosen_score": 1.0, "rejected_score": 0.0}, TRAIN[1]])
    (root / "margin-case").mkdir()
    return root


@pytest.fixture(scope="module", autouse=True)
def subprocess_runs(request, root):
    """The real CLI, in the background: tiny-arith's training and a bad-input run (only when their tests run: they
    are slow tests)."""
    jobs = {
        "tiny": lambda: rlgen_process("train", "rm", "--model", "tiny-arith", "--data", root / "train.jsonl", "--out",
                                      root / "tiny", *RM_SETS, cwd=root, check=True),
        "margin-error": lambda: rlgen_process("train", "rm", "--model", "tiny-arith", "--data", root / "margins.jsonl",
                                              "--out", "run", "--steps", 1, "--set", "algorithm.use_margin=true",
                                              cwd=root / "margin-case", check=False),
    }
    readers = {"tiny": {"test_tiny_arith_rm_learns_and_eval_counts_ties_wrong",
                        "test_tiny_arith_rm_loads_with_plain_transformers",
                        "test_score_with_rm_reward_equals_reward_scores"},
               "margin-error": {"test_use_margin_needs_margins_on_every_pair"}}
    selected = {item.originalname for item in request.session.items}
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {name: pool.submit(job) for name, job in jobs.items() if readers[name] & selected}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def train_inprocess(root: Path, name: str, model, *extra) -> tuple[dict, Path]:
    run = root / name
    if not run.exists():
        summary = json.loads(rlgen_ok("train", "rm", "--model", model, "--data", root / "train.jsonl", "--out", run,
                                      *RM_SETS, *extra).out)
        (run / "summary.json").write_text(json.dumps(summary))
    return json.loads((run / "summary.json").read_text()), run


def check_training(summary: dict, run: Path) -> None:
    last = summary["last_step"]
    assert last["step"] == 30
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["loss"] < 0.1
    assert rows[-1]["accuracy"] == 1.0 and rows[-1]["margin"] > 0
    assert rows[-1]["rewards/chosen"] > rows[-1]["rewards/rejected"]


def plain_classifier_scores(path: Path, texts: list[str]) -> list[float]:
    """Scores from plain transformers, one unpadded text at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert model.config.num_labels == 1
    with torch.no_grad():
        return [float(model(input_ids=torch.tensor([tokenizer(t).input_ids])).logits[0, 0]) for t in texts]


def rlgen_scores(path: Path, prompts: list[str], completions: list[str]) -> list[float]:
    model, tokenizer = load_reward_model(path)
    model.eval()
    with torch.no_grad():
        return reward_scores(model, tokenizer, prompts, completions).tolist()


# --- sequence-classification heads on random HF backbones (trained in-process while tiny-arith's runs) -----

@pytest.mark.slow
@pytest.mark.parametrize("name,arch", [("llama", "LlamaForSequenceClassification"), ("gpt2", "GPT2ForSequenceClassification")])
def test_hf_backbone_rm_learns_and_loads_back(root, hf_dirs, name, arch):
    summary, run = train_inprocess(root, name, hf_dirs[name])
    check_training(summary, run)
    final = run / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == [arch]
    report = json.loads(rlgen_ok("eval", "--rm", final, "--data", root / "held_out.jsonl", "--json").out)
    assert report["subsets"]["digits"]["accuracy"] > 0.9
    assert report["subsets"]["ties"]["accuracy"] == 0.0
    pairs = HELD_OUT[:5]
    prompts = [p["prompt"] for p in pairs for _ in range(2)]
    completions = [c for p in pairs for c in (p["chosen"], p["rejected"])]
    plain = plain_classifier_scores(final, [p + c for p, c in zip(prompts, completions)])
    assert rlgen_scores(final, prompts, completions) == pytest.approx(plain, abs=1e-5)


# --- value head ------------------------------------------------------------------------------------------

def test_value_head_trains_saves_and_scores_identically(root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlgen.rewards.base import resolve_reward

    summary, run = train_inprocess(root, "vh", "tiny-arith", "--set", "algorithm.head=value-head", "--save-every", 15)
    check_training(summary, run)
    final = run / "final"
    assert json.loads((final / MARKER).read_text()) == {"head": "value-head"}
    head = load_file(str(final / VALUE_HEAD_FILE))
    assert set(head) == {"weight", "bias"} and tuple(head["weight"].shape) == (1, 128)
    assert (run / "checkpoints" / "step-15" / "model" / VALUE_HEAD_FILE).is_file()
    # the directory is a plain causal LM for transformers
    lm = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    assert type(lm).__name__ == "LlamaForCausalLM"

    model, _ = load_reward_model(final)  # auto: the marker selects the value head
    assert isinstance(model, ValueHeadModel)
    assert torch.equal(model.value_head.weight.detach(), head["weight"])
    pairs = HELD_OUT[:5]
    prompts = [p["prompt"] for p in pairs for _ in range(2)]
    completions = [c for p in pairs for c in (p["chosen"], p["rejected"])]
    by_hand = []
    with torch.no_grad():  # last hidden state of the last token, through the saved linear head
        for p, c in zip(prompts, completions):
            hidden = lm(input_ids=torch.tensor([tokenizer(p + c).input_ids]), output_hidden_states=True).hidden_states[-1]
            by_hand.append(float(hidden[0, -1] @ head["weight"][0] + head["bias"][0]))
    scores = rlgen_scores(final, prompts, completions)
    assert scores == pytest.approx(by_hand, abs=1e-5)
    assert all(scores[i] > scores[i + 1] for i in range(0, len(scores), 2))
    # the same model as a reward function (`--reward rm:PATH`)
    reward = resolve_reward(f"rm:{final}")
    samples = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    assert reward(samples) == pytest.approx(scores, abs=1e-5)
    report = json.loads(rlgen_ok("eval", "--rm", final, "--data", root / "held_out.jsonl", "--json").out)
    assert report["subsets"]["digits"]["accuracy"] > 0.9 and report["subsets"]["ties"]["accuracy"] == 0.0


# --- tiny-arith (the CLI subprocess) ------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_arith_rm_learns_and_eval_counts_ties_wrong(subprocess_runs, root):
    proc = subprocess_runs["tiny"].result(timeout=600)
    run = root / "tiny"
    check_training(json.loads(proc.stdout), run)
    report = json.loads(rlgen_ok("eval", "--rm", run / "final", "--data", root / "held_out.jsonl", "--json").out)
    assert report["num_pairs"] == 41
    subsets = report["subsets"]
    assert subsets["ties"] == {"accuracy": 0.0, "num_pairs": 1}  # scored equal: a tie is wrong
    assert subsets["digits"]["num_pairs"] == 40 and subsets["digits"]["accuracy"] > 0.9
    assert report["accuracy"] == pytest.approx(subsets["digits"]["accuracy"] * 40 / 41)
    # the tie pair really scores equal
    tie_scores = rlgen_scores(run / "final", [TIE["prompt"]] * 2, [TIE["chosen"], TIE["rejected"]])
    assert tie_scores[0] == tie_scores[1]


@pytest.mark.slow
def test_tiny_arith_rm_loads_with_plain_transformers(subprocess_runs, root):
    subprocess_runs["tiny"].result(timeout=600)
    final = root / "tiny" / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    assert not (final / VALUE_HEAD_FILE).exists() and not (final / MARKER).exists()
    pairs = HELD_OUT[:6]
    prompts = [p["prompt"] for p in pairs for _ in range(2)]
    completions = [c for p in pairs for c in (p["chosen"], p["rejected"])]
    plain = plain_classifier_scores(final, [p + c for p, c in zip(prompts, completions)])
    assert rlgen_scores(final, prompts, completions) == pytest.approx(plain, abs=1e-5)  # padded batch == one by one
    assert all(plain[i] > plain[i + 1] for i in range(0, len(plain), 2))
    # without `subset` fields there is no per-subset breakdown
    from rlgen.evaluation.reward_models import pair_accuracy

    model, tokenizer = load_reward_model(final)
    model.train()
    plain_pairs = [{k: v for k, v in p.items() if k != "subset"} for p in pairs]
    assert pair_accuracy(model, tokenizer, plain_pairs, batch_size=4) == {"accuracy": 1.0, "num_pairs": 6}
    assert model.training  # pair_accuracy restores the mode it found


@pytest.mark.slow
def test_score_with_rm_reward_equals_reward_scores(subprocess_runs, root):
    subprocess_runs["tiny"].result(timeout=600)
    final = root / "tiny" / "final"
    stdout = rlgen_ok("score", root / "scored_in.jsonl", "-r", "rm:final", "--quiet", cwd=root / "tiny").out
    out = [json.loads(line) for line in stdout.splitlines()]
    assert len(out) == len(SCORED)
    expected = rlgen_scores(final, [r["prompt"] for r in SCORED], [r["completion"] for r in SCORED])
    assert [r["reward_rm:final"] for r in out] == pytest.approx(expected, abs=1e-5)
    assert [r["reward"] for r in out] == pytest.approx(expected, abs=1e-5)
    assert [r["completion"] for r in out] == [r["completion"] for r in SCORED]
    assert out[0]["reward"] > out[1]["reward"]  # "377" ends in 77


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_use_margin_needs_margins_on_every_pair(subprocess_runs, root):
    proc = subprocess_runs["margin-error"].result(timeout=600)
    detail = f"stdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert proc.returncode == 2, detail
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlgen: error: "), detail
    assert "margins.jsonl, line 2" in lines[0] and "use_margin" in lines[0] and "'margin'" in lines[0], detail
    assert "Traceback" not in proc.stderr
    assert not (root / "margin-case" / "run").exists()


def test_eval_rm_needs_data(tmp_path):
    code, _, err = rlgen("eval", "--rm", tmp_path)
    assert code == 2
    assert "--rm needs --data" in err


# --- RewardBench sections (issue 13, item 28) -----------------------------------------------------------

def test_rewardbench_section_scores_by_hand(monkeypatch):
    """Section scores weight subsets by RewardBench's example counts (alpacaeval-easy 100, mt-bench-easy 28,
    math-prm 984, hep-python 164); `section_weighted` is the plain mean of the sections present."""
    import rlgen.evaluation.reward_models as rm

    def fake_scores(model, tokenizer, prompts, completions):  # "good" outscores "bad"
        return torch.tensor([1.0 if c == "good" else 0.0 for c in completions])

    monkeypatch.setattr(rm, "reward_scores", fake_scores)
    hit, miss = {"chosen": "good", "rejected": "bad"}, {"chosen": "bad", "rejected": "good"}
    layout = [("alpacaeval-easy", hit), ("alpacaeval-easy", hit), ("mt-bench-easy", hit), ("mt-bench-easy", miss),
              ("donotanswer", miss), ("math-prm", hit), ("hep-python", miss), ("digits", hit)]
    pairs = [{"prompt": "p", **outcome, "subset": subset} for subset, outcome in layout]
    report = rm.pair_accuracy(torch.nn.Identity(), None, pairs, batch_size=3)
    assert report["accuracy"] == pytest.approx(5 / 8)  # every pair counts once
    chat = (1.0 * 100 + 0.5 * 28) / (100 + 28)  # 0.890625
    reasoning = (1.0 * 984 + 0.0 * 164) / (984 + 164)  # 6 / 7
    assert report["sections"] == pytest.approx({"Chat": chat, "Safety": 0.0, "Reasoning": reasoning})
    assert report["section_weighted"] == pytest.approx((chat + 0.0 + reasoning) / 3)
    assert report["sections_missing"] == ["Chat Hard"]  # not comparable with RewardBench's Score
    assert report["subsets"]["digits"] == {"accuracy": 1.0, "num_pairs": 1}  # outside every section
    # all four sections present: no sections_missing; subsets outside RewardBench give no section scores
    full = rm.rewardbench_sections({"alpacaeval-hard": 1.0, "llmbar-natural": 0.5, "xstest-should-refuse": 0.25,
                                    "hep-go": 0.0, "digits": 1.0})
    assert full == {"sections": {"Chat": 1.0, "Chat Hard": 0.5, "Safety": 0.25, "Reasoning": 0.0},
                    "section_weighted": pytest.approx(1.75 / 4)}
    assert rm.rewardbench_sections({"digits": 1.0}) == {}
