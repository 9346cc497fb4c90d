"""KL divergence of a policy p to a reference q, estimated on given samples (Schulman's estimators).

For each sampled completion, summed over its tokens (up to and including the stop token), with
log r = log q(token) - log p(token):

    k1 = -log r = log p - log q          (unbiased, high variance, can be negative)
    k3 = (r - 1) - log r                 (unbiased, always >= 0, lower variance)

The estimates of KL(p || q) are the means over sequences of these per-sequence sums; they are unbiased
when the completions were sampled from p itself at temperature 1 (e.g. `rlgen eval --model P -k K
--temperature 1 --ref Q`). On other completions (greedy ones) they are only the log-ratio statistics of
those completions. The per-token log-probs come from the trainers' own code
(`rlgen.models.logprobs.completion_logprobs`, the fused log-prob kernels), at temperature 1. The reference
may be a separately loaded model or a trainer's `ReferencePolicy` (e.g. the LoRA base, adapter off).
"""
from __future__ import annotations

import torch

from rlgen.errors import RlgenError
from rlgen.models.backbone import ReferencePolicy
from rlgen.models.logprobs import token_logprobs
from rlgen.rollout.engine import HFEngine


def kl_estimates(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sequence k1 and k3 [B] (sums over the masked tokens) from per-token log-probs [B, C]."""
    m = mask.to(torch.float64)
    log_ratio = (logq.double() - logp.double()) * m  # log r, 0 on padding
    k1 = -log_ratio
    k3 = (torch.expm1(log_ratio) - log_ratio) * m
    return {"k1": k1.sum(1), "k3": k3.sum(1), "tokens": m.sum(1)}


def as_reference(reference) -> ReferencePolicy:
    """A trainer's ReferencePolicy as it is (e.g. the policy's LoRA base, adapter off), or a separately
    loaded model used as one (run in eval mode without gradients, its own mode restored after)."""
    return reference if isinstance(reference, ReferencePolicy) else ReferencePolicy(reference, "frozen-copy", token_logprobs)


@torch.no_grad()
def sequence_kl(policy, reference, prompt_ids, prompt_mask, completion_ids, completion_mask,
                batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per-sequence k1, k3 and token counts [B] of completions (right-padded ids and mask, as in Rollouts)
    after their left-padded prompts, policy vs reference (a model or a ReferencePolicy)."""
    reference = as_reference(reference)
    check_vocabularies(policy, reference.module)
    parts: dict[str, list[torch.Tensor]] = {"k1": [], "k3": [], "tokens": []}
    was_training = policy.training
    policy.eval()
    try:
        for start in range(0, prompt_ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            inputs = (prompt_ids[rows], prompt_mask[rows], completion_ids[rows], completion_mask[rows])
            logp = token_logprobs(policy, *inputs, 1.0)
            logq = reference.logprobs(*inputs, 1.0)
            for key, value in kl_estimates(logp, logq, inputs[3]).items():
                parts[key].append(value)
    finally:
        policy.train(was_training)
    return {key: torch.cat(values) if values else torch.zeros(0, dtype=torch.float64) for key, values in parts.items()}


def summarize_kl(per_sequence: dict[str, torch.Tensor]) -> dict:
    """Means over sequences of k1 and k3 (KL per sequence, in nats), per-token means, and counts."""
    n = int(per_sequence["k1"].numel())
    tokens = float(per_sequence["tokens"].sum())
    if n == 0:
        return {"kl_k1": None, "kl_k3": None, "num_sequences": 0, "num_tokens": 0}
    return {
        "kl_k1": float(per_sequence["k1"].mean()),
        "kl_k3": float(per_sequence["k3"].mean()),
        "kl_k1_per_token": float(per_sequence["k1"].sum()) / tokens if tokens else None,
        "kl_k3_per_token": float(per_sequence["k3"].sum()) / tokens if tokens else None,
        "num_sequences": n,
        "num_tokens": int(tokens),
    }


def kl_of_rollouts(policy, reference, rollouts, batch_size: int = 64) -> dict:
    """KL estimates on sampled Rollouts (the exact generated tokens)."""
    return summarize_kl(sequence_kl(policy, reference, rollouts.prompt_ids, rollouts.prompt_mask,
                                    rollouts.completion_ids, rollouts.completion_mask, batch_size))


def kl_to_reference(policy, reference, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 64) -> dict:
    """KL estimates on (prompt, completion) texts: each completion is tokenised and ends with the stop token,
    as if the policy had generated it (the tokenisation of the trainers' fixed answers)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    engine = HFEngine(policy, tokenizer)
    prompt_ids, prompt_mask = engine.encode_prompts(list(prompts))
    completion_ids, completion_mask = engine.encode_completions(list(completions))
    return summarize_kl(sequence_kl(policy, reference, prompt_ids, prompt_mask, completion_ids, completion_mask, batch_size))


def check_vocabularies(policy, reference) -> None:
    """The two models must share a vocabulary (the same token ids are scored by both)."""
    a = getattr(getattr(policy, "config", None), "vocab_size", None)
    b = getattr(getattr(reference, "config", None), "vocab_size", None)
    if a is not None and b is not None and a != b:
        raise RlgenError(f"the policy and the reference have different vocabularies ({a} vs {b} tokens): "
                         "KL needs the same tokenizer")
