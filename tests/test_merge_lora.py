"""rlgen.merging.lora: folding peft LoRA adapters while streaming equals peft's merge_and_unload (Linear,
Embedding, Conv, fan_in_fan_out, rslora, lora_bias, rank/alpha patterns, modules_to_save), the result
loads in transformers / diffusers, DIR+ADAPTER merges, and unsupported adapters are one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import rlgen_process
from rlgen.errors import RlgenError
from rlgen.merging.config import from_flags
from rlgen.merging.merge import fold_adapter, merge_models

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "rlgen" / "builtin_models" / "tiny-digits"


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama with untied embeddings (so lm_head can be a modules_to_save target)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("llama") / "base"
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet()
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("gpt2") / "base"
    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=4)).save_pretrained(str(out))
    return out


def randomize_trainables(peft_model) -> None:
    """LoRA B starts at zero and modules_to_save / lora_B.bias as copies: make every one of them matter."""
    g = torch.Generator().manual_seed(3)
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            param.data.add_(0.05 * torch.randn(param.shape, generator=g))


def make_adapter(model, lora_config, out: Path) -> dict[str, torch.Tensor]:
    """Save `model` + a random LoRA as a peft adapter at `out`; peft's merge_and_unload state dict."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config)
    randomize_trainables(peft_model)
    peft_model.save_pretrained(str(out))
    return {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def assert_matches(folded: dict, reference: dict, atol=1e-5) -> None:
    assert set(folded) <= set(reference)  # (a tied lm_head is in the state dict, not in the file)
    for name, value in folded.items():
        assert value.dtype == reference[name].dtype, name
        torch.testing.assert_close(value, reference[name], atol=atol, rtol=0, msg=name)


def test_fold_llama_matches_peft_merge(tmp_path, llama_dir):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.0.self_attn.q_proj": 3},
                        modules_to_save=["lm_head"], init_lora_weights=False)
    adapter = tmp_path / "adapter"
    base_sd = load_file(str(llama_dir / "model.safetensors"))
    reference = make_adapter(AutoModelForCausalLM.from_pretrained(str(llama_dir)), config, adapter)

    summary = fold_adapter(str(llama_dir), str(adapter), str(tmp_path / "folded"))
    folded = load_file(str(tmp_path / "folded" / "model.safetensors"))
    assert summary["tensors"] == len(base_sd) and set(folded) == set(base_sd)
    assert_matches(folded, reference)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(folded[name], base_sd[name]), name  # the adapter really changed these
    assert torch.equal(folded["model.layers.0.self_attn.k_proj.weight"], base_sd["model.layers.0.self_attn.k_proj.weight"])

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "folded"))  # a plain transformers directory
    ids = torch.tensor([[1, 5, 7, 2]])
    merged = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    merged.load_state_dict(reference)
    torch.testing.assert_close(model(ids).logits, merged(ids).logits, atol=1e-5, rtol=0)
    assert not (tmp_path / "folded" / "adapter_config.json").exists()


def test_fold_gpt2_fan_in_fan_out_rslora_bias(tmp_path, gpt2_dir):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=4, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                        use_rslora=True, lora_bias=True, init_lora_weights=False)
    adapter = tmp_path / "adapter"
    reference = make_adapter(AutoModelForCausalLM.from_pretrained(str(gpt2_dir)), config, adapter)
    fold_adapter(str(gpt2_dir), str(adapter), str(tmp_path / "folded"))
    folded = load_file(str(tmp_path / "folded" / "model.safetensors"))
    assert_matches(folded, reference)
    base = load_file(str(gpt2_dir / "model.safetensors"))
    assert not torch.equal(folded["transformer.h.0.attn.c_attn.bias"], base["transformer.h.0.attn.c_attn.bias"])


def test_fold_diffusers_unet_conv_and_attention(tmp_path):
    from diffusers import UNet2DModel
    from peft import LoraConfig

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "conv1", "conv_shortcut"],
                        init_lora_weights=False)
    adapter = tmp_path / "adapter"
    unet = UNet2DModel.from_pretrained(str(DIGITS / "unet"))
    reference = make_adapter(unet, config, adapter)
    summary = fold_adapter("tiny-digits", str(adapter), str(tmp_path / "folded"))
    out = tmp_path / "folded"
    folded = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert summary["tensors"] == len(folded)
    assert_matches(folded, reference)
    base = load_file(str(DIGITS / "unet" / "diffusion_pytorch_model.safetensors"))
    convs = [n for n in folded if n.endswith("conv1.weight")]
    assert convs and all(not torch.equal(folded[n], base[n]) for n in convs)
    UNet2DModel.from_pretrained(str(out / "unet"))
    assert (out / "scheduler" / "scheduler_config.json").read_text() == (DIGITS / "scheduler" / "scheduler_config.json").read_text()


def test_dir_plus_adapter_merges_like_the_fold(tmp_path, llama_dir):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    make_adapter(AutoModelForCausalLM.from_pretrained(str(llama_dir)),
                 LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"], init_lora_weights=False), adapter)
    fold_adapter(str(llama_dir), str(adapter), str(tmp_path / "folded"))
    folded = load_file(str(tmp_path / "folded" / "model.safetensors"))
    # ties of base and base+adapter at density 1: the adapter's delta, all of it
    config = from_flags([f"{llama_dir}+{adapter}"], method="task-arithmetic", base=str(llama_dir), weights=[1.0])
    merge_models(config, str(tmp_path / "merged"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for name, value in folded.items():
        torch.testing.assert_close(merged[name], value, atol=1e-6, rtol=0)
    # an adapter directory alone stands for its base_model_name_or_path + itself
    config = from_flags([str(adapter)], method="linear")
    merge_models(config, str(tmp_path / "alone"))
    alone = load_file(str(tmp_path / "alone" / "model.safetensors"))
    for name, value in folded.items():
        assert torch.equal(alone[name], value), name


def test_unsupported_adapters_are_one_line_errors(tmp_path, llama_dir):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    dora = tmp_path / "dora"
    make_adapter(AutoModelForCausalLM.from_pretrained(str(llama_dir)),
                 LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), dora)
    with pytest.raises(RlgenError, match="use_dora.*DoRA") as err:
        fold_adapter(str(llama_dir), str(dora), str(tmp_path / "out"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    from safetensors.torch import save_file

    save_file({"base_model.model.model.nope.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.model.nope.lora_B.weight": torch.zeros(32, 2)}, str(wrong / "adapter_model.safetensors"))
    with pytest.raises(RlgenError, match="model.nope.lora_A.weight.*model.nope.weight"):
        fold_adapter(str(llama_dir), str(wrong), str(tmp_path / "out"))
    (wrong / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 2, "lora_alpha": 2}))
    with pytest.raises(RlgenError, match="peft_type"):
        fold_adapter(str(llama_dir), str(wrong), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_lora_fold(tmp_path, llama_dir):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    reference = make_adapter(AutoModelForCausalLM.from_pretrained(str(llama_dir)),
                             LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj"], init_lora_weights=False), adapter)
    proc = rlgen_process("merge", llama_dir, "--lora", adapter, "--out", tmp_path / "folded", "--dtype", "bfloat16",
                         "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["method"] == "lora-fold" and summary["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "folded" / "config.json").read_text())["dtype"] == "bfloat16"
    folded = load_file(str(tmp_path / "folded" / "model.safetensors"))
    for name, value in folded.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, reference[name].to(torch.bfloat16)), name
