"""The merge kernels (rlgen.merging.kernels): the native CPU kernel against the torch reference (keep
masks exactly, merged values to float32 rounding) over dtypes, odd sizes, densities 0 and 1, equal
magnitudes, negative weights; the CUDA kernel's math in host emulation (no GPU here)."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rlgen import kernels
from rlgen.merging import kernels as mk

REPO = Path(__file__).resolve().parent.parent
NATIVE = getattr(kernels._import_native("_native"), "sparse_task_merge", None) is not None
native_only = pytest.mark.skipif(not NATIVE, reason="the native CPU extension is not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 2, 3, 777, 2048, 2049, 6151]


@pytest.fixture(autouse=True)
def auto_mode():
    previous = kernels.use("auto")
    yield
    kernels.use(previous)


def make(n, dtype, data, seed=0, count=1):
    """(models, base): `data` "ties" gives deltas of a few bf16 steps (many equal magnitudes), "distinct"
    fp32-like noise, "equal" one magnitude everywhere, "zero" no delta at all."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    models = []
    for _ in range(count):
        if data == "ties":
            delta = torch.randint(-3, 4, (n,), generator=g).float() / 64
        elif data == "distinct":
            delta = 0.1 * torch.randn(n, generator=g)
        elif data == "equal":
            delta = torch.where(torch.rand(n, generator=g) < 0.5, -0.25, 0.25)
        else:
            delta = torch.zeros(n)
        models.append((base.float() + delta).to(dtype))
    return models, base


RULES = [("magnitude", d, 0.0) for d in (0.0, 0.001, 0.3, 0.5, 0.999, 1.0)] + \
        [("random", d, 0.0) for d in (0.0, 0.3, 0.5, 1.0)] + \
        [("outliers", d, g) for d, g in ((0.3, 0.0), (0.5, 0.05), (0.5, 0.5), (0.9, 0.1), (0.0, 0.1), (1.0, 0.1))] + \
        [(None, 1.0, 0.0)]


@native_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data", ["ties", "distinct", "equal", "zero"])
def test_keep_masks_equal_the_reference(dtype, data):
    for n in SIZES:
        (model,), base = make(n, dtype, data, seed=n)
        for sparsify, density, gamma in RULES:
            args = dict(sparsify=sparsify, density=density, gamma=gamma, key=n * 7919)
            got, want = mk.keep_mask(model, base, **args), mk.reference_keep_mask(model, base, **args)
            assert torch.equal(got, want), (n, sparsify, density, gamma)


@native_only
def test_keep_masks_on_a_larger_tensor_with_many_ties():
    # many blocks and many equal keys: the cut index of the equal magnitudes is found across blocks
    models, base = make(300_001, torch.bfloat16, "ties", count=2)
    models[1][:150_000] = base[:150_000]  # half of the deltas zero
    for model, (sparsify, density, gamma) in itertools.product(models, [("magnitude", 0.37, 0), ("outliers", 0.6, 0.01),
                                                                        ("magnitude", 0.7, 0)]):
        args = dict(sparsify=sparsify, density=density, gamma=gamma)
        assert torch.equal(mk.keep_mask(model, base, **args), mk.reference_keep_mask(model, base, **args))
    (model,), base = make(70_001, torch.float32, "distinct")
    args = dict(sparsify="magnitude", density=0.25)
    assert torch.equal(mk.keep_mask(model, base, **args), mk.reference_keep_mask(model, base, **args))


METHODS = {  # the methods as sparse_task_merge calls
    "task-arithmetic": dict(),
    "ties": dict(sparsify="magnitude", consensus="sum"),
    "dare-linear": dict(sparsify="random", rescale=True),
    "dare-ties": dict(sparsify="random", consensus="sum", rescale=True),
    "breadcrumbs": dict(sparsify="outliers"),
    "breadcrumbs-ties": dict(sparsify="outliers", consensus="sum"),
}


def assert_merged_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    # float32 rounding of the arithmetic; one step of the output dtype where it is narrower
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-6)


