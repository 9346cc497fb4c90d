"""Eager torch reference implementations: what the kernels must equal (and the `reference` backend)."""
from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, ignore_index: int = -100):
    """(logprobs [...], entropy [...]) of logits [..., V] at targets [...]: log_softmax + gather + entropy,
    materialising [..., V] intermediates. fp32 results for fp32/bf16/fp16 input, fp64 for fp64."""
    z = logits.double() if logits.dtype == torch.float64 else logits.float()
    if temperature != 1.0:
        z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    ignored = targets == ignore_index
    safe = torch.where(ignored, torch.zeros_like(targets), targets)
    logprobs = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(ignored, torch.zeros_like(logprobs), logprobs)
    probs = logp_all.exp()
    entropy = -(probs * torch.where(probs > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logprobs, entropy


def linear_token_logprobs(hidden, weight, targets, temperature: float = 1.0, bias=None, ignore_index: int = -100):
    """The eager path of the fused op: the full [..., V] logits from the head, then token_logprobs."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprobs(logits, targets, temperature, ignore_index)
