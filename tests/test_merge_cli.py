"""`rlgen merge` end to end: streaming merges of tiny-arith fine-tunes (sharded output that transformers
loads, weights equal to the direct per-tensor computation, `rlgen eval` runs on it), a diffusers pipeline
merge of tiny-digits, TOML / mergekit YAML configs with gradients and filters, and the error contract
(one line, exit 2, no output directory and nothing left beside it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import merge_error as run_error
from cli_helpers import rlgen_process
from rlgen.merging.config import MergeConfig, ModelEntry, ParameterResolver, load_config, validate
from rlgen.merging.kernels import reference_sparse_task_merge
from rlgen.merging.merge import merge_models
from rlgen.merging.safetensors_io import Checkpoint

REPO = Path(__file__).resolve().parent.parent
ARITH = REPO / "rlgen" / "builtin_models" / "tiny-arith"
DIGITS = REPO / "rlgen" / "builtin_models" / "tiny-digits"
UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"


def perturbed_copy(src: Path, dst: Path, weights: Path, seed: int, scale: float, dtype=None) -> Path:
    """A copy of a model directory whose every tensor in `weights` got Gaussian noise (a "fine-tune")."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(src / weights))
    noisy = {k: (v + scale * torch.randn(v.shape, generator=g)).to(dtype or v.dtype) for k, v in tensors.items()}
    save_file(noisy, str(dst / weights), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finetunes")
    return (perturbed_copy(ARITH, root / "ft1", Path("model.safetensors"), 1, 0.004),
            perturbed_copy(ARITH, root / "ft2", Path("model.safetensors"), 2, 0.004))


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")] if parent.exists() else []


@pytest.mark.slow
def test_ties_merge_is_streamed_sharded_and_exact(tmp_path, finetunes):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    proc = rlgen_process("merge", *finetunes, "--method", "ties", "--base", "tiny-arith", "--density", "0.5,0.3",
                         "--param", "lambda=0.9", "--max-shard-size", "1MB", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["method"] == "ties" and summary["tensors"] == 38 and summary["shards"] >= 2
    assert "merging tensors" in proc.stderr  # rich progress on stderr, JSON alone on stdout
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").read_bytes() == (ARITH / "tokenizer.json").read_bytes()
    assert not leftovers(tmp_path, "merged")

    merged = Checkpoint(out)
    base = load_file(str(ARITH / "model.safetensors"))
    a, b = (load_file(str(f / "model.safetensors")) for f in finetunes)
    assert set(merged.names) == set(base)
    for name in base:
        expected = reference_sparse_task_merge(
            [a[name], b[name]], base[name], [0.5, 0.5], sparsify="magnitude", densities=[0.5, 0.3], gammas=None,
            keys=None, rescale=False, consensus="sum", normalize=True, lam=0.9, out_dtype=torch.float32)
        torch.testing.assert_close(merged.tensor(name), expected, atol=1e-6, rtol=0, msg=name)
    merged.close()

    model = AutoModelForCausalLM.from_pretrained(str(out))
    name = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(model.state_dict()[name], load_file_sharded(out)[name])

    proc = rlgen_process("eval", "--model", out, "--task", "arithmetic", "--limit", "20", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["accuracy"] <= 1.0


def load_file_sharded(directory: Path) -> dict:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out = {}
    for file in set(index["weight_map"].values()):
        out.update(load_file(str(directory / file)))
    return out


YAML_CONFIG = """\
merge_method: task_arithmetic
base_model: tiny-arith
models:
  - model: tiny-arith
  - model: {ft1}
    parameters:
      weight: [0.0, 1.0]
  - model: {ft2}
    parameters:
      weight:
        - filter: self_attn
          value: [1.0, 0.5]
        - value: 0.75
parameters:
  lambda: 0.8
  int8_mask: true
dtype: bfloat16
"""

TOML_CONFIG = """\
merge_method = "task_arithmetic"
base_model = "tiny-arith"
dtype = "bfloat16"
parameters = {{ lambda = 0.8, int8_mask = true }}

[[models]]
model = "tiny-arith"

[[models]]
model = "{ft1}"
parameters = {{ weight = [0.0, 1.0] }}

[[models]]
model = "{ft2}"
parameters = {{ weight = [{{ filter = "self_attn", value = [1.0, 0.5] }}, {{ value = 0.75 }}] }}
"""


@pytest.mark.slow
def test_yaml_and_toml_configs_with_gradients_and_filters(tmp_path, finetunes):
    yml, toml = tmp_path / "merge.yml", tmp_path / "merge.toml"
    yml.write_text(YAML_CONFIG.format(ft1=finetunes[0], ft2=finetunes[1]))
    toml.write_text(TOML_CONFIG.format(ft1=finetunes[0], ft2=finetunes[1]))
    from_yaml, from_toml = load_config(str(yml)), load_config(str(toml))
    assert from_yaml.method == "task-arithmetic" and from_yaml.dtype == "bfloat16"
    assert {**from_yaml.__dict__, "source": ""} == {**from_toml.__dict__, "source": ""}

    resolver = ParameterResolver(from_yaml, validate(from_yaml), Checkpoint(ARITH).names)
    params, global_params = resolver.resolve("model.layers.2.self_attn.q_proj.weight")  # layer 2 of 4: t = 2/3
    assert params[0]["weight"] == pytest.approx(2 / 3) and params[1]["weight"] == pytest.approx(1 - 0.5 * 2 / 3)
    assert global_params == {"lambda": 0.8, "normalize": False}
    params, _ = resolver.resolve("model.layers.3.mlp.up_proj.weight")
    assert params[0]["weight"] == pytest.approx(1.0) and params[1]["weight"] == 0.75
    params, _ = resolver.resolve("model.embed_tokens.weight")  # outside the layers: t = 0
    assert params[0]["weight"] == 0.0 and params[1]["weight"] == 0.75

    out = tmp_path / "merged"
    proc = rlgen_process("merge", "--config", yml, "--out", out, "--quiet", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["models"] == [str(f) for f in finetunes]  # the listed base is left out
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # config follows the output dtype
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(ARITH / "model.safetensors"))
    a, b = (load_file(str(f / "model.safetensors")) for f in finetunes)
    for name in base:
        params, _ = resolver.resolve(name)
        w1, w2 = params[0]["weight"], params[1]["weight"]
        expected = base[name] + 0.8 * (w1 * (a[name] - base[name]) + w2 * (b[name] - base[name]))
        assert merged[name].dtype == torch.bfloat16
        torch.testing.assert_close(merged[name].float(), expected.to(torch.bfloat16).float(), atol=1e-6, rtol=8e-3)


def test_gradient_outside_the_layers_follows_mergekit_pre_and_post_weights():
    """mergekit 0.1.5 plans embeddings and the final norm / lm_head alike at t = 0: the gradient's first value
    (issue 13, item 22: mergekit up to 0.1.1, and rlgen before, gave the final norm / lm_head t = 1)."""
    from rlgen.merging.config import layer_position

    assert layer_position("model.embed_tokens.weight", 4) == 0.0
    assert layer_position("transformer.wte.weight", 4) == 0.0 and layer_position("transformer.wpe.weight", 4) == 0.0
    assert layer_position("model.norm.weight", 4) == 0.0 and layer_position("lm_head.weight", 4) == 0.0
    assert layer_position("transformer.ln_f.weight", 4) == 0.0 and layer_position("embed_out.weight", 4) == 0.0
    assert layer_position("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert layer_position("conv_out.weight", 0) == 0.0  # no numbered layers (a UNet): t = 0 throughout


@pytest.mark.slow
def test_diffusers_pipeline_merge_changes_only_the_unet(tmp_path):
    from diffusers import DiffusionPipeline

    other = perturbed_copy(DIGITS, tmp_path / "digits2", UNET_FILE, 5, 0.01)
    out = tmp_path / "merged"
    proc = rlgen_process("merge", "tiny-digits", other, "--weights", "0.25,0.75", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    files = sorted(str(p.relative_to(DIGITS)) for p in DIGITS.rglob("*") if p.is_file())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == files
    for rel in files:
        if rel != str(UNET_FILE):
            assert (out / rel).read_bytes() == (DIGITS / rel).read_bytes(), rel
    a, b, m = (load_file(str(d / UNET_FILE)) for d in (DIGITS, other, out))
    for name in a:
        torch.testing.assert_close(m[name], 0.25 * a[name] + 0.75 * b[name], atol=1e-6, rtol=0)
    pipe = DiffusionPipeline.from_pretrained(str(out))
    torch.testing.assert_close(dict(pipe.unet.named_parameters())["conv_in.weight"].detach(), m["conv_in.weight"])


def test_slerp_of_two_with_gradient_t(tmp_path, finetunes):
    config = MergeConfig("slerp", [ModelEntry("tiny-arith"), ModelEntry(str(finetunes[0]))], base="tiny-arith",
                         parameters={"t": [0.0, 1.0]})
    merge_models(config, str(tmp_path / "m"))
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    base, ft = load_file(str(ARITH / "model.safetensors")), load_file(str(finetunes[0] / "model.safetensors"))
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # t = 0
    torch.testing.assert_close(merged["model.layers.3.mlp.up_proj.weight"], ft["model.layers.3.mlp.up_proj.weight"])


# --------------------------------------------------------------------------- errors



CONFIG_ERRORS = {
    "unknown-method": ("merge_method: frankenmerge\nmodels: [{{model: tiny-arith}}]\n",
                       ["bad.yml", "'merge_method'", "frankenmerge", "known:"]),
    "unknown-parameter": ("merge_method: ties\nbase_model: tiny-arith\nmodels:\n  - model: {ft1}\n"
                          "    parameters: {{weight: 1.0, densty: 0.5}}\n",
                          ["bad.yml", "'models[0].parameters.densty'", "unknown parameter", "density"]),
    "missing-weight": ("merge_method: ties\nbase_model: tiny-arith\nmodels:\n  - model: {ft1}\n"
                       "    parameters: {{density: 0.5}}\n", ["bad.yml", "'models[0].parameters.weight'", "missing"]),
    "slices": ("merge_method: slerp\nslices:\n  - sources: [{{model: tiny-arith, layer_range: [0, 4]}}]\n"
               "models: [{{model: tiny-arith}}]\n", ["bad.yml", "'slices'", "not supported"]),
    "slerp-three": ("merge_method: slerp\nbase_model: tiny-arith\nparameters: {{t: 0.5}}\n"
                    "models: [{{model: tiny-arith}}, {{model: {ft1}}}, {{model: {ft2}}}]\n",
                    ["bad.yml", "'models'", "exactly 2 models including the base model, got 3"]),
    "no-base": ("merge_method: dare_ties\nmodels: [{{model: {ft1}, parameters: {{weight: 1}}}}]\n",
                ["bad.yml", "'base_model'", "dare-ties", "needs a base model"]),
    "bad-value": ("merge_method: linear\nmodels: [{{model: {ft1}, parameters: {{weight: {{a: 1}}}}}}]\n",
                  ["bad.yml", "'models[0].parameters.weight'", "gradient"]),
    "unknown-key": ("merge_method: linear\nmodel: [{{model: {ft1}}}]\n", ["bad.yml", "'model'", "unknown key"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors(tmp_path, finetunes, case):
    text, expect = CONFIG_ERRORS[case]
    config = tmp_path / "bad.yml"
    config.write_text(text.format(ft1=finetunes[0], ft2=finetunes[1]))
    err = run_error("--config", config, "--out", tmp_path / "out")
    for part in expect:
        assert part in err, (part, err)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_mismatched_models_are_named(tmp_path, finetunes):
    shape = tmp_path / "shape"
    shutil.copytree(ARITH, shape)
    tensors = load_file(str(ARITH / "model.safetensors"))
    save_file({**tensors, "model.norm.weight": torch.ones(64)}, str(shape / "model.safetensors"))
    err = run_error(finetunes[0], shape, "--out", tmp_path / "out")
    assert f"{shape}: tensor 'model.norm.weight' is float32 [64]" in err and "[128]" in err

    dtype = perturbed_copy(ARITH, tmp_path / "dtype", Path("model.safetensors"), 3, 0.0, torch.bfloat16)
    err = run_error("--base", "tiny-arith", "--method", "ties", dtype, "--out", tmp_path / "out")
    assert f"{dtype}: tensor" in err and "bfloat16" in err and "float32" in err

    names = tmp_path / "names"
    shutil.copytree(ARITH, names)
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, str(names / "model.safetensors"))
    err = run_error(finetunes[0], names, "--out", tmp_path / "out")
    assert f"{names} has no tensor 'model.norm.weight'" in err

    err = run_error(finetunes[0], "tiny-digits", "--out", tmp_path / "out")
    assert "diffusers" in err and "causal LM" in err

    err = run_error(finetunes[0], finetunes[1], "--weights", "0.2,0.3,0.5", "--out", tmp_path / "out")
    assert "--weights: got 3 values for 2 models" in err
    err = run_error(finetunes[0], "--method", "ties", "--base", "tiny-arith", "--param", "lamda=2",
                    "--out", tmp_path / "out")
    assert "--param lamda: unknown parameter" in err
    err = run_error(finetunes[0], "no/such/model", "--out", tmp_path / "out")
    assert "unknown model 'no/such/model'" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_failure_midway_leaves_nothing_and_keeps_the_old_output(tmp_path, monkeypatch, finetunes):
    from rlgen.merging import safetensors_io

    out = tmp_path / "deep" / "merged"
    config = MergeConfig("linear", [ModelEntry(str(f), {"weight": 0.5}) for f in finetunes])
    calls = []
    original = safetensors_io.ShardedWriter.write

    def failing_write(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full")
        return original(self, name, tensor)

    monkeypatch.setattr(safetensors_io.ShardedWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        merge_models(config, str(out))
    assert not (tmp_path / "deep").exists()  # not even the parent made for it

    monkeypatch.setattr(safetensors_io.ShardedWriter, "write", original)
    merge_models(config, str(out))
    before = (out / "model.safetensors").read_bytes()
    calls.clear()
    monkeypatch.setattr(safetensors_io.ShardedWriter, "write", failing_write)
    with pytest.raises(OSError):
        merge_models(replace_weights(config, 0.9), str(out))
    assert (out / "model.safetensors").read_bytes() == before  # the previous output is untouched
    assert not leftovers(out.parent, "merged")


def replace_weights(config: MergeConfig, first: float) -> MergeConfig:
    from dataclasses import replace

    return replace(config, models=[replace(config.models[0], parameters={"weight": first}), *config.models[1:]])


def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path, finetunes):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    err = run_error(*finetunes, "--out", precious)
    assert "not a model directory" in err
    assert (precious / "notes.txt").read_text() == "keep me"
