"""A merge method (`rlgen merge --method example-mean A B --out DIR`)."""
from __future__ import annotations

import torch

# Contract: an rlgen.merging.methods.MergeMethod(fn, needs_base, model_params, global_params,
# min_models, max_models, description). fn(tensors, base, model_params, global_params, *, keys,
# out_dtype) merges ONE tensor name: tensors are the models' tensors (read only), base the base
# model's or None, model_params one dict per model and global_params one dict of the declared
# parameters (defaults filled in), keys the DARE random keys. Return a new tensor of out_dtype.
# needs_base = True makes --base mandatory.


def mean(tensors, base, model_params, global_params, *, keys=None, out_dtype):
    """The plain average of the models' tensors (no weights, no base)."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64 if tensors[0].dtype == torch.float64 else torch.float32)
    for tensor in tensors:
        total += tensor.to(total.dtype)
    return (total / len(tensors)).to(out_dtype).contiguous()


def _method():
    from rlgen.merging.methods import MergeMethod

    return MergeMethod(mean, needs_base=False, min_models=2,
                       description="plain average of the models' tensors (rlgen-example)")


MEAN = _method()
