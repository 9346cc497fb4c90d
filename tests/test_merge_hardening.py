"""Merge numerics and value checks of issue 13: non-finite weights / parameters are errors (item 12),
ranges of density / t / gamma checked before any model is read (item 15), slerp's float64 coefficients
(item 21), and the mergekit 0.1.5 conventions (item 22): gradients give the final norm / lm_head the first
value, TIES keeps at least one entry per tensor, `rescale_norm` (mergekit's norm-preserving rescale)
beside DARE's default 1 / density."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlgen import kernels
from cli_helpers import merge_error as run_error
from cli_helpers import rlgen_ok
from rlgen.merging.config import MergeConfig, ModelEntry, ParameterResolver, validate
from rlgen.merging.kernels import (keep_mask, reference_keep_mask, reference_sparse_task_merge,
                                   sparse_task_merge)
from rlgen.merging.methods import METHODS, _lerp_or_slerp_coefficients, slerp




@pytest.fixture(params=["auto", "torch"])
def backend(request):
    previous = kernels.use(request.param)
    yield request.param
    kernels.use(previous)


# --------------------------------------------------------------------------- items 12 and 15: values

# Models that do not exist: the value checks must come before any model is opened.
GHOSTS = ["no/such/a", "no/such/b", "--base", "no/such/base"]

FLAG_ERRORS = [
    (["--method", "linear", "no/such/a", "no/such/b", "--weights", "nan,1"], "--weights", "finite"),
    (["--method", "linear", "no/such/a", "no/such/b", "--weights", "1,inf"], "--weights", "finite"),
    (["--method", "ties", *GHOSTS, "--param", "lambda=nan"], "--param lambda", "finite"),
    (["--method", "ties", *GHOSTS, "--param", "lambda=-inf"], "--param lambda", "finite"),
    (["--method", "ties", *GHOSTS, "--density", "1.5"], "--density", "(0, 1]"),
    (["--method", "ties", *GHOSTS, "--density", "0"], "--density", "(0, 1]"),
    (["--method", "dare-ties", *GHOSTS, "--density", "-0.2,0.5"], "--density", "(0, 1]"),
    (["--method", "ties", *GHOSTS, "--density", "nan"], "--density", "finite"),
    (["--method", "slerp", "no/such/a", "--base", "no/such/base", "--param", "t=1.5"], "--param t", "[0, 1]"),
    (["--method", "slerp", "no/such/a", "--base", "no/such/base", "--param", "t=[0, -0.5]"], "--param t[1]",
     "[0, 1]"),
    (["--method", "breadcrumbs", *GHOSTS, "--param", "gamma=2"], "--param gamma", "[0, 1]"),
]


@pytest.mark.parametrize("args, where, what", FLAG_ERRORS)
def test_bad_numbers_from_flags_fail_before_any_model_is_read(tmp_path, args, where, what):
    err = run_error(*args, "--out", tmp_path / "out")
    assert f"{where}:" in err and what in err, err
    assert "unknown model" not in err
    assert not (tmp_path / "out").exists()


CONFIG_ERRORS = {
    "nan-weight.yml": ("merge_method: linear\nmodels:\n  - model: no/such/a\n    parameters: {weight: .nan}\n",
                       "'models[0].parameters.weight'"),
    "inf-gradient.yml": ("merge_method: task_arithmetic\nbase_model: no/such/base\nmodels:\n  - model: no/such/a\n"
                         "    parameters: {weight: [0, .inf]}\n", "'models[0].parameters.weight[1]'"),
    "nan-filter.yml": ("merge_method: ties\nbase_model: no/such/base\nparameters:\n  density:\n"
                       "    - {filter: mlp, value: .nan}\n    - {value: 0.5}\nmodels:\n"
                       "  - {model: no/such/a, parameters: {weight: 1}}\n", "'parameters.density[0].value'"),
    "huge-int.yml": ("merge_method: linear\nmodels:\n  - model: no/such/a\n    parameters: {weight: " + "9" * 400
                     + "}\n", "'models[0].parameters.weight'"),
    "nan-lambda.toml": ('merge_method = "ties"\nbase_model = "no/such/base"\nparameters = {lambda = nan}\n'
                        '[[models]]\nmodel = "no/such/a"\nparameters = {weight = 1}\n', "'parameters.lambda'"),
    "density-range.yml": ("merge_method: dare_ties\nbase_model: no/such/base\nmodels:\n  - model: no/such/a\n"
                          "    parameters: {weight: 1, density: [0.5, 1.2]}\n", "'models[0].parameters.density[1]'"),
    "gamma-range.yml": ("merge_method: breadcrumbs\nbase_model: no/such/base\nmodels:\n  - model: no/such/a\n"
                        "    parameters: {weight: 1, gamma: -0.1}\n", "'models[0].parameters.gamma'"),
    "t-range.yml": ("merge_method: slerp\nbase_model: no/such/base\nparameters: {t: 2}\nmodels:\n"
                    "  - model: no/such/a\n", "'parameters.t'"),
    "rescale-norm.yml": ("merge_method: dare_ties\nbase_model: no/such/base\nparameters: {rescale_norm: l3}\n"
                         "models:\n  - {model: no/such/a, parameters: {weight: 1}}\n",
                         "'parameters.rescale_norm': must be one of l1, l2, linf"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_ERRORS))
def test_bad_numbers_in_config_files_name_the_key(tmp_path, name):
    text, key = CONFIG_ERRORS[name]
    (tmp_path / name).write_text(text)
    err = run_error("--config", tmp_path / name, "--out", tmp_path / "out")
    assert f"{name}: key {key}" in err and len(err) < 400, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- item 21: slerp in float64

def test_slerp_coefficients_are_float64_accurate_on_large_tensors():
    """4M float32 entries at an angle of ~0.05 rad: a float32 dot product was off by ~1e-7 in the
    coefficients (growing with size: ~1e-2 at 134M entries); float64 accumulation gives ~1e-14."""
    g = torch.Generator().manual_seed(0)
    n = 4_000_000
    v0 = 1 + 0.05 * torch.randn(n, generator=g)
    v1 = v0 + 0.05 * torch.randn(n, generator=g)
    a, b = v0.double(), v1.double()
    theta = math.acos(float(a @ b) / (float(a.norm()) * float(b.norm())))
    t = 0.3
    expected = (math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta))
    c0, c1 = _lerp_or_slerp_coefficients(v0, v1, t)
    assert abs(c0 - expected[0]) < 1e-10 and abs(c1 - expected[1]) < 1e-10, (c0 - expected[0], c1 - expected[1])
    merged = slerp([v1], v0, [{}], {"t": t}, out_dtype=torch.float32)
    torch.testing.assert_close(merged.double(), expected[0] * a + expected[1] * b, atol=2e-7, rtol=0)


# --------------------------------------------------------------------------- item 22: mergekit 0.1.5

def test_gradients_give_the_final_norm_and_lm_head_the_first_value():
    names = ["model.embed_tokens.weight", *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)),
             "model.norm.weight", "lm_head.weight"]
    config = MergeConfig("task-arithmetic", [ModelEntry("a", {"weight": [0.2, 0.5, 0.8]})], base="base")
    resolver = ParameterResolver(config, validate(config), names)
    weights = {name: resolver.resolve(name)[0][0]["weight"] for name in names}
    assert weights["model.norm.weight"] == 0.2 and weights["lm_head.weight"] == 0.2  # 0.8 before
    assert weights["model.embed_tokens.weight"] == 0.2
    assert [weights[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(3)] == [0.2, 0.5, 0.8]


def test_ties_keeps_at_least_the_largest_entry_of_every_tensor(backend):
    delta = torch.tensor([0.1, -0.7, 0.3, 0.05, 0.2, -0.1, 0.0, 0.4, -0.2, 0.15])
    base = torch.zeros(10)
    for mask in (keep_mask(delta, base, sparsify="magnitude", density=0.05),
                 reference_keep_mask(delta, base, sparsify="magnitude", density=0.05)):
        assert mask.tolist() == [i == 1 for i in range(10)]  # floor(0.05 * 10) = 0 kept nothing before
    merged = METHODS["ties"].fn([delta], base, [{"weight": 1.0, "density": 0.05}],
                                {"lambda": 1.0, "normalize": True, "rescale_norm": None}, keys=[0],
                                out_dtype=torch.float32)
    assert merged.tolist() == [0.0, -0.699999988079071, *[0.0] * 8]


def test_rescale_norm_l1_preserves_each_task_vectors_l1_norm(backend):
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    model = base + torch.tensor([4.0, -1.0, 2.0, 0.5])
    # density 0.5 keeps 4 and 2 (L1 6 of 7.5): scaled by 7.5 / 6 = 1.25
    for fn in (sparse_task_merge, reference_sparse_task_merge):
        out = fn([model], base, [1.0], sparsify="magnitude", densities=[0.5], rescale_norm="l1")
        torch.testing.assert_close(out, base + torch.tensor([5.0, 0.0, 2.5, 0.0]), atol=1e-6, rtol=0)
        plain = fn([model], base, [1.0], sparsify="magnitude", densities=[0.5])
        torch.testing.assert_close(plain, base + torch.tensor([4.0, 0.0, 2.0, 0.0]))


def test_dare_keeps_one_over_density_by_default_and_rescale_norm_replaces_it(backend):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4096, generator=g)
    model = base + torch.randn(4096, generator=g)
    delta = model - base
    mask = reference_keep_mask(model, base, sparsify="random", density=0.3, key=7)
    params = {"lambda": 1.0, "normalize": False, "rescale": True, "rescale_norm": None}
    default = METHODS["dare-linear"].fn([model], base, [{"weight": 1.0, "density": 0.3}], params, keys=[7],
                                        out_dtype=torch.float32)
    torch.testing.assert_close(default, base + torch.where(mask, delta / 0.3, 0.0), atol=1e-5, rtol=1e-5)
    l1 = METHODS["dare-linear"].fn([model], base, [{"weight": 1.0, "density": 0.3}],
                                   {**params, "rescale_norm": "l1"}, keys=[7], out_dtype=torch.float32)
    kept = torch.where(mask, delta, 0.0).double()
    factor = float(delta.double().abs().sum() / kept.abs().sum())
    torch.testing.assert_close((l1 - base).double(), kept * factor, atol=1e-5, rtol=1e-5)
    assert (l1 - base).abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)


def test_rescale_norm_from_a_config_file(tmp_path):
    ft = tmp_path / "ft"
    import shutil

    from safetensors.torch import load_file, save_file

    arith = Path(__file__).resolve().parent.parent / "rlgen" / "builtin_models" / "tiny-arith"
    shutil.copytree(arith, ft)
    tensors = load_file(str(arith / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in tensors.items()},
              str(ft / "model.safetensors"), metadata={"format": "pt"})
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: ties\nbase_model: tiny-arith\nparameters: {{rescale_norm: l1}}\n"
                      f"models:\n  - {{model: {ft}, parameters: {{weight: 1, density: 0.5}}}}\n")
    rlgen_ok("merge", "--config", config, "--out", tmp_path / "out", "--quiet")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    tuned = load_file(str(ft / "model.safetensors"))
    for name in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
        delta, kept = tuned[name] - tensors[name], merged[name] - tensors[name]
        assert kept.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4)
        assert (kept != 0).sum().item() == delta.numel() // 2


# --------------------------------------------------------------------------- round 2: over-long integers,
# duplicate keys, non-finite merged tensors

_DIGITS = "9" * 5000
_HEX = "0x" + "f" * 5000


@pytest.mark.parametrize("param", [f"weight={_DIGITS}", f"weight={_HEX}", f"weight=[0, {_DIGITS}]"])
def test_integers_too_long_to_print_in_params_are_one_line(tmp_path, param):
    err = run_error("no/such/a", "no/such/b", "--method", "linear", "--param", param, "--out", tmp_path / "out")
    assert "--param weight: an integer too long" in err and len(err) < 400, err


LONG_INT_CONFIGS = {
    "seed.yml": f"merge_method: linear\nseed: {_DIGITS}\nmodels: [{{model: no/such/a}}]\n",
    "hex.yml": f"merge_method: linear\nmodels: [{{model: no/such/a, parameters: {{weight: {_HEX}}}}}]\n",
    "hexkey.yml": f"merge_method: linear\nmodels: [{{model: no/such/a}}]\n? {_HEX}\n: 1\n",
    "weight.toml": f'merge_method = "linear"\n[[models]]\nmodel = "no/such/a"\nparameters = {{weight = {_DIGITS}}}\n',
    "hexseed.toml": f'merge_method = "linear"\nseed = {_HEX}\n[[models]]\nmodel = "no/such/a"\n',
}


@pytest.mark.parametrize("name", sorted(LONG_INT_CONFIGS))
def test_integers_too_long_to_print_in_config_files_are_one_line(tmp_path, name):
    (tmp_path / name).write_text(LONG_INT_CONFIGS[name])
    err = run_error("--config", tmp_path / name, "--out", tmp_path / "out")
    assert f"{name}: bad {'TOML' if name.endswith('toml') else 'YAML'} (" in err and "too long" in err, err
    assert len(err) < 400, err


def test_duplicate_keys_in_a_merge_yaml_are_an_error(tmp_path):
    from rlgen.merging.config import load_config

    for text, key in (("merge_method: linear\nmodels: [{model: no/such/a}]\nmerge_method: slerp\n", "merge_method"),
                      ("merge_method: linear\nmodels: [{model: no/such/a, parameters: {weight: 1, weight: 2}}]\n",
                       "weight")):
        (tmp_path / "dup.yml").write_text(text)
        err = run_error("--config", tmp_path / "dup.yml", "--out", tmp_path / "out")
        assert "dup.yml: bad YAML (line" in err and f"duplicate key '{key}'" in err, err
    # a `<<` merge key may still be overridden
    (tmp_path / "anchors.yml").write_text("merge_method: linear\nmodels:\n  - {model: no/such/a, parameters: &p "
                                          "{weight: 1}}\n  - {model: no/such/b, parameters: {<<: *p, weight: 2}}\n")
    assert load_config(str(tmp_path / "anchors.yml")).models[1].parameters == {"weight": 2}


def _raw_safetensors(path: Path, header: bytes) -> None:
    import struct

    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


def test_safetensors_header_with_a_long_integer_or_a_duplicate_key(tmp_path):
    from rlgen.errors import RlgenError
    from rlgen.merging.safetensors_io import read_header

    _raw_safetensors(tmp_path / "long.safetensors",
                     b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, ' + _DIGITS.encode() + b"]}}")
    with pytest.raises(RlgenError, match="not a safetensors file .*integer too long"):
        read_header(tmp_path / "long.safetensors")
    entry = b'{"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'
    _raw_safetensors(tmp_path / "dup.safetensors", b'{"a": ' + entry + b', "a": ' + entry + b"}")
    with pytest.raises(RlgenError, match="not a safetensors file .*'a' appears twice"):
        read_header(tmp_path / "dup.safetensors")
    _raw_safetensors(tmp_path / "ok.safetensors", b'{"a": ' + entry + b"}")
    assert list(read_header(tmp_path / "ok.safetensors")[0]) == ["a"]


def test_a_nan_in_an_input_fails_the_merge_and_leaves_no_output(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    arith = Path(__file__).resolve().parent.parent / "rlgen" / "builtin_models" / "tiny-arith"
    nan_model = tmp_path / "nanm"
    shutil.copytree(arith, nan_model)
    tensors = load_file(str(arith / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(nan_model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "merged" / "m"
    err = run_error(nan_model, "tiny-arith", "--method", "linear", "--out", out)
    assert f"tensor '{name}': the merged values are not finite" in err and str(nan_model) in err, err
    assert not (tmp_path / "merged").exists()  # no output, no temp dir, not even the parent made for it
