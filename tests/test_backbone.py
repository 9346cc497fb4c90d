"""The backbone protocol (rlgen.models.backbone): which backbone a model directory belongs to (built-ins and
a plugin's), the one reference-policy builder (a frozen copy of the base; the LoRA base with the adapter off)
against the behaviour it replaces, save / load round trips, and each backbone's engine and log-probs."""
from __future__ import annotations

import json

import pytest
import torch

import rlgen.plugins
from rlgen.errors import RlgenError
from rlgen.hookspecs import hookimpl
from rlgen.models.backbone import Backbone, ReferencePolicy, backbone_for, backbone_named, backbones
from rlgen.models.causal_lm import ModelConfig, load_model, load_tokenizer, resolve_model_path
from rlgen.models.logprobs import completion_logprobs

PROMPTS = ["042+917=", "042+917=", "123+456=", "500+500="]
COMPLETIONS = ["959", "960", "579", "1000"]


def _inputs(tokenizer):
    from rlgen.rollout.engine import HFEngine

    engine = HFEngine(None, tokenizer)
    return (*engine.encode_prompts(PROMPTS), *engine.encode_completions(COMPLETIONS))


def _logprobs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return completion_logprobs(model, *inputs)[0] * inputs[3]


def _sgd_step(model, inputs, lr: float = 0.05) -> None:
    """One plain gradient step raising the completions' log-likelihood (the policy moves away from the base)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = -(completion_logprobs(model, *inputs)[0] * inputs[3]).sum()
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g


# --- which backbone --------------------------------------------------------------------------------------

def test_backbone_for_builtins_and_files_only(tmp_path):
    assert backbone_for("tiny-arith").name == "causal-lm"
    assert backbone_for("tiny-digits").name == "diffusers"
    assert backbone_for("tiny-digits-flow").name == "diffusers"
    # decided from the files alone: empty JSON files are enough, nothing is loaded
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text("{}")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "pipe" / "config.json").write_text("{}")  # a pipeline root is the pipeline's, whatever else it holds
    assert backbone_for(str(tmp_path / "lm")).name == "causal-lm"
    assert backbone_for(str(tmp_path / "pipe")).name == "diffusers"
    assert [b.name for b in backbones()][:2] == ["causal-lm", "diffusers"]
    assert all(isinstance(b, Backbone) for b in backbones())


def test_a_directory_of_no_known_kind_is_one_line_listing_the_kinds(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(RlgenError) as info:
        backbone_for(str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "causal-lm (" in message and "diffusers (" in message
    with pytest.raises(RlgenError, match="unknown model 'no-such-model'.*tiny-arith"):
        backbone_for("no-such-model")


def test_each_resolver_names_the_other_backbones_model():
    from rlgen.diffusion.pipeline import resolve_pipeline_path

    with pytest.raises(RlgenError, match="'tiny-digits' is a diffusers pipeline .* not a causal LM: use it with a diffusion"):
        resolve_model_path("tiny-digits")
    with pytest.raises(RlgenError, match="tiny-arith is a Hugging Face causal LM .* not a diffusers pipeline directory"):
        resolve_pipeline_path("tiny-arith")


class DllmBackbone:
    """A plugin backbone claiming directories with a dllm.json (the next issues add dLLMs this way)."""

    name = "test-dllm"
    description = "a test diffusion LM (dllm.json)"

    def claims(self, path):
        return (path / "dllm.json").is_file()

    def resolve(self, name_or_path):
        return name_or_path

    def load(self, model_config):
        raise NotImplementedError

    def save(self, handle, out_dir, merge_lora=True):
        raise NotImplementedError

    def reference_policy(self, handle, model_config):
        raise NotImplementedError

    def rollout_engine(self, handle):
        raise NotImplementedError

    def sequence_logprobs(self, handle, *args, **kwargs):
        raise RlgenError("test-dllm computes no sequence log-probs")


class GreedyBackbone(DllmBackbone):
    """Claims every directory: built-ins are asked first, so it never takes theirs."""

    name = "test-greedy"

    def claims(self, path):
        return True


class TestPlugin:
    @hookimpl
    def register_backbones(self, register):
        register(DllmBackbone.name, DllmBackbone(), DllmBackbone.description)
        register(GreedyBackbone.name, GreedyBackbone())


@pytest.fixture
def plugin_backbones():
    rlgen.plugins.plugin_manager().register(TestPlugin(), name="test-backbones")
    try:
        yield
    finally:
        rlgen.plugins.reset()


def test_a_plugin_backbone_is_found_after_the_builtins(tmp_path, plugin_backbones):
    (tmp_path / "dllm.json").write_text("{}")
    assert backbone_for(str(tmp_path)).name == "test-dllm"  # asked before test-greedy (by name)
    assert backbone_for("tiny-arith").name == "causal-lm"
    assert backbone_for("tiny-digits").name == "diffusers"
    names = [b.name for b in backbones()]
    assert names[:2] == ["causal-lm", "diffusers"] and names.index("test-dllm") < names.index("test-greedy")
    assert isinstance(backbone_named("test-dllm"), Backbone)
    (tmp_path / "other").mkdir()
    assert backbone_for(str(tmp_path / "other")).name == "test-greedy"


def test_the_plugin_is_gone_after_reset(tmp_path):
    (tmp_path / "dllm.json").write_text("{}")
    with pytest.raises(RlgenError, match="not a model directory of any known kind"):
        backbone_for(str(tmp_path))


# --- the reference policy: causal LMs ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def arith():
    path = resolve_model_path("tiny-arith")
    tokenizer = load_tokenizer(path)
    return path, tokenizer, _inputs(tokenizer)


def test_frozen_copy_matches_the_policy_then_stays_fixed(arith):
    path, tokenizer, inputs = arith
    lm = backbone_named("causal-lm")
    handle = lm.load(ModelConfig(path="tiny-arith"))
    assert handle.path == path and handle.tokenizer is not None
    reference = lm.reference_policy(handle, ModelConfig(path="tiny-arith"))
    assert reference.kind == "frozen-copy" and reference.module is not handle.model
    assert not any(p.requires_grad for p in reference.module.parameters())
    before = _logprobs(handle.model, inputs)
    assert torch.equal(reference.logprobs(*inputs) * inputs[3], before)
    _sgd_step(handle.model, inputs)
    after = _logprobs(handle.model, inputs)
    assert (after - before).abs().max() > 1e-3  # the policy moved ...
    assert torch.equal(reference.logprobs(*inputs) * inputs[3], before)  # ... its reference did not


def test_frozen_copy_is_the_base_reloaded_not_the_current_weights(arith):
    """On resume the policy holds a checkpoint's weights; the reference must still be the base."""
    path, _, inputs = arith
    lm = backbone_named("causal-lm")
    handle = lm.load(ModelConfig(path="tiny-arith"))
    base = _logprobs(handle.model, inputs)
    _sgd_step(handle.model, inputs)
    reference = lm.reference_policy(handle, ModelConfig(path="tiny-arith"))
    assert torch.equal(reference.logprobs(*inputs) * inputs[3], base)


