"""Contract of the merger hook (`rlgen merge --method NAME`).

A merger is registered as a MergeMethod (rlgen.merging.methods): its `fn`, whether it needs the base model
(`needs_base`, also read as `capabilities(method).needs_base`), its per-model and global parameters with
defaults, and the model count it accepts. `fn` merges one tensor name at a time, in either form:

    def my_merge(batch: MergeInput) -> torch.Tensor: ...          # typed
    def my_merge(tensors, base, model_params, global_params, *, keys, out_dtype): ...   # old form

`merge_tensor` calls either. The result is a new contiguous tensor of `out_dtype`, shaped like the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from rlgen.extension import Capabilities, takes

MERGER_DEFAULTS = Capabilities()


@dataclass
class MergeInput:
    name: str  # the tensor's name in the checkpoint
    tensors: list[torch.Tensor]  # the merged models' tensors (read only: maybe views of memory-mapped files)
    base: torch.Tensor | None  # the base model's (None unless the method needs the base)
    model_params: list[dict]  # one dict per model, every declared per-model parameter resolved for this tensor
    global_params: dict  # every declared global parameter resolved for this tensor
    keys: list[int]  # the DARE hash key of each model (methods.dare_key)
    out_dtype: torch.dtype


class MergeFunction(Protocol):
    def __call__(self, batch: MergeInput) -> torch.Tensor: ...


def merge_tensor(fn, batch: MergeInput) -> torch.Tensor:
    """One merged tensor from a merge function of either form."""
    if takes(fn, MergeInput):
        return fn(batch)
    return fn(batch.tensors, batch.base, batch.model_params, batch.global_params, keys=batch.keys,
              out_dtype=batch.out_dtype)