@native_only
@pytest.mark.parametrize("method", list(METHODS))
def test_merged_values_equal_the_reference(method):
    cases = itertools.product([(torch.bfloat16,) * 3, (torch.float16,) * 3, (torch.float32, torch.bfloat16, torch.float16)],
                              [777, 6151], [True, False], [torch.float32, torch.bfloat16, torch.float16])
    for in_dtypes, n, normalize, out_dtype in cases:
        models, base = make(n, torch.float32, "ties", seed=n, count=3)
        models = [m.to(d) for m, d in zip(models, in_dtypes)]
        base = base.to(in_dtypes[0])
        for weights, densities in [([1.0, -0.5, 0.7], [0.3, 0.5, 1.0]), ([0.5, 0.5, -1.0], [0.0, 1.0, 0.8]),
                                   ([1.0, -1.0, 0.0], [0.6, 0.6, 0.6])]:
            args = dict(METHODS[method], densities=densities, gammas=[0.01, 0.2, 0.0], keys=[n, 2 * n, 3 * n],
                        normalize=normalize, lam=0.75, out_dtype=out_dtype)
            got = mk.sparse_task_merge(models, base, weights, **args)
            want = mk.reference_sparse_task_merge(models, base, weights, **args)
            assert_merged_close(got, want)


@native_only
def test_linear_form_without_base_and_one_model():
    models, _ = make(2049, torch.bfloat16, "distinct", count=3)
    for weights, normalize in [([1.0, 2.0, -0.5], True), ([1.0, -1.0, 0.0], True), ([0.3, 0.3, 0.3], False)]:
        got = mk.sparse_task_merge(models, None, weights, normalize=normalize, out_dtype=torch.float32)
        assert_merged_close(got, mk.reference_sparse_task_merge(models, None, weights, normalize=normalize,
                                                                out_dtype=torch.float32))
    (model,), base = make(5, torch.float32, "distinct")
    got = mk.sparse_task_merge([model], base, [1.0], sparsify="magnitude", densities=[0.5], consensus="sum")
    assert_merged_close(got, mk.reference_sparse_task_merge([model], base, [1.0], sparsify="magnitude",
                                                            densities=[0.5], consensus="sum"))


@native_only
def test_output_rounding_and_input_decoding_match_torch():
    # one model, no base, weight 1: the kernel's result is the input itself, converted
    special = torch.tensor([1.0, -2.5, 65504.0, 65519.0, 65520.0, 1e6, 6e-8, 3e-8, 2.98e-8, 1e-40, 3.3e38,
                            float("inf"), float("-inf"), float("nan"), 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8,
                            1 + 3 * 2**-8, 2**-14 + 2**-25, 5e-5, -7e-6])
    g = torch.Generator().manual_seed(0)
    values = torch.cat([special, torch.randn(5000, generator=g) * torch.exp(8 * torch.randn(5000, generator=g))])
    for out_dtype in DTYPES:
        got, want = mk.sparse_task_merge([values], None, [1.0], out_dtype=out_dtype), values.to(out_dtype)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        bits = torch.int32 if out_dtype == torch.float32 else torch.int16
        assert torch.equal(got[~nan].view(bits), want[~nan].view(bits)), out_dtype
    for in_dtype in (torch.bfloat16, torch.float16):
        x = values.to(in_dtype)
        assert torch.allclose(mk.sparse_task_merge([x], None, [1.0], out_dtype=torch.float32), x.float(),
                              rtol=0, atol=0, equal_nan=True)


