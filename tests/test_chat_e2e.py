"""Chat templates and conversational data end to end, on a user's own kind of model (a byte-level BPE tokenizer
with a ChatML template, a random Qwen2): SFT on `messages` -> GRPO on message-list prompts -> DPO on
message-list pairs -> sample | score | eval, with the template applied wherever text meets the model (the
prompt ids start with the template's header, the trained completion is the assistant turn with its
end-of-turn marker) and the sampled completions written back as assistant messages."""
from __future__ import annotations

import json

import pytest

from chat_model import IM_END, IM_START, build_chat_model
from cli_helpers import rlgen, rlgen_ok

QUESTIONS = [(a, b) for a in range(1, 5) for b in range(1, 3)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model = build_chat_model(root / "model")
    user = lambda a, b: [{"role": "user", "content": f"What is {a}+{b}?"}]  # noqa: E731
    sft = _write(root / "sft.jsonl", [{"messages": [*user(a, b), {"role": "assistant", "content": str(a + b)}]}
                                      for a, b in QUESTIONS])
    prompts = _write(root / "prompts.jsonl", [{"prompt": user(a, b), "answer": str(a + b)} for a, b in QUESTIONS])
    pairs = _write(root / "pairs.jsonl", [{"prompt": user(a, b), "chosen": [{"role": "assistant", "content": str(a + b)}],
                                           "rejected": [{"role": "assistant", "content": str(a + b + 1)}]}
                                          for a, b in QUESTIONS])
    return {"root": root, "model": model, "sft": sft, "prompts": prompts, "pairs": pairs}


def _left_stripped(ids: list[int], mask: list[int]) -> list[int]:
    return [t for t, m in zip(ids, mask) if m]


def test_sft_encodes_the_rendered_prompt_and_the_assistant_turn(chat_files, tmp_path):
    from rlgen.api import build_trainer

    trainer = build_trainer("sft", model=str(chat_files["model"]), data=str(chat_files["sft"]), out=str(tmp_path / "run"),
                            sets=["run.eval_every=0", "algorithm.batch_size=2"])
    trainer.setup()
    tok = trainer.tokenizer
    prompt_ids, prompt_mask, completion_ids, completion_mask = trainer.encode(trainer.records[:1])
    prompt = _left_stripped(prompt_ids[0].tolist(), prompt_mask[0].tolist())
    assert prompt[0] == tok.convert_tokens_to_ids(IM_START)  # the template's header, no token added before it
    assert tok.decode(prompt) == f"{IM_START}user\nWhat is 1+1?{IM_END}\n{IM_START}assistant\n"
    trained = _left_stripped(completion_ids[0].tolist(), completion_mask[0].tolist())
    assert tok.decode(trained) == f"2{IM_END}"  # the answer and the end of the turn (the stop token)


def test_grpo_rolls_out_on_the_rendered_prompts(chat_files, tmp_path):
    from rlgen.api import build_trainer

    trainer = build_trainer("grpo", model=str(chat_files["model"]), data=str(chat_files["prompts"]), out=str(tmp_path / "run"),
                            sets=["run.eval_every=0", "rollout.prompts_per_step=2", "rollout.num_generations=2",
                                  "rollout.max_new_tokens=3", 'rewards=[{name="exact-match"}]'])
    trainer.setup()
    batch = trainer._rollout_groups(trainer.records[:2])
    tok = trainer.tokenizer
    for row in range(4):
        prompt = _left_stripped(batch.rollouts.prompt_ids[row].tolist(), batch.rollouts.prompt_mask[row].tolist())
        assert prompt[0] == tok.convert_tokens_to_ids(IM_START)
        assert tok.decode(prompt).endswith(f"{IM_START}assistant\n")
    assert batch.samples[0]["prompt"] == "What is 1+1?"  # rewards read text (as in `rlgen score` and `rlgen eval`)
    assert isinstance(batch.records[0]["prompt"], list)  # the record itself as given


def test_sft_then_grpo_then_dpo_then_sample_on_conversations(chat_files):
    root, model = chat_files["root"], chat_files["model"]
    common = ["--quiet", "--set", "run.eval_every=0"]
    rlgen_ok("train", "sft", "--model", model, "--data", chat_files["sft"], "--steps", 2, "--set", "algorithm.batch_size=4",
             "--out", root / "sft", *common)
    held = _write(root / "held.jsonl", [{"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}], "answer": str(a + b)}
                                        for a, b in [(7, 1), (8, 1), (9, 1)]])
    grpo = rlgen_ok("train", "grpo", "--model", root / "sft" / "final", "--data", chat_files["prompts"],
                    "--eval-data", held, "--reward", "exact-match", "--reward", "length:-0.01", "--steps", 1,
                    "--set", "rollout.prompts_per_step=2", "--set", "rollout.num_generations=2",
                    "--set", "rollout.max_new_tokens=3", "--set", "run.eval_every=1", "--out", root / "grpo")
    assert f"held-out evaluation: {held} (3 records)" in grpo.err  # it says what it evaluated on
    rows = [json.loads(line) for line in (root / "grpo" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [row for row in rows if "eval/reward" in row]
    assert evaluated and all({"eval/accuracy", "eval/reward_exact-match", "eval/reward_length"} <= set(row) for row in evaluated)
    rlgen_ok("train", "dpo", "--model", root / "grpo" / "final", "--data", chat_files["pairs"], "--steps", 1,
             "--set", "algorithm.batch_size=2", "--out", root / "dpo", *common)
    out = rlgen_ok("sample", "--model", root / "dpo" / "final", "--prompts", chat_files["prompts"], "-n", 2,
                   "--max-new-tokens", 3, "--limit", 3).out
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 6
    for row in rows:  # written back in the shape read: messages in, assistant messages out
        assert isinstance(row["prompt"], list) and row["prompt"][0]["role"] == "user"
        assert [m["role"] for m in row["completion"]] == ["assistant"] and isinstance(row["completion"][0]["content"], str)
    scored = rlgen_ok("score", "-r", "exact-match", stdin=out).out
    assert all(json.loads(line)["reward_exact-match"] in (0.0, 1.0) for line in scored.splitlines())
    summary = json.loads(rlgen_ok("eval", "-", "--json", stdin=scored).out)
    assert summary["num_samples"] == 6 and "accuracy" in summary
    assert len(rlgen_ok("pairs", stdin=scored).out.splitlines()) <= 3


def test_chat_template_modes(chat_files, tmp_path):
    prompts = chat_files["prompts"]
    never = rlgen("sample", "--model", chat_files["model"], "--prompts", prompts, "--chat-template", "never",
                  "--max-new-tokens", 2, "--limit", 1)
    assert never.code == 2 and never.out == "" and "chat_template = never" in never.err and "line 1" in never.err
    strings = _write(tmp_path / "strings.jsonl", [{"prompt": "What is 1+1?"}])
    plain = rlgen_ok("sample", "--model", chat_files["model"], "--prompts", strings, "--chat-template", "never",
                     "--max-new-tokens", 2).out
    assert isinstance(json.loads(plain)["completion"], str)  # a string prompt gets a string completion
    from rlgen.data.chat import ChatFormat
    from rlgen.models.causal_lm import load_tokenizer

    tok = load_tokenizer(chat_files["model"])
    auto = ChatFormat(tok, "auto", system_prompt="Be brief.")
    assert auto.prompt_text("Hi") == (f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi{IM_END}\n"
                                      f"{IM_START}assistant\n")
    assert auto.completion_text("Hi", "Hello") == f"Hello{IM_END}\n"
    assert ChatFormat(tok, "never").prompt_text("Hi") == "Hi"
    from rlgen.errors import RlgenError
    from rlgen.models.causal_lm import resolve_model_path

    plain_tok = load_tokenizer(resolve_model_path("tiny-arith"))  # no template: auto leaves prompts as they are
    assert ChatFormat(plain_tok, "auto").prompt_text("1+1=") == "1+1="
    with pytest.raises(RlgenError, match="no chat template"):
        ChatFormat(plain_tok, "always")


def test_eval_a_chat_model_on_message_prompts_with_sampling_options(chat_files, tmp_path):
    samples = tmp_path / "evaluated.jsonl"
    result = json.loads(rlgen_ok("eval", "--model", chat_files["model"], "--data", chat_files["prompts"], "--limit", 3,
                                 "--max-new-tokens", 3, "--repetition-penalty", 1.3, "--min-p", 0.05, "--stop", "\n",
                                 "-k", 2, "--samples-out", samples, "--json").out)
    assert result["num_problems"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    written = [json.loads(line) for line in samples.read_text().splitlines()]
    assert all(isinstance(row["prompt"], list) and row["completion"][0]["role"] == "assistant" for row in written)
    assert all("\n" not in row["completion"][0]["content"] for row in written)  # cut at the stop string


def test_multi_turn_sft_trains_every_assistant_turn_and_nothing_else(chat_files, tmp_path):
    from rlgen.api import build_trainer

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+1?"},
             {"role": "assistant", "content": "2"}, {"role": "user", "content": "And 2+2?"},
             {"role": "assistant", "content": "4"}]
    data = _write(tmp_path / "multi.jsonl", [{"messages": turns}])
    trainer = build_trainer("sft", model=str(chat_files["model"]), data=str(data), out=str(tmp_path / "run"),
                            sets=["run.eval_every=0", "algorithm.batch_size=2"])
    trainer.setup()
    assert [len(r["prompt"]) for r in trainer.records] == [2, 4]  # one example per assistant turn
    tok = trainer.tokenizer
    prompt_ids, prompt_mask, completion_ids, completion_mask = trainer.encode(trainer.records)
    trained = [tok.decode(_left_stripped(ids.tolist(), mask.tolist())) for ids, mask in zip(completion_ids, completion_mask)]
    assert trained == [f"2{IM_END}", f"4{IM_END}"]
    second = tok.decode(_left_stripped(prompt_ids[1].tolist(), prompt_mask[1].tolist()))
    assert second.endswith(f"{IM_START}user\nAnd 2+2?{IM_END}\n{IM_START}assistant\n") and f"2{IM_END}" in second


def test_conversational_samples_pair_rm_and_sft_held_out(chat_files, tmp_path):
    from rlgen.data.preferences import make_pairs

    answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    made = make_pairs([{"prompt": [{"role": "user", "content": "q"}], "completion": answer("a"), "reward": 1.0},
                       {"prompt": [{"role": "user", "content": "q"}], "completion": answer("b"), "reward": 0.0}])
    assert made[0]["chosen"] == answer("a") and made[0]["rejected"] == answer("b")  # messages stay messages
    rlgen_ok("train", "rm", "--model", chat_files["model"], "--data", chat_files["pairs"], "--steps", 1,
             "--set", "algorithm.batch_size=2", "--quiet", "--out", tmp_path / "rm")
    held = _write(tmp_path / "held-sft.jsonl", [{"messages": [{"role": "user", "content": "What is 9+9?"},
                                                               {"role": "assistant", "content": "18"}]}])
    rlgen_ok("train", "sft", "--model", chat_files["model"], "--data", chat_files["sft"], "--eval-data", held,
             "--steps", 1, "--set", "run.eval_every=1", "--set", "algorithm.batch_size=2", "--quiet", "--out", tmp_path / "sft")
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [row["eval/accuracy"] for row in rows if "eval/accuracy" in row] == [0.0, 0.0]  # a number, not NaN
