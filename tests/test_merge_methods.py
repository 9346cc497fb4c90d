"""Merge methods (rlgen.merging.methods) against direct computations written independently here: numpy
stable argsorts for the magnitude masks, the DARE hash in Python integers, per-element loops for the
sign election; plus tiny cases worked out by hand. Every test runs on the native kernels (where built)
and on the torch reference."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from rlgen import kernels
from rlgen.merging.methods import METHODS, REQUIRED, MergeMethod, dare_key
from rlgen.plugins import registry


@pytest.fixture(params=["auto", "torch"], autouse=True)
def kernel_mode(request):
    previous = kernels.use(request.param)
    yield request.param
    kernels.use(previous)


def run(name, tensors, base, model_params, global_params=None, *, keys=None, out_dtype=torch.float32):
    """Call a method as the merge does: every declared parameter filled in."""
    method = METHODS[name]
    models = [{**{k: v for k, v in method.model_params.items() if v is not REQUIRED}, **p} for p in model_params]
    settings = {**{k: v for k, v in method.global_params.items() if v is not REQUIRED}, **(global_params or {})}
    keys = keys if keys is not None else [dare_key(0, "t", i) for i in range(len(tensors))]
    before = [t.clone() for t in tensors] + ([base.clone()] if base is not None else [])
    out = method.fn(tensors, base, models, settings, keys=keys, out_dtype=out_dtype)
    after = list(tensors) + ([base] if base is not None else [])
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a method modified its inputs"
    assert out.dtype == out_dtype and out.shape == tensors[0].shape and out.is_contiguous()
    return out


# --- independent references -------------------------------------------------------------------

def mix32(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def np_delta(tensor, base):
    return tensor.float().numpy().ravel() - base.float().numpy().ravel()


def top_mask(delta, density):
    n = delta.size
    mask = np.zeros(n, bool)
    if density >= 1:
        return ~mask
    order = np.argsort(-np.abs(delta), kind="stable")  # equal magnitudes: index order
    mask[order[: math.floor(density * n)]] = True
    return mask


def breadcrumbs_mask(delta, density, gamma):
    n = delta.size
    if density >= 1:
        return np.ones(n, bool)
    target, n_top = math.floor(density * n), math.floor(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    mask = np.zeros(n, bool)
    mask[np.argsort(np.abs(delta), kind="stable")[n_bot:n - n_top]] = True
    return mask


def dare_mask(n, density, key):
    if density >= 1:
        return np.ones(n, bool)
    threshold = math.floor(density * 2**32)
    return np.array([mix32(mix32(j) ^ key) < threshold for j in range(n)], bool)


def combine(base, taus, weights, *, consensus, normalize, lam):
    """base + lam * merged, element by element in float32."""
    f = np.float32
    out = np.empty(base.size, np.float32)
    for j in range(base.size):
        column = [f(t[j]) for t in taus]
        if consensus:
            total = f(0)
            for v in column:
                total = f(total + v)
            sign = 1 if total >= 0 else -1
            agree = [v != 0 and np.sign(v) == sign for v in column]
        else:
            agree = [True] * len(column)
        merged = f(sum(v for v, a in zip(column, agree) if a))
        if normalize:
            if consensus:
                divisor = f(sum(f(w) for w, a in zip(weights, agree) if a))
                divisor = divisor if divisor != 0 else f(1)
            else:
                divisor = f(sum(weights)) if abs(sum(weights)) >= 1e-8 else f(1)
            merged = f(merged / divisor)
        out[j] = f(base[j]) + f(lam) * merged
    return out


def task_reference(tensors, base, weights, masks, scales, **combine_args):
    b = base.float().numpy().ravel()
    taus = [np.where(mask, np_delta(t, base) / np.float32(scale), np.float32(0)).astype(np.float32) * np.float32(w)
            for t, mask, scale, w in zip(tensors, masks, scales, weights)]
    return combine(b, taus, weights, **combine_args).reshape(base.shape)


def random_models(count=3, shape=(7, 43), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    return [(base.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(count)], base


def close(got, want, rtol=2e-6, atol=1e-6):
    torch.testing.assert_close(got, torch.as_tensor(want), rtol=rtol, atol=atol)


# --- registration --------------------------------------------------------------------------------

def test_methods_are_registered_with_their_parameters():
    merger = registry("merger")
    for name in ("linear", "slerp", "task-arithmetic", "ties", "dare-linear", "dare-ties", "breadcrumbs",
                 "breadcrumbs-ties"):
        method = merger.get(name)
        assert isinstance(method, MergeMethod) and method.description
        assert method.needs_base == (name != "linear")
    assert merger.get("ties").model_params == {"weight": REQUIRED, "density": 1.0}
    assert merger.get("ties").global_params == {"lambda": 1.0, "normalize": True, "rescale_norm": None}
    assert merger.get("dare-ties").global_params == {"lambda": 1.0, "normalize": False, "rescale": True,
                                                     "rescale_norm": None}
    assert merger.get("breadcrumbs").model_params == {"weight": REQUIRED, "density": 1.0, "gamma": 0.01}
    assert merger.get("breadcrumbs-ties").global_params["normalize"] is False
    assert merger.get("slerp").global_params == {"t": REQUIRED} and merger.get("slerp").max_models == 1
    assert merger.get("linear").global_params == {"normalize": True}


def test_dare_key_is_the_crc32_of_seed_name_index():
    assert dare_key(7, "model.layers.0.mlp.up_proj.weight", 2) == zlib.crc32(b"7:model.layers.0.mlp.up_proj.weight:2")
    assert 0 <= dare_key(0, "x", 0) < 2**32 and dare_key(0, "x", 0) != dare_key(0, "x", 1)


# --- hand-computed cases ---------------------------------------------------------------------------

def test_ties_by_hand():
    base = torch.full((4,), 0.5)
    # deltas: model 1 [1, -2, 0.5, 3], model 2 [-1.5, 1, 0.5, -1]; density 0.5 -> k = 2 each:
    #   model 1 keeps |3| (index 3) and |-2| (index 1)
    #   model 2 keeps |-1.5| (index 0) and one of the two |1|s: the lower index (1) wins over index 3
    # weights 1, 2: tau1 = [0, -2, 0, 3], tau2 = [-3, 2, 0, 0]; sums [-3, 0, 0, 3] elect [-, +, +, +]
    #   (a zero sum elects +). Agreeing: [tau2 | tau2 (+2) | none | tau1], divided by their weights:
    #   [-3/2, 2/2, 0/1, 3/1] = [-1.5, 1, 0, 3]; plus the base 0.5.
    models = [base + torch.tensor([1.0, -2.0, 0.5, 3.0]), base + torch.tensor([-1.5, 1.0, 0.5, -1.0])]
    out = run("ties", models, base, [{"weight": 1.0, "density": 0.5}, {"weight": 2.0, "density": 0.5}])
    assert out.tolist() == [-1.0, 1.5, 0.5, 3.5]
    # normalize off: the agreeing taus summed, times lambda 0.5: [-3, 2, 0, 3] * 0.5 + 0.5
    out = run("ties", models, base, [{"weight": 1.0, "density": 0.5}, {"weight": 2.0, "density": 0.5}],
              {"normalize": False, "lambda": 0.5})
    assert out.tolist() == [-1.0, 1.5, 0.5, 2.0]


def test_ties_equal_magnitudes_keep_exactly_k_lowest_indices_first():
    base = torch.zeros(7)
    model = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, 1.0, -1.0])  # six equal magnitudes
    for density, kept in [(0.3, [0, 1]), (0.5, [0, 1, 2]), (0.75, [0, 1, 2, 3, 5]), (0.0, []), (1.0, range(7))]:
        out = run("ties", [model], base, [{"weight": 1.0, "density": density}])
        want = torch.zeros(7)
        want[list(kept)] = model[list(kept)]
        assert torch.equal(out, want), (density, out)


def test_dare_by_hand():
    # key K = crc32("0:w:0") = 2858141534; u_j = mix32(mix32(j) ^ K) for j = 0..7 is
    #   3af44f09 640e8c11 dda2334c 2ecfb79c e645c06d eb857c8b 93e3ca99 2ce26c74 (hex);
    # density 0.5 keeps u < 2^31 = 0x80000000: j = 0, 1, 3, 7, rescaled by 1 / 0.5;
    # density 0.25 keeps u < 0x40000000: j = 0, 3, 7, rescaled by 4.
    key = dare_key(0, "w", 0)
    assert key == 2858141534 and [mix32(mix32(j) ^ key) for j in (0, 7)] == [0x3AF44F09, 0x2CE26C74]
    base = torch.ones(8)
    delta = torch.arange(1.0, 9.0) / 8
    out = run("dare-linear", [base + delta], base, [{"weight": 1.0, "density": 0.5}], keys=[key])
    assert torch.equal(out - base, torch.tensor([2, 4, 0, 8, 0, 0, 0, 16]) / 8)
    out = run("dare-linear", [base + delta], base, [{"weight": 1.0, "density": 0.25}], {"rescale": False}, keys=[key])
    assert torch.equal(out - base, torch.tensor([1, 0, 0, 4, 0, 0, 0, 8]) / 8)
    # dare-ties: a second model with key 0 and all-negative deltas fights the first on the kept entries
    second = [mix32(mix32(j)) < 2**31 for j in range(8)]
    out = run("dare-ties", [base + delta, base - 2 * delta], base,
              [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}], keys=[key, 0])
    for j in range(8):
        tau1 = 2 * float(delta[j]) if j in (0, 1, 3, 7) else 0.0
        tau2 = -4 * float(delta[j]) if second[j] else 0.0
        sign = 1 if tau1 + tau2 >= 0 else -1
        assert float(out[j] - base[j]) == sum(t for t in (tau1, tau2) if t != 0 and math.copysign(1, t) == sign)


def test_breadcrumbs_by_hand():
    base = torch.zeros(10)
    delta = torch.tensor([1.0, -9.0, 3.0, 5.0, -2.0, 10.0, 7.0, -4.0, 6.0, 8.0]) / 8
    # density 0.5, gamma 0.1: target 5, n_top 1, n_bot 10 - 5 - 1 = 4. |delta| ascending by index:
    #   1(0) 2(4) 3(2) 4(7) 5(3) 6(8) 7(6) 8(9) 9(1) 10(5) -> ranks [4, 9): indices 3, 8, 6, 9, 1
    out = run("breadcrumbs", [delta], base, [{"weight": 2.0, "density": 0.5, "gamma": 0.1}])
    want = torch.zeros(10)
    want[[1, 3, 6, 8, 9]] = 2 * delta[[1, 3, 6, 8, 9]]
    assert torch.equal(out, want)
    # equal magnitudes: the ascending order is stable, so the bottom drops the lowest indices and the
    # top drops the highest: n = 6, density 0.5, gamma 1/6 -> n_top 1, n_bot 2 -> keep indices 2, 3, 4
    out = run("breadcrumbs", [torch.tensor([1.0, -1, 1, -1, 1, -1])], torch.zeros(6),
              [{"weight": 1.0, "density": 0.5, "gamma": 1 / 6}])
    assert out.tolist() == [0.0, 0.0, 1.0, -1.0, 1.0, 0.0]
    # gamma too large for the density: n_bot would be negative -> n_top shrinks (10 - 8 = 2), n_bot 0
    out = run("breadcrumbs", [delta], base, [{"weight": 1.0, "density": 0.8, "gamma": 0.5}])
    assert torch.equal(out != 0, torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool))


def test_linear_by_hand():
    a, b = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([3.0, 0.0, 4.0])
    assert run("linear", [a, b], None, [{"weight": 1.0}, {"weight": 3.0}]).tolist() == [2.5, 0.5, 2.0]
    assert run("linear", [a, b], None, [{"weight": 1.0}, {"weight": 3.0}], {"normalize": False}).tolist() == [10, 2, 8]
    # weights summing to 0: the divisor becomes 1
    assert run("linear", [a, b], None, [{"weight": 1.0}, {"weight": -1.0}]).tolist() == [-2.0, 2.0, -8.0]
    # a base passed in is ignored
    assert run("linear", [a, b], torch.full((3,), 100.0), [{"weight": 1.0}, {"weight": 1.0}]).tolist() == [2, 1, 0]
    half = run("linear", [a.bfloat16(), b.bfloat16()], None, [{"weight": 0.5}, {"weight": 0.5}], out_dtype=torch.bfloat16)
    assert half.tolist() == [2.0, 1.0, 0.0]


def test_task_arithmetic_by_hand():
    base = torch.tensor([1.0, 1.0, 1.0])
    m1, m2 = torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 3.0, 1.0])  # deltas [1, 0, -1], [0, 2, 0]
    out = run("task-arithmetic", [m1, m2], base, [{"weight": 1.0}, {"weight": 0.5}], {"lambda": 2.0})
    assert out.tolist() == [3.0, 3.0, -1.0]  # 1 + 2 * [1, 1, -1]
    out = run("task-arithmetic", [m1, m2], base, [{"weight": 1.0}, {"weight": 3.0}], {"normalize": True})
    assert out.tolist() == [1.25, 2.5, 0.75]  # 1 + [1, 6, -1] / 4


def test_slerp_by_hand():
    v0, v1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 3.0])
    assert torch.equal(run("slerp", [v1], v0, [{}], {"t": 0.0}), v0)
    assert torch.equal(run("slerp", [v1], v0, [{}], {"t": 1.0}), v1)
    # orthogonal: theta = pi/2, sin(theta) = 1 -> sin(pi/4) v0 + sin(pi/4) v1
    close(run("slerp", [v1], v0, [{}], {"t": 0.5}), [2 * math.sqrt(0.5), 3 * math.sqrt(0.5)])
    close(run("slerp", [v1], v0, [{}], {"t": 1 / 3}), [2 * math.sin(math.pi / 3), 3 * math.sin(math.pi / 6)])
    # (anti-)parallel: plain lerp
    close(run("slerp", [1.5 * v0], v0, [{}], {"t": 0.25}), [2.25, 0.0])
    close(run("slerp", [-v0], v0, [{}], {"t": 0.25}), [1.0, 0.0])
    # a zero base is not normalised: dot 0, theta pi/2
    close(run("slerp", [v1], torch.zeros(2), [{}], {"t": 0.5}), [0.0, 3 * math.sqrt(0.5)])
    # bf16 in, bf16 out, shape kept
    m, b = random_models(1, (5, 6), torch.bfloat16)
    assert run("slerp", m, b, [{}], {"t": 0.0}, out_dtype=torch.bfloat16).equal(b)


# --- random tensors against the references ---------------------------------------------------------------

WEIGHTS = [1.0, -0.6, 0.8]
DENSITIES = [0.3, 0.55, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["ties", "task-arithmetic", "dare-linear", "dare-ties", "breadcrumbs", "breadcrumbs-ties"])
def test_methods_match_direct_computation(name, dtype):
    models, base = random_models(3, (5, 61), dtype, seed=zlib.crc32(name.encode()))
    keys = [dare_key(3, "w", i) for i in range(3)]
    params = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(WEIGHTS, DENSITIES, [0.02, 0.1, 0.0])]
    params = [{k: v for k, v in p.items() if k in METHODS[name].model_params} for p in params]
    settings = {"lambda": 0.7, "normalize": name != "task-arithmetic"}
    out = run(name, models, base, params, settings, keys=keys)
    n = base.numel()
    deltas = [np_delta(m, base) for m in models]
    scales = [1.0] * 3
    if name.startswith("ties"):
        masks = [top_mask(d, p["density"]) for d, p in zip(deltas, params)]
    elif name.startswith("dare"):
        masks = [dare_mask(n, p["density"], k) for p, k in zip(params, keys)]
        scales = [p["density"] for p in params]
    elif name.startswith("breadcrumbs"):
        masks = [breadcrumbs_mask(d, p["density"], p["gamma"]) for d, p in zip(deltas, params)]
    else:
        masks = [np.ones(n, bool)] * 3
    want = task_reference(models, base, WEIGHTS, masks, scales, consensus=name.endswith("ties"),
                          normalize=settings["normalize"], lam=0.7)
    close(out, want)


def test_linear_and_slerp_match_direct_computation():
    models, _ = random_models(3, (9, 13), torch.bfloat16)
    out = run("linear", models, None, [{"weight": w} for w in (1.0, 2.0, 0.5)])
    want = sum(w * m.float().numpy() for w, m in zip((1.0, 2.0, 0.5), models)) / 3.5
    close(out, want, rtol=1e-5, atol=1e-6)
    (model,), base = random_models(1, (9, 13))
    v0, v1 = base.double().ravel(), model.double().ravel()
    theta = math.acos(float(v0 @ v1 / (v0.norm() * v1.norm())))
    want = (math.sin(0.3 * theta) * v0 + math.sin(0.7 * theta) * v1) / math.sin(theta)
    close(run("slerp", [model], base, [{}], {"t": 0.7}), want.float().view(9, 13), rtol=1e-4, atol=1e-5)


def test_float64_inputs_are_merged_in_float64():
    models, base = random_models(2, (3, 11), torch.float64)
    out = run("ties", models, base, [{"weight": 1.0, "density": 0.5}] * 2, out_dtype=torch.float64)
    masks = [top_mask(m.numpy().ravel() - base.numpy().ravel(), 0.5) for m in models]
    taus = [np.where(mask, m.numpy().ravel() - base.numpy().ravel(), 0.0) for m, mask in zip(models, masks)]
    total = taus[0] + taus[1]
    agree = [(t != 0) & (np.sign(t) == np.where(total >= 0, 1, -1)) for t in taus]
    merged = sum(np.where(a, t, 0) for a, t in zip(agree, taus)) / np.maximum(sum(a.astype(float) for a in agree), 1)
    np.testing.assert_allclose(out.numpy().ravel(), base.numpy().ravel() + merged, rtol=1e-12, atol=1e-14)