@native_only
def test_results_do_not_depend_on_the_thread_count():
    models, base = make(20_011, torch.bfloat16, "ties", count=3)
    args = dict(sparsify="magnitude", densities=[0.2, 0.5, 0.7], consensus="sum", normalize=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mk.sparse_task_merge(models, base, [1.0, 0.5, -0.3], **args)
        torch.set_num_threads(max(2, threads))
        many = mk.sparse_task_merge(models, base, [1.0, 0.5, -0.3], **args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_inputs_are_read_only_and_any_layout_works():
    models, base = make(6 * 35, torch.bfloat16, "ties", count=2)
    models = [m.view(6, 35).t() for m in models]  # non-contiguous views
    base = base.view(6, 35).t()
    before = [t.clone() for t in (*models, base)]
    args = dict(sparsify="magnitude", densities=[0.5, 0.5], consensus="sum", out_dtype=torch.bfloat16)
    got = mk.sparse_task_merge(models, base, [1.0, 1.0], **args)
    assert got.shape == (35, 6) and got.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(before, (*models, base)))
    assert torch.equal(got, mk.reference_sparse_task_merge(models, base, [1.0, 1.0], **args))


def test_torch_mode_and_float64_take_the_reference():
    models, base = make(101, torch.float64, "distinct", count=2)
    got = mk.sparse_task_merge(models, base, [1.0, 2.0], sparsify="magnitude", densities=[0.5, 0.5])
    assert got.dtype == torch.float64
    assert torch.equal(got, mk.reference_sparse_task_merge(models, base, [1.0, 2.0], sparsify="magnitude",
                                                           densities=[0.5, 0.5]))
    kernels.use("torch")
    assert mk.backend_name("cpu") == "torch"
    kernels.use("auto")
    assert mk.backend_name("cpu") == ("native-cpu" if NATIVE else "torch")


def test_bad_arguments_are_refused():
    models, base = make(10, torch.float32, "distinct", count=2)
    with pytest.raises(ValueError, match="weights"):
        mk.sparse_task_merge(models, base, [1.0])
    with pytest.raises(ValueError, match="shape"):
        mk.sparse_task_merge([models[0], models[1][:5]], base, [1.0, 1.0])
    with pytest.raises(ValueError, match="sparsify"):
        mk.sparse_task_merge(models, base, [1.0, 1.0], sparsify="top")


def test_torch_hash_is_mix32_on_32_bit_integers():
    def mix32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert mk._mix32(torch.tensor(values)).tolist() == [mix32(v) for v in values]
    key = 0x9E3779B9
    assert mk.dare_uniforms(50, key).tolist() == [mix32(mix32(j) ^ key) for j in range(50)]


def test_cuda_rule_rows_describe_the_reference_masks():
    """The CUDA path's cut points (found with torch, here on CPU tensors) select the reference masks."""
    for data, (sparsify, density, gamma) in itertools.product(["ties", "distinct"], RULES):
        (model,), base = make(2049, torch.bfloat16, data, seed=3)
        rule = mk.keep_rule(sparsify, model.numel(), density, gamma, key=11)
        kind, threshold, key, hi_v, hi_c, lo_v, lo_c = mk._cuda_rule_row(model, base, rule)
        keys = mk._magnitude_keys(model.float() - base.float()).long()
        j = torch.arange(model.numel())
        above = (keys > hi_v) | ((keys == hi_v) & (j < hi_c))
        below_hi = (keys < hi_v) | ((keys == hi_v) & (j < hi_c))
        below_lo = (keys < lo_v) | ((keys == lo_v) & (j < lo_c))
        mask = {"all": torch.ones_like(above), "none": torch.zeros_like(above), "top": above,
                "band": below_hi & ~below_lo, "random": mk.dare_uniforms(model.numel(), key) < threshold}[rule.kind]
        assert kind == mk._KIND_CODES[rule.kind]
        assert torch.equal(mask, mk.reference_keep_mask(model, base, sparsify=sparsify, density=density,
                                                        gamma=gamma, key=11)), (data, sparsify, density, gamma)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: the CUDA extension is not built")
def test_cuda_extension_has_the_merge_kernel():
    module = kernels._import_native("_native_cuda")
    assert module is not None and hasattr(module, "sparse_task_apply")


@pytest.mark.slow  # compiles the CUDA kernel for the host
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_merge_math_in_host_emulation(tmp_path):
    """No GPU here: the CUDA kernel's per-entry math, compiled as host code, against a reference whose
    cut points come from stable sorts (every rule kind and input dtype), and its fp16 / bf16
    conversions against CUDA's."""
    binary = tmp_path / "merge_host_emulation"
    build = subprocess.run(
        ["nvcc", "-std=c++17", "-O1", "-x", "cu", str(REPO / "native/cuda/tests/merge_host_emulation.cu"),
         "-o", str(binary), "-I", str(REPO / "native/cpu")],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "merge emulation done, failures 0" in run.stdout, run.stdout[-3000:]