def test_lora_adapter_off_is_the_base_model(arith):
    path, _, inputs = arith
    lm = backbone_named("causal-lm")
    config = ModelConfig(path="tiny-arith", lora_r=4, lora_alpha=8.0, lora_target_modules=["q_proj", "v_proj"])
    handle = lm.load(config)
    policy = handle.model
    # LoRA starts as a no-op (B = 0); give the adapter a hand-set delta so the policy differs from its base
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    base_model = load_model(path).eval()
    base = _logprobs(base_model, inputs)
    policy.eval()
    assert (_logprobs(policy, inputs) - base).abs().max() > 1e-3
    reference = lm.reference_policy(handle, config)
    assert reference.kind == "adapter-off" and reference.module is policy  # no second copy of the weights
    assert torch.allclose(reference.logprobs(*inputs) * inputs[3], base, atol=1e-6)
    # hand check of one adapted projection: W x + (alpha / r) * B A x with the adapter on, W x with it off
    q = policy.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, q.in_features)
    w = base_model.model.layers[0].self_attn.q_proj.weight
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    with torch.no_grad():
        assert torch.allclose(q(x), x @ w.T + (8.0 / 4) * (x @ a.T) @ b.T, atol=1e-5)
        with reference.forward():
            assert torch.allclose(q(x), x @ w.T, atol=1e-6)
        assert torch.allclose(q(x), x @ w.T + 2.0 * (x @ a.T) @ b.T, atol=1e-5)  # the adapter is back on after
    # a moving reference needs a copy
    with pytest.raises(RlgenError, match="adapter-off"):
        reference.load_state_dict({})


def test_reference_forward_runs_without_gradients_in_eval_mode_and_restores(arith):
    path, _, _ = arith
    model = load_model(path).train()
    reference = ReferencePolicy(model, "frozen-copy")
    with reference.forward() as module:
        assert module is model and not model.training and not torch.is_grad_enabled()
        with reference.forward():  # re-entering is a no-op
            assert not model.training
        assert not model.training
    assert model.training and torch.is_grad_enabled()
    with pytest.raises(RlgenError, match="no log-prob function"):
        reference.logprobs()


def test_kl_to_an_adapter_off_reference_equals_kl_to_the_loaded_base(arith):
    from rlgen.evaluation.kl import sequence_kl

    path, _, inputs = arith
    lm = backbone_named("causal-lm")
    config = ModelConfig(path="tiny-arith", lora_r=2, lora_target_modules=["q_proj"])
    handle = lm.load(config)
    with torch.no_grad():
        for name, p in handle.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    via_reference = sequence_kl(handle.model, lm.reference_policy(handle, config), *inputs)
    via_model = sequence_kl(handle.model, load_model(path), *inputs)
    assert via_reference["k3"].abs().sum() > 0
    for key in ("k1", "k3", "tokens"):
        assert torch.allclose(via_reference[key], via_model[key], atol=1e-6)


# --- save / load, engines, log-probs --------------------------------------------------------------------

