"""The per-tensor hot path of the task-vector merges: one tensor name, all its models, one call.

    sparse_task_merge(tensors, base, weights, *, sparsify, densities, gammas, keys, rescale,
                      rescale_norm, consensus, normalize, lam, out_dtype)        -> merged tensor
    reference_sparse_task_merge(...)                                 the same in plain torch
    keep_mask(tensor, base, *, sparsify, density, gamma, key)        one model's sparsification mask
    reference_keep_mask(...)

ties, dare-linear, dare-ties, breadcrumbs, breadcrumbs-ties, task-arithmetic and linear are all
sparse_task_merge (docs/spec: delta_i = theta_i - base, in float32):
  sparsify  None        keep every entry of delta_i
            "magnitude" keep the max(1, floor(density * numel)) largest |delta_i| (ties' trim; equal
                        magnitudes: the lower flat index wins)
            "random"    DARE: entry j kept iff mix32(mix32(j) ^ key_i) < floor(density * 2**32), kept
                        entries divided by density when `rescale` (the DARE paper's 1 / density)
            "outliers"  breadcrumbs: drop the floor(gamma * numel) largest and the smallest, keep
                        floor(density * numel) (ascending stable ranks)
  rescale_norm "l1" | "l2" | "linf" (mergekit's RescaleNorm; None: off): instead of 1 / density, the
            kept entries of delta_i are scaled by |delta_i| / |kept delta_i| in that norm (any sparsify;
            unscaled when either norm is below 1e-7), as mergekit's `rescale: true` does with l1
  tau_i = weight_i * kept delta_i
  consensus None   merged = sum_i tau_i, divided by sum_i weight_i when `normalize`
            "sum"  ties' sign election: s = sign(sum_i tau_i) (+1 at 0); only the tau_i of sign s
                   count, divided by the sum of their weights when `normalize`
  result = base + lam * merged, in `out_dtype`.

Backends: rlgen._native (CPU tensors: OpenMP, reads bf16 / fp16 / fp32 directly, the magnitude cut
points by a radix select on the fly, no float32 copy of the deltas); rlgen._native_cuda (CUDA tensors:
the cut points found with torch, the element-wise merge in one kernel); otherwise, and with
RLGEN_KERNELS=torch or reference (rlgen.kernels.use), the torch reference. float64 inputs always take the
reference, in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from rlgen import kernels

SPARSIFY = (None, "magnitude", "random", "outliers")
CONSENSUS = (None, "sum")
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_CUDA_MODELS = 16  # rlgen::merge::gpu::kMaxModels; more models take the torch reference
_HASH_CHUNK = 1 << 20  # elements per chunk of the torch DARE hash (int64 buffers)
# Rule kinds as numbered by rlgen::merge::Keep (native/cpu/merge_kernels.h).
_KIND_CODES = {"all": 0, "none": 1, "top": 2, "random": 3, "band": 4}


@dataclass(frozen=True)
class KeepRule:
    """Which entries of one model's delta survive sparsification, in counts (no float left to round).

    kind "all" | "none" | "top" (the `k` largest magnitudes) | "random" (DARE, `threshold` and `key`)
    | "band" (ascending stable magnitude ranks [lo, hi)). Kept values are divided by `divide_by`."""

    kind: str
    k: int = 0
    lo: int = 0
    hi: int = 0
    threshold: int = 0
    key: int = 0
    divide_by: float = 1.0


def keep_rule(sparsify: str | None, numel: int, density: float = 1.0, gamma: float = 0.0, key: int = 0,
              rescale: bool = False) -> KeepRule:
    if sparsify not in SPARSIFY:
        raise ValueError(f"sparsify must be one of {SPARSIFY}, got {sparsify!r}")
    density = float(density)
    if sparsify is None or density >= 1.0:  # density >= 1 keeps all, unscaled
        return KeepRule("all")
    if sparsify == "random":
        threshold = max(0, math.floor(density * 2**32))
        if threshold == 0:
            return KeepRule("none")
        return KeepRule("random", threshold=threshold, key=int(key) & 0xFFFFFFFF,
                        divide_by=density if rescale else 1.0)
    target = max(0, math.floor(density * numel))
    if sparsify == "magnitude":
        if density > 0:  # keep at least the largest entry: a small tensor (a norm) is never dropped whole
            target = max(1, target)
        if target >= numel:
            return KeepRule("all")
        return KeepRule("none") if target == 0 else KeepRule("top", k=target)
    n_top = max(0, math.floor(float(gamma) * numel))
    n_bot = numel - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    lo, hi = n_bot, numel - n_top
    if lo >= hi:
        return KeepRule("none")
    return KeepRule("all") if lo == 0 and hi == numel else KeepRule("band", lo=lo, hi=hi)


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(tensors, base, weights, sparsify, consensus, per_model):
    if not tensors:
        raise ValueError("sparse_task_merge needs at least one tensor")
    if sparsify not in SPARSIFY:
        raise ValueError(f"sparsify must be one of {SPARSIFY}, got {sparsify!r}")
    if consensus not in CONSENSUS:
        raise ValueError(f"consensus must be one of {CONSENSUS}, got {consensus!r}")
    shape = tensors[0].shape
    for t in [*tensors, base]:
        if t is not None and (t.shape != shape or not t.is_floating_point()):
            raise ValueError(f"every tensor must be floating point of shape {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
    for name, values in per_model.items():
        if values is not None and len(values) != len(tensors):
            raise ValueError(f"got {len(values)} {name} for {len(tensors)} tensors")
    if len(weights) != len(tensors):
        raise ValueError(f"got {len(weights)} weights for {len(tensors)} tensors")


RESCALE_NORMS = ("l1", "l2", "linf")  # mergekit's RescaleNorm
_RESCALE_EPS = 1e-7  # mergekit's: below it either norm leaves the kept entries unscaled


def _norm(x: torch.Tensor, kind: str) -> float:
    if kind == "l1":
        return float(x.abs().sum(dtype=torch.float64))
    if kind == "l2":
        return float(torch.linalg.vector_norm(x, dtype=torch.float64))
    return float(x.abs().max()) if x.numel() else 0.0


def _norm_rescaled(tensors, base, rules: list[KeepRule], kind: str) -> list[KeepRule]:
    """The rules with `divide_by` set so that each model's kept delta has its whole delta's `kind` norm
    (mergekit's rescale_norm: kept * |delta| / |kept|, unscaled when either norm is below 1e-7)."""
    if kind not in RESCALE_NORMS:
        raise ValueError(f"rescale_norm must be one of {RESCALE_NORMS}, got {kind!r}")
    dtype = _compute_dtype(base, *tensors)
    rescaled = []
    for tensor, rule in zip(tensors, rules):
        if rule.kind in ("all", "none"):
            rescaled.append(replace(rule, divide_by=1.0))
            continue
        delta = _flat_delta(tensor, base, dtype)
        before = _norm(delta, kind)
        after = _norm(torch.where(_mask(delta, rule), delta, torch.zeros_like(delta)), kind)
        divide_by = 1.0 if before < _RESCALE_EPS or after < _RESCALE_EPS else after / before
        rescaled.append(replace(rule, divide_by=divide_by))
    return rescaled


def _rules(n, count, sparsify, densities, gammas, keys, rescale) -> list[KeepRule]:
    return [keep_rule(sparsify, n, densities[i] if densities is not None else 1.0,
                      gammas[i] if gammas is not None else 0.0, keys[i] if keys is not None else 0, rescale)
            for i in range(count)]


def _flat_divisor(weights, normalize: bool) -> float:
    total = math.fsum(float(w) for w in weights)
    return total if normalize and abs(total) >= 1e-8 else 1.0


# --- torch reference ---------------------------------------------------------------------------

def _magnitude_keys(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as integers ordered like the magnitudes (its IEEE bits), every NaN the same largest key."""
    magnitude = delta.abs()
    if magnitude.dtype == torch.float64:
        keys, nan = magnitude.view(torch.int64), 0x7FF8000000000000
    else:
        keys, nan = magnitude.view(torch.int32), 0x7FC00000
    return torch.where(torch.isnan(magnitude), torch.full_like(keys, nan), keys)


def _equal_before(keys: torch.Tensor, value: int, need: int) -> int:
    """The flat index c such that exactly `need` entries equal to `value` lie before it."""
    if need == 0:
        return 0
    return int(torch.nonzero(keys == value)[need - 1, 0]) + 1


def _top_cut(keys: torch.Tensor, k: int) -> tuple[int, int]:
    """(v, c): the k largest keys, lower index first among equals, are those > v or (== v and index < c)."""
    value = int(torch.kthvalue(keys, keys.numel() - k + 1).values)
    return value, _equal_before(keys, value, k - int((keys > value).sum()))


def _below_cut(keys: torch.Tensor, rank: int) -> tuple[int, int]:
    """(v, c): the entries of ascending stable rank < rank (0 < rank < numel) are those < v or (== v and index < c)."""
    value = int(torch.kthvalue(keys, rank + 1).values)
    return value, _equal_before(keys, value, rank - int((keys < value).sum()))


def _below_mask(keys: torch.Tensor, cut: tuple[int, int]) -> torch.Tensor:
    value, c = cut
    mask = keys < value
    mask[:c] |= keys[:c] == value
    return mask


def _mul32_(x: torch.Tensor, c: int, tmp: torch.Tensor) -> torch.Tensor:
    """x = (x * c) mod 2**32 in place, for 0 <= x < 2**32 in int64: c split into 16-bit halves keeps every
    product below 2**49."""
    torch.mul(x, c >> 16, out=tmp)
    tmp.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(0xFFFFFFFF)


def _xorshift_(x: torch.Tensor, shift: int, tmp: torch.Tensor) -> torch.Tensor:
    torch.bitwise_right_shift(x, shift, out=tmp)
    return x.bitwise_xor_(tmp)


def _mix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """mix32 of each entry of an int64 tensor of 32-bit values, in place (tmp: scratch of x's size)."""
    _xorshift_(x, 16, tmp)
    _mul32_(x, 0x7FEB352D, tmp)
    _xorshift_(x, 15, tmp)
    _mul32_(x, 0x846CA68B, tmp)
    return _xorshift_(x, 16, tmp)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.int64, copy=True)
    return _mix32_(x, torch.empty_like(x))


def _dare_chunks(numel: int, key: int, device):
    """(start, u) over chunks of the flat index range: u = mix32(mix32(j) ^ key) as int64 (reused buffers:
    in-place operations on small chunks are several times faster than whole-tensor temporaries)."""
    u = torch.empty(min(numel, _HASH_CHUNK), dtype=torch.int64, device=device)
    tmp = torch.empty_like(u)
    for start in range(0, numel, _HASH_CHUNK):
        size = min(_HASH_CHUNK, numel - start)
        chunk, scratch = u[:size], tmp[:size]
        torch.arange(start, start + size, dtype=torch.int64, device=device, out=chunk)
        _mix32_(chunk, scratch).bitwise_xor_(int(key) & 0xFFFFFFFF)
        yield start, _mix32_(chunk, scratch)


def dare_uniforms(numel: int, key: int, device="cpu") -> torch.Tensor:
    """u(j) = mix32(mix32(j) ^ key) for j < numel, as int64 (DARE keeps j iff u(j) < threshold)."""
    out = torch.empty(numel, dtype=torch.int64, device=device)
    for start, u in _dare_chunks(numel, key, device):
        out[start:start + u.numel()] = u
    return out


def _dare_mask(numel: int, key: int, threshold: int, device) -> torch.Tensor:
    mask = torch.empty(numel, dtype=torch.bool, device=device)
    for start, u in _dare_chunks(numel, key, device):
        torch.lt(u, threshold, out=mask[start:start + u.numel()])
    return mask


def _rule_cuts(keys: torch.Tensor, rule: KeepRule) -> tuple[tuple[int, int], tuple[int, int]]:
    """(hi, lo) cut points of a "top" or "band" rule (native/cpu/merge_kernels.h: merge::Rule)."""
    n = keys.numel()
    if rule.kind == "top":
        return _top_cut(keys, rule.k), (0, 0)
    hi = _below_cut(keys, rule.hi) if rule.hi < n else (0xFFFFFFFF, n)
    lo = _below_cut(keys, rule.lo) if rule.lo > 0 else (0, 0)
    return hi, lo


def _mask(delta: torch.Tensor, rule: KeepRule) -> torch.Tensor:
    """Keep mask of a flat delta under `rule`."""
    if rule.kind == "all":
        return torch.ones_like(delta, dtype=torch.bool)
    if rule.kind == "none":
        return torch.zeros_like(delta, dtype=torch.bool)
    if rule.kind == "random":
        return _dare_mask(delta.numel(), rule.key, rule.threshold, delta.device)
    keys = _magnitude_keys(delta)
    hi, lo = _rule_cuts(keys, rule)
    if rule.kind == "top":
        value, c = hi
        mask = keys > value
        mask[:c] |= keys[:c] == value
        return mask
    mask = _below_mask(keys, hi) if rule.hi < keys.numel() else torch.ones_like(keys, dtype=torch.bool)
    return mask & ~_below_mask(keys, lo) if rule.lo > 0 else mask


def _flat_delta(tensor, base, dtype):
    x = tensor.reshape(-1).to(dtype)
    return x if base is None else x - base.reshape(-1).to(dtype)


def reference_keep_mask(tensor, base, *, sparsify=None, density=1.0, gamma=0.0, key=0) -> torch.Tensor:
    """The keep mask (shape of `tensor`) of delta = tensor - base under one model's sparsification."""
    rule = keep_rule(sparsify, tensor.numel(), density, gamma, key)
    return _mask(_flat_delta(tensor, base, _compute_dtype(tensor, base)), rule).view(tensor.shape)


def _reference_merge(tensors, base, weights, rules, consensus, normalize, lam, out_dtype):
    dtype = _compute_dtype(base, *tensors)
    b = None if base is None else base.reshape(-1).to(dtype)
    taus = []
    merged = torch.zeros(tensors[0].numel(), dtype=dtype, device=tensors[0].device)
    for tensor, weight, rule in zip(tensors, weights, rules):
        delta = _flat_delta(tensor, base, dtype)
        kept = torch.where(_mask(delta, rule), delta / rule.divide_by, torch.zeros_like(delta))
        tau = kept * float(weight)
        if consensus:
            taus.append(tau)
        else:
            merged += tau
    if consensus:
        total = torch.zeros_like(merged)
        for tau in taus:
            total += tau
        divisor = torch.zeros_like(merged)
        for tau, weight in zip(taus, weights):
            agree = torch.where(total >= 0, tau > 0, tau < 0)
            merged += torch.where(agree, tau, torch.zeros_like(tau))
            divisor += agree.to(dtype) * float(weight)
        if normalize:
            merged /= torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    elif normalize:
        merged /= _flat_divisor(weights, True)
    result = lam * merged if b is None else b + lam * merged
    return result.to(out_dtype).view(tensors[0].shape)


def reference_sparse_task_merge(tensors, base, weights, *, sparsify=None, densities=None, gammas=None, keys=None,
                                rescale=False, rescale_norm=None, consensus=None, normalize=False, lam=1.0,
                                out_dtype=None):
    """sparse_task_merge in plain torch operations (see the module docstring)."""
    _check(tensors, base, weights, sparsify, consensus, {"densities": densities, "gammas": gammas, "keys": keys})
    out_dtype = out_dtype or (base if base is not None else tensors[0]).dtype
    rules = _rules(tensors[0].numel(), len(tensors), sparsify, densities, gammas, keys, rescale)
    if rescale_norm is not None:
        rules = _norm_rescaled(tensors, base, rules, rescale_norm)
    return _reference_merge(tensors, base, weights, rules, consensus, normalize, float(lam), out_dtype)


# --- native dispatch ---------------------------------------------------------------------------

def _native_module(device: torch.device):
    """The compiled module for tensors on `device`, or None (not built, another device, torch mode)."""
    if kernels.mode() in ("torch", "reference"):
        return None
    name = {"cpu": "_native", "cuda": "_native_cuda"}.get(device.type)
    module = kernels._import_native(name) if name else None
    if module is not None and hasattr(module, "sparse_task_merge" if name == "_native" else "sparse_task_apply"):
        return module
    if kernels.mode() == "native":
        raise RuntimeError(f"no native merge kernels for device '{device.type}' "
                           f"({kernels.native_import_error(name) if name else 'unsupported device'})")
    return None


def backend_name(device="cpu") -> str:
    """'native-cpu', 'native-cuda' or 'torch' (the reference): what sparse_task_merge runs for `device`."""
    device = torch.device(device)
    if _native_module(device) is None:
        return "torch"
    return "native-cpu" if device.type == "cpu" else "native-cuda"


def _native_inputs(tensors, base, out_dtype):
    """The flat contiguous views the kernels read, or None when some dtype is not a kernel dtype."""
    if out_dtype not in NATIVE_DTYPES or any(t.dtype not in NATIVE_DTYPES for t in tensors):
        return None
    if base is not None and base.dtype not in NATIVE_DTYPES:
        return None
    if tensors[0].numel() >= 2**32:  # the DARE hash indexes entries with 32 bits
        return None
    flat = [t.contiguous().view(-1) for t in tensors]
    return flat, None if base is None else base.contiguous().view(-1)


def _cpu_rule_row(rule: KeepRule) -> list[int]:
    a = {"top": rule.k, "random": rule.threshold, "band": rule.lo}.get(rule.kind, 0)
    return [_KIND_CODES[rule.kind], a, rule.hi if rule.kind == "band" else 0, rule.key]


def _cuda_rule_row(flat: torch.Tensor, base, rule: KeepRule) -> list[int]:
    hi, lo = (0, 0), (0, 0)
    if rule.kind in ("top", "band"):
        hi, lo = _rule_cuts(_magnitude_keys(_flat_delta(flat, base, torch.float32)), rule)
    return [_KIND_CODES[rule.kind], rule.threshold, rule.key, hi[0], hi[1], lo[0], lo[1]]


def sparse_task_merge(tensors, base, weights, *, sparsify=None, densities=None, gammas=None, keys=None,
                      rescale=False, rescale_norm=None, consensus=None, normalize=False, lam=1.0,
                      out_dtype=None) -> torch.Tensor:
    """The generalized task arithmetic of one tensor name (see the module docstring); a new contiguous
    tensor of `out_dtype` (default: the base's dtype, else the first tensor's). Inputs are only read."""
    _check(tensors, base, weights, sparsify, consensus, {"densities": densities, "gammas": gammas, "keys": keys})
    out_dtype = out_dtype or (base if base is not None else tensors[0]).dtype
    shape, n = tensors[0].shape, tensors[0].numel()
    rules = _rules(n, len(tensors), sparsify, densities, gammas, keys, rescale)
    if rescale_norm is not None and n:
        rules = _norm_rescaled(tensors, base, rules, rescale_norm)
    device = tensors[0].device
    module = _native_module(device) if n else None
    inputs = _native_inputs(tensors, base, out_dtype) if module is not None else None
    if inputs is None or (device.type == "cuda" and len(tensors) > MAX_CUDA_MODELS):
        return _reference_merge(tensors, base, weights, rules, consensus, normalize, float(lam), out_dtype)
    flat, flat_base = inputs
    out = torch.empty(n, dtype=out_dtype, device=device)
    divisor = _flat_divisor(weights, normalize)
    floats = [float(w) for w in weights], [r.divide_by for r in rules]
    if device.type == "cpu":
        rows = [v for r in rules for v in _cpu_rule_row(r)]
        module.sparse_task_merge(flat, flat_base, out, rows, *floats, consensus is not None, bool(normalize),
                                 divisor, float(lam), torch.get_num_threads())
    else:
        rows = [v for x, r in zip(flat, rules) for v in _cuda_rule_row(x, flat_base, r)]
        module.sparse_task_apply(flat, flat_base, out, rows, *floats, consensus is not None, bool(normalize),
                                 divisor, float(lam), torch.cuda.current_stream(device).cuda_stream)
    return out.view(shape)


def keep_mask(tensor, base, *, sparsify=None, density=1.0, gamma=0.0, key=0) -> torch.Tensor:
    """reference_keep_mask by the native CPU kernel where it runs (the tests compare the two)."""
    module = _native_module(tensor.device) if tensor.device.type == "cpu" and tensor.numel() else None
    inputs = _native_inputs([tensor], base, torch.float32) if module is not None else None
    if inputs is None:
        return reference_keep_mask(tensor, base, sparsify=sparsify, density=density, gamma=gamma, key=key)
    (flat,), flat_base = inputs
    out = torch.empty(tensor.numel(), dtype=torch.bool)
    rule = keep_rule(sparsify, tensor.numel(), density, gamma, key)
    module.sparse_keep_mask(flat, flat_base, out, _cpu_rule_row(rule), torch.get_num_threads())
    return out.view(tensor.shape)
