"""Weight-merge methods. A method combines the same-named tensor of several models:
fn(tensors: list[Tensor], weights: list[float], **options) -> Tensor."""
from __future__ import annotations

import torch

from rlgen.hookspecs import hookimpl


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True, **_) -> torch.Tensor:
    """Weighted average (mergekit's `linear`): sum_i w_i * theta_i, divided by sum_i w_i when normalize."""
    acc = torch.zeros_like(tensors[0], dtype=torch.float32)
    for tensor, weight in zip(tensors, weights):
        acc += weight * tensor.float()
    if normalize:
        acc /= sum(weights)
    return acc.to(tensors[0].dtype)


@hookimpl
def register_mergers(register):
    register("linear", linear)