def test_causal_lm_save_load_round_trip(tmp_path, arith):
    _, tokenizer, inputs = arith
    lm = backbone_named("causal-lm")
    handle = lm.load(ModelConfig(path="tiny-arith"))
    _sgd_step(handle.model, inputs)
    lm.save(handle, tmp_path / "saved")
    assert backbone_for(str(tmp_path / "saved")) is lm
    again = lm.load(ModelConfig(path=str(tmp_path / "saved")))
    assert torch.equal(_logprobs(again.model, inputs), _logprobs(handle.model, inputs))
    assert again.tokenizer("042+917=").input_ids == tokenizer("042+917=").input_ids


def test_causal_lm_engine_and_sequence_logprobs(arith):
    from rlgen.rollout.engine import SamplingParams

    _, _, inputs = arith
    lm = backbone_named("causal-lm")
    handle = lm.load(ModelConfig(path="tiny-arith"))
    handle.model.eval()
    out = lm.rollout_engine(handle).generate(["042+917=", "123+456="], SamplingParams(max_new_tokens=5, temperature=0))
    assert out.texts == ["959", "579"]  # the built-in model was trained on three-digit sums
    expected = completion_logprobs(handle.model, *inputs)[0]
    assert torch.equal(lm.sequence_logprobs(handle, *inputs), expected)


def test_diffusers_save_load_round_trip(tmp_path):
    from rlgen.diffusion.pipeline import DiffusionModelConfig

    pipe = backbone_named("diffusers")
    handle = pipe.load(DiffusionModelConfig(path="tiny-digits"))
    assert handle.tokenizer is None and handle.path.name == "tiny-digits"
    with torch.no_grad():
        next(handle.model.denoiser.parameters()).add_(0.01)
    pipe.save(handle, tmp_path / "saved")
    assert backbone_for(str(tmp_path / "saved")) is pipe
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text()) == \
        json.loads((handle.path / "model_index.json").read_text())
    again = pipe.load(DiffusionModelConfig(path=str(tmp_path / "saved")))
    saved, trained = again.model.denoiser.state_dict(), handle.model.denoiser.state_dict()
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)


# --- the reference policy: diffusers pipelines ------------------------------------------------------------

def _denoiser_inputs(model):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((4, *model.latent_shape), generator=generator)
    t = torch.tensor([900, 500, 100, 10])
    cond = model.conditioning(["0", "3", "5", "9"])
    return x, t, cond


def test_diffusers_frozen_copy_and_adapter_off():
    from rlgen.diffusion.pipeline import DiffusionModelConfig

    pipe = backbone_named("diffusers")
    handle = pipe.load(DiffusionModelConfig(path="tiny-digits"))
    model = handle.model.eval()
    x, t, cond = _denoiser_inputs(model)
    with torch.no_grad():
        base = model.predict(x, t, cond)
        with pytest.raises(RuntimeError, match="before the reference policy"):
            model.predict(x, t, cond, reference=True)
        reference = pipe.reference_policy(handle, DiffusionModelConfig(path="tiny-digits"))
        assert reference.kind == "frozen-copy" and model.reference is reference
        for p in model.denoiser.parameters():
            p.add_(0.01)
        assert (model.predict(x, t, cond) - base).abs().max() > 1e-3
        assert torch.equal(model.predict(x, t, cond, reference=True), base)

    lora = pipe.load(DiffusionModelConfig(path="tiny-digits", lora_r=2))
    model = lora.model.eval()
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
        reference = pipe.reference_policy(lora, None)
        assert reference.kind == "adapter-off" and reference.module is model.denoiser
        assert (model.predict(x, t, cond) - base).abs().max() > 1e-3
        assert torch.allclose(model.predict(x, t, cond, reference=True), base, atol=1e-5)


def test_diffusers_engine_and_step_logprobs():
    from rlgen.diffusion.pipeline import DiffusionModelConfig
    from rlgen.diffusion.sampling import DiffusionSamplingParams, denoise_step, make_schedule

    pipe = backbone_named("diffusers")
    handle = pipe.load(DiffusionModelConfig(path="tiny-digits"))
    params = DiffusionSamplingParams(num_steps=4, eta=1.0)
    images = pipe.rollout_engine(handle).generate([{"prompt": "7"}], 2, params, seed=0)
    assert [s["prompt"] for s in images] == ["7", "7"] and images[0]["image"].shape[0] == handle.model.latent_shape[0]
    schedule = make_schedule(handle.model, params.num_steps)
    x, _, cond = _denoiser_inputs(handle.model)
    step = denoise_step(handle.model, schedule, 1, x, cond, None, params, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp = pipe.sequence_logprobs(handle, schedule, 1, x, cond, None, params, step.prev_sample)
        reference = pipe.reference_policy(handle, None)
        ref_logp = reference.logprobs(schedule, 1, x, cond, None, params, step.prev_sample)
    assert logp.shape == (4,) and torch.allclose(logp, step.log_prob)
    assert torch.allclose(ref_logp, step.log_prob)  # nothing trained yet: the reference is the policy

