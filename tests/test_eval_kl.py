"""KL of a policy to a reference on samples (Schulman's k1 and k3): 0 for a model against itself, and equal
to a direct torch log_softmax computation for two different tiny models, on texts and on sampled rollouts;
and `rlgen eval --model M -k K --ref R` end to end (in-process)."""
from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import rlgen, rlgen_ok

PROMPTS = ["1+2=", "13+4=", "7+7=", "1+2="]
COMPLETIONS = ["3", "17", "14 ", "4"]


def _llama(tokenizer, seed: int, vocab: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab or len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **ids))
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from rlgen.models.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    root = tmp_path_factory.mktemp("kl")
    policy, reference = _llama(tokenizer, 0), _llama(tokenizer, 1)
    dirs = {}
    for name, model in (("policy", policy), ("reference", reference)):
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(str(root / name), safe_serialization=True)
        tokenizer.save_pretrained(str(root / name))
        dirs[name] = root / name
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": c.strip()}) + "\n" for p, c in zip(PROMPTS, COMPLETIONS)))
    return {"tokenizer": tokenizer, "policy": policy, "reference": reference, "dirs": dirs, "data": data}


def direct_kl(policy, reference, sequences):
    """Per-sequence sums of k1 and k3 from full forward passes and torch.log_softmax, one sequence at a time."""
    k1s, k3s = [], []
    with torch.no_grad():
        for prompt_ids, completion_ids in sequences:
            ids = torch.tensor([prompt_ids + completion_ids])
            start, end = len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1  # positions predicting the completion
            target = torch.tensor(completion_ids)
            logp = torch.log_softmax(policy(ids).logits[0, start:end].double(), -1).gather(-1, target[:, None])[:, 0]
            logq = torch.log_softmax(reference(ids).logits[0, start:end].double(), -1).gather(-1, target[:, None])[:, 0]
            log_r = logq - logp
            k1s.append(float((-log_r).sum()))
            k3s.append(float((log_r.exp() - 1 - log_r).sum()))
    return k1s, k3s


def text_sequences(tokenizer):
    eos = tokenizer.eos_token_id
    return [(tokenizer(p).input_ids, tokenizer(c, add_special_tokens=False).input_ids + [eos])
            for p, c in zip(PROMPTS, COMPLETIONS)]


def test_kl_of_a_model_to_itself_is_zero(models):
    from rlgen.evaluation.kl import kl_to_reference

    result = kl_to_reference(models["policy"], models["policy"], models["tokenizer"], PROMPTS, COMPLETIONS)
    assert result["kl_k1"] == 0.0 and result["kl_k3"] == 0.0
    assert result["num_sequences"] == 4
    assert result["num_tokens"] == sum(len(c) for _, c in text_sequences(models["tokenizer"]))


def test_kl_equals_a_direct_log_softmax_computation(models):
    from rlgen.evaluation.kl import kl_to_reference

    policy, reference, tokenizer = models["policy"], models["reference"], models["tokenizer"]
    result = kl_to_reference(policy, reference, tokenizer, PROMPTS, COMPLETIONS, batch_size=3)  # two batches
    k1s, k3s = direct_kl(policy, reference, text_sequences(tokenizer))
    assert result["kl_k1"] == pytest.approx(sum(k1s) / len(k1s), rel=1e-4, abs=1e-5)
    assert result["kl_k3"] == pytest.approx(sum(k3s) / len(k3s), rel=1e-4, abs=1e-5)
    assert result["kl_k3"] > 0 and all(k >= 0 for k in k3s)
    tokens = sum(len(c) for _, c in text_sequences(tokenizer))
    assert result["kl_k1_per_token"] == pytest.approx(sum(k1s) / tokens, rel=1e-4, abs=1e-5)


def test_kl_on_sampled_rollouts(models):
    from rlgen.evaluation.kl import kl_of_rollouts
    from rlgen.rollout.engine import HFEngine, SamplingParams

    policy, reference, tokenizer = models["policy"], models["reference"], models["tokenizer"]
    engine = HFEngine(policy, tokenizer)
    prompts = [p for p in PROMPTS[:3] for _ in range(2)]
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=5, temperature=1.0), torch.Generator().manual_seed(0))
    result = kl_of_rollouts(policy, reference, rollouts)
    sequences = [(ids[m.bool()].tolist(), cids[cm.bool()].tolist()) for ids, m, cids, cm in
                 zip(rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids, rollouts.completion_mask)]
    k1s, k3s = direct_kl(policy, reference, sequences)
    assert result["num_sequences"] == 6
    assert result["kl_k1"] == pytest.approx(sum(k1s) / 6, rel=1e-4, abs=1e-5)
    assert result["kl_k3"] == pytest.approx(sum(k3s) / 6, rel=1e-4, abs=1e-5)


def test_estimators_by_hand():
    from rlgen.evaluation.kl import kl_estimates

    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
    logq = torch.log(torch.tensor([[0.25, 0.5, 0.1]]))
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    out = kl_estimates(logp, logq, mask)
    # r = q / p = 0.5 and 2: k1 = -log r, k3 = (r - 1) - log r
    assert float(out["k1"][0]) == pytest.approx(-(torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(2.0))).item(), abs=1e-6)
    assert float(out["k3"][0]) == pytest.approx((0.5 - 1 - torch.log(torch.tensor(0.5)).item()) + (2 - 1 - torch.log(torch.tensor(2.0)).item()), abs=1e-6)
    assert float(out["tokens"][0]) == 2


def test_different_vocabularies_are_an_error(models):
    from rlgen.errors import RlgenError
    from rlgen.evaluation.kl import kl_to_reference

    other = _llama(models["tokenizer"], 2, vocab=len(models["tokenizer"]) + 5)
    with pytest.raises(RlgenError, match="vocabularies"):
        kl_to_reference(models["policy"], other, models["tokenizer"], PROMPTS, COMPLETIONS)


def test_cli_eval_with_ref_and_k(models):
    dirs = models["dirs"]
    common = ["eval", "--model", dirs["policy"], "--data", models["data"], "--max-new-tokens", 4, "--json", "--quiet"]
    report = json.loads(rlgen_ok(*common, "-k", 3, "--ref", dirs["reference"], "--similarity", "ngram").out)
    kl = report["kl_to_reference"]
    assert kl["num_sequences"] == 4 * 3 and "3 samples per problem" in kl["on"]
    assert kl["kl_k3"] > 0
    diversity = report["diversity"]
    assert diversity["similarity"] == "ngram" and diversity["groups"] == 3  # "1+2=" appears twice: one group of 6
    assert 1.0 <= diversity["vendi"] <= 6.0 and diversity["self-bleu"] is not None
    itself = json.loads(rlgen_ok(*common, "--ref", dirs["policy"]).out)["kl_to_reference"]
    assert itself["kl_k1"] == 0.0 and itself["kl_k3"] == 0.0 and "greedy" in itself["on"]


def test_cli_ref_needs_model(models):
    code, _, err = rlgen("eval", models["data"], "--ref", models["dirs"]["reference"])
    assert code == 2
    assert "--ref" in err
