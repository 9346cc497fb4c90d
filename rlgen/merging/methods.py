"""Weight-merge methods: how the same-named tensor of several models becomes one.

Each registered method is a MergeMethod whose `fn(tensors, base, model_params, global_params, *, keys,
out_dtype)` merges one tensor name: `tensors` are the non-base models' tensors (read only: they may be
views of memory-mapped files), `base` the base model's (or None), `model_params` one dict per model and
`global_params` one dict, every declared parameter resolved for this tensor (`rescale_norm`: None, or
mergekit's "l1" / "l2" / "linf" norm-preserving rescale of the kept deltas instead of DARE's 1/density),
`keys` the DARE key of each model (dare_key). Arithmetic is float32 (float64 for float64 inputs); the result is a new contiguous
tensor of `out_dtype`. A plugin's `fn` may take one MergeInput instead (rlgen.merging.contracts). All the task-vector methods are one call of rlgen.merging.kernels.sparse_task_merge.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from rlgen.extension import Capabilities
from rlgen.hookspecs import hookimpl
from rlgen.merging.kernels import sparse_task_merge


class _Required:
    """Marks a parameter without a default: the merge configuration must give it."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class MergeMethod:
    fn: Callable
    needs_base: bool
    model_params: dict = field(default_factory=dict)  # per-model parameter -> default (or REQUIRED)
    global_params: dict = field(default_factory=dict)  # global parameter -> default (or REQUIRED)
    min_models: int = 1
    max_models: int | None = None
    description: str = ""

    @property
    def capabilities(self) -> Capabilities:
        """Read through rlgen.extension.capabilities, like every other registered item's."""
        return Capabilities(needs_base=self.needs_base)


def dare_key(seed: int, name: str, model_index: int) -> int:
    """The DARE hash key of (seed, tensor name, model index): a uint32."""
    return zlib.crc32(f"{seed}:{name}:{model_index}".encode())


def _column(model_params: list[dict], name: str) -> list[float]:
    return [float(params[name]) for params in model_params]


def linear(tensors, base, model_params, global_params, *, keys=None, out_dtype):
    """sum_i w_i theta_i, divided by sum_i w_i when `normalize` (by 1 when that sum is about 0)."""
    return sparse_task_merge(tensors, None, _column(model_params, "weight"),
                             normalize=bool(global_params["normalize"]), out_dtype=out_dtype)


_SLERP_CHUNK = 1 << 20  # elements converted to float64 at a time (8 MB), so memory stays small


def _float64_dot_and_norms(v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float, float]:
    """(v0 . v1, |v0|, |v1|) accumulated in float64, chunk by chunk: a float32 sum over 10^8 entries is
    off by ~1e-3 relative, which slerp's acos amplifies into visibly wrong coefficients."""
    dot = sq0 = sq1 = 0.0
    for start in range(0, v0.numel(), _SLERP_CHUNK):
        a = v0[start:start + _SLERP_CHUNK].to(torch.float64)
        b = v1[start:start + _SLERP_CHUNK].to(torch.float64)
        dot += float(torch.dot(a, b))
        sq0 += float(torch.dot(a, a))
        sq1 += float(torch.dot(b, b))
    return dot, math.sqrt(sq0), math.sqrt(sq1)


def _lerp_or_slerp_coefficients(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple[float, float]:
    """(c0, c1) with result = c0 v0 + c1 v1: slerp on the directions, lerp when nearly parallel. The dot
    product and norms are float64 whatever the tensors' dtype."""
    dot, norm0, norm1 = _float64_dot_and_norms(v0, v1)
    norm0 = norm0 if norm0 > 1e-8 else 1.0  # a zero vector stays unnormalised
    norm1 = norm1 if norm1 > 1e-8 else 1.0
    dot = dot / (norm0 * norm1)
    if abs(dot) > 0.9995:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, dot)))
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp(tensors, base, model_params, global_params, *, keys=None, out_dtype):
    """Spherical interpolation from the base (t = 0) to the one model (t = 1)."""
    t = float(global_params["t"])
    dtype = torch.float64 if torch.float64 in (base.dtype, tensors[0].dtype) else torch.float32
    c0, c1 = _lerp_or_slerp_coefficients(base.reshape(-1), tensors[0].reshape(-1), t)
    v0, v1 = base.reshape(-1).to(dtype), tensors[0].reshape(-1).to(dtype)
    return (c0 * v0 + c1 * v1).to(out_dtype).view(base.shape)


