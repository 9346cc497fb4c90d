"""The trainers' log-prob pass on the kernels: the fused lm_head path is taken for HF models (and the
model's own full-logits head is never called), models whose head cannot be split fall back to the
logits kernel, and the GRPO / SFT losses and gradients equal the eager reference on a fixed batch."""
from __future__ import annotations

import json

import pytest
import torch
from test_shared_prefix import make_batch

from cli_helpers import rlgen_process

from rlgen import kernels
from rlgen.models.logprobs import Head, completion_logprobs
from rlgen.algorithms.losses import LossContext, dapo, policy_loss
from rlgen.models.lm_head import split_head


def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).train()


def llama_model(tiny_model_dir):
    from rlgen.models.causal_lm import load_model

    torch.manual_seed(0)
    return load_model(tiny_model_dir, "float32").train()


def softcapped_model():
    """Gemma-2 soft-caps its logits inside forward: lm_head(hidden) is not its logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2)
    return Gemma2ForCausalLM(config).train()


def grpo_loss_and_grads(model, batch, shared: bool, mode: str):
    previous = kernels.use(mode)
    try:
        model.zero_grad(set_to_none=True)
        logp, entropy = completion_logprobs(model, *batch, 0.9, shared_prefix=shared)
        mask = batch[3].float()
        rows = logp.shape[0]
        advantages = torch.linspace(-1.0, 1.0, rows)
        old = logp.detach() - 0.05 * torch.linspace(-1, 1, logp.numel()).view_as(logp)  # ratios off 1: clipping acts
        ctx = LossContext(epsilon=0.2, epsilon_high=0.28, delta=None, importance_sampling_level="token",
                          max_completion_length=batch[2].shape[1], num_items_in_batch=float(mask.sum()),
                          num_sequences_in_batch=float(rows), num_micro_batches=1)
        loss, _ = policy_loss(dapo, logp, old, advantages, mask, ctx)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return float(loss), (entropy.detach() * mask).sum() / mask.sum(), grads
    finally:
        kernels.use(previous)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("which", ["llama", "gpt2", "softcapped"])
def test_grpo_loss_equal_on_kernels_and_reference(tiny_model_dir, which, shared):
    model = {"llama": lambda: llama_model(tiny_model_dir), "gpt2": gpt2_model, "softcapped": softcapped_model}[which]()
    batch = make_batch(model.config.vocab_size)
    loss_r, ent_r, grads_r = grpo_loss_and_grads(model, batch, shared, "reference")
    for mode in ("auto", "torch"):
        loss, ent, grads = grpo_loss_and_grads(model, batch, shared, mode)
        assert loss == pytest.approx(loss_r, rel=1e-5, abs=1e-6)
        assert float(ent) == pytest.approx(float(ent_r), rel=1e-5)
        assert grads.keys() == grads_r.keys() and grads
        for name, grad in grads_r.items():
            scale = grad.abs().max().clamp(min=1e-12)
            assert (grads[name] - grad).abs().max() <= 1e-4 * scale, name


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_fused_head_is_used_and_full_logits_never_built(tiny_model_dir, which):
    model = llama_model(tiny_model_dir) if which == "llama" else gpt2_model()
    split = split_head(model)
    assert split is not None and split[1] is model.get_output_embeddings()
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: calls.append(out.shape))
    try:
        logp, _ = completion_logprobs(model, *make_batch(model.config.vocab_size), 1.0)
        logp.sum().backward()
    finally:
        handle.remove()
    assert calls == []  # the lm_head module never ran: its weight went into the fused kernel
    previous = kernels.use("reference")
    try:
        assert Head(model).lm_head is None  # reference mode: the plain logits path
    finally:
        kernels.use(previous)


def test_head_that_cannot_be_split_falls_back():
    assert split_head(softcapped_model()) is None
    from peft import LoraConfig, get_peft_model

    lora_on_head = get_peft_model(gpt2_model(), LoraConfig(r=2, target_modules=["lm_head", "c_attn"]))
    assert split_head(lora_on_head) is None
    lora_elsewhere = get_peft_model(gpt2_model(), LoraConfig(r=2, target_modules=["c_attn"]))
    assert split_head(lora_elsewhere) is not None


@pytest.mark.slow
def test_sft_run_equal_on_kernels_and_reference(tmp_path, hf_dirs):
    """Two SFT steps through the CLI with each kernel mode end with the same weights (deterministic data)."""
    from safetensors.torch import load_file

    finals = {}
    for mode in ("auto", "reference"):
        out = tmp_path / mode
        rlgen_process("train", "sft", "--model", hf_dirs["llama"], "--data", hf_dirs["data"], "--steps", 2, "--out", out,
                      "--set", "run.threads=1", "--set", f"run.kernels={mode}", "--set", "optim.lr=1e-3", "--quiet",
                      cwd=tmp_path, check=True)
        assert f'kernels = "{mode}"' in (out / "config.toml").read_text()
        finals[mode] = load_file(str(out / "final" / "model.safetensors"))
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        finals[mode + "-loss"] = losses
    assert finals["auto-loss"] == pytest.approx(finals["reference-loss"], rel=1e-5)
    for name, value in finals["reference"].items():
        torch.testing.assert_close(finals["auto"][name], value, rtol=1e-4, atol=1e-6)
