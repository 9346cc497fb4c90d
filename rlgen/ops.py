"""Hot-path operations. One entry point per op so that a native backend can slot in underneath."""
from __future__ import annotations

import torch


def backend_name() -> str:
    return "torch"


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, entropy_grad: bool = False):
    """Log-prob of each target token and the entropy of each row's distribution, in fp32.

    logits [..., V], targets [...] -> (logprobs [...], entropy [...])

    The entropy is a metric for the trainers, so by default it carries no gradient and none of its
    full-vocabulary intermediates are kept for backward; `entropy_grad=True` makes it differentiable.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if entropy_grad:
        return logprobs, _entropy(logp_all)
    with torch.no_grad():
        return logprobs, _entropy(logp_all)


def _entropy(logp_all: torch.Tensor) -> torch.Tensor:
    probs = logp_all.exp()
    return -(probs * torch.where(probs > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