def _task_merge(sparsify, consensus):
    """A task-vector method: base + lambda * (sparsified, optionally sign-elected) weighted deltas."""

    def fn(tensors, base, model_params, global_params, *, keys=None, out_dtype):
        densities = _column(model_params, "density") if sparsify else None
        return sparse_task_merge(
            tensors, base, _column(model_params, "weight"), sparsify=sparsify, densities=densities,
            gammas=_column(model_params, "gamma") if sparsify == "outliers" else None,
            keys=keys if sparsify == "random" else None, rescale=bool(global_params.get("rescale", False)),
            rescale_norm=global_params.get("rescale_norm"), consensus=consensus, normalize=bool(global_params["normalize"]), lam=float(global_params["lambda"]),
            out_dtype=out_dtype)

    return fn


METHODS = {
    "linear": MergeMethod(
        linear, needs_base=False, model_params={"weight": REQUIRED}, global_params={"normalize": True},
        description="weighted average of the models (mergekit `linear`)"),
    "slerp": MergeMethod(
        slerp, needs_base=True, global_params={"t": REQUIRED}, min_models=1, max_models=1,
        description="spherical interpolation from the base (t=0) to one model (t=1)"),
    "task-arithmetic": MergeMethod(
        _task_merge(None, None), needs_base=True, model_params={"weight": REQUIRED},
        global_params={"lambda": 1.0, "normalize": False},
        description="base + lambda * weighted sum of the task vectors (model - base)"),
    "ties": MergeMethod(
        _task_merge("magnitude", "sum"), needs_base=True, model_params={"weight": REQUIRED, "density": 1.0},
        global_params={"lambda": 1.0, "normalize": True, "rescale_norm": None},
        description="TIES: keep each task vector's largest-magnitude fraction `density`, elect signs, "
                    "average the agreeing entries"),
    "dare-linear": MergeMethod(
        _task_merge("random", None), needs_base=True, model_params={"weight": REQUIRED, "density": 1.0},
        global_params={"lambda": 1.0, "normalize": False, "rescale": True, "rescale_norm": None},
        description="DARE: drop task-vector entries at random (kept fraction `density`, rescaled), then sum"),
    "dare-ties": MergeMethod(
        _task_merge("random", "sum"), needs_base=True, model_params={"weight": REQUIRED, "density": 1.0},
        global_params={"lambda": 1.0, "normalize": False, "rescale": True, "rescale_norm": None},
        description="DARE's random drop with TIES' sign election"),
    "breadcrumbs": MergeMethod(
        _task_merge("outliers", None), needs_base=True,
        model_params={"weight": REQUIRED, "density": 1.0, "gamma": 0.01},
        global_params={"lambda": 1.0, "normalize": False, "rescale_norm": None},
        description="model breadcrumbs: drop the largest (fraction `gamma`) and smallest task-vector entries, "
                    "keep `density`, then sum"),
    "breadcrumbs-ties": MergeMethod(
        _task_merge("outliers", "sum"), needs_base=True,
        model_params={"weight": REQUIRED, "density": 1.0, "gamma": 0.01},
        global_params={"lambda": 1.0, "normalize": False, "rescale_norm": None},
        description="breadcrumbs' mask with TIES' sign election"),
}


@hookimpl
def register_mergers(register):
    for name, method in METHODS.items():
        register(name, method, method.description)
